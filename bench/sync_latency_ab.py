"""Synchronous mode of file VMs (issue 18), A/B in the same minutes: ``sync_latency.py`` run
alternately with two versions of the code (``--ref``, default ``main``, extracted with
``git archive``; and this worktree), A B B A A B …, so the box's load falls on both alike.
Each run's load average is kept with its figures; the summary gives per-variant medians of
the sync QD1 p50/p99, the ratio to the same run's local ``O_DSYNC`` p50, and QD16.

Both versions run this worktree's ``bench/sync_latency.py`` (one measurement for both) with
``PYTHONPATH`` = the version's ``src`` (ahead of the editable install), in both of its
processes (the guest and the recovery side).

    .venv/bin/python bench/sync_latency_ab.py [--ref main] [--rounds 3] [--n 1000]
                                              [--qd16-seconds 3] [--recovery-dir /dev/shm]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def extract(ref: str, into: Path) -> Path:
    """The tree of ``ref`` (its ``src``) under ``into``."""
    blob = subprocess.run(["git", "-C", str(REPO), "archive", ref, "src"],
                          check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(blob)) as t:
        t.extractall(into, filter="data")
    return into


def run(tree: Path, args: list[str]) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=str(tree / "src"))
    out = subprocess.run([sys.executable, str(REPO / "bench" / "sync_latency.py"), *args],
                         check=True, capture_output=True, text=True, env=env).stdout
    res: dict[str, Any] = json.loads(out)
    return res


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    def med(xs: list[float]) -> float:
        return round(statistics.median(xs), 1)
    p50 = [r["sync_qd1"]["p50_us"] for r in runs]
    return {
        "runs": len(runs),
        "load_before": [round(r["load_avg_before"][0], 1) for r in runs],
        "local_o_dsync_p50_us": [r["local_durable"]["o_dsync"]["p50_us"] for r in runs],
        "sync_qd1_p50_us": p50,
        "sync_qd1_p99_us": [r["sync_qd1"]["p99_us"] for r in runs],
        "ratio_to_local_o_dsync": [r["sync_p50_over_local_dsync_p50"] for r in runs],
        "async_qd1_p50_us": [r["async_qd1"]["p50_us"] for r in runs],
        "sync_qd16_writes_per_s": [r["sync_qd16"]["writes_per_s"] for r in runs],
        # CPU per sync QD1 write, each side (/proc ticks of 10 ms: ±5–10 % at n = 1000)
        "guest_cpu_us_per_write": [r["sync_qd1"]["guest_cpu_us_per_write"] for r in runs],
        "recovery_cpu_us_per_write": [r["sync_qd1"]["recovery_cpu_us_per_write"]
                                      for r in runs],
        "median": {"sync_qd1_p50_us": med(p50),
                   "sync_qd1_p99_us": med([r["sync_qd1"]["p99_us"] for r in runs]),
                   "ratio": med([r["sync_p50_over_local_dsync_p50"] for r in runs]),
                   "sync_qd16_writes_per_s": med([r["sync_qd16"]["writes_per_s"]
                                                  for r in runs]),
                   "guest_cpu_us_per_write": med([r["sync_qd1"]["guest_cpu_us_per_write"]
                                                  for r in runs]),
                   "recovery_cpu_us_per_write": med(
                       [r["sync_qd1"]["recovery_cpu_us_per_write"] for r in runs])}}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ref", default="main")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--qd16-seconds", type=float, default=3.0)
    ap.add_argument("--recovery-dir", default=None)
    a = ap.parse_args()
    args = ["--n", str(a.n), "--qd16-seconds", str(a.qd16_seconds)]
    if a.recovery_dir:
        args += ["--recovery-dir", a.recovery_dir]
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                          check=True, capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "src"],
                                check=True, capture_output=True, text=True).stdout.strip())
    with tempfile.TemporaryDirectory(prefix="sync-ab-") as tmp:
        trees = {f"A {a.ref}": extract(a.ref, Path(tmp) / "a"),
                 f"B {head}{'+' if dirty else ''}": REPO}
        names = list(trees)
        results: dict[str, list[dict[str, Any]]] = {k: [] for k in names}
        for i in range(a.rounds):
            order = names if i % 2 == 0 else names[::-1]
            for name in order:
                r = run(trees[name], args)
                results[name].append(r)
                print(f"round {i + 1} {name}: load {r['load_avg_before'][0]:.1f} "
                      f"O_DSYNC p50 {r['local_durable']['o_dsync']['p50_us']} us, "
                      f"sync QD1 p50 {r['sync_qd1']['p50_us']} / p99 {r['sync_qd1']['p99_us']}"
                      f" us ({r['sync_p50_over_local_dsync_p50']}x), QD16 "
                      f"{r['sync_qd16']['writes_per_s']}/s, CPU per QD1 write: guest "
                      f"{r['sync_qd1']['guest_cpu_us_per_write']} us, recovery "
                      f"{r['sync_qd1']['recovery_cpu_us_per_write']} us",
                      file=sys.stderr, flush=True)
    print(json.dumps({"args": args, "variants": {k: summary(v) for k, v in results.items()}},
                     indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
