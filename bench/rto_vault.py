"""Failover RTO through the vault: API request → recovery VM running, with real processes.

A vault and two agents (``drsite up``) on 127.0.0.1; one file VM per disk size (default 1 GiB
and 100 GiB, sparse) holding the same ``--data-mib`` of data, protected through the API
(initial replication + a few delta cycles). Then, per size, an unplanned failover of the
latest point through ``POST /items/{id}/failover/unplanned-failover``, timed from the request
to the job's end as the API reports it (the recovery VM is running when the job succeeds), and
the agent's own figure (``failovers.rto_s``: command start → VM running) with its steps (the
failover record's ``timings`` on the recovery host: hydrate, verify, create_vm, power_on). Each is cancelled
afterwards (untimed) so the next run starts from a protected item.

The difference between the two is the control plane: the job runner's tick, the command's
delivery (pushed over the agents' command channel since issue 13; before, it waited for the
recovery agent's next heartbeat, 2 s) and the result's post. Goals: 100 GiB within 1.2× of
1 GiB; API request → VM running ≤ 2 s for 1 GiB.

The recovery agent proves its replicas equal to their points in the background, so a failover
usually compares nothing ("compared: pre-verified 0 MiB") or only the cycles since the last
proof ("incremental"); ``--unverified`` forgets that proof before each failover: every byte is
compared, as right after a replica was rebuilt (the worst case).

    .venv/bin/python bench/rto_vault.py [--quick] [--runs N] [--unverified] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from benchlib import GiB, MiB, machine_info, workdir, write_json
from clusterlib import cluster, file_vm, group, map_networks, policy, protect, wait, wait_more_points

from drsite.client.api import VaultClient
from drsite.fsutil import atomic_write_json
from drsite.hypervisors.file.driver import FileHypervisor
from drsite.sitestore.server import replica_lock
from drsite.up import Cluster


def setup(c: Cluster, cl: VaultClient, sizes: dict[str, int], data_mib: int) -> dict[str, str]:
    hv = FileHypervisor(c.root / "primary" / "vms")
    vm_ids = {name: file_vm(hv, name, size, data=data_mib * MiB / size, seed=7, rate=256 * 1024,
                            mac="52:54:00:00:10:01")
              for name, size in sizes.items()}
    policy(cl, "rto")
    group(cl, "g", "rto")
    map_networks(cl)
    items = protect(cl, vm_ids, "g")
    wait_more_points(cl, items)
    return items


def agent_steps(c: Cluster, failover_id: str) -> tuple[dict[str, float], str]:
    """The recovery agent's own step timings of a failover (its record on the recovery host;
    the API does not serve them), and what its verification compared (``verify_scope``)."""
    rec = c.root / "secondary" / "agent" / "failover" / "failovers" / f"{failover_id}.json"
    d = json.loads(rec.read_text())
    steps = {k: float(v) for k, v in d.get("timings", {}).items() if k != "cancel"}
    return steps, f"{d.get('verify_scope') or '-'} {int(d.get('verify_bytes') or 0) // MiB} MiB"


def forget_verified(c: Cluster, item: str) -> None:
    """Make the replica unverified (as right after a rebuild): the failover compares every
    byte, as every failover did before the background verification."""
    replica = c.root / "secondary" / "agent" / "replicas" / item
    with replica_lock(replica):
        st = json.loads((replica / "state.json").read_text())
        st["verified"] = None
        atomic_write_json(replica / "state.json", st)


def one(c: Cluster, cl: VaultClient, item: str, *,
        unverified: bool) -> tuple[float, float, dict[str, float], str]:
    if unverified:
        forget_verified(c, item)
    t0 = time.monotonic()
    job = cl.item_action(item, "unplanned-failover")
    final = cl.wait_job(job["id"], timeout=600, poll=0.05)
    api_s = time.monotonic() - t0
    if final["state"] != "succeeded":
        raise SystemExit(f"failover: {final}")
    fo = cl.failovers(item)[0]
    agent_s = float(fo["rto_s"] or 0.0)
    steps, scope = agent_steps(c, str(final.get("failover_id") or fo.get("failover_id")))
    done = cl.wait_job(cl.item_action(item, "cancel")["id"], timeout=600)
    if done["state"] != "succeeded":
        raise SystemExit(f"cancel: {done}")
    wait("protected again", lambda: cl.item(item)["protection"] == "protected", 60)
    time.sleep(6)  # let a cycle land and the replica catch up before the next run
    return api_s, agent_s, steps, scope


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 GiB and 10 GiB, one run")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--data-mib", type=int, default=256)
    ap.add_argument("--workdir", type=Path)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--keep", action="store_true",
                    help="keep the work files (bench/verify_ab.py reads the agent's replicas)")
    ap.add_argument("--unverified", action="store_true",
                    help="forget each replica's background verification before its failover "
                         "(the worst case: the failover compares every byte of the point)")
    a = ap.parse_args()
    sizes = {"rto-1g": GiB, "rto-10g" if a.quick else "rto-100g": (10 if a.quick else 100) * GiB}
    runs = 1 if a.quick else a.runs
    out: dict[str, Any] = {"machine": machine_info(), "runs": runs, "data_mib": a.data_mib,
                           "results": {}}
    with workdir(a.workdir, keep=a.keep) as root, cluster(root / "cluster") as c, c.client() as cl:
        items = setup(c, cl, sizes, a.data_mib)
        for name, item in items.items():
            got = [one(c, cl, item, unverified=a.unverified) for _ in range(runs)]
            api = statistics.median(x for x, _, _, _ in got)
            agent = statistics.median(y for _, y, _, _ in got)
            steps = {k: statistics.median(s.get(k, 0.0) for _, _, s, _ in got)
                     for k in sorted({k for _, _, s, _ in got for k in s})}
            out["results"][name] = {"api_s": api, "agent_rto_s": agent, "agent_steps": steps,
                                    "all": [[x, y, s, v] for x, y, s, v in got]}
            print(f"{name:10s} API request → VM running {api:6.2f} s (median of {runs}); "
                  f"agent's RTO {agent:6.2f} s; agent's steps (medians) "
                  + ", ".join(f"{k} {v:.3f}" for k, v in steps.items())
                  + "; compared: " + ", ".join(v for _, _, _, v in got), flush=True)
    r = out["results"]
    small, big = r["rto-1g"]["api_s"], r[next(k for k in r if k != "rto-1g")]["api_s"]
    print(f"ratio large/1 GiB = {big / small:.2f} (goal ≤ 1.2); large = {big:.2f} s (goal < 10 s)")
    if a.json:
        write_json(a.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
