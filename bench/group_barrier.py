"""Guest write pause per cycle of a consistency group's barrier (issue 18), real processes.

A vault, the secondary's agent (the store) and two source hosts of site ``primary`` on
127.0.0.1 (``drsite up`` plus one more agent); two file VMs per source host (4 VMs on 2 hosts),
each a guest process, each written continuously by its own writer thread (small writes through
the guest's control socket, as a guest OS would). Policy frequency 5 s.

Reference, same run: the 4 VMs in a plain group (per-VM cycles: a seal holds the guest's I/O
lock for a moment). Then the group is made consistent (barrier bound 500 ms) and the same is
measured for group points. Figures per VM and cycle:

- **hold** (group phase only): how long the guest held writes (``paused_s``, measured in
  the guest from hold to seal);
- **write pause**: the longest time one write took, among writes started in the second before
  the point's seal instant (what the writer saw), minus the median write latency of the run.

Goal: group write pause p99 ≤ 50 ms.

    .venv/bin/python bench/group_barrier.py [--seconds 90] [--json FILE]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

from benchlib import MiB, machine_info, workdir, write_json
from clusterlib import power_off_all, wait

from drsite.client.api import VaultClient
from drsite.core.model import DiskSpec, VmSpec
from drsite.hypervisors.file.driver import FileHypervisor
from drsite.up import Cluster, down, start_agent, up

HOSTS = (("primary", "primary"), ("primary-b", "primary-b"))  # (vms dir, agent key)
BOUND_MS = 500


class Writer:
    """Writes 512 B to its VM every ``period`` s; records (start wall time, latency)."""

    def __init__(self, h: FileHypervisor, vm_id: str, period: float = 0.02) -> None:
        self.h, self.vm_id, self.period = h, vm_id, period
        self.samples: list[tuple[float, float]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        n = 0
        while not self.stop.is_set():
            t0, m0 = time.time(), time.monotonic()
            self.h.write(self.vm_id, "d0", (n % 4096) * 512, n.to_bytes(8, "little") * 64)
            self.samples.append((t0, time.monotonic() - m0))
            n += 1
            self.stop.wait(self.period)


def pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))]


def pauses(w: Writer, seal_times: list[float], base: float) -> list[float]:
    out = []
    for t in seal_times:
        near = [lat for (t0, lat) in w.samples if t - 1.0 <= t0 <= t + 0.05]
        if near:
            out.append(max(0.0, max(near) - base))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=90.0, help="per phase")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--dir", type=Path, default=None)
    ap.add_argument("--keep", action="store_true", help="keep the work files (logs)")
    args = ap.parse_args()
    with workdir(args.dir, keep=args.keep) as root:
        machine = machine_info(root)
        load_before = os.getloadavg()
        c: Cluster = up(root / "c")
        try:
            start_agent(c, "primary", store=False, host="primary-b")
            res = run(c, args.seconds)
        finally:
            down(c)
            power_off_all(c.root, tuple(d for d, _ in HOSTS))
    res["machine"] = machine
    res["loadavg"] = {"before": load_before, "after": os.getloadavg()}
    report(res)
    write_json(args.json, res)
    return 0


def run(c: Cluster, seconds: float) -> dict[str, Any]:
    vms: list[tuple[FileHypervisor, str]] = []
    for d, _ in HOSTS:
        h = FileHypervisor(c.root / d / "vms")
        for k in range(2):
            v = h.create_blank(VmSpec(name=f"gb-{d}-{k}", disks=(DiskSpec("d0", 8 * MiB),)))
            h.power_on(v.vm_id)
            vms.append((h, v.vm_id))
    with c.client() as cl:
        cl.create_policy({"name": "p", "frequency_s": 5.0, "retention_hours": 24,
                          "app_consistent_every_s": None, "rpo_threshold_s": 120,
                          "resync_window": "00:00-00:00", "compression": True,
                          "encryption": False, "bandwidth_limit_bps": None})
        cl.create_group({"name": "g", "site": "primary", "target_site": "secondary",
                         "policy": "p", "match": {"vm_names": [], "hosts": [], "labels": []},
                         "barrier_timeout_ms": BOUND_MS})
        items: list[str] = []
        for _h, vm_id in vms:
            wait("inventory", lambda v=vm_id: any(x["vm_id"] == v for x in cl.vms()), 60)
            job = cl.wait_job(cl.protect(vm_id, "g")["job_id"], timeout=300)
            if job["state"] != "succeeded":
                raise SystemExit(f"protect: {job}")
            items.append(next(i["id"] for i in cl.items() if i["vm_id"] == vm_id))
        writers = [Writer(h, v) for h, v in vms]
        for w in writers:
            w.thread.start()
        try:
            ref = phase(cl, items, writers, seconds, consistent=False)
            cl.update_group("g", {"consistent": True})
            time.sleep(6)  # the per-VM cycles in flight end
            grp = phase(cl, items, writers, seconds, consistent=True)
        finally:
            for w in writers:
                w.stop.set()
                w.thread.join(5)
    return {"seconds_per_phase": seconds, "vms": len(vms), "hosts": 2, "bound_ms": BOUND_MS,
            "reference": ref, "group": grp,
            "ratio_p99": (grp["write_pause_p99_ms"] / ref["write_pause_p99_ms"]
                          if ref["write_pause_p99_ms"] else None)}


def phase(cl: VaultClient, items: list[str], writers: list[Writer], seconds: float, *,
          consistent: bool) -> dict[str, Any]:
    t0 = time.time()
    time.sleep(seconds)
    t1 = time.time()
    base = statistics.median(lat for w in writers for (t, lat) in w.samples if t0 <= t <= t1)
    pause_s: list[float] = []
    holds: list[float] = []
    barriers = {"committed": 0, "partial": 0}
    modes: dict[str, int] = {}
    missed: dict[str, int] = {}
    for item, w in zip(items, writers, strict=True):
        seals = [float(p["created_at"]) for p in cl.points(item)
                 if t0 + 1 <= float(p["created_at"]) <= t1 - 0.1]
        pause_s += pauses(w, seals, base)
    if consistent:
        for g in cl.group_points("g", all=True):
            if t0 <= g["started_at"] <= t1 and g["state"] in barriers:
                barriers[g["state"]] += 1
                key = f"{g.get('mode', 'two_phase')} {g['state']}"
                modes[key] = modes.get(key, 0) + 1
                for m in g["members"].values():
                    if m.get("error"):
                        why = str(m["error"]).split(" ms")[0].rstrip("0123456789.- ")
                        missed[why] = missed.get(why, 0) + 1
                holds += [float(m["paused_s"] or 0.0) for m in g["members"].values()
                          if m.get("paused_s") is not None]
    return {"cycles": len(pause_s), "write_median_ms": 1000 * base,
            "write_pause_p50_ms": 1000 * pct(pause_s, 50),
            "write_pause_p99_ms": 1000 * pct(pause_s, 99),
            "write_pause_max_ms": 1000 * max(pause_s, default=float("nan")),
            **({"hold_p50_ms": 1000 * pct(holds, 50), "hold_p99_ms": 1000 * pct(holds, 99),
                "hold_max_ms": 1000 * max(holds, default=float("nan")), "barriers": barriers,
                "modes": modes, "missed": missed}
               if consistent else {})}


def report(r: dict[str, Any]) -> None:
    ref, grp = r["reference"], r["group"]
    print(f"machine: {r['machine']}; load average {r['loadavg']}")
    print(f"{r['vms']} VMs on {r['hosts']} hosts, {r['seconds_per_phase']:.0f} s per phase, "
          f"bound {r['bound_ms']} ms")
    print(f"per-VM cycles (reference): {ref['cycles']} cycles, write median "
          f"{ref['write_median_ms']:.2f} ms, pause p50 {ref['write_pause_p50_ms']:.1f} ms, "
          f"p99 {ref['write_pause_p99_ms']:.1f} ms")
    print(f"group points: {grp['barriers']} barriers, {grp['cycles']} member cycles; hold p50 "
          f"{grp['hold_p50_ms']:.1f} ms, p99 {grp['hold_p99_ms']:.1f} ms, max "
          f"{grp['hold_max_ms']:.1f} ms; write pause p50 {grp['write_pause_p50_ms']:.1f} ms, "
          f"p99 {grp['write_pause_p99_ms']:.1f} ms (goal <= 50 ms: "
          f"{'met' if grp['write_pause_p99_ms'] <= 50 else 'NOT met'})")
    print(f"barriers by mode: {grp.get('modes')}; members that missed, by reason: "
          f"{grp.get('missed')}")
    if r["ratio_p99"] is not None:
        print(f"ratio group / per-VM write pause p99: {r['ratio_p99']:.2f}")


if __name__ == "__main__":
    sys.exit(main())
