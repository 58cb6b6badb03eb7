"""Liveness with real processes (issues 19 and 13): a vault and two agents (``drsite up``).

Issue 19's three findings, each a test: an agent killed with a vault command in flight is back
to protected within two policy intervals (not 15 minutes); a vault killed in an unplanned
failover, then a cancel, leaves the source replicating (its report recomputed, the job saying so
only once a point proves it); a full disk during cancel is a clear transient error that is
retried, never "failed unexpectedly" nor a silent wait.

Issue 13: with the primary agent hung (SIGSTOP) and, separately, with the link between the
sites black-holed (a proxy that keeps sockets open and forwards nothing), the secondary keeps
heartbeating, an unplanned failover completes in < 10 s, the old primary's VM is fenced as soon
as its agent can be told, the item shows "old primary may still be writing" until then, and the
recovery VM's disks are never written by the old side."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.blackhole import Proxy
from tests.e2e.test_cluster import alive, stop_process, until
from tests.e2e.test_failover_cluster import disks_digest, hv, make_vm, protect, run, setup
from tests.procs import kill9

from drsite.client.api import VaultClient
from drsite.core.model import PowerState
from drsite.up import Cluster, down, start_agent, start_vault, up

pytestmark = pytest.mark.slow
POLICY_S = 5.0          # the "fast" policy of ``setup``
SLACK_S = 8.0           # process start-up and a busy 2-core box


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = up(tmp_path / "c")
    try:
        yield c
    finally:
        for name, pid in list(c.pids.items()):
            if name.startswith("agent"):
                try:
                    os.kill(pid, signal.SIGCONT)  # a stopped agent cannot stop cleanly
                except ProcessLookupError:
                    pass
        down(c)
        for site in ("primary", "secondary"):
            h = hv(c, site)
            for vm in h.list_vms():
                h.power_off(vm.vm_id, force=True)


def deltas(cl: VaultClient, item_id: str) -> list[dict[str, Any]]:
    return [p for p in cl.points(item_id) if p.get("kind") != "initial"]


def not_on_both(c: Cluster, name: str, vm_id: str) -> None:
    prim, sec = hv(c, "primary"), hv(c, "secondary")
    here = prim.get_vm(vm_id).power is PowerState.RUNNING
    there = any(v.name == name and v.power is PowerState.RUNNING for v in sec.list_vms())
    assert not (here and there), f"{name} runs on both sites"


# ------------------------------------------------------------------------- issue 19, finding 1

def test_agent_killed_with_protect_in_flight_is_protected_within_two_intervals(
        cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """The primary agent dies mid initial copy (its `protect` running): the restarted agent
    resumes the command it had accepted, the vault's command ends, and cycles follow on time."""
    vm_id = make_vm(cluster, "f1", 48, "10.0.0.41", rate=64 * 1024)
    with cluster.client() as cl:
        setup(cl)
        until("inventory", lambda: any(v["vm_id"] == vm_id for v in cl.vms()))
        stop_process(cluster.pids["agent-primary"])
        monkeypatch.setenv("DRSITE_FAILPOINTS", "store.pack-stored=kill@2")
        start_agent(cluster, "primary", store=True)
        monkeypatch.delenv("DRSITE_FAILPOINTS")
        job_id = cl.protect(vm_id, "g")["job_id"]
        until("the agent killed mid initial copy",
              lambda: not alive(cluster.pids["agent-primary"]), 120)
        start_agent(cluster, "primary", store=True)
        job = cl.wait_job(job_id, timeout=120)
        assert job["state"] == "succeeded", job
        t_protected = time.monotonic()
        item = next(it for it in cl.items() if it["vm_id"] == vm_id)
        # before: the `protect` stayed "running" on the vault for 15 min and no cycle was sent
        until("a delta point within two policy intervals",
              lambda: len(deltas(cl, item["id"])) >= 1, 2 * POLICY_S + SLACK_S)
        waited = time.monotonic() - t_protected
        until("two more", lambda: len(deltas(cl, item["id"])) >= 3, 3 * POLICY_S + SLACK_S)
        it = cl.item(item["id"])
        assert it["health"] in ("normal", "warning") and it["state"] == "protected", it
        assert waited <= 2 * POLICY_S + SLACK_S


# ------------------------------------------------------------------------- issue 19, finding 2

def test_vault_killed_in_unplanned_failover_then_cancel_replicates_again(cluster: Cluster) -> None:
    """The old primary is hung while an unplanned failover runs and the vault is killed in it;
    the old primary comes back and is fenced (its engine too); the vault is killed again, then
    the failover is cancelled: the source must really replicate again (before: its report stayed
    `critical / fenced`, the scheduler sent nothing, and the job said it replicated)."""
    vm_id = make_vm(cluster, "f2", 16, "10.0.0.42")
    prim = hv(cluster, "primary")
    with cluster.client() as cl:
        setup(cl)
        item = protect(cl, vm_id)["id"]
        until("delta points", lambda: len(deltas(cl, item)) >= 1, 30)
        os.kill(cluster.pids["agent-primary"], signal.SIGSTOP)
        job = cl.item_action(item, "unplanned-failover")
    kill9(cluster.pids["vault"])        # early in the failover
    start_vault(cluster)
    with cluster.client() as cl:
        final = cl.wait_job(job["id"], timeout=60)
        assert final["state"] == "succeeded", final
        fo = cl.failovers(item)[0]
        until("the item critical: old primary may still be writing",
              lambda: any("old primary may still be writing" in r
                          for r in cl.item(item)["health_reasons"]), 10)
        assert cl.item(item)["health"] == "critical"
        assert prim.get_vm(vm_id).power is PowerState.RUNNING   # hung agent: not fenced yet
        os.kill(cluster.pids["agent-primary"], signal.SIGCONT)
        until("the old primary fenced",
              lambda: (cl.failover(fo["id"])["result"].get("fence") or {}).get("state") == "done",
              2 * POLICY_S + SLACK_S)
        assert prim.get_vm(vm_id).power is PowerState.STOPPED
        not_on_both(cluster, "f2", vm_id)
        until("health no longer critical", lambda: cl.item(item)["health"] != "critical", 15)
        # the old primary reports the item fenced
        until("source report fenced",
              lambda: ((cl.item(item).get("report") or {}).get("last_error") or {})
              .get("code") == "fenced", 15)
    kill9(cluster.pids["vault"])        # vault-kill-then-cancel
    start_vault(cluster)
    with cluster.client() as cl:
        n = len(cl.points(item))
        t0 = time.monotonic()
        final = run(cl, cl.item_action(item, "cancel"), timeout=60)
        assert "replicates again" in final["message"], final
        it = cl.item(item)
        assert it["protection"] == "protected" and it["state"] == "protected", it
        # the job's own replication proved it (catalogued from the next heartbeat)
        until("the cancel's point catalogued", lambda: len(cl.points(item)) > n, 10)
        until("a scheduled point after the cancel",
              lambda: len(cl.points(item)) > n + 1, 2 * POLICY_S + SLACK_S)
        assert time.monotonic() - t0 < 60
        until("the source runs again", lambda: prim.get_vm(vm_id).power is PowerState.RUNNING, 10)
        not_on_both(cluster, "f2", vm_id)
        it = cl.item(item)
        assert it["health"] != "critical" and (it["report"] or {}).get("state") == "protected", it


# ------------------------------------------------------------------------- issue 19, finding 3

def test_full_disk_during_cancel_is_a_clear_error_and_is_retried(cluster: Cluster) -> None:
    vm_id = make_vm(cluster, "f3", 8, "10.0.0.43")
    with cluster.client() as cl:
        setup(cl)
        item = protect(cl, vm_id)["id"]
        stop_process(cluster.pids["agent-secondary"])
        # the secondary's disk is full for the first two attempts of the cancel
        start_agent(cluster, "secondary", store=True,
                    env={"DRSITE_FAILPOINTS": "agent.failover-cancel=enospc*2"})
        run(cl, cl.item_action(item, "unplanned-failover"))
        t0 = time.monotonic()
        final = run(cl, cl.item_action(item, "cancel"), timeout=60)
        assert time.monotonic() - t0 < 30, final
        assert cl.item(item)["protection"] == "protected"
    log = (cluster.root / "logs" / "agent-secondary.log").read_text()
    assert "low_disk" in log or "no space left" in log.lower()
    assert "failed unexpectedly" not in log


# ------------------------------------------------------------------------- issue 13

def reverse_item(cl: VaultClient, c: Cluster) -> str:
    """A VM of the secondary site protected back to the primary's store: its catalogue lives
    on the primary, the peer that is about to hang."""
    sec = hv(c, "secondary")
    from drsite.core.model import DiskSpec, VmSpec
    vm = sec.create_blank(VmSpec(name="rev", disks=(DiskSpec("d0", 4 << 20),)))
    sec.power_on(vm.vm_id)
    cl.create_group({"name": "back", "site": "secondary", "target_site": "primary",
                     "policy": "fast", "match": {"vm_names": [], "hosts": [], "labels": []}})
    until("inventory", lambda: any(v["vm_id"] == vm.vm_id for v in cl.vms()))
    job = cl.wait_job(cl.protect(vm.vm_id, "back")["job_id"], timeout=60)
    assert job["state"] == "succeeded", job
    return next(it["id"] for it in cl.items() if it["vm_id"] == vm.vm_id)


@pytest.mark.parametrize("fault", ["sigstop", "blackhole"])
def test_hung_primary_never_stalls_the_recovery_site(cluster: Cluster, fault: str) -> None:
    proxies: list[Proxy] = []
    if fault == "blackhole":
        # both stores are reached through proxies; the vault is reached directly
        for site in ("secondary", "primary"):
            stop_process(cluster.pids[f"agent-{site}"])
            port = cluster.store_port if site == "secondary" else cluster.primary_store_port
            assert port is not None
            proxies.append(Proxy(port))
            start_agent(cluster, site, store=True, store_url=proxies[-1].url)
    vm_id = make_vm(cluster, "h1", 16, "10.0.0.44")
    prim, sec = hv(cluster, "primary"), hv(cluster, "secondary")
    try:
        with cluster.client() as cl:
            setup(cl)
            item = protect(cl, vm_id)["id"]
            rev = reverse_item(cl, cluster)
            until("delta points", lambda: len(deltas(cl, item)) >= 1, 30)
            if fault == "sigstop":
                os.kill(cluster.pids["agent-primary"], signal.SIGSTOP)
            else:
                for p in proxies:
                    p.hold()
            sec_id = next(h["id"] for h in cl.hosts() if h["site"] == "secondary")
            t0 = time.monotonic()
            job = cl.item_action(item, "unplanned-failover")
            final = cl.wait_job(job["id"], timeout=60)
            wall = time.monotonic() - t0
            assert final["state"] == "succeeded", final
            assert wall < 10, f"unplanned failover took {wall:.1f} s with the primary {fault}"
            fo = cl.failovers(item)[0]
            assert fo["wall_s"] is not None and fo["wall_s"] < 10, fo
            rec = sec.find_vm("h1")
            assert rec.power is PowerState.RUNNING
            digest = disks_digest(sec, rec.vm_id)
            store_points = sorted((cluster.root / "secondary" / "store" / "items" / item /
                                   "points").iterdir())
            # the secondary keeps heartbeating for a while (its reverse item's peer is hung)
            beats = set()
            for _ in range(8):
                h = cl.host(sec_id)
                assert h["up"], h
                beats.add(h["last_heartbeat"])
                time.sleep(1.0)
            assert len(beats) >= 3, beats
            # the reverse item needs the hung peer: degraded, with the reason
            until("reverse item degraded with the reason",
                  lambda: any("does not answer" in r or "not sending heartbeats" in r
                              for r in cl.item(rev)["health_reasons"]), 30)
            if fault == "sigstop":
                assert any("old primary may still be writing" in r
                           for r in cl.item(item)["health_reasons"])
                assert any(v["warning"] for v in cl.vms() if v["vm_id"] == vm_id)
                os.kill(cluster.pids["agent-primary"], signal.SIGCONT)
            # fenced as soon as the old primary's agent can be told (at once if reachable)
            until("the old primary fenced",
                  lambda: (cl.failover(fo["id"])["result"].get("fence") or {}).get("state")
                  == "done", 2 * POLICY_S + SLACK_S)
            assert prim.get_vm(vm_id).power is PowerState.STOPPED
            # the warning stays until the old primary's inventory says its VM is off (its
            # next heartbeat after the fence), never longer
            until("the both-sites warning cleared",
                  lambda: not any(v["warning"] for v in cl.vms() if v["vm_id"] == vm_id), 15)
            for p in proxies:
                p.release()
            time.sleep(2 * POLICY_S)   # the old side had every chance to write
            assert disks_digest(sec, rec.vm_id) == digest
            assert sorted((cluster.root / "secondary" / "store" / "items" / item /
                           "points").iterdir()) == store_points
            assert sec.get_vm(rec.vm_id).power is PowerState.RUNNING
    finally:
        for p in proxies:
            p.close()
