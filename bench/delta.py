"""Delta cycle efficiency: bytes shipped / bytes written after N random 4 KiB writes.

A file VM (default one 1 GiB disk, half of it data) is replicated (initial copy, replica
hydrated); then the VM runs as an in-process guest (``FileHypervisor.guest``) and takes N random
4 KiB tracked writes of random data (``GuestRuntime.vm.write``: change log, copy-before-write,
disk), N such that about 64 MiB are written; then ONE delta cycle (``ItemReplicator.run_cycle``)
ships them.

Reference = the bytes the guest wrote, in the same run:
* ``shipped / written``: shipped = the report's ``bytes_sent`` delta (raw bytes before
  compression), written = distinct bytes written (overlapping writes counted once). Goal <= 1.05.
* the same with overlapping writes counted as written (N x 4 KiB), for information.
The cycle's wall time (seal → commit → replica hydrated) is printed too.

    .venv/bin/python bench/delta.py [--disk-mib 1024] [--write-mib 64] [--io 4096] [--unaligned]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from benchlib import (
    KiB,
    MiB,
    Site,
    mib,
    plan_sparse,
    timed,
    try_drop_caches,
    workdir,
    write_image,
    write_json,
)

from drsite.core.extents import coalesce

GOAL = 1.05


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--disk-mib", type=int, default=1024, help="disk size (MiB)")
    ap.add_argument("--fill", type=float, default=0.5, help="fraction of the disk holding data")
    ap.add_argument("--write-mib", type=int, default=64, help="MiB written by the random writes")
    ap.add_argument("--io", type=int, default=4 * KiB, help="size of each write (bytes)")
    ap.add_argument("--unaligned", action="store_true",
                    help="writes at any byte offset (default: aligned to their size)")
    ap.add_argument("--seed", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=None,
                    help="where work files go (a temp dir is made inside; default bench/out)")
    ap.add_argument("--keep", action="store_true", help="keep the work files")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    a = ap.parse_args(argv)
    size = a.disk_mib * MiB
    io = a.io
    n = max(1, a.write_mib * MiB // io)

    with workdir(a.workdir, a.keep) as wd:
        site = Site(wd)
        vm_id = site.create_vm("bench-delta", size)
        write_image(site.hv.disk_path(vm_id, "disk0"), plan_sparse(size, a.fill, a.seed), a.seed)
        it, target = site.item("delta", vm_id, hydrate=True)
        t_init, _ = timed(it.run_initial)
        print(f"initial replication of a {mib(size)} disk: {t_init:.1f} s "
              f"({mib(it.report.bytes_sent)} shipped)")

        rng = np.random.default_rng(a.seed)
        if a.unaligned:
            offsets = rng.integers(0, size - io + 1, n, dtype=np.int64)
        else:
            offsets = rng.integers(0, size // io, n, dtype=np.int64) * io
        payload = rng.bytes(n * io)
        rt = site.hv.guest(vm_id)
        try:
            t0 = time.perf_counter()
            for i, off in enumerate(offsets.tolist()):
                rt.vm.write("disk0", off, payload[i * io:(i + 1) * io])
            t_writes = time.perf_counter() - t0
            written_total = n * io
            written_distinct = coalesce(offsets, np.full(n, io, np.int64)).total
            print(f"{n} random {io}-byte writes ({'unaligned' if a.unaligned else 'aligned'}) "
                  f"through the guest in {t_writes:.1f} s: {mib(written_total)} written, "
                  f"{mib(written_distinct)} distinct")
            dropped = try_drop_caches()
            sent0, stored0 = it.report.bytes_sent, it.report.bytes_stored
            hyd0 = target.hydrate_s
            t_cycle, point = timed(it.run_cycle)
            hyd = target.hydrate_s - hyd0
        finally:
            rt.stop()
        sent = it.report.bytes_sent - sent0
        stored = it.report.bytes_stored - stored0
        r_distinct = sent / written_distinct
        r_total = sent / written_total
        replica_ok = target.hydrator is not None and target.hydrator.verify(point.point_id)
        print(f"delta cycle ({'cold' if dropped else 'warm'} page cache): {t_cycle:.2f} s "
              f"(to commit {t_cycle - hyd:.2f} s, replica hydration {hyd:.2f} s); point "
              f"{point.point_id}; replica verified: {'yes' if replica_ok else 'NO'}")
        print(f"  shipped {mib(sent)} raw (before compression), stored {mib(stored)}")
        print(f"  shipped / written (distinct bytes)          {r_distinct:.3f}  (goal <= {GOAL}: "
              f"{'met' if r_distinct <= GOAL else 'NOT met'})")
        print(f"  shipped / written (overlaps counted twice)  {r_total:.3f}")
        print(f"  cycle throughput: {written_distinct / MiB / t_cycle:.1f} MiB/s of changed data, "
              f"{n / t_cycle:.0f} writes/s")
        write_json(a.json, {
            "benchmark": "delta", "disk_size": size, "writes": n, "io": io,
            "unaligned": a.unaligned, "written_total": written_total,
            "written_distinct": written_distinct, "bytes_sent": sent, "bytes_stored": stored,
            "ratio_distinct": r_distinct, "ratio_total": r_total, "goal": GOAL,
            "cycle_seconds": t_cycle, "hydrate_seconds": hyd, "writes_seconds": t_writes,
            "cache_dropped": dropped, "replica_ok": replica_ok,
        })
        target.repo.close()
        if not replica_ok:
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
