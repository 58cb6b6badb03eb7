"""The vault's group barrier with a fake clock: prepare to every member, seal only once all
are held, a group point only when every member sealed under its hold and committed; a member
that misses the prepare's bound → per-VM points, an alert; at most 16 VMs; failover choice
``latest_group`` resolves every member to the same group point."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from drsite.agent.link import Command as AgentCommand
from drsite.agent.storeacl import retention_keep
from drsite.core.errors import InvalidInput
from drsite.core.retention import RetentionRule
from drsite.vault import barrier
from drsite.vault.barrier import check_members
from drsite.vault.db.models import Group, GroupBarrier, Item, Job, Point
from drsite.vault.jobs.create import create_job
from drsite.vault.jobs.item_actions import start_item_action
from drsite.vault.testing import Agent, Harness, point, report, vm_info

MIDNIGHT = 1_700_006_400.0


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    """The two-phase barrier (the clock cut is tested with ``hc``)."""
    hh = Harness(tmp_path / "vault", barrier_clock_cut=False)
    hh.clock.t = MIDNIGHT + 12 * 3600
    yield hh
    hh.close()


def setup_group(h: Harness, *, consistent: bool = True, app_every: float | None = None
                ) -> tuple[list[Agent], list[str]]:
    """Two source hosts (one VM each) in site prim, a store host in sec, group g1 protected."""
    h.site("prim")
    h.site("sec")
    a1, a2, st = h.register("prim", "hv1"), h.register("prim", "hv2"), h.register("sec", "st")
    assert h.set_store("sec", "st").status_code == 200   # the site's store role
    vms = {a1: [vm_info("vm-a", "vma")], a2: [vm_info("vm-b", "vmb")]}
    for a, v in vms.items():
        a.beat(vms=v)
    st.beat(store_url="https://127.0.0.1:9443")
    h.ok("PUT", "/network-mappings", json={"source_site": "prim", "recovery_site": "sec",
                                           "source_network": "lan", "recovery_network": "dr",
                                           "test_network": "bubble"})
    h.ok("POST", "/policies", json={"name": "p1", "frequency_s": 30,
                                    "app_consistent_every_s": app_every})
    h.ok("POST", "/groups", json={"name": "g1", "site": "prim", "target_site": "sec",
                                  "policy": "p1", "consistent": consistent,
                                  "barrier_timeout_ms": 400})
    items = [h.ok("POST", "/items", json={"vm_id": vm, "group": "g1"})["item_id"]
             for vm in ("vm-a", "vm-b")]
    h.store_beat()
    h.tick()
    for a, item_id, (vm, name) in zip((a1, a2), items, (("vm-a", "vma"), ("vm-b", "vmb")),
                                      strict=True):
        (cmd,) = [c for c in a.beat(vms=vms[a])["commands"] if c["kind"] == "protect"]
        a.beat(vms=vms[a], items=[{"item_id": item_id, "report": report(item_id, vm, name),
                                   "new_points": [point(item_id, 1, h.clock.now())]}])
        a.result(cmd["command_id"], "succeeded")
    h.tick()
    for i in items:
        assert h.ok("GET", f"/items/{i}")["protection"] == "protected"
    return [a1, a2], items


def cmds(a: Agent, kind: str) -> list[dict[str, Any]]:
    return [c for c in a.beat()["commands"] if c["kind"] == kind]


def seal_ok(h: Harness, a: Agent, c: dict[str, Any], seq: int, *, held: bool = True) -> None:
    p = point(c["item_id"], seq, h.clock.now())
    a.beat(items=[{"item_id": c["item_id"], "report": report(c["item_id"], "x", "x"),
                   "new_points": [p]}])
    r = a.result(c["command_id"], "succeeded",
                 result={"point": p, "barrier": {"id": c["args"]["barrier_id"], "held": held,
                                                 "paused_s": 0.01}})
    assert r.status_code == 200, r.text


def test_group_point_from_a_two_phase_barrier(h: Harness) -> None:
    (a1, a2), items = setup_group(h)  # its last tick started the first barrier
    assert h.ok("GET", "/groups/g1")["consistent"] is True
    # no per-item cycles for a consistent group: the barrier's prepares instead
    p1, p2 = cmds(a1, "group_prepare"), cmds(a2, "group_prepare")
    assert len(p1) == len(p2) == 1 and not cmds(a1, "cycle")
    bid = p1[0]["args"]["barrier_id"]
    assert p2[0]["args"]["barrier_id"] == bid and p1[0]["args"]["hold_s"] == 0.4
    a1.result(p1[0]["command_id"], "succeeded", result={"barrier_id": bid})
    assert cmds(a1, "group_seal") == []  # not before every member is held
    a2.result(p2[0]["command_id"], "succeeded", result={"barrier_id": bid})
    (s1,), (s2,) = cmds(a1, "group_seal"), cmds(a2, "group_seal")
    seal_ok(h, a1, s1, 2)
    assert h.ok("GET", "/groups/g1/points") == []  # recorded only when every member committed
    seal_ok(h, a2, s2, 2)
    (gp,) = h.ok("GET", "/groups/g1/points")
    assert gp["id"] == bid and gp["state"] == "committed"
    assert {i: m["point_id"] for i, m in gp["members"].items()} == {i: "p000002" for i in items}
    # failover to the latest multi-VM consistent point: each member to its point of it
    h.clock.advance(1)
    for item_id in items:
        job = h.ok("POST", f"/items/{item_id}/failover/test-failover",
                   json={"point": "latest_group"})
        with h.vault.db.read() as s:
            assert s.get(Job, job["id"]).args["point"] == "p000002"  # type: ignore[union-attr]
        fo = h.ok("GET", f"/items/{item_id}/failovers")[0]
        assert any(f"group point {bid}" in n for n in fo["notes"])


def test_a_plan_keeps_every_member_on_the_group_point_its_first_vm_chose(h: Harness) -> None:
    """A barrier commits on the seals' results; a member's point may reach the catalogue a
    beat later. A plan whose first group resolved before that point arrived must not move a
    later group's VM to the newer group point (found by the causal e2e test: A on one group
    point, B on the next)."""
    (a1, a2), items = setup_group(h)
    for seq in (2, 3):
        for a in (a1, a2):
            (p,) = cmds(a, "group_prepare")
            a.result(p["command_id"], "succeeded", result={})
        (s1,), (s2,) = cmds(a1, "group_seal"), cmds(a2, "group_seal")
        seal_ok(h, a1, s1, seq)
        if seq == 2:
            seal_ok(h, a2, s2, seq)
        else:  # the seal's result first; the point's catalogue beat comes later
            late = point(items[1], seq, h.clock.now())
            a2.result(s2["command_id"], "succeeded",
                      result={"point": late, "barrier": {"id": s2["args"]["barrier_id"],
                                                         "held": True, "paused_s": 0.01}})
        h.clock.advance(31)
        h.tick()
    newest = h.ok("GET", "/groups/g1/points")[0]
    assert newest["state"] == "committed" and newest["members"][items[1]]["point_id"] == "p000003"
    h.clock.advance(1)
    with h.vault.db.tx() as s:
        plan = create_job(s, "plan", target="pl", item_id=None, args={}, now=h.clock.now(),
                          tasks=(("plan_group", "first"),))
        plan_id = plan.id
        job_a = start_item_action(s, items[0], "test-failover",
                                  {"plan_job": plan_id, "point": "latest_group"}, h.clock.now())
        assert job_a.args["point"] == "p000002"  # the newest group point whose points are in
    a2.beat(items=[{"item_id": items[1], "report": report(items[1], "x", "x"),
                    "new_points": [late]}])
    h.clock.advance(5)
    with h.vault.db.tx() as s:
        job_b = start_item_action(s, items[1], "test-failover",
                                  {"plan_job": plan_id, "point": "latest_group"}, h.clock.now())
        assert job_b.args["point"] == "p000002"  # the plan's group point, not the newer one
        # without a plan, the newest whole group point
        assert barrier.latest_group_point(s, s.get(Item, items[0]))[1] == "p000003"  # type: ignore[arg-type]


def test_a_seal_not_under_the_hold_is_no_group_point(h: Harness) -> None:
    (a1, a2), _items = setup_group(h)
    for a in (a1, a2):
        (p,) = cmds(a, "group_prepare")
        a.result(p["command_id"], "succeeded", result={})
    (s1,), (s2,) = cmds(a1, "group_seal"), cmds(a2, "group_seal")
    seal_ok(h, a1, s1, 2)
    seal_ok(h, a2, s2, 2, held=False)  # its guest's hold expired before the seal
    assert h.ok("GET", "/groups/g1/points") == []
    (b,) = h.ok("GET", "/groups/g1/points?all=true")
    assert b["state"] == "partial" and "vmb" in b["message"]
    h.vault.monitor.tick()
    alerts = h.ok("GET", "/alerts?state=active")["entries"]
    assert any(al["key"] == "group_barrier:g1" for al in alerts)


def test_a_silent_member_misses_the_bound_others_are_sealed_at_once(h: Harness) -> None:
    (a1, a2), items = setup_group(h)  # its last tick started the first barrier
    (p1,) = cmds(a1, "group_prepare")
    (p2,) = cmds(a2, "group_prepare")
    a1.result(p1["command_id"], "succeeded", result={})
    h.clock.advance(0.25)  # past the prepare's bound (half of 400 ms); a2 never answers
    h.tick()
    (s1,) = cmds(a1, "group_seal")  # the held member is sealed (and released) now
    (c2,) = cmds(a2, "cycle")  # the silent one gets a per-VM cycle
    assert not cmds(a2, "group_seal")
    # its withdrawn prepare answered late: refused, nothing changes
    assert a2.result(p2["command_id"], "succeeded", result={}).status_code == 409
    seal_ok(h, a1, s1, 2, held=True)
    (b,) = h.ok("GET", "/groups/g1/points?all=true")
    assert b["state"] == "partial" and "vmb" in b["message"]
    assert b["members"][items[1]]["state"] == "missed"
    h.vault.monitor.tick()
    active = h.ok("GET", "/alerts?state=active")["entries"]
    assert any(al["key"] == "group_barrier:g1" for al in active)
    r = h.call("POST", f"/items/{items[0]}/failover/test-failover", json={"point": "latest_group"})
    assert r.status_code == 400 and "no multi-VM consistent" in r.json()["message"]
    # the next barrier commits: the alert clears
    a2.result(c2["command_id"], "succeeded", result={})
    h.clock.advance(30)
    h.tick()
    for a in (a1, a2):
        (p,) = cmds(a, "group_prepare")
        a.result(p["command_id"], "succeeded", result={})
    for a in (a1, a2):
        (sc,) = cmds(a, "group_seal")
        seal_ok(h, a, sc, 3)
    assert len(h.ok("GET", "/groups/g1/points")) == 1
    h.vault.monitor.tick()
    active = h.ok("GET", "/alerts?state=active")["entries"]
    assert not any(al["key"] == "group_barrier:g1" for al in active)


def test_a_refused_prepare_ends_the_barrier_at_once(h: Harness) -> None:
    (a1, a2), _ = setup_group(h)
    (p1,) = cmds(a1, "group_prepare")
    (p2,) = cmds(a2, "group_prepare")
    a1.result(p1["command_id"], "succeeded", result={})
    a2.result(p2["command_id"], "failed", error={"code": "busy", "class": "transient",
                                                 "message": "vmb is busy", "hint": ""})
    assert len(cmds(a1, "group_seal")) == 1 and len(cmds(a2, "cycle")) == 1


def test_at_most_16_vms_and_bound_validated(h: Harness) -> None:
    setup_group(h, consistent=False)
    r = h.call("PUT", "/groups/g1", json={"barrier_timeout_ms": 10})
    assert r.status_code == 400
    h.ok("PUT", "/groups/g1", json={"consistent": True})
    with h.vault.db.read() as s:
        g = s.scalars(select(Group).where(Group.name == "g1")).one()
        check_members(s, g, adding=14)  # 16: fine
        with pytest.raises(InvalidInput, match="at most 16"):
            check_members(s, g, adding=15)


def test_a_member_silent_after_it_held_does_not_stop_the_group(h: Harness) -> None:
    (a1, a2), items = setup_group(h)
    for a in (a1, a2):
        (p,) = cmds(a, "group_prepare")
        a.result(p["command_id"], "succeeded", result={})
    (s1,) = cmds(a1, "group_seal")
    (s2,) = cmds(a2, "group_seal")
    seal_ok(h, a1, s1, 2)  # a2's agent stops after holding: its seal never answers
    h.clock.advance(89)  # max(60 s, 3 periods of 30 s)
    h.tick()
    assert h.ok("GET", "/groups/g1/points?all=true")[0]["state"] == "sealing"
    h.clock.advance(2)
    h.tick()  # the barrier ends; the next round: a2 still has its seal open → a1 alone cycles
    rows = h.ok("GET", "/groups/g1/points?all=true")
    assert rows[1]["state"] == "partial" and "no seal answer" in rows[1]["message"]
    assert rows[0]["state"] == "partial" and "not eligible" in rows[0]["message"]
    assert len(cmds(a1, "cycle")) == 1
    # the late answer still commits a2's per-VM point; no group point appears from it
    seal_ok(h, a2, s2, 2)
    assert h.ok("GET", "/groups/g1/points") == []
    assert h.ok("GET", "/groups/g1/points?all=true")[1]["members"][items[1]]["state"] == "committed"


def barrier_round(h: Harness, agents: list[Agent], seq: int) -> None:
    """One barrier that commits a group point of every member's point ``seq``."""
    for a in agents:
        (p,) = cmds(a, "group_prepare")
        a.result(p["command_id"], "succeeded", result={})
    for a in agents:
        (sc,) = cmds(a, "group_seal")
        seal_ok(h, a, sc, seq)


def test_retention_keeps_the_member_points_of_group_points(h: Harness) -> None:
    """Thinning each member on its own keeps the newest point of each hour: a per-VM point
    after a group point in the same hour would cost the group point its member points, and
    with it the group's only multi-VM consistent failover point. The vault's ``retention``
    names them in ``keep`` and refuses their removal; the group point stays offered."""
    (a1, a2), items = setup_group(h)
    st = h.agents[2]
    barrier_round(h, [a1, a2], 2)  # the group point: p000002 of both
    (gp,) = h.ok("GET", "/groups/g1/points")
    # the next barrier misses (a2 refuses): per-VM points p000003, same hour
    h.clock.advance(30)
    h.tick()
    (p1,) = cmds(a1, "group_prepare")
    (p2,) = cmds(a2, "group_prepare")
    a1.result(p1["command_id"], "succeeded", result={})
    a2.result(p2["command_id"], "failed", error={"code": "busy", "class": "transient",
                                                 "message": "vmb is busy", "hint": ""})
    (s1,), (c2,) = cmds(a1, "group_seal"), cmds(a2, "cycle")
    seal_ok(h, a1, s1, 3)
    p3 = point(items[1], 3, h.clock.now())
    a2.beat(items=[{"item_id": items[1], "report": report(items[1], "x", "x"),
                    "new_points": [p3]}])
    assert a2.result(c2["command_id"], "succeeded", result={"point": p3}).status_code == 200
    assert h.ok("GET", "/groups/g1/points?all=true")[0]["state"] == "partial"
    # two hours on (out of the keep-all hour, within the 24 h retention): retention is due
    h.clock.advance(2 * 3600)
    h.tick()
    rets = [c for c in st.beat(store_url=st.store_url)["commands"] if c["kind"] == "retention"]
    assert {c["item_id"]: c["args"]["keep"] for c in rets} == {i: ["p000002"] for i in items}
    assert all(c["args"]["store_side"] for c in rets)
    # a source that removed one anyway (the rule alone drops it: p000003 is its hour's
    # newest) is refused: the catalogue keeps it
    a1.beat(items=[{"item_id": items[0], "report": report(items[0], "x", "x"),
                    "removed_points": ["p000002"]}])
    assert [p["point_id"] for p in h.entries(f"/items/{items[0]}/points")] == \
        ["p000001", "p000002", "p000003"]
    h.vault.monitor.tick()
    alerts = h.ok("GET", "/alerts?state=active")["entries"]
    assert any(al["key"] == f"point_removal:{items[0]}" for al in alerts)
    (still,) = h.ok("GET", "/groups/g1/points")
    assert still["id"] == gp["id"] and still["complete"] is True
    with h.vault.db.read() as s:
        assert barrier.latest_group_point(s, s.get(Item, items[0]))[1] == "p000002"  # type: ignore[arg-type]
    # p000001 (the initial point, no group point's) goes as the rule says
    a1.beat(items=[{"item_id": items[0], "report": report(items[0], "x", "x"),
                    "removed_points": ["p000001"]}])
    assert [p["point_id"] for p in h.entries(f"/items/{items[0]}/points")] == \
        ["p000002", "p000003"]


def test_group_points_are_thinned_by_the_policy_rule(h: Harness) -> None:
    """Group points are thinned as points are (every one of the last hour, the newest of
    each older hour, none past the retention, the newest always); a member point of a group
    point the rule drops is left to the item's own rule."""
    (_a1, _a2), items = setup_group(h)
    rule = RetentionRule(retention_s=6 * 3600.0, keep_all_s=3600.0, thin_interval_s=3600.0)
    t0 = h.clock.now()
    # group points every 20 minutes over 8 hours, member points p(k) of both items
    with h.vault.db.tx() as s:
        g = s.scalars(select(Group).where(Group.name == "g1")).one()
        for k in range(24):
            at = t0 + k * 1200.0
            s.add(GroupBarrier(id=f"gb{k:03d}", group_id=g.id, state="committed",
                               started_at=at, prepare_deadline=at, hold_deadline=at,
                               ended_at=at + 1, point_time=at,
                               members={i: {"point_id": f"q{k:03d}", "state": "committed",
                                            "held": True} for i in items}))
        g_id = g.id
    now = t0 + 23 * 1200.0 + 60
    with h.vault.db.read() as s:
        kept = barrier.kept_member_points(s, items[0], g_id, rule, now)
    hours = {int((t0 + k * 1200.0) // 3600) for k in range(24)}
    expect = {f"q{k:03d}" for k in range(24) if now - (t0 + k * 1200.0) < 3600}
    for hr in hours:  # the newest of each hour within the retention
        ks = [k for k in range(24) if int((t0 + k * 1200.0) // 3600) == hr]
        k = max(ks)
        if now - (t0 + k * 1200.0) <= rule.retention_s:
            expect.add(f"q{k:03d}")
    assert kept == expect
    assert "q000" not in kept and "q023" in kept and len(kept) < 24
    # an item that is no member of any group point keeps nothing extra
    with h.vault.db.read() as s:
        assert barrier.kept_member_points(s, "it-none", g_id, rule, now) == set()
        # past the whole retention only the newest group point stays
        assert barrier.kept_member_points(s, items[1], g_id, rule, now + 30 * 3600) == {"q023"}


def test_a_group_point_whose_member_point_is_gone_is_not_offered(h: Harness) -> None:
    (a1, a2), items = setup_group(h)
    barrier_round(h, [a1, a2], 2)
    h.clock.advance(30)
    h.tick()
    barrier_round(h, [a1, a2], 3)
    assert [g["complete"] for g in h.ok("GET", "/groups/g1/points")] == [True, True]
    with h.vault.db.tx() as s:  # the newest group point's member of vmb is found damaged
        row = s.scalars(select(Point).where(Point.item_id == items[1],
                                            Point.point_id == "p000003")).one()
        row.damage = {"reason": "test"}
    listed = h.ok("GET", "/groups/g1/points")
    assert [(g["members"][items[0]]["point_id"], g["complete"]) for g in listed] == \
        [("p000003", False), ("p000002", True)]
    h.clock.advance(1)
    job = h.ok("POST", f"/items/{items[0]}/failover/test-failover",
               json={"point": "latest_group"})
    with h.vault.db.read() as s:
        assert s.get(Job, job["id"]).args["point"] == "p000002"  # type: ignore[union-attr]


def test_a_retention_keep_that_is_not_a_list_of_point_ids_is_refused() -> None:
    def cmd(keep: Any) -> AgentCommand:
        return AgentCommand(command_id="c1", kind="retention", item_id="it1",
                            args={"keep": keep})

    assert retention_keep(cmd(["p1", "p2"])) == {"p1", "p2"}
    assert retention_keep(cmd(None)) == set()
    for bad in ("p1", [1], {"p": 1}):
        with pytest.raises(InvalidInput, match="keep"):
            retention_keep(cmd(bad))


@pytest.fixture
def hc(tmp_path: Path) -> Iterator[Harness]:
    """The clock cut (the default)."""
    hh = Harness(tmp_path / "vault")
    hh.clock.t = MIDNIGHT + 12 * 3600
    yield hh
    hh.close()


def cut_ok(h: Harness, a: Agent, c: dict[str, Any], seq: int, *, held: bool = True,
           missed: str | None = None) -> None:
    p = point(c["item_id"], seq, h.clock.now())
    a.beat(items=[{"item_id": c["item_id"], "report": report(c["item_id"], "x", "x"),
                   "new_points": [p]}])
    b: dict[str, Any] = {"id": c["args"]["barrier_id"], "held": held, "paused_s": 0.02}
    if missed:
        b["missed"] = missed
    r = a.result(c["command_id"], "succeeded", result={"point": p, "barrier": b})
    assert r.status_code == 200, r.text


def test_a_clock_cut_is_one_command_per_member_and_two_misses_fall_back_to_two_phase(
        hc: Harness) -> None:
    t0 = barrier.cut_clock()
    (a1, a2), items = setup_group(hc)
    first = a1.beat()["commands"]
    t1 = barrier.cut_clock()   # the cut was made between t0 and t1 (a loaded box: far apart)
    assert [c["kind"] for c in first] == ["group_seal"]  # no prepare round
    (s1,), (s2,) = first, cmds(a2, "group_seal")
    args = s1["args"]
    assert args["cut_at"] == s2["args"]["cut_at"] and args["clock_id"] == barrier.CLOCK_ID
    assert args["hold_s"] == 0.4 and args["margin_s"] == 0.02
    # the cut is 0.6 of the bound ahead, on the vault's cut clock, of the moment it was made
    assert t0 + 0.24 <= args["cut_at"] <= t1 + 0.24
    # the agent's clock endpoint reads that clock
    r = a1.post("/clock", {})
    assert r.status_code == 200 and r.json()["clock_id"] == barrier.CLOCK_ID
    assert abs(r.json()["t"] - barrier.cut_clock()) < 5
    hc.peer = None
    assert hc.client.post("/api/v1/agent/clock", json={}).status_code == 401
    cut_ok(hc, a1, s1, 2)
    cut_ok(hc, a2, s2, 2)
    (gp,) = hc.ok("GET", "/groups/g1/points")
    assert gp["state"] == "committed" and gp["complete"] is True
    # the next cut: vmb's agent could not prove its hold around the cut
    hc.clock.advance(30)
    hc.tick()
    (s1,), (s2,) = cmds(a1, "group_seal"), cmds(a2, "group_seal")
    cut_ok(hc, a1, s1, 3)
    cut_ok(hc, a2, s2, 3, held=False, missed="clock uncertainty 31.0 ms is too large")
    b = hc.ok("GET", "/groups/g1/points?all=true")[0]
    assert b["state"] == "partial"
    assert b["message"] == ("missed the clock cut: vmb (clock uncertainty 31.0 ms is too "
                            "large) (per-VM points)")
    hc.vault.monitor.tick()
    assert any(al["key"] == "group_barrier:g1"
               for al in hc.ok("GET", "/alerts?state=active")["entries"])
    # one miss: the next barrier is a cut again; a second miss in a row: then two-phase
    hc.clock.advance(30)
    hc.tick()
    (s1,), (s2,) = cmds(a1, "group_seal"), cmds(a2, "group_seal")
    assert "cut_at" in s1["args"]
    cut_ok(hc, a1, s1, 4)
    cut_ok(hc, a2, s2, 4, held=False, missed="the cut came 40.0 ms too soon (command late)")
    hc.clock.advance(30)
    hc.tick()
    assert [c["kind"] for c in a1.beat()["commands"]] == ["group_prepare"]
    with hc.vault.db.read() as s:
        open_b = s.scalars(select(GroupBarrier).where(GroupBarrier.state == "preparing")).one()
        preps = {i: m["prepare"] for i, m in open_b.members.items()}
    for a, i in ((a1, items[0]), (a2, items[1])):
        assert a.result(preps[i], "succeeded", result={}).status_code == 200
    for a in (a1, a2):
        (sc,) = cmds(a, "group_seal")
        assert "cut_at" not in sc["args"]
        seal_ok(hc, a, sc, 5)
    assert hc.ok("GET", "/groups/g1/points?all=true")[0]["state"] == "committed"
    hc.clock.advance(30)
    hc.tick()
    assert "cut_at" in cmds(a1, "group_seal")[0]["args"]


def test_no_clock_cut_when_disabled(tmp_path: Path) -> None:
    hh = Harness(tmp_path / "vault", barrier_clock_cut=False)
    try:
        hh.clock.t = MIDNIGHT + 12 * 3600
        (a1, _a2), _ = setup_group(hh)
        assert [c["kind"] for c in a1.beat()["commands"]] == ["group_prepare"]
    finally:
        hh.close()


def test_a_member_silent_at_the_cuts_bound_misses_it(hc: Harness) -> None:
    """A cut's member whose agent does not say it took the cut by the bound (stopped before
    it could) misses it like a silent prepare: its seal is withdrawn (a late answer is
    refused), it gets a plain cycle; the member that took it keeps its (per-VM) point."""
    (a1, a2), items = setup_group(hc)
    (s1,), (s2,) = cmds(a1, "group_seal"), cmds(a2, "group_seal")
    assert a1.result(s1["command_id"], "running", progress=50.0,
                     result={"cut": {"held": True}}).status_code == 200
    # a periodic progress post (no ``cut``) does not count as taking the cut
    assert a2.result(s2["command_id"], "running", progress=0.0).status_code == 200
    hc.clock.advance(0.3)
    hc.tick()
    assert hc.ok("GET", "/groups/g1/points?all=true")[0]["state"] == "sealing"  # not yet
    hc.clock.advance(0.2)  # past the bound (400 ms)
    hc.tick()
    (c2,) = cmds(a2, "cycle")
    assert c2["item_id"] == items[1]
    assert a2.result(s2["command_id"], "succeeded", result={}).status_code == 409
    cut_ok(hc, a1, s1, 2)
    b = hc.ok("GET", "/groups/g1/points?all=true")[0]
    assert b["state"] == "partial" and b["members"][items[1]]["state"] == "missed"
    assert b["message"] == "missed the barrier: vmb (per-VM points)"
    assert b["members"][items[0]]["point_id"] == "p000002"


def test_an_app_consistent_barrier_is_two_phase(hc: Harness) -> None:
    """A freeze hook runs inside the hold and outlasts a cut's window: app-consistent
    barriers use the two-phase barrier, crash-consistent ones the cut."""
    (a1, a2), _ = setup_group(hc, app_every=3600)
    (p1,) = cmds(a1, "group_prepare")
    assert p1["args"]["app_consistent"] is True
    (p2,) = cmds(a2, "group_prepare")
    for a, p in ((a1, p1), (a2, p2)):
        a.result(p["command_id"], "succeeded", result={})
    for a in (a1, a2):
        (sc,) = cmds(a, "group_seal")
        seal_ok(hc, a, sc, 2)
    hc.clock.advance(30)
    hc.tick()
    (s1,) = cmds(a1, "group_seal")
    assert "cut_at" in s1["args"] and s1["args"]["app_consistent"] is False


def test_the_cut_clock_is_shared_by_every_process_of_the_machine() -> None:
    """The vault's API workers are separate processes: an agent's clock reading may come from
    any of them, so they must name (and read) one clock. Another process of this machine
    gets the same id, and its reading of the clock falls between two of ours."""
    code = ("import json, time; from drsite.vault import barrier; "
            "print(json.dumps([barrier.CLOCK_ID, barrier.cut_clock()]))")
    before = barrier.cut_clock()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    after = barrier.cut_clock()
    clock_id, t = json.loads(out)
    assert clock_id == barrier.CLOCK_ID and clock_id.startswith("clk-")
    assert before <= t <= after
