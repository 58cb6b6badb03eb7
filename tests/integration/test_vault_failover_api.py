"""Failover through the vault API with agents played by the test (SQLite and PostgreSQL):
jobs send the right commands to the right hosts, record the failover, move the item through
its states; bad input and wrong roles are refused and change nothing; a plan runs its groups
in order and waits for an operator at a manual step."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from drsite.vault.testing import Agent, Harness, point, report, vm_info
from tests.integration.test_vault_api import (
    cli_against,
    err,
    policy_and_group,
    protect,
    two_sites,
)

ENGINES = ["sqlite", "postgresql"]


@pytest.fixture(params=ENGINES)
def h(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Harness]:
    url = request.getfixturevalue("pg_url") if request.param == "postgresql" else None
    hh = Harness(tmp_path / "vault", url)
    yield hh
    hh.close()


def play(h: Harness, agent: Agent, kind: str, result: dict[str, Any] | None = None,
         status: str = "succeeded", error: dict[str, Any] | None = None) -> dict[str, Any]:
    """Tick, take the one command of ``kind`` the agent gets, answer it."""
    h.tick()
    reply = agent.beat(store_url="https://127.0.0.1:9443" if agent.site == "sec"
                       else "https://127.0.0.1:9555",
                       vms=[vm_info("vm-1", "web1"), vm_info("vm-2", "db1", labels=["db"])]
                       if agent.site == "prim" else [])
    cmds = [c for c in reply["commands"] if c["kind"] == kind]
    assert len(cmds) == 1, reply["commands"]
    body: dict[str, Any] = {"result": result or {}}
    if error is not None:
        body = {"error": error}
    assert agent.result(cmds[0]["command_id"], status, **body).status_code == 200
    h.tick()
    return dict(cmds[0])


def fo_result(state: str, **kw: Any) -> dict[str, Any]:
    return {"failover": {"state": state, "point_id": "p000000000001", "vm_name": "web1",
                         "vm_id": "rvm-1", "generation": 2, "rto_s": 1.5, **kw}}


def setup(h: Harness) -> tuple[Agent, Agent, str]:
    a, b = two_sites(h)
    policy_and_group(h)
    item = protect(h, a)
    h.ok("PUT", "/network-mappings", json={"source_site": "prim", "recovery_site": "sec",
                                           "source_network": "lan", "recovery_network": "dr",
                                           "test_network": "bubble"})
    return a, b, item


def test_planned_failover_commit_reprotect_commands(h: Harness) -> None:
    a, b, item = setup(h)
    assert h.set_store("prim", "hv1").status_code == 200   # the old primary's store role
    job = h.ok("POST", f"/items/{item}/failover/planned-failover", json={})
    cmd = play(h, a, "failover_prepare", {"point_id": "p000000000002", "fingerprints": {"d0": "x"}})
    assert cmd["args"]["failover_id"].startswith("f-")
    cmd = play(h, b, "failover", fo_result("pending_commit", point_id="p000000000002"))
    assert cmd["args"]["kind"] == "planned" and cmd["args"]["fingerprints"] == {"d0": "x"}
    assert cmd["args"]["network_map"][0]["recovery"] == "dr"
    assert cmd["args"]["recovery_site"] == "sec" and cmd["args"]["source_site"] == "prim"
    assert h.job(job["id"])["state"] == "succeeded"
    assert h.ok("GET", f"/items/{item}")["protection"] == "failed_over"
    # failed over: the old primary may still read its item on the store, never write it
    h.store_beat()
    assert b.store_acl is not None
    assert b.store_acl["items"][item]["writer"] == "" and a.host_id in \
        b.store_acl["items"][item]["readers"]
    fo = h.ok("GET", f"/items/{item}/failovers")[0]
    assert fo["state"] == "pending_commit" and fo["rto_s"] == 1.5
    assert "fingerprints" not in str(fo)
    # no second failover while this one is open; cycles stop
    err(h.call("POST", f"/items/{item}/failover/test-failover", json={}), 409)
    # commit (planned) re-protects: the way back must be mapped (or asked to be made)
    e = err(h.call("POST", f"/items/{item}/failover/commit", json={}), 409)
    assert "network mapping back" in e["message"] and "--create-reverse-mapping" in e["hint"]
    assert "drsite network map --from-site sec --to-site prim --network dr" in e["hint"]
    assert len(h.ok("GET", "/network-mappings")) == 1
    assert h.ok("GET", f"/items/{item}")["active_job_id"] is None  # nothing started
    # commit (planned) re-protects: seed on the old primary, protect on the recovery host
    job = h.ok("POST", f"/items/{item}/failover/commit", json={"create_reverse_mapping": True})
    back = [m for m in h.ok("GET", "/network-mappings") if m["source_site"] == "sec"]
    assert [(m["source_network"], m["recovery_network"], m["test_network"]) for m in back] == \
        [("dr", "lan", "bubble")]
    play(h, b, "failover_commit", fo_result("committed", point_id="p000000000002"))
    cmd = play(h, a, "reprotect_seed", {"base_point_id": "p1", "base_bytes_local": 100,
                                        "disk_bytes": 1000})
    rev_id = cmd["args"]["rev_item_id"]
    assert cmd["args"]["rev_point_key"] and cmd["args"]["point_key"]
    a.beat(store_url="https://127.0.0.1:9555", vms=[vm_info("vm-1", "web1")])
    h.tick()         # the reverse item exists: its store (the old primary's) gets its grant
    h.store_beat()
    cmd = play(h, b, "protect", {"report": {"bytes_sent": 10}})
    assert cmd["item_id"] == rev_id and cmd["args"]["resync_from_base"] is True
    assert cmd["args"]["store_url"] == "https://127.0.0.1:9555"
    # the job ends once the reverse item's first point reached the catalogue
    assert h.job(job["id"])["state"] == "running"
    b.beat(store_url="https://127.0.0.1:9443", items=[{
        "item_id": rev_id, "report": report(rev_id, "rvm-1", "web1"),
        "new_points": [point(rev_id, 1, h.clock.now())]}])
    h.tick()
    assert h.job(job["id"])["state"] == "succeeded", h.job(job["id"])
    rev = h.ok("GET", f"/items/{rev_id}")
    assert rev["protection"] == "protected" and rev["target_site"] == "prim"
    assert h.ok("GET", f"/failovers/{fo['id']}")["result"]["reprotect"]["bytes_sent"] == 10


def test_plan_groups_in_order_manual_resume(h: Harness) -> None:
    a, b, _item = setup(h)
    protect(h, a, "vm-2", "db1")
    plan = {"name": "shop", "groups": [
        {"name": "db", "vms": ["db1"], "post": [{"manual": "check the database"}]},
        {"name": "web", "vms": ["web1"]}]}
    op = h.token("operator", "op-plan")
    err(h.call("POST", "/plans", token=op, json={"plans": [plan]}), 403)  # scripts: admin only
    assert h.ok("POST", "/plans", json={"plans": [plan], "dry_run": True})["changes"][0]["change"] == "create"
    assert h.ok("GET", "/plans") == []
    h.ok("POST", "/plans", json={"plans": [plan]})
    reader = h.token("reader", "rd")
    err(h.call("POST", "/plans/shop/test-failover", token=reader, json={}), 403)
    job = h.ok("POST", "/plans/shop/test-failover", token=op, json={})
    cmd = play(h, b, "failover", fo_result("test_running", vm_name="db1-test"))
    assert cmd["args"]["kind"] == "test"
    for _ in range(3):
        h.tick()
    j = h.job(job["id"])
    assert j["state"] == "running" and "waiting for operator" in j["message"], j
    h.ok("POST", f"/jobs/{job['id']}/resume", token=op)
    err(h.call("POST", f"/jobs/{job['id']}/resume", token=op), 409)  # not waiting any more
    play(h, b, "failover", fo_result("test_running", vm_name="web1-test"))
    for _ in range(3):
        h.tick()
    j = h.job(job["id"])
    assert j["state"] == "succeeded", j
    assert [t["name"] for t in j["tasks"]] == ["plan_group", "plan_action", "plan_group", "plan_summary"]
    assert "measured RTO" in j["message"]


def test_bad_input_is_refused_and_changes_nothing(h: Harness) -> None:
    _a, _b, item = setup(h)
    err(h.call("POST", f"/items/{item}/failover/explode", json={}), 400)
    err(h.call("POST", f"/items/{item}/failover/test-failover", json={"point": "../etc"}), 400)
    err(h.call("POST", "/items/nope/failover/test-failover", json={}), 404)
    err(h.call("POST", f"/items/{item}/failover/commit", json={}), 409)   # nothing to commit
    err(h.call("POST", f"/items/{item}/failover/reprotect", json={}), 409)
    err(h.call("POST", f"/items/{item}/failover/test-failover", json={"bogus": 1}), 422)
    for bad in ({"name": "../x", "groups": [{"vms": ["web1"]}]},
                {"name": "p", "groups": []},
                {"name": "p", "groups": [{"vms": ["web1"], "pre": [{"script": "x", "manual": "y"}]}]},
                {"name": "p", "groups": [{"vms": ["web1"]}, {"vms": ["web1"]}]},
                {"name": "p", "groups": [{"vms": ["web1"], "pre": [{"script": "x", "timeout_s": -1}]}]}):
        err(h.call("POST", "/plans", json={"plans": [bad]}), 400)
    assert h.ok("GET", "/plans") == []
    err(h.call("PUT", "/network-mappings", json={"source_site": "prim", "recovery_site": "sec",
                                                 "source_network": "lan", "recovery_network": "dr",
                                                 "ip_rule": {"kind": "subnet", "source": "10.0.0.0/24",
                                                             "target": "10.1.0.0/16"}}), 400)
    assert h.entries("/jobs?kind=TestFailover") == []
    # a job created while the network was mapped: its first step checks again, before
    # anything runs, and fails with the same clear message
    job = h.ok("POST", f"/items/{item}/failover/test-failover", json={})
    mapping = h.ok("GET", "/network-mappings")[0]
    h.ok("DELETE", f"/network-mappings/{mapping['id']}")
    h.tick()
    j = h.job(job["id"])
    assert j["state"] == "failed" and "network 'lan' has no network mapping" in j["error"]["message"], j
    assert j["error"]["hint"]
    assert h.ok("GET", f"/items/{item}")["protection"] == "protected"
    assert h.ok("GET", f"/items/{item}/failovers")[0]["state"] == "failed"
    # now unmapped: the request itself is refused (400, what to do), and nothing is created
    before = (h.entries("/jobs"), h.ok("GET", f"/items/{item}/failovers"))
    for action in ("test-failover", "planned-failover", "unplanned-failover"):
        body = err(h.call("POST", f"/items/{item}/failover/{action}", json={}), 400)
        assert "network 'lan' has no network mapping" in body["message"] and body["hint"], body
    assert (h.entries("/jobs"), h.ok("GET", f"/items/{item}/failovers")) == before
    assert h.ok("GET", f"/items/{item}")["protection"] == "protected"


def test_unplanned_change_point_then_cancel_hands_the_item_back(h: Harness) -> None:
    a, b, item = setup(h)
    # no app-consistent point: refused before a job exists (400, exit 2 in the CLI)
    body = err(h.call("POST", f"/items/{item}/failover/unplanned-failover",
                      json={"point": "latest_app"}), 400)
    assert "app-consistent" in body["message"] and "latest" in body["hint"], body
    body = err(h.call("POST", f"/items/{item}/failover/unplanned-failover",
                      json={"point": "p000000000077"}), 400)
    assert "not in the catalogue" in body["message"], body
    assert h.entries("/jobs?kind=UnplannedFailover") == []
    job = h.ok("POST", f"/items/{item}/failover/unplanned-failover", json={})
    cmd = play(h, b, "failover", fo_result("pending_commit"))
    assert cmd["args"]["kind"] == "unplanned" and cmd["args"]["point"] == "latest"
    assert h.job(job["id"])["state"] == "succeeded"
    job = h.ok("POST", f"/items/{item}/failover/change-point", json={"point": "p000000000001"})
    cmd = play(h, b, "failover_change_point", fo_result("pending_commit"))
    assert cmd["args"]["point"] == "p000000000001"
    assert h.job(job["id"])["state"] == "succeeded"
    job = h.ok("POST", f"/items/{item}/failover/cancel", json={})
    play(h, b, "failover_cancel", fo_result("cancelled", generation=3))
    cmd = play(h, a, "failover_resume_source", {"generation": 3, "powered_on": False,
                                                "resync": True})
    args = dict(cmd["args"])
    assert args.pop("point_key")  # the item's point key travels with every failover command
    assert args == {"generation": 3, "power_on": False}  # unplanned: the source was not stopped
    # the job says "replicates again" only once a point proves it: the fenced source resyncs
    assert h.job(job["id"])["state"] == "running"
    h.store_beat()  # the store grants the source its writes again before the first one
    cmd = play(h, a, "resync", {"point": {"point_id": "p000000000009"}})
    assert cmd["args"].pop("point_key")
    assert cmd["args"] == {"by_hand": True}
    j = h.job(job["id"])
    assert j["state"] == "succeeded" and "replicates again" in j["message"], j
    assert "p000000000009" in j["message"]
    assert h.ok("GET", f"/items/{item}")["protection"] == "protected"
    assert [f["state"] for f in h.ok("GET", f"/items/{item}/failovers")] == ["cancelled"]


def test_cancelled_failover_job_withdraws_its_queued_command(h: Harness) -> None:
    """A failover job cancelled before its command reached an agent: the command is withdrawn
    (an agent coming back later does not promote anything) and the item is protected."""
    _a, _b, item = setup(h)
    job = h.ok("POST", f"/items/{item}/failover/unplanned-failover", json={})
    h.tick()   # checks pass, the failover command is queued (no heartbeat takes it)
    h.ok("POST", f"/jobs/{job['id']}/cancel")
    h.tick()
    assert h.job(job["id"])["state"] == "cancelled"
    assert h.ok("GET", f"/items/{item}")["protection"] == "protected"
    reply = _b.beat(store_url="https://127.0.0.1:9443")
    assert [c for c in reply["commands"] if c["kind"].startswith("failover")] == []


def test_planned_failover_failing_at_the_source_is_cancelled_back(h: Harness) -> None:
    """The source's half fails (its VM may be off): the item is left failed_over, cancel hands
    it back and powers the source VM on, even though nothing started on the recovery side."""
    a, b, item = setup(h)
    job = h.ok("POST", f"/items/{item}/failover/planned-failover", json={})
    play(h, a, "failover_prepare", status="failed",
         error={"code": "network", "class": "permanent", "message": "disk gone", "hint": "x"})
    assert h.job(job["id"])["state"] == "failed"
    assert h.ok("GET", f"/items/{item}")["protection"] == "failed_over"
    job = h.ok("POST", f"/items/{item}/failover/cancel", json={})
    play(h, b, "failover_cancel", fo_result("cancelled", generation=1))
    cmd = play(h, a, "failover_resume_source", {"generation": 1, "powered_on": True})
    assert cmd["args"]["power_on"] is True
    assert h.job(job["id"])["state"] == "running"  # not before the source replicated once
    # the store got the read-only list with the cancel: the source waits for its write grant,
    # and gets no cycle before the store confirmed the list that gives it its writes back
    h.tick()
    assert not [c for c in a.beat(vms=a.last_vms, store_url=a.store_url)["commands"] if c["kind"] == "cycle"]
    assert "access grant" in h.job(job["id"])["message"], h.job(job["id"])
    h.store_beat()
    cmd = play(h, a, "cycle", {"point": {"point_id": "p000000000002"}})
    assert h.job(job["id"])["state"] == "succeeded"
    assert h.ok("GET", f"/items/{item}")["protection"] == "protected"


def test_cli_plan_apply_diff_network_map_and_bad_yaml(h: Harness, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    from typer.testing import CliRunner

    from drsite.cli.main import app

    cli_against(h, monkeypatch)
    _a, _b, _item = setup(h)
    runner = CliRunner()
    plan = tmp_path / "plan.yaml"
    plan.write_text("plans:\n  - name: shop\n    groups:\n      - name: web\n        vms: [web1]\n"
                    "        post:\n          - manual: check it\n")
    r = runner.invoke(app, ["plan", "apply", "-f", str(plan), "--dry-run", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output) == [{"plan": "shop", "change": "create",
                                     "fields": ["description", "groups"]}]
    assert h.ok("GET", "/plans") == []
    r = runner.invoke(app, ["plan", "apply", "-f", str(plan), "--json"])
    assert r.exit_code == 0 and h.ok("GET", "/plans")[0]["name"] == "shop"
    r = runner.invoke(app, ["plan", "show", "shop"])
    assert r.exit_code == 0 and "web1" in r.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("plans: [ {name: x, groups: [")
    r = runner.invoke(app, ["plan", "apply", "-f", str(bad)])
    assert r.exit_code != 0 and "not valid YAML" in str(r.exception)  # main() maps it to 2
    r = runner.invoke(app, ["network", "map", "--from-site", "prim", "--to-site", "sec",
                            "--network", "lan", "--recovery-network", "dr2",
                            "--ip-rule", "subnet:10.0.0.0/24:10.2.0.0/24", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["ip_rule"] == {"kind": "subnet", "source": "10.0.0.0/24",
                                               "target": "10.2.0.0/24"}
    r = runner.invoke(app, ["network", "map", "--from-site", "prim", "--to-site", "sec",
                            "--network", "lan", "--recovery-network", "dr2", "--ip-rule", "nope"])
    assert r.exit_code != 0 and "unknown IP rule" in str(r.exception)


def test_low_disk_in_a_failover_step_is_retried_on_the_seed_schedule(h: Harness) -> None:
    """Issue 19, finding 3: a full disk during cancel is a clear transient error in the job's
    message, retried at once a few times, then per the seed's schedule — never a silent wait
    and never a failed job."""
    a, b, item = setup(h)
    job = h.ok("POST", f"/items/{item}/failover/unplanned-failover", json={})
    play(h, b, "failover", fo_result("pending_commit"))
    job = h.ok("POST", f"/items/{item}/failover/cancel", json={})
    full = {"code": "low_disk", "class": "transient", "hint": "Free space on the recovery store.",
            "message": "failover_cancel of i on host b (/srv/replicas): no space left"}
    for wait_s in (0, 0, 4, 8):   # the first try, then re-sends 0, 2 and 4 heartbeats later
        h.clock.advance(wait_s)
        play(h, b, "failover_cancel", status="failed", error=full)
        assert h.job(job["id"])["state"] == "running", (wait_s, h.job(job["id"])["message"])
    j = h.job(job["id"])
    assert j["state"] == "running", j
    assert "no space left" in j["message"] and "next attempt in 60 s" in j["message"], j
    h.tick()
    reply = b.beat(store_url="https://127.0.0.1:9443")
    assert [c for c in reply["commands"] if c["kind"] == "failover_cancel"] == []
    h.clock.advance(61)
    a.beat()   # the source is up (a down source ends the job with "when it returns")
    play(h, b, "failover_cancel", fo_result("cancelled", generation=3))   # space again
    play(h, a, "failover_resume_source", {"generation": 3, "powered_on": False})
    h.store_beat()  # the store grants the source its writes again
    play(h, a, "cycle", {"point": {"point_id": "p000000000002"}})
    assert h.job(job["id"])["state"] == "succeeded"


def test_a_step_that_could_not_reach_the_store_is_sent_again_once_its_host_beats(
        h: Harness) -> None:
    """Crash campaign: the recovery site's agent killed during a planned failover — the
    source's final sync cannot reach its store (``network``). Re-sent at once, then two and
    four heartbeats later; but once the store's host heartbeats after the failure (it is back
    from its restart), at once: a failover does not sit out seconds of spacing."""
    a, b, item = setup(h)
    h.ok("POST", f"/items/{item}/failover/planned-failover", json={})
    down = {"code": "network", "class": "transient", "hint": "Check the recovery site.",
            "message": "list 'items/i/points/': cannot reach the store server: ConnectError"}
    play(h, a, "failover_prepare", status="failed", error=down)
    h.clock.advance(0.2)
    play(h, a, "failover_prepare", status="failed", error=down)   # re-sent at once
    h.clock.advance(0.2)
    h.tick()
    vms = [vm_info("vm-1", "web1"), vm_info("vm-2", "db1", labels=["db"])]
    assert [c for c in a.beat(vms=vms)["commands"] if c["kind"] == "failover_prepare"] == []
    # the store's host beats (restarted): the next try goes now, not 4 s after the failure
    h.clock.advance(0.2)
    b.beat(store_url="https://127.0.0.1:9443")
    play(h, a, "failover_prepare", {"point_id": "p000000000002", "fingerprints": {"d0": "x"}})
    assert "sending it again" not in h.job(
        h.ok("GET", f"/items/{item}")["active_job_id"])["message"]


def test_unplanned_failover_fences_the_old_primary_when_it_is_back(h: Harness) -> None:
    """Issue 13 part 2: after an unplanned failover the source host gets `failover_fence`
    (whenever it is back); until it confirms, the item is Critical with "old primary may still
    be writing" and GET /vms warns on both VMs; the confirmation clears both."""
    a, b, item = setup(h)
    h.ok("POST", f"/items/{item}/failover/unplanned-failover", json={})
    play(h, b, "failover", fo_result("pending_commit"))
    b.beat(store_url="https://127.0.0.1:9443", vms=[vm_info("rvm-1", "web1")])
    h.tick()
    it = h.ok("GET", f"/items/{item}")
    assert it["protection"] == "failed_over" and it["health"] == "critical", it
    assert any("old primary may still be writing" in r for r in it["health_reasons"]), it
    warned = {(v["host_id"], v["vm_id"]) for v in h.ok("GET", "/vms") if v["warning"]}
    assert (a.host_id, "vm-1") in warned and (b.host_id, "rvm-1") in warned
    assert any(al["kind"] == "critical" and al["active"] for al in h.entries("/alerts"))
    cmd = play(h, a, "failover_fence", {"fenced": True, "vm_power": "stopped",
                                        "was_running": True})
    assert cmd["args"]["failover_id"] and cmd["args"]["recovery_site"] == "sec"
    h.tick()
    it = h.ok("GET", f"/items/{item}")
    assert it["health"] == "normal" and it["health_reasons"] == [], it
    assert not any(v["warning"] for v in h.ok("GET", "/vms"))
    fo = h.ok("GET", f"/items/{item}/failovers")[0]
    assert fo["result"]["fence"]["state"] == "done" and fo["result"]["fence"]["vm_power"] == "stopped"


def take(h: Harness, agent: Agent, kind: str) -> dict[str, Any]:
    """Tick, and let the agent take the one command of ``kind`` without answering it."""
    h.tick()
    reply = agent.beat(store_url="https://127.0.0.1:9443" if agent.site == "sec"
                       else "https://127.0.0.1:9555",
                       vms=[vm_info("vm-1", "web1")] if agent.site == "prim" else [])
    cmds = [c for c in reply["commands"] if c["kind"] == kind]
    assert len(cmds) == 1, reply["commands"]
    return dict(cmds[0])


def test_a_failover_the_recovery_host_finished_after_its_job_was_cancelled_is_recorded(
        h: Harness) -> None:
    """The recovery host took the failover command and hung (SIGSTOP); the operator cancelled
    the job; the host came back and started the recovery VM. Found by an outside review: the
    vault said "cancelled, no VM", the item 'failed_over' with normal health, commit was refused
    and the only way out deleted the running VM. Now: critical while the outcome is unknown,
    then the late success is recorded — the failover pending commit with its VM, critical until
    an operator commits or cancels it — and commit works."""
    a, b, item = setup(h)
    job = h.ok("POST", f"/items/{item}/failover/planned-failover", json={})
    play(h, a, "failover_prepare", {"point_id": "p000000000002", "fingerprints": {"d0": "x"}})
    cmd = take(h, b, "failover")
    assert b.result(cmd["command_id"], "running").status_code == 200
    h.clock.advance(h.settings.agent_down_after_s + 1)   # the recovery host hangs
    h.tick()
    msg = h.job(job["id"])["message"]
    assert "took failover" in msg and "queued" not in msg, msg
    h.ok("POST", f"/jobs/{job['id']}/cancel")
    h.tick()
    assert h.job(job["id"])["state"] == "cancelled"
    it = h.ok("GET", f"/items/{item}")
    assert it["protection"] == "failed_over" and it["health"] == "critical", it
    assert "was cancelled after it reached the recovery site" in it["health_reasons"][0]
    assert h.ok("GET", "/health")["items"]["critical"] == 1   # counted while failed over
    # the host is back: it started the VM
    b.beat(store_url="https://127.0.0.1:9443")
    assert b.result(cmd["command_id"], "succeeded",
                    result=fo_result("pending_commit", point_id="p000000000002")
                    ).status_code == 200
    h.tick()
    fo = h.ok("GET", f"/items/{item}/failovers")[0]
    assert fo["state"] == "pending_commit" and fo["vm_id"] == "rvm-1", fo
    assert fo["result"]["late_start"]["job_state"] == "cancelled"
    it = h.ok("GET", f"/items/{item}")
    assert it["protection"] == "failed_over" and it["health"] == "critical", it
    assert "started after its job was cancelled" in it["health_reasons"][0]
    assert any(al["kind"] == "critical" and al["active"] for al in h.entries("/alerts"))
    # the operator keeps it: commit is accepted
    h.ok("POST", f"/items/{item}/failover/commit", json={"create_reverse_mapping": True})
    play(h, b, "failover_commit", fo_result("committed", point_id="p000000000002"))
    assert h.ok("GET", f"/items/{item}/failovers")[0]["state"] == "committed"


def test_an_unplanned_failover_finished_after_its_cancel_fences_the_old_primary(
        h: Harness) -> None:
    """The same for an unplanned failover: the late recovery VM means the old primary must be
    fenced, as after a success (its VM would otherwise run on both sites)."""
    a, b, item = setup(h)
    job = h.ok("POST", f"/items/{item}/failover/unplanned-failover", json={})
    cmd = take(h, b, "failover")
    h.ok("POST", f"/jobs/{job['id']}/cancel")
    h.tick()
    assert h.job(job["id"])["state"] == "cancelled"
    assert b.result(cmd["command_id"], "succeeded",
                    result=fo_result("pending_commit")).status_code == 200
    h.tick()
    fo = h.ok("GET", f"/items/{item}/failovers")[0]
    assert fo["state"] == "pending_commit" and fo["result"]["fence"]["state"] == "pending", fo
    fence = play(h, a, "failover_fence", {"fenced": True, "vm_power": "stopped",
                                          "was_running": True})
    assert fence["args"]["failover_id"] == fo["id"]


def test_a_late_recovery_vm_under_a_running_cancel_is_left_to_that_cancel(h: Harness) -> None:
    """The operator already runs `failover cancel` (which deletes whatever the recovery host
    started) when the late success arrives: the fact is recorded, the cancel decides."""
    _a, b, item = setup(h)
    job = h.ok("POST", f"/items/{item}/failover/unplanned-failover", json={})
    cmd = take(h, b, "failover")
    h.ok("POST", f"/jobs/{job['id']}/cancel")
    h.tick()
    undo = h.ok("POST", f"/items/{item}/failover/cancel", json={})
    assert b.result(cmd["command_id"], "succeeded",
                    result=fo_result("pending_commit")).status_code == 200
    h.tick()
    fo = h.ok("GET", f"/items/{item}/failovers")[0]
    assert fo["state"] == "cancelled" and fo["result"]["late_start"]["superseded_by"] == undo["id"]
    play(h, b, "failover_cancel", fo_result("cancelled", generation=3))


def test_cancel_does_not_wait_for_a_down_recovery_host_that_never_got_the_failover(
        h: Harness) -> None:
    """Found by the outside review (a failback cancelled while the old primary's site was
    lost): the source was off, the failover's command never left the vault, and `failover
    cancel` waited for the lost host for ever before resuming the source — the VM off on both
    sites. Nothing of the failover is on that host: the cancel goes straight to the source."""
    a, b, item = setup(h)
    job = h.ok("POST", f"/items/{item}/failover/planned-failover", json={})
    play(h, a, "failover_prepare", {"point_id": "p000000000002", "fingerprints": {"d0": "x"}})
    h.clock.advance(h.settings.agent_down_after_s + 1)   # the recovery site is lost
    a.beat(vms=[vm_info("vm-1", "web1")])
    h.tick()
    h.ok("POST", f"/jobs/{job['id']}/cancel")
    h.tick()
    it = h.ok("GET", f"/items/{item}")
    assert it["protection"] == "failed_over" and it["health"] == "critical", it
    assert "cancelled after the source was shut down" in it["health_reasons"][0], it
    undo = h.ok("POST", f"/items/{item}/failover/cancel", json={})
    cmd = play(h, a, "failover_resume_source", {"generation": 1, "powered_on": True})
    assert cmd["args"]["power_on"] is True          # the source VM runs again
    first = h.job(undo["id"])["tasks"][0]
    assert first["state"] == "succeeded" and "never received" in first["message"], first
    assert h.ok("GET", f"/items/{item}")["protection"] == "protected"
    assert not [c for c in b.beat(store_url="https://127.0.0.1:9443")["commands"]
                if c["kind"].startswith("failover")]   # nothing for the lost host when back
