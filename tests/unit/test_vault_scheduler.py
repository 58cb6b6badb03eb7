"""The vault's scheduler with a fake clock: cycles on time (one outstanding at most),
app-consistent points, retention hourly, retries after 1/2/4/8/10/30 min, permanent → Critical,
resync only inside the window unless started by hand."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from drsite.core.states import ItemProtection
from drsite.replication.report import ItemState
from drsite.vault import commands, storeacl
from drsite.vault.db.models import Item
from drsite.vault.testing import Agent, Harness, point, report, vm_info

VMS = [vm_info("vm-1", "web1")]
MIDNIGHT = 1_700_006_400.0  # 2023-11-15 00:00 UTC
NET = {"code": "network", "class": "transient", "message": "store unreachable", "hint": "retries"}
BROKEN = {"code": "broken_chain", "class": "permanent", "message": "chain broken", "hint": "resync"}


@pytest.fixture(params=["sqlite", "postgresql"])
def h(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Harness]:
    """A vault on SQLite, and on PostgreSQL (the scheduler's candidates query joins the
    policy; its writes are executemany batches)."""
    url = request.getfixturevalue("pg_url") if request.param == "postgresql" else None
    hh = Harness(tmp_path / "vault", url)
    hh.clock.t = MIDNIGHT + 12 * 3600  # noon UTC: outside the default resync window
    yield hh
    hh.close()


def protected(h: Harness, **policy: Any) -> tuple[Agent, str]:
    a, _store, item_id = protected_with_store(h, **policy)
    return a, item_id


def protected_with_store(h: Harness, **policy: Any) -> tuple[Agent, Agent, str]:
    """(the source agent, the store-serving agent of the target site, the item)."""
    h.site("prim")
    h.site("sec")
    a, b = h.register("prim", "hv1"), h.register("sec", "hv2")
    assert h.set_store("sec", "hv2").status_code == 200
    a.beat(vms=VMS)
    b.beat(store_url="https://127.0.0.1:9443")
    h.ok("POST", "/policies", json={"name": "p1", "frequency_s": 30, "app_consistent_every_s": None,
                                    **policy})
    h.ok("POST", "/groups", json={"name": "g1", "site": "prim", "target_site": "sec", "policy": "p1"})
    item_id = h.ok("POST", "/items", json={"vm_id": "vm-1", "group": "g1"})["item_id"]
    h.store_beat()  # the store receives and confirms the item's grant
    h.tick()
    (cmd,) = [c for c in a.beat(vms=VMS)["commands"] if c["kind"] == "protect"]
    a.beat(vms=VMS, items=[{"item_id": item_id, "report": report(item_id, "vm-1", "web1"),
                            "new_points": [point(item_id, 1, h.clock.now())]}])
    a.result(cmd["command_id"], "succeeded")
    h.tick()
    assert h.ok("GET", f"/items/{item_id}")["protection"] == "protected"
    return a, b, item_id


def sent(h: Harness, kind: str | None = None) -> list[Any]:
    return [c for c in h.vault.scheduler.tick() if kind is None or c.kind == kind]


def test_cycles_on_time_and_never_two_outstanding(h: Harness) -> None:
    a, _item_id = protected(h)
    t0 = h.clock.now()
    h.clock.advance(10)
    assert sent(h, "cycle") == []
    h.clock.advance(20)
    (c1,) = sent(h, "cycle")
    assert c1.args == {"app_consistent": False}
    for _ in range(4):  # the agent is slow: nothing more is sent while one is outstanding
        h.clock.advance(30)
        assert sent(h, "cycle") == []
    a.result(c1.id, "succeeded")
    (c2,) = sent(h, "cycle")
    assert c2.created_at == t0 + 150
    # anchored to send times: the next one is due 30 s after c2 was sent
    a.result(c2.id, "succeeded")
    h.clock.advance(29)
    assert sent(h, "cycle") == []
    h.clock.advance(1)
    assert len(sent(h, "cycle")) == 1



def test_app_consistent_points_at_the_policy_frequency(h: Harness) -> None:
    a, _ = protected(h, app_consistent_every_s=90)
    flags = []
    for _ in range(7):
        h.clock.advance(30)
        (c,) = sent(h, "cycle")
        flags.append(c.args["app_consistent"])
        a.result(c.id, "succeeded")
    assert flags == [True, False, False, True, False, False, True]


def test_retention_hourly(h: Harness) -> None:
    """Hourly, and sent to the agent whose store holds the item (remote clients may not delete
    committed objects), with the policy's settings."""
    a, store, _ = protected_with_store(h)
    times = []
    for _ in range(int(3 * 3600 / 300)):
        h.clock.advance(300)
        for c in sent(h):
            if c.kind == "retention":
                assert c.host_id == store.host_id and c.args["store_side"] is True
                assert c.args["settings"]["retention_hours"] > 0
                store.result(c.id, "succeeded")
                times.append(c.created_at)
            else:
                a.result(c.id, "succeeded")
    assert [round(t2 - t1) for t1, t2 in itertools.pairwise(times)] == [3600, 3600]


def test_transient_failures_retry_after_1_2_4_8_10_then_30_minutes(h: Harness) -> None:
    a, item_id = protected(h, frequency_s=900, rpo_threshold_s=3600)
    h.clock.advance(900)
    (c,) = sent(h, "cycle")
    gaps = []
    for _ in range(7):
        a.result(c.id, "failed", error=NET)
        failed_at = h.clock.now()
        item = h.ok("GET", f"/items/{item_id}")
        assert item["last_error"]["code"] == "network" and item["next_attempt_at"] > failed_at
        while not (cycles := sent(h, "cycle")):
            h.clock.advance(15)
        gaps.append((h.clock.now() - failed_at) / 60)
        c = cycles[0]
    assert [round(g) for g in gaps] == [1, 2, 4, 8, 10, 30, 30]
    assert h.ok("GET", f"/items/{item_id}")["health"] == "warning"
    a.result(c.id, "succeeded")
    item = h.ok("GET", f"/items/{item_id}")
    assert item["last_error"] is None and item["next_attempt_at"] is None
    h.clock.advance(899)
    assert sent(h, "cycle") == []  # back to the policy's frequency


def test_first_network_retry_is_early_when_the_store_agent_is_back(h: Harness) -> None:
    """Issue 19: a cycle that failed because the recovery site's agent restarted is retried as
    soon as that agent heartbeats again (two heartbeat intervals at least), not after the
    seed's first minute; a second failure follows the seed's schedule."""
    a, _ = protected(h, frequency_s=30)
    h.clock.advance(30)
    (c,) = sent(h, "cycle")
    a.result(c.id, "failed", error=NET)
    h.clock.advance(1)
    assert sent(h, "cycle") == []                 # not at once: give the peer a moment
    h.clock.advance(3)
    assert sent(h, "cycle") == []                 # the store's agent is not heartbeating
    store = next(x for x in h.ok("GET", "/hosts") if x["store_url"])
    assert store["up"] is False
    b = next(x for x in h.agents if x.name == "hv2")  # the same host, its agent back
    b.beat(store_url="https://127.0.0.1:9443")
    (c,) = sent(h, "cycle")
    a.result(c.id, "failed", error=NET)           # the link itself is down: seed schedule
    h.clock.advance(60)
    b.beat(store_url="https://127.0.0.1:9443")
    assert sent(h, "cycle") == []
    h.clock.advance(61)
    b.beat(store_url="https://127.0.0.1:9443")
    assert len(sent(h, "cycle")) == 1


def test_first_network_retry_goes_as_soon_as_the_store_agent_beats_after_the_failure(
        h: Harness) -> None:
    """Crash campaign: the store's agent was killed and is back half a second after the cycle
    failed — its heartbeat after the failure says so: the retry goes then, not two heartbeat
    intervals after the failure. Once per run of failures, as before."""
    a, _ = protected(h, frequency_s=30)
    h.clock.advance(30)
    (c,) = sent(h, "cycle")
    a.result(c.id, "failed", error=NET)
    h.clock.advance(0.1)
    assert sent(h, "cycle") == []                 # no heartbeat of the store since
    h.clock.advance(0.4)
    b = next(x for x in h.agents if x.name == "hv2")
    b.beat(store_url="https://127.0.0.1:9443")   # its first heartbeat after the restart
    (c,) = sent(h, "cycle")
    a.result(c.id, "failed", error=NET)           # again: the link itself is down
    h.clock.advance(0.5)
    b.beat(store_url="https://127.0.0.1:9443")
    assert sent(h, "cycle") == []                 # the seed's schedule now


def test_every_restart_of_the_store_agent_earns_one_retry_at_once(h: Harness) -> None:
    """The crash campaign kills the store's agent twice in a row: the second failure used to
    wait the seed's two minutes although the agent was back in seconds. Each restart after the
    last failure (its first heartbeat says ``restarted``) now earns one retry at once; a
    failure with no restart since (the link is down, the agent is not) follows the schedule."""
    a, item_id = protected(h, frequency_s=30)
    b = next(x for x in h.agents if x.name == "hv2")
    h.clock.advance(30)
    (c,) = sent(h, "cycle")
    for failures in (1, 2, 3):
        a.result(c.id, "failed", error=NET)
        h.clock.advance(0.5)
        b.beat(store_url="https://127.0.0.1:9443", restarted=True)  # back: a new process
        (c,) = sent(h, "cycle")
        assert h.ok("GET", f"/items/{item_id}")["last_error"]["code"] == "network", failures
    a.result(c.id, "failed", error=NET)           # no restart since: the seed's schedule
    for _ in range(3):
        h.clock.advance(5)
        b.beat(store_url="https://127.0.0.1:9443")
        assert sent(h, "cycle") == []
    h.clock.advance(5)
    b.beat(store_url="https://127.0.0.1:9443", restarted=True)  # killed and back once more
    (c,) = sent(h, "cycle")
    a.result(c.id, "succeeded")
    assert h.ok("GET", f"/items/{item_id}")["last_error"] is None


def test_permanent_failure_makes_the_item_critical_and_stops_it(h: Harness) -> None:
    a, item_id = protected(h)
    h.clock.advance(30)
    (c,) = sent(h, "cycle")
    a.result(c.id, "failed", error=BROKEN)
    h.tick()
    item = h.ok("GET", f"/items/{item_id}")
    assert item["state"] == "critical" and item["health"] == "critical"
    assert "chain broken" in item["health_reasons"][0] and "resync" in item["health_reasons"][0]
    alerts = h.entries("/alerts?state=active")
    assert [x["subject"] for x in alerts if x["kind"] == "critical"] == ["web1"]
    for _ in range(12):
        h.clock.advance(600)
        assert sent(h) == []
        a.beat(vms=VMS)
    # an operator resyncs by hand: at once, outside the window, Critical cleared
    job = h.ok("POST", f"/items/{item_id}/resync")
    h.tick()
    (rs,) = [x for x in a.beat(vms=VMS)["commands"] if x["kind"] == "resync"]
    assert rs["args"] == {"by_hand": True, "from_store": True}  # compared with what the store restores
    assert h.ok("GET", f"/items/{item_id}")["state"] == "resync_required"
    assert sent(h, "cycle") == []  # the job owns the item while it runs
    a.result(rs["command_id"], "succeeded")
    a.beat(vms=VMS, items=[{"item_id": item_id, "report": report(item_id, "vm-1", "web1"),
                            "new_points": [point(item_id, 2, h.clock.now())]}])
    h.tick()
    assert h.job(job["job_id"])["state"] == "succeeded"
    assert h.ok("GET", f"/items/{item_id}")["health"] == "normal"
    assert [x for x in h.entries("/alerts?state=active") if x["kind"] == "critical"] == []
    assert "critical" in [x["kind"] for x in h.entries("/alerts?state=cleared")]
    # replication goes on at once (the tick that ended the job scheduled a cycle)
    assert "cycle" in [x["kind"] for x in a.beat(vms=VMS)["commands"]]


def flip(h: Harness, item_id: str, status: ItemProtection) -> None:
    with h.vault.db.tx() as s:
        row = s.get(Item, item_id)
        assert row is not None
        storeacl.set_status(row, status, h.clock.now())


# as the source's engine reports a store's refusal: a failure to retry (it cannot tell why)
FORBIDDEN = {"code": "forbidden", "class": "transient", "hint": "scope",
             "message": "host hv1 may not put items/x/staging/y: item x is not assigned to it"}


def test_a_store_refusal_for_a_grant_in_flight_is_retried_once_confirmed(h: Harness) -> None:
    """Issue 19 (found by the crash campaign): after a cancelled failover the item is writable
    again, but until the store's agent holds a list that says so it refuses the source's
    writes ('not assigned'). A cycle refused then is not Critical: it is retried as soon as the
    store's agent confirms the list — and a refusal while the vault's grant is confirmed stays
    permanent (Critical: someone else's item)."""
    a, b, item_id = protected_with_store(h)
    flip(h, item_id, ItemProtection.FAILED_OVER)   # a failover: the store holds it read-only
    b.beat(store_url=b.store_url)
    b.beat(store_url=b.store_url)
    flip(h, item_id, ItemProtection.PROTECTED)     # its cancel: writable again, in the vault
    h.clock.advance(30)
    (c,) = sent(h, "cycle")
    a.result(c.id, "failed", error=FORBIDDEN)
    h.tick()
    item = h.ok("GET", f"/items/{item_id}")
    assert item["state"] != "critical" and item["health"] != "critical", item
    assert [x for x in h.entries("/alerts?state=active") if x["kind"] == "critical"] == []
    h.clock.advance(5)
    assert sent(h, "cycle") == []   # the store has not confirmed the list: no attempt
    b.beat(store_url=b.store_url)   # receives the writable list
    b.beat(store_url=b.store_url)   # confirms it
    (c2,) = sent(h, "cycle")        # retried at once, not after the seed's first minute
    a.result(c2.id, "succeeded")
    # with the grant confirmed, a refusal is what it says: permanent
    h.clock.advance(30)
    (c3,) = sent(h, "cycle")
    a.result(c3.id, "failed", error=FORBIDDEN)
    h.tick()
    assert h.ok("GET", f"/items/{item_id}")["state"] == "critical"


def test_nothing_is_sent_before_the_source_is_told_its_item_is_back(h: Harness) -> None:
    """Issue 19 (found by the crash campaign): a cancel whose source agent was down ends with
    the hand-back (``failover_resume_source``, the new generation) queued for it. The
    scheduler must not send a cycle before that command ran: the restarted agent would write
    with the old generation, be fenced, and the item would stay Critical."""
    a, item_id = protected(h)
    with h.vault.db.tx() as s:
        back = commands.enqueue(s, host_id=a.host_id, kind="failover_resume_source",
                                item_id=item_id, args={"generation": 3, "power_on": False},
                                now=h.clock.now())
        back_id = back.id
    h.clock.advance(30)
    assert sent(h) == []
    h.clock.advance(30)
    assert sent(h) == []
    a.result(back_id, "succeeded", result={})
    assert [c.kind for c in sent(h)] == ["cycle"]


def test_tracking_lost_is_not_critical(h: Harness) -> None:
    a, item_id = protected(h)
    h.clock.advance(30)
    (c,) = sent(h, "cycle")
    a.result(c.id, "failed", error={"code": "tracking_lost", "class": "permanent",
                                    "message": "log lost", "hint": ""})
    assert h.ok("GET", f"/items/{item_id}")["state"] != "critical"


def test_resync_only_inside_the_window(h: Harness) -> None:
    a, item_id = protected(h)
    a.beat(vms=VMS, items=[{"item_id": item_id,
                            "report": report(item_id, "vm-1", "web1", state=ItemState.RESYNC_REQUIRED,
                                             resync_reason="change log over 50%")}])
    h.tick()
    item = h.ok("GET", f"/items/{item_id}")
    assert item["health"] == "warning" and "resync pending" in item["health_reasons"][0]
    # noon → 17:59: no resync and no cycles (the item needs a resync first)
    for _ in range(int(6 * 3600 / 600) - 1):
        h.clock.advance(600)
        assert [c.kind for c in sent(h) if c.kind in ("resync", "cycle")] == []
    h.clock.t = MIDNIGHT + 18 * 3600
    (rs,) = sent(h, "resync")
    assert rs.args == {"by_hand": False}
    h.clock.advance(60)
    assert sent(h, "resync") == []  # one outstanding at most
    a.result(rs.id, "succeeded")
    a.beat(vms=VMS, items=[{"item_id": item_id, "report": report(item_id, "vm-1", "web1")}])
    h.clock.advance(30)
    assert len(sent(h, "cycle")) == 1


def test_a_custom_window_is_honoured(h: Harness) -> None:
    a, item_id = protected(h, resync_window="11:00-13:00")
    a.beat(vms=VMS, items=[{"item_id": item_id,
                            "report": report(item_id, "vm-1", "web1", state=ItemState.RESYNC_REQUIRED)}])
    assert len(sent(h, "resync")) == 1  # noon is inside 11:00-13:00


def test_late_cycles_are_anchored_on_their_due_time(h: Harness) -> None:
    a, _item_id = protected(h)
    t0 = h.clock.now()
    h.clock.advance(40)  # the scheduler is 10 s late: the cycle was due at t0 + 30
    (c1,) = sent(h, "cycle")
    a.result(c1.id, "succeeded")
    h.clock.advance(19)  # t0 + 59: not yet due
    assert sent(h, "cycle") == []
    h.clock.advance(1)  # t0 + 60: due (anchored on t0 + 30, not on the late send at t0 + 40)
    (c2,) = sent(h, "cycle")
    assert c2.created_at == t0 + 60
