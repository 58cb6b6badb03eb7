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

from benchlib import MiB, machine_info, workdir, write_json
from clusterlib import cluster, file_vm, group, map_networks, policy, protect, wait, wait_more_points

from drsite.client.api import VaultClient
from drsite.hypervisors.file.driver import FileHypervisor
from drsite.up import Cluster


def setup(c: Cluster, cl: VaultClient, size: int, data_mib: int) -> str:
    policy(cl, "p")
    group(cl, "fwd", "p")
    group(cl, "back", "p", site="secondary", target="primary")
    map_networks(cl)
    fwd = file_vm(FileHypervisor(c.root / "primary" / "vms"), "app", size,
                  data=data_mib * MiB / size, seed=2, rate=128 * 1024)
    back = file_vm(FileHypervisor(c.root / "secondary" / "vms"), "rev", 64 * MiB,
                   data=16 / 64, seed=2, rate=128 * 1024, net="dr")
    items = protect(cl, {"app": fwd}, "fwd") | protect(cl, {"rev": back}, "back")
    wait_more_points(cl, {"app": items["app"]})
    return items["app"]


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
    with workdir(a.workdir) as root, cluster(root / "cluster") as c, c.client() as cl:
        item = setup(c, cl, a.size_mib * MiB, a.data_mib)
        healthy = [one(cl, item) for _ in range(a.runs)]
        os.kill(c.pids["agent-primary"], signal.SIGSTOP)
        try:
            time.sleep(3)
            hung = [one(cl, item) for _ in range(a.runs)]
        finally:
            os.kill(c.pids["agent-primary"], signal.SIGCONT)
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
