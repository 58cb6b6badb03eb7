"""Scrub, repair, verify and drills through the vault API with agents played by the test: the
scrub goes to the store's host on the policy interval and resumes an incomplete pass; damage
drives health, alerts and a repair resync against the store; damaged points are refused as
failover choices; verify fails on damage; a drill runs the plan's test failover, probes, cleans
up and records RPO and RTO; a failed probe fails the drill and raises an alert; an item whose
initial replication keeps failing on a full store shows it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from drsite.core.errors import LowDiskSpace
from drsite.vault.testing import Agent, Harness, point, report, vm_info
from tests.integration.test_vault_api import err, policy_and_group, protect, two_sites

VMS = [vm_info("vm-1", "web1"), vm_info("vm-2", "db1", labels=["db"])]


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    hh = Harness(tmp_path / "vault")
    yield hh
    hh.close()


def beat(agent: Agent, **kw: Any) -> list[dict[str, Any]]:
    store = "https://127.0.0.1:9443" if agent.site == "sec" else None
    return list(agent.beat(store_url=store, vms=VMS if agent.site == "prim" else [],
                           **kw)["commands"])


def take(h: Harness, agent: Agent, kind: str, **kw: Any) -> dict[str, Any]:
    h.tick()
    cmds = [c for c in beat(agent, **kw) if c["kind"] == kind]
    assert len(cmds) == 1, cmds
    return cmds[0]


def scrub_report(item: str, findings: list[dict[str, Any]], points: list[str], *,
                 complete: bool = True) -> dict[str, Any]:
    return {"scrub": {"item_id": item, "pass_started_at": 1.0, "complete": complete,
                      "finished_at": 2.0 if complete else None, "objects_checked": 9,
                      "bytes_checked": 1000, "packs_total": 3, "packs_done": 3 if complete else 1,
                      "findings": findings, "points": points, "latest_point": points[-1],
                      "damaged_points": sorted({p for f in findings for p in f["points"]}),
                      "latest_damaged": any(points[-1] in f["points"] for f in findings)}}


def mapping(h: Harness) -> None:
    h.ok("PUT", "/network-mappings", json={"source_site": "prim", "recovery_site": "sec",
                                           "source_network": "lan", "recovery_network": "dr",
                                           "test_network": "bubble"})


def second_point(h: Harness, a: Agent, item: str) -> None:
    now = h.clock.now()
    beat(a, items=[{"item_id": item, "report": report(item, "vm-1", "web1", last_point_time=now,
                                                      last_point_id="p000002"),
                    "new_points": [point(item, 2, now)]}])


def test_scrub_damage_repair_refusal_and_verify(h: Harness) -> None:
    a, b = two_sites(h)
    policy_and_group(h, scrub_interval_s=600, scrub_rate_bps=1 << 20)
    item = protect(h, a)
    mapping(h)
    second_point(h, a, item)
    # the scrub goes to the host that serves the store, paced and bounded
    cmd = take(h, b, "scrub")
    assert cmd["item_id"] == item and cmd["args"]["rate_bps"] == 1 << 20
    assert "store" not in cmd["args"] and cmd["args"]["budget_s"] > 0
    # an incomplete pass is continued at once, a complete one waits for the interval
    b.result(cmd["command_id"], "succeeded", result=scrub_report(item, [], ["p000001",
                                                                        "p000002"],
                                                                 complete=False))
    cmd = take(h, b, "scrub")
    b.result(cmd["command_id"], "succeeded",
             result=scrub_report(item, [], ["p000001", "p000002"]))
    h.tick()
    assert [c for c in beat(b) if c["kind"] == "scrub"] == []
    assert h.ok("GET", f"/items/{item}")["health"] == "normal"

    # the next pass (within one interval) finds damage in the newest point: warning, an alert,
    # and a repair resync against what the store restores
    h.clock.advance(600)
    cmd = take(h, b, "scrub")
    flipped = {"key": "packs/c2/abc", "kind": "corrupt", "reason": "failed its hash check",
               "points": ["p000002"], "quarantined_to": "quarantine/packs/c2/abc.1"}
    b.result(cmd["command_id"], "succeeded",
             result=scrub_report(item, [flipped], ["p000001", "p000002"]))
    h.tick()
    it = h.ok("GET", f"/items/{item}")
    assert it["health"] == "warning", it
    assert any("newest recovery point p000002 is damaged" in r for r in it["health_reasons"])
    assert it["damaged_points"] == ["p000002"]
    alerts = h.entries("/alerts?state=active")
    assert [x["subject"] for x in alerts if x["kind"] == "store_damage"] == ["web1"]
    h.tick()
    for c in beat(a):  # the cycle in flight ends first (one replication command at a time)
        if c["kind"] == "cycle":
            a.result(c["command_id"], "succeeded")
    rs = take(h, a, "resync")
    assert rs["args"]["from_store"] is True and "scrub found damage" in rs["args"]["reason"]
    # a failover to the damaged point is refused with a command to run; latest falls back
    r = err(h.call("POST", f"/items/{item}/failover/test-failover",
                   json={"point": "p000002"}), 409)
    assert "cannot be restored" in r["message"] and "drsite items points" in r["hint"]
    job = h.ok("POST", f"/items/{item}/failover/test-failover", json={})
    fo = take(h, b, "failover")
    assert fo["args"]["point"] == "p000001", h.job(job["id"])  # the newest intact point
    b.result(fo["command_id"], "succeeded", result={"failover": {
        "state": "test_running", "point_id": "p000001", "vm_name": "web1-test", "rto_s": 1.0}})
    h.tick()
    assert h.job(job["id"])["state"] == "succeeded"
    notes = h.ok("GET", f"/items/{item}/failovers")[0]["notes"]
    assert any("p000002 is damaged in the store; using p000001" in n for n in notes)
    # the repair commits a new point: the damaged one is now an older point that cannot be
    # repaired: warning (the newest point is intact), with how many, and the alert says so
    a.result(rs["command_id"], "succeeded", result={"point": {"point_id": "p000003",
                                                              "bytes_written": 4096}})
    now = h.clock.now()
    beat(a, items=[{"item_id": item, "report": report(item, "vm-1", "web1", last_point_time=now,
                                                      last_point_id="p000003"),
                    "new_points": [point(item, 3, now)]}])
    h.tick()
    it = h.ok("GET", f"/items/{item}")
    assert it["health"] == "warning", it
    assert any("1 older recovery point(s) cannot be restored (p000002)" in r
               for r in it["health_reasons"])
    active = h.entries("/alerts?state=active")
    assert "critical" not in [x["kind"] for x in active]
    (dmg,) = [x for x in active if x["kind"] == "store_damage"]
    assert "1 older recovery point(s) of web1 cannot be restored" in dmg["message"], dmg
    pts = {p["point_id"]: p for p in h.entries(f"/items/{item}/points")}
    assert pts["p000002"]["damage"]["by"] == "scrub" and pts["p000003"]["damage"] is None
    m = h.client.get("/api/v1/metrics").text
    assert f'drsite_item_damaged_points{{item="{item}",vm="web1"}} 1.0' in m

    # verify: the command goes to the store host; damage fails the job; the report is kept
    v = h.ok("POST", f"/items/{item}/verify", json={"all": True})
    cmd = take(h, b, "verify")
    assert cmd["args"]["points"] == "all"
    proof = {"points": [
        {"point_id": "p000001", "ok": False, "bytes_read": 10, "disks": [
            {"disk_id": "d0", "errors": ["pack x is missing"], "damaged": [[0, 4096]]}]},
        {"point_id": "p000003", "ok": True, "bytes_read": 99, "disks": [
            {"disk_id": "d0", "digest": "ab" * 32, "errors": [], "damaged": []}]}], "ok": False}
    b.result(cmd["command_id"], "succeeded", result={"verify": proof})
    h.tick()
    j = h.job(v["job_id"])
    assert j["state"] == "failed" and "1 of 2 recovery point(s)" in j["error"]["message"], j
    rep = h.ok("GET", f"/items/{item}/verifications/{v['job_id']}")
    assert rep["report"]["points"][1]["disks"][0]["digest"] == "ab" * 32
    pts = {p["point_id"]: p for p in h.entries(f"/items/{item}/points")}
    assert pts["p000001"]["damage"]["by"] == "verify"
    err(h.call("POST", f"/items/{item}/verify", json={"all": True, "point": "p1"}), 400)


def fo_result(state: str, **kw: Any) -> dict[str, Any]:
    return {"failover": {"state": state, "point_id": "p000001", "vm_name": "web1-test",
                         "vm_id": "rvm-1", "generation": 1, "rto_s": 1.5, "verified": True,
                         "point_created_at": 1000.0, **kw}}


@pytest.mark.parametrize("probe_ok", [True, False])
def test_drill_runs_the_plan_probes_cleans_up_and_reports(h: Harness, probe_ok: bool) -> None:
    a, b = two_sites(h)
    policy_and_group(h)
    protect(h, a)
    mapping(h)
    plan = {"name": "shop", "groups": [{"name": "web", "vms": ["web1"]}],
            "drill": {"every_s": "weekly", "window": "00:00-00:00", "boot_timeout_s": 30,
                      "probe": {"script": "curl -sf http://$DRSITE_DRILL_IPS/", "timeout_s": 5}}}
    h.ok("POST", "/plans", json={"plans": [plan]})
    assert h.ok("GET", "/plans/shop")["drill"]["every_s"] == 7 * 86400
    # the schedule starts the first drill (never ran; the window is always)
    for _ in range(3):
        h.tick()
    cmd = take(h, b, "failover")
    assert cmd["args"]["kind"] == "test"
    b.result(cmd["command_id"], "succeeded", result=fo_result("test_running"))
    for _ in range(3):
        h.tick()
    probe = take(h, b, "drill_probe")
    assert probe["args"]["vm_name"] == "web1-test" and probe["args"]["probe"]["timeout_s"] == 5
    out = {"vm_name": "web1-test", "running": True, "guest_ready": probe_ok, "ok": probe_ok,
           "ready_after_s": 2.0 if probe_ok else None,
           "probe": {"rc": 0 if probe_ok else 7, "attempts": 3, "ok": probe_ok, "output": ""},
           "reason": "" if probe_ok else "probe did not pass within 30 s (3 attempt(s))"}
    b.result(probe["command_id"], "succeeded", result={"drill_probe": out})
    for _ in range(3):
        h.tick()
    cl = take(h, b, "failover_cleanup")
    b.result(cl["command_id"], "succeeded", result=fo_result("cleaned_up"))
    for _ in range(4):
        h.tick()
    (d,) = h.ok("GET", "/drills")
    assert d["state"] == ("passed" if probe_ok else "failed"), d
    vm = d["report"]["vms"][0]
    assert vm["point_id"] == "p000001" and vm["verified"] is True
    assert vm["rpo_s"] is not None and vm["rpo_s"] > 0
    if probe_ok:
        assert vm["rto_s"] == pytest.approx(3.5) and d["rto_s"] == pytest.approx(3.5)
        assert [x for x in h.entries("/alerts?state=active") if x["kind"] == "drill"] == []
    else:
        assert "probe did not pass" in vm["reason"]
        alerts = [x for x in h.entries("/alerts?state=active") if x["kind"] == "drill"]
        assert len(alerts) == 1 and "probe did not pass" in alerts[0]["message"]
    assert h.job(d["job_id"])["state"] == ("succeeded" if probe_ok else "failed")
    m = h.client.get("/api/v1/metrics").text
    assert f'drsite_drill_passed{{plan="shop"}} {1.0 if probe_ok else 0.0}' in m
    # not again before the week is over
    h.tick()
    assert len(h.ok("GET", "/drills")) == 1
    # by hand: at once, one at a time
    started = h.ok("POST", "/drills", json={"plan": "shop", "boot_timeout_s": 10})
    assert started["drill_id"] != d["id"]
    err(h.call("POST", "/drills", json={"plan": "shop"}), 409)
    err(h.call("POST", "/drills", json={"plan": "shop", "boot_timeout_s": 0}), 400)


def test_initial_replication_failing_on_a_full_store_shows_on_the_item(h: Harness) -> None:
    a, _b = two_sites(h)
    policy_and_group(h)
    out = h.ok("POST", "/items", json={"vm_id": "vm-1", "group": "g1"})
    h.tick()
    h.store_beat()  # the store receives and confirms the item's grant
    full = LowDiskSpace("recovery store /srv/store: no space left on device").to_dict()
    for i in range(2):
        h.tick()
        cmds = [c for c in beat(a) if c["kind"] == "protect"]
        assert len(cmds) == 1, cmds
        a.result(cmds[0]["command_id"], "failed", error=full)
        h.tick()
        h.tick()
        if i == 0:
            h.clock.advance(61)
    it = h.ok("GET", f"/items/{out['item_id']}")
    assert it["health"] == "warning", it
    assert any("no space left on device" in r for r in it["health_reasons"])
    alerts = [x for x in h.entries("/alerts?state=active") if x["kind"] == "replication_failing"]
    assert len(alerts) == 1 and "initial replication of web1 failed 2 times" in alerts[0]["message"]


def test_a_protection_group_carries_a_drill_schedule(h: Harness) -> None:
    """A group's drill schedule drills its protected VMs (no plan needed); its report, alert
    (``drill:group:G``) and metric are the group's; bad schedules and requests are refused."""
    a, b = two_sites(h)
    policy_and_group(h)
    err(h.call("PUT", "/groups/g1", json={"drill": {"every_s": 5}}), 400)  # under 10 s
    err(h.call("PUT", "/groups/g1", json={"drill": {"every_s": "daily", "window": "25:00-"}}),
        400)
    assert h.ok("GET", "/groups/g1")["drill"] is None
    h.tick()  # a group with a schedule but nothing protected yet starts no drill
    out = h.ok("PUT", "/groups/g1", json={"drill": {
        "every_s": "daily", "boot_timeout_s": 20,
        "probe": {"script": 'test "$DRSITE_DRILL_GROUP" = g1', "timeout_s": 5}}})
    assert out["drill"]["every_s"] == 86400 and out["drill"]["probe"]["timeout_s"] == 5
    for _ in range(3):
        h.tick()
    assert h.ok("GET", "/drills") == []
    protect(h, a)
    mapping(h)
    for _ in range(3):
        h.tick()
    (d,) = h.ok("GET", "/drills?group=g1")
    assert d["group"] == "g1" and d["plan"] is None and d["trigger"] == "schedule"
    assert h.job(d["job_id"])["target"] == "group:g1"
    cmd = take(h, b, "failover")
    assert cmd["args"]["kind"] == "test"
    b.result(cmd["command_id"], "succeeded", result=fo_result("test_running"))
    for _ in range(3):
        h.tick()
    probe = take(h, b, "drill_probe")
    assert probe["args"]["env"]["DRSITE_DRILL_GROUP"] == "g1"
    assert "DRSITE_PLAN" not in probe["args"]["env"]
    b.result(probe["command_id"], "succeeded", result={"drill_probe": {
        "vm_name": "web1-test", "running": True, "guest_ready": True, "ok": False,
        "ready_after_s": None, "probe": {"rc": 1, "attempts": 2, "ok": False, "output": ""},
        "reason": "probe did not pass within 20 s (2 attempt(s), last exit code 1)"}})
    for _ in range(3):
        h.tick()
    cl = take(h, b, "failover_cleanup")
    b.result(cl["command_id"], "succeeded", result=fo_result("cleaned_up"))
    for _ in range(4):
        h.tick()
    d = h.ok("GET", f"/drills/{d['id']}")
    assert d["state"] == "failed" and d["report"]["group"] == "g1", d
    job = h.job(d["job_id"])
    assert "drill of protection group g1 failed" in job["error"]["message"]
    assert "drsite drills run --group g1" in job["error"]["hint"]
    (alert,) = [x for x in h.entries("/alerts?state=active") if x["kind"] == "drill"]
    assert alert["subject"] == "group g1" and "protection group g1" in alert["message"]
    assert 'drsite_group_drill_passed{group="g1"} 0.0' in h.client.get("/api/v1/metrics").text
    # not again before a day is over; by hand at once; one target at a time
    h.tick()
    assert len(h.ok("GET", "/drills")) == 1
    err(h.call("POST", "/drills", json={"plan": "shop", "group": "g1"}), 400)
    err(h.call("POST", "/drills", json={}), 400)
    err(h.call("POST", "/drills", json={"group": "nope"}), 404)
    started = h.ok("POST", "/drills", json={"group": "g1"})
    err(h.call("POST", "/drills", json={"group": "g1"}), 409)
    assert h.ok("GET", f"/drills/{started['drill_id']}")["trigger"] == "hand"
    # the schedule ends
    assert h.ok("PUT", "/groups/g1", json={"drill": None})["drill"] is None


def test_a_drill_never_adopts_an_operators_test_failover(h: Harness) -> None:
    """A drill removes what it opened; a test failover an operator runs is not its to remove:
    the drill is refused until it is cleaned up."""
    a, _b = two_sites(h)
    policy_and_group(h)
    item = protect(h, a)
    mapping(h)
    h.ok("POST", "/plans", json={"plans": [{"name": "shop", "groups": [{"name": "web",
                                                                        "vms": ["web1"]}]}]})
    h.ok("POST", f"/items/{item}/failover/test-failover", json={})
    for body in ({"plan": "shop"}, {"group": "g1"}):
        r = err(h.call("POST", "/drills", json=body), 409)
        assert "web1 already run(s) a test failover" in r["message"]
        assert "drsite failover cleanup" in r["hint"]
    assert h.ok("GET", "/drills") == []
