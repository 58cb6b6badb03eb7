"""The delta cycle's store path at 4 KiB random churn: CPU seconds to write and commit a cycle.

A repository over an in-memory store that keeps only the metadata (pack bodies are dropped:
the commit never reads them) holds one disk (``--disk-gib``, default 4). ``--warmup`` cycles of
``--writes`` random 4 KiB writes each (distinct blocks, shipped in disk order as the engine
reads a sealed cycle) fragment its segment maps, as a disk in 4 KiB churn is;
then ``--cycles`` measured cycles of the same size. Per measured cycle: CPU seconds (the whole
process, all threads) of writing (``write_many`` in batches of ``--batch`` extents, as the engine
feeds it, + ``flush``) and of ``commit`` (maps, tables, manifest), the commit's wall time, and
the map rows of the disk. Zero detection, hashing and zstd run as in the engine (random data:
frames stored raw after the incompressibility probe).

``--ab OTHER_SRC`` runs the measurement in child processes, alternating this tree's ``src`` and
``OTHER_SRC`` (e.g. a ``git archive`` of main), ``--rounds`` times each, and prints both: CPU
seconds are the robust figure on a loaded box; the load average is printed with each run.

    .venv/bin/python bench/commit_path.py [--disk-gib 4] [--writes 131072] [--warmup 4]
        [--cycles 2] [--ab /tmp/main/src --rounds 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve()
KiB, MiB, GiB = 1024, 1 << 20, 1 << 30


def measure(a: argparse.Namespace) -> dict[str, Any]:
    from drsite.core.model import Consistency
    from drsite.store.repository import Repository
    from drsite.store.testing.memory import MemoryObjectStore

    class MetaOnlyStore(MemoryObjectStore):
        """Keeps maps, tables and manifests; a pack keeps only its length (never read here)."""

        def put(self, key: str, data: bytes | memoryview, *, overwrite: bool = False) -> None:
            if "/packs/" in key:
                data = b"\0" * 0  # body dropped
            super().put(key, data, overwrite=overwrite)

    size = int(a.disk_gib * GiB)
    io = 4 * KiB
    rng = np.random.default_rng(a.seed)
    payload = rng.bytes(a.batch * io)  # one batch's data, reused (content does not matter)
    repo = Repository(MetaOnlyStore(), "commit-bench")
    base: str | None = None
    out: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    for c in range(a.warmup + a.cycles):
        # the engine reads a cycle's dirty blocks once each, in disk order
        offs = np.unique(rng.integers(0, size // io, a.writes, dtype=np.int64)) * io
        w = repo.begin(f"c{c:04d}", base=base, disk_sizes={"disk0": size},
                       kind="initial" if base is None else "delta")
        lens = np.full(a.batch, io, np.int64)
        p0 = time.process_time()
        for i in range(0, offs.size, a.batch):
            o = offs[i:i + a.batch]
            w.write_many("disk0", o, lens[:o.size], memoryview(payload)[:o.size * io])
        w.flush()
        p1, t1 = time.process_time(), time.perf_counter()
        info = w.commit(created_at=time.time(), consistency=Consistency.CRASH)
        p2, t2 = time.process_time(), time.perf_counter()
        base = info.point_id
        if c >= a.warmup:
            body = repo._load_manifest(base)
            rows = sum(repo._get_map(k).entries.size
                       for k in repo._map_keys(body["disks"]["disk0"]) if k is not None)
            out.append({"write_cpu": p1 - p0, "commit_cpu": p2 - p1, "commit_wall": t2 - t1,
                        "map_rows": rows})
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * KiB
    return {"cycles": out, "peak_rss": rss, "seconds": time.perf_counter() - t_start,
            "writes": a.writes, "disk_size": size}


def child_cmd(src: str, a: argparse.Namespace) -> list[str]:
    return [sys.executable, str(HERE), "--child", "--disk-gib", str(a.disk_gib), "--writes",
            str(a.writes), "--warmup", str(a.warmup), "--cycles", str(a.cycles), "--batch",
            str(a.batch), "--seed", str(a.seed)]


def run_child(src: str, a: argparse.Namespace) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=src)
    load0 = os.getloadavg()[0]
    r = subprocess.run(child_cmd(src, a), env=env, check=True, capture_output=True, text=True)
    res: dict[str, Any] = json.loads(r.stdout.strip().splitlines()[-1])
    res["load"] = [load0, os.getloadavg()[0]]
    return res


def show(tag: str, r: dict[str, Any]) -> str:
    cs = r["cycles"]
    gib = r["writes"] * 4 * KiB / GiB
    wc = [c["write_cpu"] for c in cs]
    cc = [c["commit_cpu"] for c in cs]
    walls = [c["commit_wall"] for c in cs]
    return (f"{tag}: load {r['load'][0]:.1f}→{r['load'][1]:.1f}; write CPU "
            f"{', '.join(f'{x:.2f}' for x in wc)} s; commit CPU {', '.join(f'{x:.2f}' for x in cc)} s "
            f"(wall {', '.join(f'{x:.2f}' for x in walls)}); "
            f"CPU-s per GiB of churn {min(w + c for w, c in zip(wc, cc, strict=True)) / gib:.2f}; "
            f"map rows {cs[-1]['map_rows']}; peak RSS {r['peak_rss'] / MiB:.0f} MiB")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--disk-gib", type=float, default=4.0)
    ap.add_argument("--writes", type=int, default=128 * 1024, help="4 KiB writes per cycle")
    ap.add_argument("--warmup", type=int, default=4, help="cycles that fragment the maps first")
    ap.add_argument("--cycles", type=int, default=2, help="measured cycles")
    ap.add_argument("--batch", type=int, default=256, help="extents per write_many call")
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--ab", default=None, help="the other tree's src directory (A/B mode)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(measure(a)))
        return 0
    mine = str(HERE.parent.parent / "src")
    runs: dict[str, list[dict[str, Any]]] = {"this": [], "other": []}
    pairs = [("this", mine)] + ([("other", a.ab)] if a.ab else [])
    for rnd in range(a.rounds if a.ab else 1):
        for tag, src in (pairs if rnd % 2 == 0 else pairs[::-1]):
            r = run_child(src, a)
            runs[tag].append(r)
            print(f"round {rnd + 1} {show(tag, r)}", flush=True)
    if a.json:
        a.json.write_text(json.dumps({"args": vars(a) | {"json": str(a.json)}, "runs": runs},
                                     indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
