"""Multi-process: a vault and two agents as real processes on 127.0.0.1 (``drsite up``).

Protect VMs through the API; initial replication completes; delta points arrive on time;
SIGKILL the primary agent mid initial copy and restart it → replication resumes without a full
copy; SIGKILL the vault mid-job and restart it → the job resumes or fails clearly."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from drsite.client.api import VaultClient
from drsite.core.model import DiskSpec, VmSpec
from drsite.demo import seed_disk
from drsite.hypervisors.file.driver import FileHypervisor
from drsite.hypervisors.file.workload import WorkloadSpec
from drsite.up import Cluster, down, start_agent, start_vault, up

pytestmark = pytest.mark.slow
MiB = 1024 * 1024
TERMINAL = ("succeeded", "failed", "cancelled")


def until(what: str, check: Any, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        res = check()
        if res:
            return res
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.25)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = up(tmp_path / "c")
    try:
        yield c
    finally:
        down(c)
        # the VMs are not the cluster's processes: stop their guests too, or they outlive the test
        hv = FileHypervisor(c.root / "primary" / "vms")
        for vm in hv.list_vms():
            hv.power_off(vm.vm_id, force=True)


def make_vm(c: Cluster, name: str, size_mib: int, rate: int = 256 * 1024) -> str:
    hv = FileHypervisor(c.root / "primary" / "vms")
    vm = hv.create_blank(VmSpec(name=name, disks=(DiskSpec("d0", size_mib * MiB),
                                                   DiskSpec("d1", size_mib * MiB))))
    rng = np.random.default_rng(len(name))
    for d in vm.disks:
        seed_disk(hv.disk_path(vm.vm_id, d.disk_id), d.size, 0.6, rng)
    hv.set_workload(vm.vm_id, WorkloadSpec(pattern="random", io_size=4096, rate=rate, seed=1))
    hv.power_on(vm.vm_id)
    return vm.vm_id


def vm_known(cl: VaultClient, vm_id: str) -> bool:
    return any(v.get("vm_id") == vm_id for v in cl.vms())


def setup_policy(cl: VaultClient, frequency: float = 5.0) -> None:
    cl.create_policy({"name": "fast", "frequency_s": frequency, "retention_hours": 24,
                      "app_consistent_every_s": None, "rpo_threshold_s": 60,
                      "resync_window": "00:00-00:00", "compression": True, "encryption": False,
                      "bandwidth_limit_bps": None})
    cl.create_group({"name": "g", "site": "primary", "target_site": "secondary",
                     "policy": "fast", "match": {"vm_names": [], "hosts": [], "labels": []}})


def item_of(cl: VaultClient, vm_id: str) -> dict[str, Any]:
    return next(it for it in cl.items() if it.get("vm_id") == vm_id)


def test_protect_initial_and_deltas_on_time(cluster: Cluster) -> None:
    vm_id = make_vm(cluster, "web", 32)
    with cluster.client() as cl:
        until("inventory", lambda: vm_known(cl, vm_id))
        setup_policy(cl)
        job_id = cl.protect(vm_id, "g")["job_id"]
        job = cl.wait_job(job_id, timeout=120)
        assert job["state"] == "succeeded", job
        assert [t["state"] for t in job["tasks"]] == ["succeeded"] * len(job["tasks"])
        item = item_of(cl, vm_id)
        n0 = len(cl.points(item["id"]))
        assert n0 >= 1
        t0 = time.time()
        until("three delta points", lambda: len(cl.points(item["id"])) >= n0 + 3, 45)
        pts = cl.points(item["id"])
        gaps = np.diff([p["created_at"] for p in pts[-4:]])
        assert all(g < 5.0 * 2.5 for g in gaps), gaps  # on time, with slack for a 2-core box
        assert time.time() - t0 < 40
        it = cl.item(item["id"])
        assert it["health"] == "normal" and it["rpo_s"] is not None and it["rpo_s"] < 20
        assert "drsite_" in cl.metrics()


def stop_process(pid: int, sig: int = signal.SIGTERM) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        return
    until("process exit", lambda: not alive(pid), 30)


def alive(pid: int) -> bool:
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def test_sigkill_agent_mid_initial_resumes_without_full_copy(cluster: Cluster,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    vm_id = make_vm(cluster, "db", 96, rate=64 * 1024)
    with cluster.client() as cl:
        until("inventory", lambda: vm_known(cl, vm_id))
        setup_policy(cl, frequency=30)
        # the primary agent SIGKILLs itself right after its third pack is stored (failpoint)
        stop_process(cluster.pids["agent-primary"])
        monkeypatch.setenv("DRSITE_FAILPOINTS", "store.pack-stored=kill@3")
        start_agent(cluster, "primary", store=True)
        monkeypatch.delenv("DRSITE_FAILPOINTS")
        job_id = cl.protect(vm_id, "g")["job_id"]
        until("the agent killed mid initial copy", lambda: not alive(cluster.pids["agent-primary"]),
              120)
        assert cl.job(job_id)["state"] == "running"
        start_agent(cluster, "primary", store=True)
        job = cl.wait_job(job_id, timeout=180)
        assert job["state"] == "succeeded", job
        rep = item_of(cl, vm_id).get("report") or {}
        assert rep.get("initial_resumed_from", 0) >= 2 * 8 * MiB, rep


def test_sigkill_vault_mid_job_resumes_or_fails_clearly(cluster: Cluster) -> None:
    vm_id = make_vm(cluster, "app", 128, rate=64 * 1024)
    with cluster.client() as cl:
        until("inventory", lambda: vm_known(cl, vm_id))
        setup_policy(cl, frequency=30)
        job_id = cl.protect(vm_id, "g")["job_id"]
        until("job running", lambda: cl.job(job_id)["state"] == "running", 30)
    os.killpg(cluster.pids["vault"], signal.SIGKILL)
    time.sleep(0.5)
    start_vault(cluster)
    with cluster.client() as cl:
        job = cl.wait_job(job_id, timeout=180)
        assert job["state"] in TERMINAL
        if job["state"] == "succeeded":
            assert len(cl.points(item_of(cl, vm_id)["id"])) >= 1
        else:  # failed clearly: a reason an operator can act on
            assert job.get("error") and job["error"].get("message"), job
