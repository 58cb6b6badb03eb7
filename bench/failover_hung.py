"""Unplanned failover with the primary hung ÷ with the primary healthy (issue 13), real processes.

A vault and two agents (``drsite up``) on 127.0.0.1; one file VM on the primary protected to the
secondary, and one VM on the secondary protected back to the primary's store (a reverse item:
the secondary then depends on the primary for its catalogue — the case that used to stall the
secondary's heartbeat). Per run: an unplanned failover through the API, timed from the request
to the job's end (recovery VM running), then a cancel (untimed). First with the primary
healthy, then with the primary agent hung (``SIGSTOP``: its store server and its agent answer
nothing, connections stay open). Goal: hung ÷ healthy ≤ 1.5.

    .venv/bin/python bench/failover_hung.py [--runs 5] [--size-mib 1024] [--json FILE]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from benchlib import MiB, machine_info, workdir, write_json

from drsite.client.api import VaultClient
from drsite.core.model import DiskSpec, Nic, VmSpec
from drsite.demo import seed_disk
from drsite.hypervisors.file.driver import FileHypervisor
from drsite.hypervisors.file.workload import WorkloadSpec
from drsite.up import Cluster, down, up


def wait(what: str, check: Any, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.1)
    raise SystemExit(f"timed out waiting for {what}")


def vm(h: FileHypervisor, name: str, size: int, net: str, data_mib: int) -> str:
    v = h.create_blank(VmSpec(name=name, nics=(Nic(net, "52:54:00:00:20:01", None),),
                              disks=(DiskSpec("d0", size),)))
    seed_disk(h.disk_path(v.vm_id, "d0"), size, min(1.0, data_mib * MiB / size),
              np.random.default_rng(3))
    h.set_workload(v.vm_id, WorkloadSpec(pattern="random", io_size=4096, rate=128 * 1024, seed=2))
    h.power_on(v.vm_id)
    return v.vm_id


def setup(c: Cluster, cl: VaultClient, size: int, data_mib: int) -> str:
    cl.create_policy({"name": "p", "frequency_s": 5.0, "retention_hours": 24,
                      "app_consistent_every_s": None, "rpo_threshold_s": 120,
                      "resync_window": "00:00-00:00", "compression": True, "encryption": False,
                      "bandwidth_limit_bps": None})
    for name, site, target in (("fwd", "primary", "secondary"), ("back", "secondary", "primary")):
        cl.create_group({"name": name, "site": site, "target_site": target, "policy": "p",
                         "match": {"vm_names": [], "hosts": [], "labels": []}})
    cl.set_network_mapping({"source_site": "primary", "recovery_site": "secondary",
                            "source_network": "prod", "recovery_network": "dr"})
    fwd = vm(FileHypervisor(c.root / "primary" / "vms"), "app", size, "prod", data_mib)
    back = vm(FileHypervisor(c.root / "secondary" / "vms"), "rev", 64 * MiB, "dr", 16)
    items: dict[str, str] = {}
    for vm_id, group in ((fwd, "fwd"), (back, "back")):
        wait("inventory", lambda v=vm_id: any(x["vm_id"] == v for x in cl.vms()), 60)
        job = cl.wait_job(cl.protect(vm_id, group)["job_id"], timeout=1800)
        if job["state"] != "succeeded":
            raise SystemExit(f"protect {group}: {job}")
        items[group] = next(i["id"] for i in cl.items() if i["vm_id"] == vm_id)
    n = len(cl.points(items["fwd"]))
    wait("delta points", lambda: len(cl.points(items["fwd"])) >= n + 2, 120)
    return items["fwd"]


def one(cl: VaultClient, item: str) -> float:
    t0 = time.monotonic()
    final = cl.wait_job(cl.item_action(item, "unplanned-failover")["id"], timeout=600, poll=0.05)
    took = time.monotonic() - t0
    if final["state"] != "succeeded":
        raise SystemExit(f"failover: {final}")
    done = cl.wait_job(cl.item_action(item, "cancel")["id"], timeout=600)
    if done["state"] != "succeeded":
        raise SystemExit(f"cancel: {done}")
    wait("protected again", lambda: cl.item(item)["protection"] == "protected", 60)
    time.sleep(3)
    return took


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--data-mib", type=int, default=128)
    ap.add_argument("--workdir", type=Path)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    out: dict[str, Any] = {"machine": machine_info(), "runs": a.runs, "size_mib": a.size_mib,
                           "load": os.getloadavg()}
    with workdir(a.workdir) as root:
        c = up(root / "cluster")
        try:
            with c.client() as cl:
                item = setup(c, cl, a.size_mib * MiB, a.data_mib)
                healthy = [one(cl, item) for _ in range(a.runs)]
                os.kill(c.pids["agent-primary"], signal.SIGSTOP)
                try:
                    time.sleep(3)
                    hung = [one(cl, item) for _ in range(a.runs)]
                finally:
                    os.kill(c.pids["agent-primary"], signal.SIGCONT)
        finally:
            down(c)
            for site in ("primary", "secondary"):
                h = FileHypervisor(c.root / site / "vms")
                for v in h.list_vms():
                    h.power_off(v.vm_id, force=True)
    h_med, s_med = statistics.median(healthy), statistics.median(hung)
    out.update(healthy_s=healthy, hung_s=hung, healthy_median_s=h_med, hung_median_s=s_med,
               ratio=s_med / h_med)
    print(f"unplanned failover, request → VM running: healthy primary {h_med:.2f} s "
          f"(runs {', '.join(f'{x:.2f}' for x in healthy)}); primary hung {s_med:.2f} s "
          f"(runs {', '.join(f'{x:.2f}' for x in hung)})")
    print(f"ratio hung/healthy = {s_med / h_med:.2f} (goal ≤ 1.5)")
    if a.json:
        write_json(a.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
