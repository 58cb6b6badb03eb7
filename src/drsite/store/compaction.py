"""Which live blocks of sparse packs a delta cycle should store again ("re-homing").

GC deletes a pack only when no kept point uses any of its frames (``maintenance.gc``). Under
scattered writes nearly every pack keeps a few live frames for many cycles: with 30 % of a disk
overwritten per cycle, an 8 MiB pack of 4 KiB blocks lives ~20 cycles whatever the retention,
and the store held 5–8 × the disk (``bench/store_growth.py``). A delta cycle may therefore also
write, into its own packs, the latest point's data that still sits in that point's sparsest
packs; once retention has dropped the points before it, nothing references those packs and GC
deletes them. Points never change: the re-homed bytes are a new point's own copy.

Invariants (the caller's, ``replication.driver``):
- a re-homed range holds the *base point's* bytes, read through its verified reader; the base
  of a staged cycle is pinned (retention, GC), so it cannot go while it is read;
- re-homed ranges never overlap the cycle's changed extents (they are subtracted first), so
  what the guest wrote always wins; they are written with ``PointWriter.write_many(...,
  rehomed=True)``, so the point's changed list (what a replica at the base rewrites) and the
  tee leave them out — their bytes are the base's;
- planning only reads immutable objects (manifest, tables, maps) and the packs' sizes; it writes
  nothing and may be skipped or cut short at any time: it changes how much space the store
  takes, never what a point holds.

Responsible for: the plan. Not responsible for: reading or writing the data (the engine does,
through ``PointReader`` and ``PointWriter``), deleting packs (``maintenance.gc``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from drsite.core.extents import ExtentList, coalesce
from drsite.store.catalog import Catalog
from drsite.store.format import ZERO, Entries

# a pack is re-homed when the base point reads less than this share of its content
SPARSE_BELOW = 0.5
# the most pack sizes one plan asks the store for (a HEAD each on a remote store)
MAX_SIZE_REQUESTS = 512
# a point with more map rows than this is not planned (seconds of CPU per plan beyond it)
MAX_ROWS = 16_000_000
PREFETCH = 32


@dataclass(frozen=True)
class RehomePlan:
    """What to store again: per disk, the base point's extents whose bytes sit in ``packs``."""

    ranges: dict[str, ExtentList] = field(default_factory=dict)
    packs: tuple[str, ...] = ()
    live_bytes: int = 0     # disk bytes in ``ranges`` (what the cycle writes again)
    pack_bytes: int = 0     # stored bytes of ``packs`` (what GC frees once no kept point uses them)

    @property
    def empty(self) -> bool:
        return self.live_bytes == 0


def plan_rehome(repo: Catalog, point_id: str, *, budget: int,
                sparse_below: float = SPARSE_BELOW) -> RehomePlan:
    """The packs of ``point_id`` whose bytes it reads for less than ``sparse_below`` of their
    content, sparsest first, as many as fit ``budget`` disk bytes of live data, and the
    point's extents held in them.

    A pack's live bytes are the disk bytes the point's map rows take from it; its content is
    its stored size scaled by the compression ratio of the frames the point references (a
    frame is kept whole while any row uses it, so frames cannot be the measure: a 1 MiB frame
    of an initial copy stays in use until every 4 KiB of it has been overwritten)."""
    if budget <= 0:
        return RehomePlan()
    body = repo._load_manifest(point_id)
    disk_names = sorted(body["disks"])

    def maps() -> Iterator[tuple[int, list[int], Entries]]:
        """(disk index, the map's pack ids, its data rows), map by map: two passes over the
        maps rather than every row of the point in memory at once (an 8 GiB disk written in
        scattered 4 KiB pieces has ~2 million rows)."""
        for di, disk_id in enumerate(disk_names):
            keys = repo._map_keys(body["disks"][disk_id])
            for i, mk in enumerate(keys):
                if i % PREFETCH == 0:   # a remote store: 8 maps in flight, not one at a time
                    repo._prefetch_maps(keys[i:i + PREFETCH])
                if mk is None:
                    continue
                m = repo._get_map(mk)
                e = m.entries[m.entries["codec"] != ZERO]
                if e.size:
                    yield di, [gid.setdefault(pk, len(gid)) for pk in m.packs], e

    # pass 1, per pack: disk bytes the point takes from it, and the stored and raw bytes of
    # the frames it references (once per map: for the compression ratio only)
    gid: dict[str, int] = {}
    live = np.zeros(0)
    stored_ref = np.zeros(0)
    raw_ref = np.zeros(0)
    rows = 0
    for _di, ids, e in maps():
        rows += e.size
        if rows > MAX_ROWS:
            return RehomePlan()
        pack = np.asarray(ids, np.int64)[e["pack"].astype(np.int64)]
        if len(gid) > live.size:
            grow = len(gid) - live.size
            live, stored_ref, raw_ref = (np.concatenate([a, np.zeros(grow)])
                                         for a in (live, stored_ref, raw_ref))
        live += np.bincount(pack, weights=e["length"], minlength=live.size)
        _, first = np.unique(pack * (1 << 40) + e["foff"].astype(np.int64), return_index=True)
        stored_ref += np.bincount(pack[first], weights=e["flen"][first], minlength=live.size)
        raw_ref += np.bincount(pack[first], weights=e["rlen"][first], minlength=live.size)
    if not gid:
        return RehomePlan()
    names = sorted(gid, key=gid.__getitem__)
    ratio = np.divide(raw_ref, stored_ref, out=np.ones_like(raw_ref), where=stored_ref > 0)
    # candidates by an estimate (a pack holds about the writer's target, and at least the
    # frames referenced), then the store's size of each candidate, sparsest first: a remote
    # store answers one request per pack asked, so at most MAX_SIZE_REQUESTS are asked
    est = np.maximum(stored_ref, float(repo.pack_target)) * ratio
    est_share = np.divide(live, est, out=np.ones_like(live), where=est > 0)
    chosen: list[int] = []
    total = 0
    stored = 0
    asked = 0
    for g in np.argsort(est_share, kind="stable").tolist():
        if est_share[g] >= sparse_below or asked >= MAX_SIZE_REQUESTS:
            break
        if total + int(live[g]) > budget:
            continue
        size = repo.store.size(repo.key(names[g]))
        asked += 1
        if size <= 0 or live[g] / (size * ratio[g]) >= sparse_below:
            continue
        chosen.append(g)
        total += int(live[g])
        stored += size
    if not chosen:
        return RehomePlan()
    # pass 2: the point's extents held in the chosen packs
    want = np.zeros(len(gid), bool)
    want[chosen] = True
    offs: list[list[np.ndarray]] = [[] for _ in disk_names]
    lens: list[list[np.ndarray]] = [[] for _ in disk_names]
    for di, ids, e in maps():
        pick = want[np.asarray(ids, np.int64)[e["pack"].astype(np.int64)]]
        if pick.any():
            offs[di].append(e["offset"][pick])
            lens[di].append(e["length"][pick])
    ranges = {disk_names[di]: coalesce(np.concatenate(offs[di]), np.concatenate(lens[di]))
              for di in range(len(disk_names)) if offs[di]}
    return RehomePlan(ranges=ranges, packs=tuple(names[g] for g in chosen),
                      live_bytes=sum(r.total for r in ranges.values()), pack_bytes=stored)


__all__ = ["MAX_SIZE_REQUESTS", "SPARSE_BELOW", "RehomePlan", "plan_rehome"]
