"""Health and alerts: RPO over threshold, missed heartbeats, Critical; deduplicated while the
condition lasts, cleared when it ends."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from drsite.replication.report import Health
from drsite.vault.db.models import Item
from drsite.vault.health import item_health
from drsite.vault.testing import Harness, point, report, vm_info

VMS = [vm_info("vm-1", "web1")]


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    hh = Harness(tmp_path / "vault")
    yield hh
    hh.close()


def alerts(h: Harness, kind: str, state: str = "active") -> list[dict[str, object]]:
    return [a for a in h.entries(f"/alerts?state={state}") if a["kind"] == kind]


def test_agent_down_after_three_missed_heartbeats(h: Harness) -> None:
    h.site("prim")
    a = h.register("prim", "hv1")
    a.beat()
    h.clock.advance(5.9)  # 3 x 2 s not yet passed
    h.tick()
    assert alerts(h, "agent_down") == [] and h.ok("GET", "/hosts")[0]["up"] is True
    h.clock.advance(0.2)
    h.tick()
    h.clock.advance(10)
    h.tick()
    (al,) = alerts(h, "agent_down")
    assert al["subject"] == "hv1" and al["severity"] == "warning"
    assert h.ok("GET", "/hosts")[0]["up"] is False
    a.beat()
    h.tick()
    assert alerts(h, "agent_down") == []
    assert len(alerts(h, "agent_down", "cleared")) == 1
    # a new outage is a new alert
    h.clock.advance(7)
    h.tick()
    assert len(alerts(h, "agent_down")) == 1 and len(alerts(h, "agent_down", "cleared")) == 1


def test_rpo_alert_raised_once_and_cleared(tmp_path: Path) -> None:
    h = Harness(tmp_path / "vault", heartbeat_interval=600.0)  # keep agents "up" in this test
    try:
        h.site("prim")
        h.site("sec")
        a, b = h.register("prim", "hv1"), h.register("sec", "hv2")
        assert h.set_store("sec", "hv2").status_code == 200
        a.beat(vms=VMS)
        b.beat(store_url="https://127.0.0.1:9443")
        h.ok("POST", "/policies", json={"name": "p1", "frequency_s": 30, "rpo_threshold_s": 120})
        h.ok("POST", "/groups", json={"name": "g1", "site": "prim", "target_site": "sec", "policy": "p1"})
        item_id = h.ok("POST", "/items", json={"vm_id": "vm-1", "group": "g1"})["item_id"]
        h.tick()
        a.beat(vms=VMS, items=[{"item_id": item_id, "report": report(item_id, "vm-1", "web1"),
                                "new_points": [point(item_id, 1, h.clock.now())]}])
        h.tick()
        assert h.ok("GET", f"/items/{item_id}")["health"] == "normal"
        for _ in range(5):
            h.clock.advance(60)
            h.tick()
        item = h.ok("GET", f"/items/{item_id}")
        assert item["health"] == "warning" and item["rpo_s"] == 300
        assert "exceeds the threshold of 120 s" in item["health_reasons"][0]
        (al,) = alerts(h, "rpo")  # one alert however many ticks saw the condition
        assert al["raised_at"] == h.clock.now() - 120 and al["last_seen_at"] == h.clock.now()
        a.beat(vms=VMS, items=[{"item_id": item_id, "report": report(item_id, "vm-1", "web1"),
                                "new_points": [point(item_id, 2, h.clock.now())]}])
        h.tick()
        assert alerts(h, "rpo") == [] and alerts(h, "rpo", "cleared")[0]["cleared_at"] == h.clock.now()
        assert h.ok("GET", f"/items/{item_id}")["health"] == "normal"
        metrics = h.client.get("/api/v1/metrics").text
        assert f'drsite_item_rpo_seconds{{item="{item_id}",vm="web1"}} 0.0' in metrics
    finally:
        h.close()


def _item(**kw: object) -> Item:
    base: dict[str, object] = dict(id="i-1", host_id="h", vm_id="v", vm_name="web1", group_id=1,
                                   target_site_id=2, status="protected", state="protected", report={},
                                   retry={}, critical_error=None, last_point_time=1000.0)
    base.update(kw)
    return Item(**base)


def test_item_health_rules() -> None:
    assert item_health(_item(), None, True, 1010).reasons == ["the item's group has no policy"]
    from drsite.vault.db.models import Policy
    p = Policy(name="p", rpo_threshold_s=60.0)
    assert item_health(_item(), p, True, 1010).health is Health.NORMAL
    assert item_health(_item(), p, True, 1061).health is Health.WARNING
    assert item_health(_item(last_point_time=None, state="initial_replication"), p, True, 9999).health \
        is Health.NORMAL
    w = item_health(_item(state="resync_required"), p, True, 1010)
    assert w.health is Health.WARNING and w.reasons[0].startswith("resync pending")
    assert item_health(_item(), p, False, 1010).reasons == ["source agent is not sending heartbeats"]
    r = item_health(_item(retry={"failures": 2, "last_error": {"message": "net"}}), p, True, 1010)
    assert r.health is Health.WARNING and "2 transient failure(s): net" in r.reasons[0]
    c = item_health(_item(critical_error={"message": "chain broken", "hint": "resync"}), p, True, 1010)
    assert c.health is Health.CRITICAL and c.reasons == ["critical: chain broken; resync"]
    assert item_health(_item(status="failed"), p, True, 1010).health is Health.CRITICAL


def test_store_damage_health_rules() -> None:
    """Newest damaged and being repaired: warning; newest damaged and not repairable: critical;
    after a repair only older points are damaged: warning, with their count."""
    from drsite.vault.db.models import Policy
    from drsite.vault.scrub import Damage
    p = Policy(name="p", rpo_threshold_s=60.0)
    assert item_health(_item(), p, True, 1010, Damage()).health is Health.NORMAL
    newest = Damage({"p3": "corrupt object packs/ab"}, newest="p3")
    w = item_health(_item(), p, True, 1010, newest)
    assert w.health is Health.WARNING
    assert w.reasons == ["the newest recovery point p3 is damaged in the store (corrupt object "
                         "packs/ab); it is being repaired from the source (a resync against what "
                         "the store can restore)"]
    c = item_health(_item(status="failed_over"), p, True, 1010, newest)
    assert c.health is Health.CRITICAL and "cannot be repaired while the item is failed_over" \
        in c.reasons[0]
    # repaired: p4 is the newest and intact; p1..p3 stay damaged (refused, not repairable)
    older = Damage({f"p{i}": "missing object maps/cd" for i in (1, 2, 3)}, newest="p4")
    o = item_health(_item(), p, True, 1010, older)
    assert o.health is Health.WARNING, o
    assert o.reasons[0].startswith("3 older recovery point(s) cannot be restored (p1, p2, p3)")
    # both: the newest is damaged again while older ones are: still warning while repairable
    both = Damage({"p1": "x", "p4": "y"}, newest="p4")
    assert item_health(_item(), p, True, 1010, both).health is Health.WARNING
    assert item_health(_item(status="committed"), p, True, 1010, both).health is Health.CRITICAL


def test_sync_alert_follows_the_agents_sync_line(tmp_path: Path) -> None:
    """A synchronous item whose agent reports 'sync mode suspended: …' has a sync_suspended
    alert and a warning; the alert clears when the line goes (back in sync)."""
    h = Harness(tmp_path / "vault", heartbeat_interval=600.0)
    try:
        h.site("prim")
        h.site("sec")
        a, b = h.register("prim", "hv1"), h.register("sec", "hv2")
        assert h.set_store("sec", "hv2").status_code == 200
        a.beat(vms=VMS)
        b.beat(store_url="https://127.0.0.1:9443")
        p = h.ok("POST", "/policies", json={"name": "zero", "frequency_s": 30, "mode": "sync",
                                            "sync_budget_ms": 20})
        assert p["mode"] == "sync" and p["sync_budget_ms"] == 20
        h.ok("POST", "/groups", json={"name": "g1", "site": "prim", "target_site": "sec",
                                      "policy": "zero"})
        item_id = h.ok("POST", "/items", json={"vm_id": "vm-1", "group": "g1"})["item_id"]
        h.tick()
        line = ("sync mode suspended: a write waited more than the latency budget of 20 ms "
                "for the recovery site; writes replicate asynchronously until the next "
                "recovery point")
        rep = {**report(item_id, "vm-1", "web1"), "agent_issues": [line]}
        a.beat(vms=VMS, items=[{"item_id": item_id, "report": rep,
                                "new_points": [point(item_id, 1, h.clock.now())]}])
        h.tick()
        (al,) = alerts(h, "sync_suspended")
        assert al["severity"] == "warning" and "latency budget of 20 ms" in str(al["message"])
        item = h.ok("GET", f"/items/{item_id}")
        assert item["health"] == "warning" and line in item["health_reasons"]
        a.beat(vms=VMS, items=[{"item_id": item_id, "report": report(item_id, "vm-1", "web1")}])
        h.tick()
        assert alerts(h, "sync_suspended") == []
        assert len(alerts(h, "sync_suspended", "cleared")) == 1
        assert h.ok("GET", f"/items/{item_id}")["health"] == "normal"
    finally:
        h.close()


def test_policy_mode_is_checked(h: Harness) -> None:
    for bad in ({"mode": "semi"}, {"mode": "sync", "sync_budget_ms": 0},
                {"sync_budget_ms": 60_001}):
        r = h.call("POST", "/policies", json={"name": "bad", **bad})
        assert r.status_code == 400 and r.json()["code"] == "invalid_input", r.text
    p = h.ok("POST", "/policies", json={"name": "plain"})
    assert p["mode"] == "async" and p["sync_budget_ms"] == 50
