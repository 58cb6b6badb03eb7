"""What the sync writer's spin (issue 18) costs the guest's other threads: a file VM in
synchronous mode writes 4 KiB at queue depth 1 back to back while, in the same process, one
thread sleeps 1 ms in a loop (its oversleep: how long it waited for the GIL) and another seals
and releases a cycle every 50 ms (the seal's duration). Run with the writer's spin on
(``ACK_SPIN_MAX_S``) and off, alternately, ``--rounds`` times each.

    .venv/bin/python bench/sync_spin_threads.py [--rounds 2] [--n 4000] [--variants 0:x,500:x]

A spinning thread releases the GIL only for each ``poll(0)``: a thread that wants it gets it at
the next forced switch (``sys.getswitchinterval()``, 5 ms) unless the spinner blocks first.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import sync_latency as S
from benchlib import machine_info, workdir

from drsite.core.model import DiskSpec, VmSpec
from drsite.hypervisors.file import FileHypervisor
from drsite.hypervisors.file.syncmirror import ACK_SPIN_MAX_S


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(len(xs) * p))] * 1e6, 1) if xs else 0.0


def one(wd: Path, spin_s: float, n: int, switch_s: float | None = None) -> dict[str, object]:
    res: dict[str, object] = {}
    old_switch = sys.getswitchinterval()
    if switch_s is not None:
        sys.setswitchinterval(switch_s)
    with S.journal_server(wd, None, res) as (port, certs, _pid):
        hv = FileHypervisor(wd / "vms")
        vm_id = hv.create_blank(VmSpec("bench", disks=(DiskSpec("d0", S.DISK),))).vm_id
        hv.start_tracking(vm_id)
        rt = hv.guest(vm_id)
        try:
            hv.release(hv.seal(vm_id))
            S.enter_sync(hv, vm_id, "bench", port, certs, 500)
            rt.vm.mirror.ack_spin_max_s = spin_s
            stop = threading.Event()
            over: list[float] = []
            seals: list[float] = []

            def ticker() -> None:
                while not stop.is_set():
                    t0 = time.perf_counter()
                    time.sleep(0.001)
                    over.append(time.perf_counter() - t0 - 0.001)

            def sealer() -> None:
                while not stop.is_set():
                    time.sleep(0.05)
                    t0 = time.perf_counter()
                    c = hv.seal(vm_id)
                    seals.append(time.perf_counter() - t0)
                    hv.release(c)

            threads = [threading.Thread(target=ticker), threading.Thread(target=sealer)]
            for t in threads:
                t.start()
            lat = S.qd1(rt.vm, n, random.Random(1))
            stop.set()
            for t in threads:
                t.join(30)
        finally:
            rt.stop()
            sys.setswitchinterval(old_switch)
    return {"spin_max_us": round(spin_s * 1e6),
            "switch_interval_us": round((switch_s or old_switch) * 1e6), "write_p50_us": pct(lat, 0.5),
            "write_p99_us": pct(lat, 0.99), "tick_oversleep_p50_us": pct(over, 0.5),
            "tick_oversleep_p99_us": pct(over, 0.99), "tick_oversleep_max_us": pct(over, 1.0),
            "seal_p50_us": pct(seals, 0.5), "seal_p99_us": pct(seals, 0.99),
            "seals": len(seals)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--n", type=int, default=4000)
    ap.add_argument("--dir", type=Path, default=None)
    ap.add_argument("--variants", default=None,
                    help="comma-separated SPIN_US:SWITCH_US pairs run in turn each round "
                         "(SWITCH_US: the process's sys.setswitchinterval, 'x' = as the mirror "
                         "leaves it); default: spin off and on, both as the mirror leaves it")
    a = ap.parse_args()
    variants: list[tuple[float, float | None]] = []
    for v in (a.variants or f"0:x,{round(ACK_SPIN_MAX_S * 1e6)}:x").split(","):
        spin_us, switch_us = v.split(":")
        variants.append((float(spin_us) / 1e6,
                         None if switch_us == "x" else float(switch_us) / 1e6))
    runs = []
    with workdir(a.dir) as wd:
        info = machine_info(wd)
        for i in range(a.rounds):
            for j, (spin, switch) in enumerate(variants if i % 2 == 0 else variants[::-1]):
                sub = wd / f"r{i}-{j}"
                sub.mkdir()
                r = one(sub, spin, a.n, switch)
                print(json.dumps(r), file=sys.stderr, flush=True)
                runs.append(r)
    print(json.dumps({"machine": info, "runs": runs}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
