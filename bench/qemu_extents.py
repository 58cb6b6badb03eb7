"""Reading a QEMU cycle's dirty extents over NBD: drsite's pure-Python pipelined client vs C tools.

A QEMU VM (``QemuHypervisor``, disk held by ``qemu-storage-daemon``: no guest needed) has one
empty 4 GiB qcow2 disk; after the tracking epoch's base cycle, N scattered 64 KiB extents
(default 4096 = 256 MiB, distinct granules at random) are written through QEMU's block layer,
then a cycle is sealed: its dirty bitmap lists exactly those extents and its frozen view (a
fleece overlay over the disk) is exported over NBD.

Timed (best of ``--runs``), all in the same run:

* **drsite**: ``NbdDiskReader.read_extents(cycle.changed, inflight=16)`` — one connection,
  16 requests in flight (what ``BitmapCycle.open_reader`` / ``read_extents`` give the engine).
* drsite, engine path: ``read_ahead`` of the engine (3 threads, one ``readinto`` per extent).
* reference **nbdcopy** of the same export to ``null:`` (libnbd, C, 4 connections × 64
  requests in flight). The disk holds data only in the written extents, so nbdcopy, which
  skips holes, reads exactly the same 256 MiB.
* reference **dd** ``bs=4M`` of the qcow2 file itself (the same data, sequential, no NBD).

Ratio = reference time / drsite time (1.0 = as fast; goal >= 0.7 against nbdcopy).

    .venv/bin/python bench/qemu_extents.py [--disk-gib 4] [--extents 4096] [--runs 3]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from benchlib import MiB, best, cache_note, mib, rate, try_drop_caches, workdir, write_json

from drsite.core.model import DiskSpec, VmSpec
from drsite.hypervisors.qemu.driver import QemuHypervisor
from drsite.hypervisors.qemu.readers import NbdDiskReader
from drsite.replication.batches import read_batches

GRANULE = 64 * 1024
GOAL = 0.7


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--disk-gib", type=int, default=4)
    ap.add_argument("--extents", type=int, default=4096, help="scattered extents")
    ap.add_argument("--extent-kib", type=int, default=64,
                    help="size of each extent (4: a 4 KiB random-write churn's cycle; nbdcopy "
                         "then reads whole 64 KiB qcow2 clusters, not like for like)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--inflight", type=int, default=16)
    ap.add_argument("--seed", type=int, default=4)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    for tool in ("qemu-img", "qemu-storage-daemon", "nbdcopy", "dd"):
        if shutil.which(tool) is None:
            print(f"{tool} is not installed", file=sys.stderr)
            return 2
    size = a.disk_gib << 30
    rng = np.random.default_rng(a.seed)
    ext = a.extent_kib * 1024
    # distinct 64 KiB granules: extents never touch, so each stays one dirty run
    granules = np.sort(rng.choice(size // GRANULE, a.extents, replace=False))
    total = a.extents * ext

    with workdir(a.workdir, a.keep) as wd:
        hv = QemuHypervisor(wd / "vms")
        vm = hv.create_blank(VmSpec("bench-qemu", memory_mib=64,
                                    disks=(DiskSpec("disk0", size),))).vm_id
        try:
            hv.start_tracking(vm)
            hv.release(hv.seal(vm))  # the epoch's base: from here on the bitmap is the delta
            payload = rng.bytes(ext * 64)
            t0 = time.perf_counter()
            for i, g in enumerate(granules.tolist()):
                j = (i % 64) * ext
                hv.write(vm, "disk0", g * GRANULE, payload[j:j + ext])
            hv.flush(vm)
            t_write = time.perf_counter() - t0
            cycle = hv.seal(vm)
            changed = cycle.changed["disk0"]
            assert changed.total == total, (changed.total, total)
            print(f"{a.extents} scattered {a.extent_kib} KiB extents ({mib(total)}) of a "
                  f"{a.disk_gib} GiB "
                  f"qcow2 written through QEMU in {t_write:.1f} s; sealed: "
                  f"{len(changed)} dirty runs, {mib(changed.total)}")
            reader = hv.open_cycle_reader(cycle, "disk0")
            assert isinstance(reader, NbdDiskReader)
            export = f"nbd+unix:///{reader.export}?socket={reader.socket_path}"
            qcow2 = hv.vm_dir(vm) / "disk0.qcow2"
            dropped = False

            def drsite_read() -> float:
                t = time.perf_counter()
                got = 0
                for _, buf in reader.read_extents(changed, inflight=a.inflight):
                    got += len(buf)
                assert got == total
                return time.perf_counter() - t

            def engine_read() -> float:
                t = time.perf_counter()
                got = sum(len(b) for _, _, b, _ in read_batches(reader, changed.split(4 * MiB), 4 * MiB))
                assert got == total
                return time.perf_counter() - t

            def nbdcopy() -> float:
                t = time.perf_counter()
                subprocess.run(["nbdcopy", export, "null:"], check=True)
                return time.perf_counter() - t

            def dd() -> float:
                t = time.perf_counter()
                subprocess.run(["dd", f"if={qcow2}", "of=/dev/null", "bs=4M", "status=none"],
                               check=True)
                return time.perf_counter() - t

            times: dict[str, list[float]] = {"drsite": [], "engine": [], "nbdcopy": [], "dd": []}
            for _ in range(a.runs):
                for name, fn in (("drsite", drsite_read), ("nbdcopy", nbdcopy), ("dd", dd),
                                 ("engine", engine_read)):
                    dropped = try_drop_caches()
                    times[name].append(fn())
            reader.close()
            hv.release(cycle)
        finally:
            hv.delete_vm(vm)
            hv.close()
        b = {k: best(v) for k, v in times.items()}
        r_copy = b["nbdcopy"] / b["drsite"]
        r_dd = b["dd"] / b["drsite"]
        print(f"({cache_note(dropped)}; best of {a.runs})")
        print(f"  drsite NbdClient.read_extents, {a.inflight} in flight   {b['drsite']:.3f} s  "
              f"{rate(total, b['drsite'])}")
        print(f"  drsite engine read_ahead (3 threads, readinto)  {b['engine']:.3f} s  "
              f"{rate(total, b['engine'])}")
        print(f"  nbdcopy of the same export -> null:           {b['nbdcopy']:.3f} s  "
              f"{rate(total, b['nbdcopy'])}")
        print(f"  dd bs=4M of the qcow2 file (sequential)       {b['dd']:.3f} s  "
              f"{rate(total, b['dd'])}")
        print(f"  ratio nbdcopy/drsite {r_copy:.2f}x (goal >= {GOAL}: "
              f"{'met' if r_copy >= GOAL else 'NOT met'}); dd/drsite {r_dd:.2f}x; "
              f"engine path/drsite {b['drsite'] / b['engine']:.2f}x")
        write_json(a.json, {"benchmark": "qemu_extents", "disk_size": size,
                            "extents": a.extents, "extent_size": ext, "bytes": total, "runs": a.runs,
                            "seconds": b, "ratio_nbdcopy": r_copy, "ratio_dd": r_dd,
                            "goal": GOAL, "cache_dropped": dropped,
                            "dirty_runs": len(changed)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
