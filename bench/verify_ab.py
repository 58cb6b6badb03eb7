"""The failover's verification step, A/B in one process: main's way vs the branch's way.

Runs on the files a ``bench/rto_vault.py --keep`` run left (``<work>/cluster``: the recovery
agent's replicas and its store): for each item, the replica image is compared with the
point its replica state names, with a new ``Repository`` each time (as the agent's failover
command), in two ways, interleaved:

* ``digests``: 64 KiB xxh3-128 digests of the whole disk on both sides, one reader call per
  data piece, segment maps fetched one at a time (main before branch r5-rto);
* ``batched``: ``failover.images.blocks_differ`` (the union of both sides' data extents read in
  batches, one ``readv`` per side per batch) with the maps prefetched in parallel.

``cold`` runs first drop the item's store objects and replica image from the page cache
(``posix_fadvise``, these files only). Prints medians and the Python call count of each way.

    .venv/bin/python bench/verify_ab.py CLUSTER_DIR [--runs N]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from drsite.failover.images import blocks_differ
from drsite.imagefile import RawImageReader
from drsite.replication.resync import Readable, block_digests, differing_blocks
from drsite.store.catalog import Catalog
from drsite.store.local.backend import LocalObjectStore
from drsite.store.repository import Repository

PREFETCH = Catalog._prefetch_maps


def digests(a: Readable, b: Readable) -> int:
    return int(differing_blocks(block_digests(a), block_digests(b)).size)


def no_prefetch(self: Catalog, rels: list[str | None]) -> None:
    return None


WAYS: dict[str, tuple[Callable[[Readable, Readable], int], Any]] = {
    "digests": (digests, no_prefetch), "batched": (blocks_differ, PREFETCH)}


def evict(paths: list[Path]) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def verify_once(root: Path, item: str, way: str, cold: bool) -> float:
    fn, prefetch = WAYS[way]
    Catalog._prefetch_maps = prefetch  # type: ignore[method-assign]
    replica = root / "secondary" / "agent" / "replicas" / item
    if cold:
        evict([replica / "d0.img"] + [Path(dp) / f for dp, _, fs in
                                      os.walk(root / "secondary" / "store" / "items" / item)
                                      for f in fs])
    state = json.loads((replica / "state.json").read_text())
    repo = Repository(LocalObjectStore(root / "secondary" / "store"), item)
    p = repo.point(state["point_id"])
    t0 = time.perf_counter()
    try:
        with RawImageReader(replica / "d0.img", p.disk_sizes["d0"]) as img:
            pr = repo.reader(p.point_id, "d0")
            bad = fn(img, pr)
            pr.close()
    finally:
        repo.close()
        Catalog._prefetch_maps = PREFETCH  # type: ignore[method-assign]
    if bad:
        raise SystemExit(f"{item}: the replica differs from point {p.point_id} in {bad} blocks")
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cluster", type=Path, help="<work>/cluster of a rto_vault.py --keep run")
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    items = sorted(d.name for d in (a.cluster / "secondary" / "agent" / "replicas").iterdir()
                   if (d / "state.json").exists())
    got: dict[tuple[str, bool, str], list[float]] = {}
    load0 = os.getloadavg()
    for _ in range(a.runs):
        for cold in (True, False):
            for item in items:
                for way in WAYS:
                    got.setdefault((item, cold, way), []).append(
                        verify_once(a.cluster, item, way, cold))
    print(f"load {load0[0]:.2f} -> {os.getloadavg()[0]:.2f}")
    for (item, cold, way), v in sorted(got.items()):
        prof = cProfile.Profile()
        prof.enable()
        verify_once(a.cluster, item, way, False)
        prof.disable()
        calls = pstats.Stats(prof).total_calls  # type: ignore[attr-defined]
        print(f"{item} {'cold' if cold else 'warm'} {way:8s} median {statistics.median(v):.3f} s "
              f"(all {[round(x, 2) for x in v]}); Python calls {calls}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
