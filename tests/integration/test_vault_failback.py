"""Failback as a verb, a VM's one identity and history, and the bugs of issue 17 around them,
through the vault API with the agents played by the test (SQLite and PostgreSQL):

- ``failover/failback`` on the original item (or its reverse item) is a planned failover of the
  reverse item back home, replacing the VM the original left stopped there;
- every item of the VM shares its ``lineage_id``, ``GET /items/{id}/history`` tells the whole
  story from any of them, and the failback's item goes back to the original group (no
  ``-reverse-reverse`` group);
- an unplanned failover after a failback replaces the stale VM on the recovery site (it used to
  fail at ``start_replica`` with "a VM named … already exists");
- a failover that fails half-way leaves the item critical with an alert and a hint to cancel;
- a planned failover is refused while a test failover of the item runs.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from drsite.vault.testing import Agent, Harness, point, report, vm_info
from tests.integration.test_vault_api import err, policy_and_group, protect, two_sites

PRIM_STORE, SEC_STORE = "https://127.0.0.1:9555", "https://127.0.0.1:9443"


@pytest.fixture(params=["sqlite", "postgresql"])
def h(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Harness]:
    url = request.getfixturevalue("pg_url") if request.param == "postgresql" else None
    hh = Harness(tmp_path / "vault", url)
    yield hh
    hh.close()


class World:
    """Two agents with their inventories: ``a`` on site prim, ``b`` on site sec (both serve a
    store, as re-protect needs)."""

    def __init__(self, h: Harness) -> None:
        self.h = h
        self.a, self.b = two_sites(h)
        # the primary site's store serves the reverse direction: its host holds the role
        assert h.set_store("prim", self.a.name).status_code == 200
        self.vms: dict[str, list[dict[str, Any]]] = {
            self.a.host_id: [vm_info("vm-1", "web1"), vm_info("vm-2", "db1", labels=["db"])],
            self.b.host_id: []}
        policy_and_group(h)
        self.item = protect(h, self.a)
        h.ok("PUT", "/network-mappings", json={"source_site": "prim", "recovery_site": "sec",
                                               "source_network": "lan", "recovery_network": "dr",
                                               "test_network": "bubble"})

    def store(self, agent: Agent) -> str:
        return PRIM_STORE if agent is self.a else SEC_STORE

    def beat(self, agent: Agent) -> dict[str, Any]:
        return agent.beat(vms=self.vms[agent.host_id], store_url=self.store(agent))

    def play(self, agent: Agent, kind: str, result: dict[str, Any] | None = None, *,
             status: str = "succeeded", error: dict[str, Any] | None = None) -> dict[str, Any]:
        """Tick until ``agent`` gets a command of ``kind``; answer it."""
        for _ in range(3):
            self.h.tick()
            cmds = [c for c in self.beat(agent)["commands"] if c["kind"] == kind]
            if cmds:
                break
        assert len(cmds) == 1, f"no {kind} for {agent.name}"
        body: dict[str, Any] = {"error": error} if error is not None else {"result": result or {}}
        assert agent.result(cmds[0]["command_id"], status, **body).status_code == 200
        self.h.tick()
        return dict(cmds[0])

    def first_point(self, agent: Agent, item: str, vm_id: str) -> None:
        """The reverse item's agent reports its first point (re-protect's resync)."""
        now = self.h.clock.now()
        agent.beat(vms=self.vms[agent.host_id], store_url=self.store(agent),
                   items=[{"item_id": item, "report": report(item, vm_id, "web1",
                                                             last_point_time=now),
                           "new_points": [point(item, 1, now)]}])

    def recovery_vm(self, agent: Agent, vm_id: str, network: str) -> None:
        """The VM a failover made appears in the agent's inventory; the one it replaced goes."""
        vm = vm_info(vm_id, "web1")
        vm["nics"] = [{"network": network, "mac": "52:54:00:00:00:01", "ip": None}]
        self.vms[agent.host_id] = [v for v in self.vms[agent.host_id] if v["name"] != "web1"] + [vm]


def fo_result(state: str, vm_id: str, **kw: Any) -> dict[str, Any]:
    return {"failover": {"state": state, "point_id": "p000001", "vm_name": "web1",
                         "vm_id": vm_id, "generation": 2, "rto_s": 1.0, **kw}}


def planned(w: World, item: str, src: Agent, dst: Agent, new_vm: str, network: str,
            action: str = "planned-failover") -> dict[str, Any]:
    job = w.h.ok("POST", f"/items/{item}/failover/{action}", json={})
    w.play(src, "failover_prepare", {"point_id": "p000001", "fingerprints": {"disk0": "x"}})
    cmd = w.play(dst, "failover", fo_result("pending_commit", new_vm))
    w.recovery_vm(dst, new_vm, network)
    assert w.h.job(job["id"])["state"] == "succeeded", w.h.job(job["id"])
    return cmd


def commit_and_reprotect(w: World, item: str, src: Agent, dst: Agent, vm_id: str,
                         **body: Any) -> str:
    """Commit a planned failover to ``vm_id`` (it re-protects); the reverse item's id."""
    job = w.h.ok("POST", f"/items/{item}/failover/commit", json=body)
    w.play(dst, "failover_commit", fo_result("committed", vm_id))
    seed = w.play(src, "reprotect_seed", {"base_point_id": "b1", "base_bytes_local": 1,
                                          "disk_bytes": 1 << 20})
    rev = str(seed["args"]["rev_item_id"])
    w.beat(src)
    w.h.tick()         # the reverse item exists: its store gets its grant and confirms it
    w.h.store_beat()
    cmd = w.play(dst, "protect", {"report": {"bytes_sent": 10}})
    assert w.h.job(job["id"])["state"] == "running"  # until the first point is catalogued
    w.first_point(dst, rev, str(cmd["args"]["vm_id"]))
    w.h.tick()
    assert w.h.job(job["id"])["state"] == "succeeded", w.h.job(job["id"])
    return rev


def test_failback_verb_one_lineage_home_group_and_the_unplanned_after_failback(h: Harness) -> None:
    w = World(h)
    a, b, first = w.a, w.b, w.item
    # failback before anything failed over: refused, with the command that comes first
    e = err(h.call("POST", f"/items/{first}/failover/failback", json={}), 409)
    assert "drsite failover commit" in e["hint"]

    planned(w, first, a, b, "rvm-1", "dr")
    rev = commit_and_reprotect(w, first, a, b, "rvm-1", create_reverse_mapping=True)
    r = h.ok("GET", f"/items/{rev}")
    assert r["lineage_id"] == first and r["origin_item_id"] == first and r["group"] == "g1-reverse"
    assert h.ok("GET", f"/items/{first}?")["protection"] == "reprotected"
    # the committed item's warning ("re-protect it") ends with the re-protect
    h.tick()
    old = h.ok("GET", f"/items/{first}")
    assert (old["health"], old["health_reasons"]) == ("normal", []), old

    # failback, asked on the ORIGINAL item: the reverse item fails over home, and the stopped
    # original VM is replaced by the one made from the reverse item's final point
    cmd = planned(w, first, b, a, "vm-9", "lan", action="failback")
    assert cmd["item_id"] == rev and cmd["args"]["replace_vm"] == "vm-1"
    jobs = [j for j in h.entries("/jobs") if j["item_id"] == rev]
    assert jobs[0]["kind"] == "Failback"
    fwd = commit_and_reprotect(w, rev, b, a, "vm-9")  # the way back (prim→sec) exists: no flag
    f = h.ok("GET", f"/items/{fwd}")
    assert f["lineage_id"] == first and f["group"] == "g1"  # home, not g1-reverse-reverse
    assert sorted(g["name"] for g in h.ok("GET", "/groups")) == ["g1", "g1-reverse"]

    hist = h.ok("GET", f"/items/{rev}/history")  # any item of the VM tells the whole story
    assert hist["lineage_id"] == first and hist["current_item_id"] == fwd
    assert [x["id"] for x in hist["items"]] == [fwd, rev, first]
    assert [(x["source_site"], x["target_site"]) for x in hist["items"]] == [
        ("prim", "sec"), ("sec", "prim"), ("prim", "sec")]
    assert len(hist["failovers"]) == 2 and {j["item_id"] for j in hist["jobs"]} == {first, rev}
    assert h.ok("GET", f"/items/{first}/history")["items"] == hist["items"]

    # the bug: an unplanned failover of the forward item after the failback replaces the VM
    # the reverse item left stopped on the recovery site
    h.ok("POST", f"/items/{fwd}/failover/unplanned-failover", json={})
    cmd = w.play(b, "failover", fo_result("pending_commit", "rvm-2"))
    assert cmd["item_id"] == fwd and cmd["args"]["replace_vm"] == "rvm-1"


def test_a_failover_that_fails_half_way_is_critical_with_an_alert(h: Harness) -> None:
    w = World(h)
    item = w.item
    h.ok("POST", f"/items/{item}/failover/unplanned-failover", json={})
    w.play(w.b, "failover", status="failed",
           error={"code": "conflict", "class": "permanent", "message": "a VM named web1 exists",
                  "hint": None})
    for _ in range(2):
        h.tick()
    it = h.ok("GET", f"/items/{item}")
    assert it["protection"] == "failed_over" and it["health"] == "critical", it
    assert any(f"drsite failover cancel {item}" in r for r in it["health_reasons"])
    alerts = [x for x in h.entries("/alerts") if x["key"] == f"critical:{item}"]
    assert alerts and alerts[0]["active"] and "a VM named web1 exists" in alerts[0]["message"]


def test_no_planned_failover_while_a_test_failover_runs(h: Harness) -> None:
    w = World(h)
    item = w.item
    h.ok("POST", f"/items/{item}/failover/test-failover", json={})
    w.play(w.b, "failover", fo_result("test_running", "t-1", vm_name="web1-test"))
    for action in ("planned-failover", "unplanned-failover", "failback"):
        e = err(h.call("POST", f"/items/{item}/failover/{action}", json={}), 409)
        if action != "failback":
            assert f"drsite failover cleanup {item}" in e["hint"], e
    assert h.ok("GET", f"/items/{item}")["protection"] == "protected"
    job = h.ok("POST", f"/items/{item}/failover/cleanup-test-failover", json={"notes": "ok"})
    w.play(w.b, "failover_cleanup", fo_result("cleaned_up", "t-1"))
    assert h.job(job["id"])["state"] == "succeeded"
    h.ok("POST", f"/items/{item}/failover/planned-failover", json={})


def test_action_spellings(h: Harness) -> None:
    w = World(h)
    # the one spelling, and the older underscore spelling still read (scripts written for it)
    job = h.ok("POST", f"/items/{w.item}/failover/test_failover", json={})
    assert job["kind"] == "TestFailover"
    e = err(h.call("POST", f"/items/{w.item}/failover/test", json={}), 400)
    assert "test-failover" in e["hint"] and "test_failover" not in e["hint"]
