"""Scrub throughput vs a plain sequential read of the same store, and the scrub's rate limit.

Setup: a local store with one item's repository — an initial point of a disk image (default
2 GiB, 60 % data in scattered runs, alternating random and text-like data, compressed as
replication stores it) and three delta points of 16 MiB of random 64 KiB writes each, committed
through the store's own writer.

* reference: read every object of the item's repository whole, one after the other in key order,
  with plain ``read`` calls into one buffer (no hashing, no parsing): what the disk and the page
  cache give a reader that does nothing with the bytes;
* ours: one full :func:`drsite.store.scrub.scrub` pass, unpaced (every manifest, table and map
  parsed and checked; every referenced pack read whole and its blake3 checked; the listing
  compared with the references).

Throughput ratio = (bytes the scrub read / its time) / (bytes the reference read / its time),
best of ``--runs`` runs, the two sides alternating; goal >= 0.8. The page cache is dropped before
every timed run when permitted (else both sides read from a warm cache: said in the output).

Rate limit: a scrub pass paced at ``--rate-mib`` MiB/s (default: a quarter of the unpaced
throughput measured, at most 64 MiB/s, so the pass lasts several seconds); achieved rate =
bytes read / pass time; goal: within 10 % of the configured rate.

``--record`` appends a dated section (machine, load from ``uptime``, figures, met or not) to
``bench/RESULTS.md``.

    .venv/bin/python bench/scrub.py [--size-mib 2048] [--runs 3] [--rate-mib R] [--record]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from benchlib import (
    BENCH_DIR,
    DataMaker,
    KiB,
    MiB,
    cache_note,
    machine_info,
    mib,
    plan_sparse,
    settle,
    try_drop_caches,
    workdir,
    write_json,
)

from drsite.core.model import Consistency
from drsite.store.local.backend import LocalObjectStore
from drsite.store.repository import Repository
from drsite.store.scrub import scrub

GOAL_RATIO = 0.8
RATE_TOLERANCE = 0.10
ITEM = "bench-scrub"
DISK = "disk0"
READ_BUF = 8 * MiB


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "uptime unavailable: load " + Path("/proc/loadavg").read_text().strip()


def build(repo: Repository, size: int, fill: float, deltas: int, seed: int) -> tuple[int, int]:
    """An initial point and ``deltas`` delta points; (data bytes written, points)."""
    dm = DataMaker(seed)
    lay = plan_sparse(size, fill, seed)
    w = repo.begin("c0", base=None, disk_sizes={DISK: size}, kind="initial")
    for off, n, kind in lay.runs:
        pos = 0
        while pos < n:
            piece = min(n - pos, 8 * MiB)
            w.write(DISK, off + pos, dm.random(piece) if kind == "random" else dm.text(piece))
            pos += piece
    base = w.commit(created_at=time.time(), consistency=Consistency.CRASH).point_id
    w.close()
    written = lay.data_bytes
    rng = np.random.default_rng(seed)
    piece = 64 * KiB
    for i in range(deltas):
        w = repo.begin(f"c{i + 1}", base=base, disk_sizes={DISK: size}, kind="delta")
        for _ in range((16 * MiB) // piece):
            off = int(rng.integers(0, size // piece)) * piece
            w.write(DISK, off, dm.random(piece))
        base = w.commit(created_at=time.time(), consistency=Consistency.CRASH).point_id
        w.close()
        written += 16 * MiB
    return written, deltas + 1


def plain_read(root: Path) -> tuple[float, int, int]:
    """Read every file under ``root`` whole, in path order: (seconds, bytes, files)."""
    files = sorted(p for p in root.rglob("*") if p.is_file())
    buf = bytearray(READ_BUF)
    mv = memoryview(buf)
    total = 0
    t0 = time.perf_counter()
    for p in files:
        fd = os.open(p, os.O_RDONLY)
        try:
            while True:
                n = os.readv(fd, [mv])
                if n <= 0:
                    break
                total += n
        finally:
            os.close(fd)
    return time.perf_counter() - t0, total, len(files)


def one_scrub(store_root: Path, rate_bps: int | None) -> dict[str, Any]:
    repo = Repository(LocalObjectStore(store_root), ITEM)
    try:
        t0 = time.perf_counter()
        rep, cursor = scrub(repo, rate_bps=rate_bps, quarantine=False)
        seconds = time.perf_counter() - t0
    finally:
        repo.close()
    assert cursor is None and rep.complete
    if rep.findings:
        raise SystemExit(f"the scrub found damage in a fresh store: {rep.to_dict()['findings']}")
    return {"seconds": seconds, "bytes": rep.bytes_checked, "objects": rep.objects_checked,
            "packs": rep.packs_total}


def prepare(dropped: bool) -> None:
    if dropped:
        try_drop_caches()
    else:
        settle()


def section(r: dict[str, Any]) -> str:
    info = r["machine"]
    ok_ratio = r["ratio"] >= GOAL_RATIO
    ok_rate = abs(r["rate_error"]) <= RATE_TOLERANCE
    lines = [
        f"## {r['date']} — scrub (`bench/scrub.py`)", "",
        f"- machine: {info['nproc']} CPUs ({info['cpu']}), {info['memory']} RAM, Python "
        f"{info['python']}, kernel {info['kernel']}; filesystem {info['filesystem']}",
        f"- load (`uptime`) before: {r['uptime_before']}",
        f"- load (`uptime`) after: {r['uptime_after']}",
        f"- page cache: {cache_note(r['cache_dropped'])}",
        f"- store: {mib(r['size'])} disk, {mib(r['data_bytes'])} written in {r['points']} points"
        f" → {r['files']} objects, {mib(r['store_bytes'])} on disk; best of {r['runs']} runs", "",
        "| figure | value | goal | verdict |", "|---|---|---|---|",
        f"| plain sequential read of every object (best) | {r['ref_seconds']:.2f} s, "
        f"{r['ref_mibps']:.0f} MiB/s | reference | |",
        f"| scrub pass, unpaced (best) | {r['ours_seconds']:.2f} s, {r['ours_mibps']:.0f} MiB/s "
        f"({r['ours_objects']} objects checked) | | |",
        f"| scrub throughput / plain read | **{r['ratio']:.2f}** | ≥ {GOAL_RATIO} | "
        f"{'met' if ok_ratio else '**not met**'} |",
        f"| rate limit: configured → achieved | {r['rate_mibps']:.1f} MiB/s → "
        f"{r['achieved_mibps']:.1f} MiB/s (**{100 * r['rate_error']:+.1f} %**, pass "
        f"{r['paced_seconds']:.1f} s) | ± {100 * RATE_TOLERANCE:.0f} % | "
        f"{'met' if ok_rate else '**not met**'} |", "",
        f"- scrub: {r['ratio']:.2f}× the throughput of a plain read of the same store "
        f"({'meets' if ok_ratio else 'misses'} ≥ {GOAL_RATIO}); the paced pass ran "
        f"{100 * r['rate_error']:+.1f} % off its configured rate "
        f"({'within' if ok_rate else 'outside'} ±{100 * RATE_TOLERANCE:.0f} %).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=2048, help="disk size (MiB)")
    ap.add_argument("--fill", type=float, default=0.6, help="fraction of the disk holding data")
    ap.add_argument("--deltas", type=int, default=3, help="delta points after the initial one")
    ap.add_argument("--runs", type=int, default=3, help="timed runs of each side")
    ap.add_argument("--rate-mib", type=float, default=None,
                    help="rate limit to check (MiB/s; default: a quarter of the unpaced rate)")
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--workdir", type=Path, default=None,
                    help="where work files go (a temp dir is made inside; default bench/out)")
    ap.add_argument("--keep", action="store_true", help="keep the work files")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    ap.add_argument("--record", action="store_true", help="append a section to bench/RESULTS.md")
    ap.add_argument("--results", type=Path, default=BENCH_DIR / "RESULTS.md")
    a = ap.parse_args(argv)
    size = a.size_mib * MiB
    up_before = uptime()

    with workdir(a.workdir, a.keep) as wd:
        store_root = wd / "store"
        repo = Repository(LocalObjectStore(store_root), ITEM)
        try:
            t0 = time.perf_counter()
            written, points = build(repo, size, a.fill, a.deltas, a.seed)
            print(f"store built in {time.perf_counter() - t0:.1f} s: {mib(size)} disk, "
                  f"{mib(written)} written in {points} points")
        finally:
            repo.close()
        item_root = store_root / "items" / ITEM
        dropped = try_drop_caches()
        print(cache_note(dropped))

        refs: list[tuple[float, int, int]] = []
        ours: list[dict[str, Any]] = []
        for i in range(a.runs):
            for side in (("ref", "ours") if i % 2 == 0 else ("ours", "ref")):
                prepare(dropped)
                if side == "ref":
                    refs.append(plain_read(item_root))
                    s, n, f = refs[-1]
                    print(f"run {i + 1}: plain read  {s:6.2f} s  {n / MiB / s:7.0f} MiB/s "
                          f"({f} files, {mib(n)})")
                else:
                    ours.append(one_scrub(store_root, None))
                    o = ours[-1]
                    print(f"run {i + 1}: scrub pass  {o['seconds']:6.2f} s  "
                          f"{o['bytes'] / MiB / o['seconds']:7.0f} MiB/s ({o['objects']} objects, "
                          f"{o['packs']} packs)")
        ref_s, ref_bytes, files = min(refs)
        best = min(ours, key=lambda o: o["seconds"])
        ref_rate = ref_bytes / ref_s
        ours_rate = best["bytes"] / best["seconds"]
        ratio = ours_rate / ref_rate

        rate = int((a.rate_mib * MiB) if a.rate_mib else min(64 * MiB, ours_rate / 4))
        prepare(dropped)
        paced = one_scrub(store_root, rate)
        achieved = paced["bytes"] / paced["seconds"]
        err = achieved / rate - 1.0
        print(f"paced scrub: configured {rate / MiB:.1f} MiB/s, achieved {achieved / MiB:.1f} MiB/s"
              f" ({100 * err:+.1f} %) over {paced['seconds']:.1f} s")
        print(f"ratio scrub / plain read = {ratio:.2f} (goal >= {GOAL_RATIO}: "
              f"{'met' if ratio >= GOAL_RATIO else 'NOT met'}); rate limit "
              f"{'met' if abs(err) <= RATE_TOLERANCE else 'NOT met'} (±{RATE_TOLERANCE:.0%})")
        r = {"benchmark": "scrub", "date": time.strftime("%Y-%m-%d %H:%M %Z"),
             "machine": machine_info(wd), "uptime_before": up_before, "uptime_after": uptime(),
             "cache_dropped": dropped, "size": size, "data_bytes": written, "points": points,
             "files": files, "store_bytes": ref_bytes, "runs": a.runs,
             "ref_seconds": ref_s, "ref_mibps": ref_rate / MiB,
             "ours_seconds": best["seconds"], "ours_mibps": ours_rate / MiB,
             "ours_bytes": best["bytes"], "ours_objects": best["objects"], "ratio": ratio,
             "goal": GOAL_RATIO, "rate_mibps": rate / MiB, "achieved_mibps": achieved / MiB,
             "paced_seconds": paced["seconds"], "rate_error": err,
             "rate_tolerance": RATE_TOLERANCE}
        write_json(a.json, r)
        text = section(r)
        print("\n" + text)
        if a.record:
            with a.results.open("a") as fh:
                fh.write("\n" + text)
            print(f"appended to {a.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
