"""How big the recovery store grows under uniform random churn with a short retention (issue
16: a 5-minute churn run at 300 MiB/s filled a 55 GB disk with the packs of an 8 GiB VM).

A file VM with one fully written disk (incompressible data) is replicated; then, ``--cycles``
times: ``--churn`` of the disk is overwritten by random aligned ``--io`` writes of random data
(through the in-process guest: change log, copy-before-write), one delta cycle ships them, the
points beyond the newest ``--keep`` are deleted and GC runs. After each cycle the item's store
bytes are printed against two references measured in the same run:

* ``disk``: the disk's size (every block is data: what one full copy takes);
* ``needed``: the disk plus every kept delta's stored bytes after the oldest kept point
  (what the kept points would take if no pack held a dead frame).

A pack is deleted only when no kept point uses any frame of it (``store/design.md``); under
uniform random writes a pack of 8 MiB holding 2,048 4 KiB blocks dies only once every one of
them has been overwritten, so without re-homing (``--rehome-share 0``) the store grows well
past ``needed``; with it, each cycle also stores again the live data of the base point's
sparsest packs (``store/compaction.py``) and the figures show what that costs in bytes written
again.

    .venv/bin/python bench/store_growth.py [--disk-mib 256] [--io 4096] [--churn 0.3]
        [--cycles 30] [--keep 4] [--rehome-share 0]
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from benchlib import MiB, Site, machine_info, workdir, write_json

from drsite.core.retention import RetentionRule


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--disk-mib", type=int, default=256)
    ap.add_argument("--io", type=int, default=4096, help="bytes per write (aligned to it)")
    ap.add_argument("--churn", type=float, default=0.3,
                    help="bytes written per cycle as a fraction of the disk (overlaps count)")
    ap.add_argument("--cycles", type=int, default=30)
    ap.add_argument("--keep", type=int, default=4, help="points kept (the newest)")
    ap.add_argument("--rehome-share", type=float, default=None,
                    help="the engine's re-homing share (ReplicationSettings.rehome_share; "
                         "0: off; default: the engine's)")
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--keep-files", action="store_true")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    size, io = a.disk_mib * MiB, a.io
    n = max(1, int(size * a.churn) // io)
    rng = np.random.default_rng(a.seed)
    rows: list[dict[str, float]] = []
    with workdir(a.workdir, a.keep_files) as wd:
        info = machine_info(wd)
        site = Site(wd)
        vm_id = site.create_vm("growth", size)
        with open(site.hv.disk_path(vm_id, "disk0"), "r+b") as f:
            for off in range(0, size, 4 * MiB):
                f.write(rng.bytes(min(4 * MiB, size - off)))
        it, target = site.item("growth", vm_id, hydrate=False, compression="off")
        # plan re-homing at every cycle (the cycles here are back to back, not a policy apart)
        it.settings = replace(it.settings, rehome_every_s=0.0,
                              # the engine's own retention keeps every point this bench keeps
                              # (it deletes all but the newest --keep itself): short enough
                              # for re-homing, long enough to change nothing here
                              retention=RetentionRule(
                                  retention_s=a.keep * it.settings.frequency_s,
                                  keep_all_s=a.keep * it.settings.frequency_s),
                              **({} if a.rehome_share is None
                                 else {"rehome_share": a.rehome_share}))
        repo = target.repo
        it.run_initial()
        stored: dict[str, int] = {}     # point id -> bytes its cycle stored
        rehomed = 0                      # bytes the cycles stored again (re-homing)
        rt = site.hv.guest(vm_id)
        t0 = time.perf_counter()
        try:
            for c in range(1, a.cycles + 1):
                offsets = (rng.integers(0, size // io, n, dtype=np.int64) * io).tolist()
                payload = rng.bytes(n * io)
                for i, off in enumerate(offsets):
                    rt.vm.write("disk0", off, payload[i * io:(i + 1) * io])
                s0 = it.report.bytes_stored
                point = it.run_cycle()
                stored[point.point_id] = it.report.bytes_stored - s0
                rehomed += int(point.meta.get("rehomed") or 0)
                points = repo.points()
                for p in points[:-a.keep]:
                    repo.delete_point(p.point_id)
                gc = repo.gc()
                kept = [p.point_id for p in repo.points()]
                store_bytes = repo.storage_bytes()
                needed = size + sum(stored.get(pid, 0) for pid in kept[1:])
                packs = sum(1 for k in repo.store.list(f"{repo.prefix}packs/"))
                row = {"cycle": c, "store_mib": round(store_bytes / MiB, 1),
                       "store_per_disk": round(store_bytes / size, 2),
                       "store_per_needed": round(store_bytes / needed, 2), "packs": packs,
                       "gc_freed_mib": round(gc.bytes_freed / MiB, 1),
                       "rehomed_per_written": round(rehomed / (c * n * io), 3)}
                rows.append(row)
                print(f"cycle {c:3d}: store {row['store_mib']:8.1f} MiB = "
                      f"{row['store_per_disk']:5.2f} × disk, {row['store_per_needed']:5.2f} × "
                      f"needed; {packs} packs; GC freed {row['gc_freed_mib']} MiB; re-homed "
                      f"{row['rehomed_per_written']:.2f} × written", flush=True)
        finally:
            rt.stop()
            repo.close()
        took = time.perf_counter() - t0
    last = rows[-1]
    print(f"after {a.cycles} cycles of {a.churn:.0%} churn in {io}-byte random writes, keeping "
          f"{a.keep} points (re-homing share {it.settings.rehome_share}): the store holds "
          f"{last['store_per_disk']} × the disk ({last['store_per_needed']} × what the kept "
          f"points need), re-homed {last['rehomed_per_written']} × the bytes written; "
          f"{took:.0f} s")
    write_json(a.json, {"benchmark": "store_growth", "machine": info, "disk_size": size,
                        "io": io, "churn": a.churn, "keep": a.keep,
                        "rehome_share": it.settings.rehome_share, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
