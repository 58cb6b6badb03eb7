"""What the deployment benchmarks share: a ``drsite up`` cluster that powers every file VM off
when it ends, file VMs seeded with data and a guest workload, and the protection of those VMs
through the API (a policy, a group, the network mapping, one protect job per VM)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from benchlib import MiB

from drsite.client.api import VaultClient
from drsite.core.model import DiskSpec, Nic, VmSpec
from drsite.demo import seed_disk
from drsite.hypervisors.file.driver import FileHypervisor
from drsite.hypervisors.file.workload import WorkloadSpec
from drsite.up import Cluster, down, up

T = TypeVar("T")


def wait(what: str, check: Callable[[], T], timeout: float, every: float = 0.1) -> T:
    """``check()``'s first truthy answer; exits the benchmark naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(every)
    raise SystemExit(f"timed out waiting for {what}")


def power_off_all(root: Path, sites: tuple[str, ...] = ("primary", "secondary")) -> None:
    """Force every file VM under ``root/<site>/vms`` off (guest processes outlive the agents)."""
    for site in sites:
        h = FileHypervisor(root / site / "vms")
        for v in h.list_vms():
            with contextlib.suppress(Exception):
                h.power_off(v.vm_id, force=True)


@contextlib.contextmanager
def cluster(root: Path, *, vm_dirs: tuple[str, ...] = ("primary", "secondary"),
            **up_kwargs: Any) -> Iterator[Cluster]:
    """``drsite up`` under ``root``; on exit ``drsite down`` and every VM of ``vm_dirs`` off."""
    c = up(root, **up_kwargs)
    try:
        yield c
    finally:
        down(c)
        power_off_all(c.root, vm_dirs)


def file_vm(h: FileHypervisor, name: str, size: int, *, data: float, seed: int,
            rate: int, net: str = "prod", mac: str = "52:54:00:00:20:01",
            ip: str | None = None) -> str:
    """A running file VM with one disk ``d0`` of ``size`` bytes, ``data`` (a fraction) of it
    written, and a guest workload of 4 KiB random writes at ``rate`` bytes/s; its id."""
    v = h.create_blank(VmSpec(name=name, nics=(Nic(net, mac, ip),),
                              disks=(DiskSpec("d0", size),)))
    seed_disk(h.disk_path(v.vm_id, "d0"), size, min(1.0, data), np.random.default_rng(seed))
    h.set_workload(v.vm_id, WorkloadSpec(pattern="random", io_size=4096, rate=rate, seed=seed))
    h.power_on(v.vm_id)
    return v.vm_id


def policy(cl: VaultClient, name: str, frequency_s: float = 5.0) -> None:
    """A crash-consistent, compressed, unencrypted policy every ``frequency_s``."""
    cl.create_policy({"name": name, "frequency_s": frequency_s, "retention_hours": 24,
                      "app_consistent_every_s": None, "rpo_threshold_s": 120,
                      "resync_window": "00:00-00:00", "compression": True, "encryption": False,
                      "bandwidth_limit_bps": None})


def group(cl: VaultClient, name: str, policy_name: str, site: str = "primary",
          target: str = "secondary") -> None:
    cl.create_group({"name": name, "site": site, "target_site": target, "policy": policy_name,
                     "match": {"vm_names": [], "hosts": [], "labels": []}})


def map_networks(cl: VaultClient) -> None:
    cl.set_network_mapping({"source_site": "primary", "recovery_site": "secondary",
                            "source_network": "prod", "recovery_network": "dr"})


def protect(cl: VaultClient, vm_ids: dict[str, str], group_name: str) -> dict[str, str]:
    """Protect every VM (name → vm id) in ``group_name`` at once; waits for every job and
    returns name → item id. Exits the benchmark if a job does not succeed."""
    jobs: dict[str, str] = {}
    for name, vm_id in vm_ids.items():
        wait("inventory", lambda v=vm_id: any(x["vm_id"] == v for x in cl.vms()), 60)
        jobs[name] = cl.protect(vm_id, group_name)["job_id"]
    items: dict[str, str] = {}
    for name, job_id in jobs.items():
        job = cl.wait_job(job_id, timeout=1800)
        if job["state"] != "succeeded":
            raise SystemExit(f"protect {name}: {job}")
        items[name] = next(i["id"] for i in cl.items() if i["vm_id"] == vm_ids[name])
    return items


def wait_more_points(cl: VaultClient, items: dict[str, str], more: int = 2,
                     timeout: float = 120) -> None:
    """Until every item has ``more`` points beyond those it has now (delta cycles ran)."""
    for name, item in items.items():
        n = len(cl.points(item))
        wait(f"delta points of {name}", lambda i=item, n=n: len(cl.points(i)) >= n + more,
             timeout)


__all__ = ["MiB", "cluster", "file_vm", "group", "map_networks", "policy", "power_off_all",
           "protect", "wait", "wait_more_points"]
