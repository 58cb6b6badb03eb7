"""Resync after lost tracking vs ``rsync --inplace --no-whole-file``, same 2 GiB pair.

Needs rsync (Debian: ``apt-get install -y rsync``).

Setup: a stopped file VM with one disk (default 2 GiB, fully allocated: alternating random and
text-like runs; ``--fill`` < 1 makes it sparse) is protected (initial replication, replica
hydrated), and a plain copy of the disk is made for rsync: both targets equal the source. Then
1% of the disk is changed in scattered 64 KiB pieces (4 KiB-aligned, random data) by writing
straight into the source image with ``os.pwrite`` while the VM is stopped, so the change log
does not see them (tracking lost, as after a host crash).

* ours: ``ItemReplicator.run_resync`` (new tracking epoch, seal, xxh3_128 of 64 KiB blocks of
  the frozen source and of the hydrated replica in parallel, ship differing blocks, commit,
  hydrate the replica);
* reference: ``rsync --inplace --no-whole-file --stats SOURCE COPY`` then ``fsync(COPY)``
  (ours fsyncs what it stores and the replica; rsync alone is printed too). The copy's mtime is
  set a day back so rsync's quick check (size + mtime) cannot skip the file.

Prints wall-time ratio ours / rsync (goal <= 0.5) and the bytes each side sent: ours = raw bytes
of differing blocks and their size after compression; rsync = "Total bytes sent" and
"Literal data" of ``--stats``. One run of each side (a resync is one-shot on its pair); the page
cache is dropped before each side when permitted.

    .venv/bin/python bench/resync.py [--size-mib 2048] [--change 0.01] [--piece-kib 64]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from benchlib import (
    KiB,
    MiB,
    Site,
    cache_note,
    fsync_path,
    mib,
    plan_sparse,
    settle,
    timed,
    try_drop_caches,
    workdir,
    write_image,
    write_json,
)

from drsite.replication.report import ItemReport

GOAL = 0.5


def parse_rsync_stats(text: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for key, label in (("total_sent", "Total bytes sent"), ("literal", "Literal data"),
                       ("matched", "Matched data"), ("total_received", "Total bytes received")):
        m = re.search(rf"^{label}: ([\d,.]+)", text, re.M)
        if m:
            out[key] = int(m.group(1).replace(",", "").replace(".", ""))
    return out


def scattered_changes(size: int, fraction: float, piece: int, align: int,
                      rng: np.random.Generator) -> list[int]:
    """Offsets of non-overlapping ``piece``-byte changes covering ``fraction`` of ``size``."""
    n = max(1, round(size * fraction / piece))
    chosen: list[int] = []
    taken: set[int] = set()
    slots = (size - piece) // align
    while len(chosen) < n:
        off = int(rng.integers(0, slots + 1)) * align
        lo, hi = off // align, (off + piece - 1) // align
        if any(s in taken for s in range(lo - piece // align, hi + 1)):
            continue
        taken.update(range(lo, hi + 1))
        chosen.append(off)
    return sorted(chosen)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=2048, help="disk size (MiB)")
    ap.add_argument("--fill", type=float, default=1.0, help="fraction of the disk holding data")
    ap.add_argument("--change", type=float, default=0.01, help="fraction of the disk changed")
    ap.add_argument("--piece-kib", type=int, default=64, help="size of each change (KiB)")
    ap.add_argument("--align", type=int, default=4 * KiB, help="alignment of the changes")
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=None,
                    help="where work files go (a temp dir is made inside; default bench/out)")
    ap.add_argument("--keep", action="store_true", help="keep the work files")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    a = ap.parse_args(argv)
    if shutil.which("rsync") is None:
        print("rsync is not installed (Debian: apt-get install -y rsync)", file=sys.stderr)
        return 3
    size = a.size_mib * MiB
    piece = a.piece_kib * KiB

    with workdir(a.workdir, a.keep) as wd:
        site = Site(wd)
        vm_id = site.create_vm("bench-resync", size)
        src = site.hv.disk_path(vm_id, "disk0")
        write_image(src, plan_sparse(size, a.fill, a.seed), a.seed)
        it, target = site.item("resync", vm_id, hydrate=True)
        assert target.hydrator is not None
        t_init, _ = timed(it.run_initial)
        replica = target.hydrator.disk_path("disk0")
        dst = wd / "rsync-target.img"
        subprocess.run(["cp", "--sparse=always", str(src), str(dst)], check=True)
        fsync_path(dst)
        # rsync's quick check skips a file of equal size and mtime: age the copy's mtime so the
        # command runs as given (the same effect as --ignore-times)
        os.utime(dst, (time.time() - 86400, time.time() - 86400))
        for name, path in (("replica", replica), ("rsync target", dst)):
            if subprocess.run(["cmp", "-s", str(src), str(path)]).returncode != 0:
                print(f"setup failed: {name} differs from the source before the changes")
                return 2
        print(f"pair: {mib(size)} disk (fill {a.fill:.0%}); initial replication + hydration "
              f"{t_init:.1f} s; replica and rsync target both equal the source")

        rng = np.random.default_rng(a.seed)
        offsets = scattered_changes(size, a.change, piece, a.align, rng)
        fd = os.open(src, os.O_RDWR)
        try:
            for off in offsets:
                os.pwrite(fd, rng.bytes(piece), off)
            os.fsync(fd)
        finally:
            os.close(fd)
        changed = len(offsets) * piece
        print(f"changed {len(offsets)} x {a.piece_kib} KiB = {mib(changed)} "
              f"({changed / size:.2%}) untracked (os.pwrite on the stopped VM's image)")

        # -- ours ---------------------------------------------------------------------------
        dropped = try_drop_caches()
        if not dropped:
            settle()
        print(cache_note(dropped))
        rep0: dict[str, Any] = it.report.to_dict()
        marks: dict[str, float] = {}

        def on_progress(rep: ItemReport) -> None:
            if rep.step.startswith("resync: sending") and "send" not in marks:
                marks["send"] = time.perf_counter()

        it.on_progress = on_progress
        hyd0 = target.hydrate_s
        t0 = time.perf_counter()
        it.request_resync("bench: tracking lost")
        point = it.run_resync("bench: tracking lost")
        t_ours = time.perf_counter() - t0
        it.on_progress = None
        hyd = target.hydrate_s - hyd0
        t_digest = marks.get("send", t0) - t0
        rep = it.report
        sent = rep.bytes_sent - rep0["bytes_sent"]
        stored = rep.bytes_stored - rep0["bytes_stored"]
        compared = rep.bytes_compared - rep0["bytes_compared"]
        ours_ok = subprocess.run(["cmp", "-s", str(src), str(replica)]).returncode == 0
        target.repo.close()

        # -- rsync --------------------------------------------------------------------------
        if dropped:
            try_drop_caches()
        else:
            settle()
        t0 = time.perf_counter()
        proc = subprocess.run(["rsync", "--inplace", "--no-whole-file", "--stats", str(src),
                               str(dst)], check=True, capture_output=True, text=True)
        t_rsync_only = time.perf_counter() - t0
        fsync_path(dst)
        t_rsync = time.perf_counter() - t0
        stats = parse_rsync_stats(proc.stdout)
        rsync_ok = subprocess.run(["cmp", "-s", str(src), str(dst)]).returncode == 0

        ratio = t_ours / t_rsync
        ratio_only = t_ours / t_rsync_only
        print(f"ours:  resync {t_ours:6.2f} s  (checksums {t_digest:.2f} s of {mib(compared)}, "
              f"send+commit {t_ours - t_digest - hyd:.2f} s, hydration {hyd:.2f} s); point "
              f"{point.point_id}; replica equals source: {'yes' if ours_ok else 'NO'}")
        print(f"       shipped {mib(sent)} raw of differing 64 KiB blocks "
              f"({sent / changed:.2f}x the changed bytes), {mib(stored)} after compression")
        print(f"rsync: {t_rsync:6.2f} s incl. fsync of the target ({t_rsync_only:.2f} s rsync "
              f"alone); target equals source: {'yes' if rsync_ok else 'NO'}")
        print(f"       total bytes sent {mib(stats.get('total_sent', 0))}, literal data "
              f"{mib(stats.get('literal', 0))}, matched {mib(stats.get('matched', 0))}")
        print(f"ratio ours / (rsync + fsync) = {ratio:.2f}  (goal <= {GOAL}: "
              f"{'met' if ratio <= GOAL else 'NOT met'}); ours / rsync alone = {ratio_only:.2f}")
        write_json(a.json, {
            "benchmark": "resync", "size": size, "fill": a.fill, "changes": len(offsets),
            "piece": piece, "changed_bytes": changed, "cache_dropped": dropped,
            "ours_seconds": t_ours, "ours_digest_seconds": t_digest, "ours_hydrate_seconds": hyd,
            "ours_bytes_sent": sent, "ours_bytes_stored": stored, "ours_bytes_compared": compared,
            "rsync_seconds": t_rsync, "rsync_only_seconds": t_rsync_only, "rsync_stats": stats,
            "ratio": ratio, "ratio_rsync_only": ratio_only, "goal": GOAL,
            "ours_ok": ours_ok, "rsync_ok": rsync_ok,
        })
        if not (ours_ok and rsync_ok):
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
