"""Failover with real processes: a vault and two agents (``drsite up``) on 127.0.0.1.

Test failover in the test network and its cleanup; planned failover that loses nothing (the
recovery VM's disks equal the stopped source's, by digest); commit, which re-protects at once
with only differences sent; failback to the original VM; a recovery plan with three groups, a
script and a manual action that pauses until resumed; split-brain (the old primary comes back
after an unplanned failover and is fenced); SIGKILL of the vault in the middle of a plan."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tests.e2e.test_cluster import until
from tests.procs import kill9

from drsite.client.api import VaultClient
from drsite.core.model import DiskSpec, Nic, PowerState, VmSpec
from drsite.demo import seed_disk
from drsite.hypervisors.file.driver import FileHypervisor
from drsite.hypervisors.file.workload import WorkloadSpec
from drsite.store.digest import file_digest, image_digest
from drsite.store.local.backend import LocalObjectStore
from drsite.store.repository import Repository
from drsite.up import Cluster, down, start_agent, start_vault, up

__all__ = ["until"]
pytestmark = pytest.mark.slow
MiB = 1024 * 1024


def hv(c: Cluster, site: str) -> FileHypervisor:
    return FileHypervisor(c.root / site / "vms")


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = up(tmp_path / "c")
    try:
        yield c
    finally:
        down(c)
        for site in ("primary", "secondary"):
            h = hv(c, site)
            for vm in h.list_vms():
                h.power_off(vm.vm_id, force=True)


def make_vm(c: Cluster, name: str, size_mib: int, ip: str, rate: int = 128 * 1024) -> str:
    h = hv(c, "primary")
    vm = h.create_blank(VmSpec(name=name, nics=(Nic("prod", "52:54:00:00:00:%02x" % (len(name) + 1), ip),),
                               disks=(DiskSpec("d0", size_mib * MiB),)))
    rng = np.random.default_rng(len(name) + 7)
    for d in vm.disks:
        seed_disk(h.disk_path(vm.vm_id, d.disk_id), d.size, 0.5, rng)
    h.set_workload(vm.vm_id, WorkloadSpec(pattern="random", io_size=4096, rate=rate, seed=3))
    h.power_on(vm.vm_id)
    return vm.vm_id


def setup(cl: VaultClient) -> None:
    cl.create_policy({"name": "fast", "frequency_s": 5.0, "retention_hours": 24,
                      "app_consistent_every_s": None, "rpo_threshold_s": 60,
                      "resync_window": "00:00-00:00", "compression": True, "encryption": False,
                      "bandwidth_limit_bps": None})
    cl.create_group({"name": "g", "site": "primary", "target_site": "secondary",
                     "policy": "fast", "match": {"vm_names": [], "hosts": [], "labels": []}})
    cl.set_network_mapping({"source_site": "primary", "recovery_site": "secondary",
                            "source_network": "prod", "recovery_network": "dr",
                            "test_network": "dr-test",
                            "ip_rule": {"kind": "subnet", "source": "10.0.0.0/24",
                                        "target": "10.9.0.0/24"}})
    # failback maps the recovery networks back
    cl.set_network_mapping({"source_site": "secondary", "recovery_site": "primary",
                            "source_network": "dr", "recovery_network": "prod",
                            "test_network": "prod-test",
                            "ip_rule": {"kind": "subnet", "source": "10.9.0.0/24",
                                        "target": "10.0.0.0/24"}})


def protect(cl: VaultClient, vm_id: str) -> dict[str, Any]:
    until("inventory", lambda: any(v["vm_id"] == vm_id for v in cl.vms()))
    job = cl.wait_job(cl.protect(vm_id, "g")["job_id"], timeout=120)
    assert job["state"] == "succeeded", job
    return next(it for it in cl.items() if it["vm_id"] == vm_id)


def run(cl: VaultClient, job: dict[str, Any], timeout: float = 120) -> dict[str, Any]:
    final = cl.wait_job(job["id"], timeout=timeout)
    assert final["state"] == "succeeded", final
    return final


def disks_digest(h: FileHypervisor, vm_id: str) -> dict[str, str]:
    return {d.disk_id: file_digest(h.disk_path(vm_id, d.disk_id), d.size) for d in h.get_vm(vm_id).disks}


def equals_point(c: Cluster, h: FileHypervisor, vm_id: str, item_id: str, point_id: str) -> bool:
    """Every disk of the VM (read through the driver: CoW overlays included) equals the point
    read back from the secondary's store."""
    repo = Repository(LocalObjectStore(c.root / "secondary" / "store"), item_id)
    try:
        for d in h.get_vm(vm_id).disks:
            r = h.open_live_reader(vm_id, d.disk_id)
            try:
                if image_digest(r) != image_digest(repo.reader(point_id, d.disk_id)):
                    return False
            finally:
                r.close()
        return True
    finally:
        repo.close()


def running_on(h: FileHypervisor, name: str) -> bool:
    return any(v.name == name and v.power is PowerState.RUNNING for v in h.list_vms())


def test_test_planned_commit_reprotect_failback(cluster: Cluster) -> None:
    vm_id = make_vm(cluster, "app", 16, "10.0.0.5")
    prim, sec = hv(cluster, "primary"), hv(cluster, "secondary")
    with cluster.client() as cl:
        setup(cl)
        item = protect(cl, vm_id)
        n0 = len(cl.points(item["id"]))

        # test failover: a CoW VM in the test network; replication goes on; cleanup removes it
        job = run(cl, cl.item_action(item["id"], "test-failover"))
        fo = cl.failovers(item["id"])[0]
        assert fo["kind"] == "test" and fo["state"] == "test_running", fo
        test_vm = sec.find_vm(fo["vm_name"])
        assert test_vm.power is PowerState.RUNNING
        assert [(n.network, n.ip) for n in test_vm.nics] == [("dr-test", "10.9.0.5")]
        assert equals_point(cluster, sec, test_vm.vm_id, item["id"], fo["point_id"])
        until("replication goes on", lambda: len(cl.points(item["id"])) >= n0 + 2, 60)
        run(cl, cl.item_action(item["id"], "cleanup-test-failover", notes="booted fine"))
        assert not any(v.name == fo["vm_name"] for v in sec.list_vms())
        assert "booted fine" in cl.failover(fo["id"])["notes"]
        assert job["tasks"][0]["state"] == "succeeded"

        # planned failover: the source stops, its last writes ship, the replica starts equal
        job = run(cl, cl.item_action(item["id"], "planned-failover"))
        fo = cl.failovers(item["id"])[0]
        assert fo["kind"] == "planned" and fo["state"] == "pending_commit", fo
        assert prim.get_vm(vm_id).power is PowerState.STOPPED
        rec_vm = sec.find_vm("app")
        assert rec_vm.power is PowerState.RUNNING
        assert [(n.network, n.ip) for n in rec_vm.nics] == [("dr", "10.9.0.5")]
        assert disks_digest(prim, vm_id) == disks_digest(sec, rec_vm.vm_id)  # no write lost
        assert fo["rto_s"] is not None and fo["rto_s"] < 30
        assert cl.item(item["id"])["protection"] == "failed_over"

        # commit re-protects at once: the recovery VM replicates back, only differences travel
        job = run(cl, cl.item_action(item["id"], "commit"), timeout=180)
        fo = cl.failover(fo["id"])
        rp = fo["result"]["reprotect"]
        assert rp["disk_bytes"] == 16 * MiB
        assert rp["bytes_sent"] < rp["disk_bytes"] // 4, rp
        rev = cl.item(rp["item_id"])
        assert rev["protection"] == "protected" and rev["site"] == "secondary"
        assert prim.get_vm(vm_id).power is PowerState.STOPPED  # never on both sites

        # failback: planned failover of the reverse item to the original VM (re-created)
        sec.set_workload(rec_vm.vm_id, WorkloadSpec(pattern="random", io_size=4096, rate=64 * 1024,
                                                    seed=9))
        until("reverse points", lambda: len(cl.points(rev["id"])) >= 2, 60)
        run(cl, cl.item_action(rev["id"], "planned-failover"))
        back = prim.find_vm("app")
        assert back.power is PowerState.RUNNING
        assert [(n.network, n.ip) for n in back.nics] == [("prod", "10.0.0.5")]
        assert sec.get_vm(rec_vm.vm_id).power is PowerState.STOPPED
        assert disks_digest(sec, rec_vm.vm_id) == disks_digest(prim, back.vm_id)
        run(cl, cl.item_action(rev["id"], "commit"), timeout=180)
        fb = cl.failovers(rev["id"])[0]
        assert fb["result"]["reprotect"]["bytes_sent"] < 16 * MiB // 4
        fwd = cl.item(fb["result"]["reprotect"]["item_id"])
        assert fwd["protection"] == "protected" and fwd["site"] == "primary"


PLAN_YAML = """
plans:
  - name: shop
    description: three tiers
    groups:
      - name: db
        vms: [db]
        pre:
          - script: 'echo "$DRSITE_PLAN $DRSITE_PLAN_ACTION $DRSITE_GROUP" >> {marker}'
            timeout_s: 30
      - name: app
        vms: [app]
        post:
          - manual: Check that the app answers on the test network
      - name: web
        vms: [web]
        pre:
          - script: 'echo "web on $DRSITE_GROUP" >> {marker}'
            on: secondary-host
"""


def test_plan_three_groups_script_manual_resume(cluster: Cluster, tmp_path: Path) -> None:
    import yaml

    marker = tmp_path / "marker.txt"
    vms = {n: make_vm(cluster, n, 8, f"10.0.0.{i + 10}") for i, n in enumerate(("db", "app", "web"))}
    with cluster.client() as cl:
        setup(cl)
        for vm_id in vms.values():
            protect(cl, vm_id)
        docs = yaml.safe_load(PLAN_YAML.format(marker=marker))["plans"]
        diff = cl.apply_plans(docs, dry_run=True)
        assert diff["changes"] == [{"plan": "shop", "change": "create", "fields": ["description", "groups"]}]
        assert cl.plans() == []
        cl.apply_plans(docs)
        assert cl.apply_plans(docs, dry_run=True)["changes"][0]["change"] == "unchanged"

        job = cl.plan_action("shop", "test-failover")
        until("manual step", lambda: "waiting for operator" in cl.job(job["id"])["message"], 120)
        j = cl.job(job["id"])
        assert j["state"] == "running"
        done_groups = [t["title"] for t in j["tasks"] if t["state"] == "succeeded"]
        assert any("Group db" in t for t in done_groups) and any("Group app" in t for t in done_groups)
        assert not any("Group web" in t for t in done_groups)
        time.sleep(1.0)
        assert cl.job(job["id"])["state"] == "running"  # it really waits
        cl.resume_job(job["id"])
        final = cl.wait_job(job["id"], timeout=120)
        assert final["state"] == "succeeded", final
        assert "measured RTO" in final["message"]
        ends = [t["ended_at"] for t in final["tasks"]]
        assert ends == sorted(ends)  # in order
        lines = marker.read_text().splitlines()
        # the vault's script, then the secondary agent's (one machine here: one file)
        assert lines == ["shop test-failover db", "web on web"]  # the action's one spelling
        sec = hv(cluster, "secondary")
        assert sorted(v.name for v in sec.list_vms() if v.power is PowerState.RUNNING) == \
            ["app-test", "db-test", "web-test"]
        run(cl, cl.plan_action("shop", "cleanup-test-failover"))
        assert not [v for v in sec.list_vms()]


def test_sigkill_vault_mid_plan_and_split_brain(cluster: Cluster) -> None:
    vms = {n: make_vm(cluster, n, 8, f"10.0.0.{i + 20}") for i, n in enumerate(("a1", "a2"))}
    prim, sec = hv(cluster, "primary"), hv(cluster, "secondary")
    with cluster.client() as cl:
        setup(cl)
        items = {n: protect(cl, v) for n, v in vms.items()}
        cl.apply_plans([{"name": "p", "groups": [{"name": "one", "vms": ["a1"]},
                                                 {"name": "two", "vms": ["a2"]}]}])
        job = cl.plan_action("p", "planned-failover")
        until("plan running", lambda: cl.job(job["id"])["progress"] > 0
              or cl.job(job["id"])["state"] != "queued", 30)
    kill9(cluster.pids["vault"])
    start_vault(cluster)
    with cluster.client() as cl:
        final = cl.wait_job(job["id"], timeout=180)
        # resumed after the restart: it finishes, or stops in a state an operator can act on
        assert final["state"] in ("succeeded", "failed"), final
        if final["state"] == "failed":
            assert final["error"]["hint"]
        for n, v in vms.items():
            assert not (prim.get_vm(v).power is PowerState.RUNNING and running_on(sec, n)), n
        if final["state"] == "succeeded":
            for n in vms:
                assert running_on(sec, n)
                assert cl.item(items[n]["id"])["protection"] == "failed_over"

        # cancel hands an item back: the source VM runs and replicates again
        a2 = items["a2"]["id"]
        if cl.item(a2)["protection"] == "failed_over":
            run(cl, cl.item_action(a2, "cancel"))
        until("a2 protected again", lambda: cl.item(a2)["protection"] == "protected", 60)
        until("a2 running on the primary", lambda: prim.get_vm(vms["a2"]).power is PowerState.RUNNING, 30)
        n2 = len(cl.points(a2))
        until("a2 replicates again", lambda: len(cl.points(a2)) >= n2 + 1, 60)

        # split brain, on an item never failed over before (its first promotion must fence):
        # unplanned failover while the primary agent is dead and its VM keeps running (a
        # partition); the old primary comes back and tries to replicate on its own: fenced
        a3_vm = make_vm(cluster, "a3", 8, "10.0.0.30")
        a3 = protect(cl, a3_vm)["id"]
        until("a3 has delta points", lambda: len(cl.points(a3)) >= 2, 60)
        # the store agent proves its replica equal to the point it holds in the background
        state = cluster.root / "secondary" / "agent" / "replicas" / a3 / "state.json"

        def verified() -> bool:
            st = json.loads(state.read_text()) if state.exists() else {}
            return bool(st.get("verified")) and st["verified"]["point_id"] == st["point_id"]

        until("a3's replica verified in the background", verified, 60)
        kill9(cluster.pids["agent-primary"])
        run(cl, cl.item_action(a3, "unplanned-failover"))
        fo = cl.failovers(a3)[0]
        # so the failover compared nothing, or only a cycle that arrived meanwhile
        agent_rec = fo["result"]["agent"]
        assert agent_rec["verified"] and agent_rec["verify_scope"] in (
            "pre-verified", "incremental"), agent_rec
        rec_vm = sec.find_vm("a3")
        assert rec_vm.power is PowerState.RUNNING and fo["generation"] == 2
        assert equals_point(cluster, sec, rec_vm.vm_id, a3, fo["point_id"])
        # the replica moved into the VM is not rebuilt behind it (hydration runs every 2 s)
        time.sleep(4.5)
        assert not list((cluster.root / "secondary" / "agent" / "replicas" / a3).glob("*.img"))
        n_points = len(cl.points(a3))
        store_points = sorted((cluster.root / "secondary" / "store" / "items" / a3 / "points").iterdir())
        assert prim.get_vm(a3_vm).power is PowerState.RUNNING  # partitioned, not dead
        until("the item warns that the old primary may still write",
              lambda: any("old primary may still be writing" in r
                          for r in cl.item(a3)["health_reasons"]), 15)
        start_agent(cluster, "primary", store=True)   # the old primary returns
        # fenced at once: the vault's failover_fence powers its VM off (before: it kept
        # running, and writing, until re-protect)
        until("the old primary fenced",
              lambda: (cl.failovers(a3)[0]["result"].get("fence") or {}).get("state") == "done", 30)
        assert prim.get_vm(a3_vm).power is PowerState.STOPPED
        log = cluster.root / "logs" / "agent-primary.log"
        assert any(a3 in ln and "fencing the old primary" in ln for ln in log.read_text().splitlines())
        # cut off from the vault, it does not replicate on its own (offline mode skips it)
        kill9(cluster.pids["vault"])
        time.sleep(35)
        assert sorted((cluster.root / "secondary" / "store" / "items" / a3 / "points").iterdir()) \
            == store_points
        assert sec.get_vm(rec_vm.vm_id).power is PowerState.RUNNING
    start_vault(cluster)
    with cluster.client() as cl:
        assert len(cl.points(a3)) == n_points
        assert cl.item(a3)["protection"] == "failed_over"
        with pytest.raises(Exception, match="only a protected item"):
            cl.item_action(a3, "test-failover")
