"""Keeping a repository: retention, garbage collection, verification, quarantine.

The functions take the item's :class:`~drsite.store.catalog.Catalog`;
:class:`~drsite.store.repository.Repository` exposes them as methods (its contract is there).

Invariants kept here:
- GC keeps every object reachable from a manifest (tables → maps → packs, changed lists),
  everything under ``packs/<c>/`` and ``maps/<c>/`` of a staged cycle ``c``, and what the base
  point of a staged cycle references. It lists candidates first, then staging markers, then
  manifests: a commit puts its manifest before dropping its marker, so every cycle is seen
  through one or the other. A manifest or map GC cannot read aborts the sweep rather than guess.
- Retention never deletes a pinned point, the latest point or the base of a staged cycle.
- Verification reports damage (key, reason, disk ranges), it never repairs; a damaged object is
  moved aside by :func:`quarantine` so a resync can write its key again.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from drsite.core.errors import BrokenChain, CorruptData, ObjectNotFound
from drsite.core.extents import ExtentList
from drsite.core.model import Consistency, validate_name
from drsite.core.retention import PointStamp, RetentionRule, points_to_keep
from drsite.store.catalog import Catalog
from drsite.store.format import TABLE_SPAN


@dataclass
class GcReport:
    objects_deleted: int = 0
    bytes_freed: int = 0
    objects_kept: int = 0
    stale_markers_removed: int = 0

    def to_dict(self) -> dict[str, int]:
        return {"objects_deleted": self.objects_deleted, "bytes_freed": self.bytes_freed,
                "objects_kept": self.objects_kept,
                "stale_markers_removed": self.stale_markers_removed}


@dataclass
class DamagedObject:
    key: str
    reason: str
    ranges: dict[str, list[tuple[int, int]]] = field(default_factory=dict)


@dataclass
class VerifyReport:
    point_id: str
    objects_checked: int = 0
    bytes_checked: int = 0
    damaged: list[DamagedObject] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.damaged

    @property
    def damaged_keys(self) -> list[str]:
        """Full store keys of the damaged objects (for :meth:`Repository.quarantine`)."""
        return [d.key for d in self.damaged]

    def to_dict(self) -> dict[str, Any]:
        return {"point_id": self.point_id, "ok": self.ok, "objects_checked": self.objects_checked,
                "bytes_checked": self.bytes_checked,
                "damaged": [{"key": d.key, "reason": d.reason,
                             "ranges": {k: [list(r) for r in v] for k, v in d.ranges.items()}}
                            for d in self.damaged]}


# --- retention and GC -------------------------------------------------------------------------

def delete_point(repo: Catalog, point_id: str) -> None:
    """Remove a point's manifest (its data goes at the next :func:`gc`). Idempotent."""
    validate_name("point", point_id)
    repo.store.delete(repo.key(f"points/{point_id}"))
    repo._forget(f"points/{point_id}")


def staged_bases(repo: Catalog) -> dict[str, str | None]:
    """Each staged cycle and its base point (None: a full cycle, or a marker that is damaged)."""
    out: dict[str, str | None] = {}
    for c in repo.staged_cycles():
        try:
            m = repo._marker(c)
        except CorruptData:
            m = None
        out[c] = m.get("base") if m else None
    return out


def apply_retention(repo: Catalog, rule: RetentionRule, now: float,
                    pinned: set[str] | frozenset[str] = frozenset(), *,
                    sweep: bool = True) -> list[str]:
    """Delete the points :func:`points_to_keep` drops (never a pinned point, the latest, or
    the base of a staged cycle), then :func:`gc` (unless not ``sweep``: the data of deleted
    points then waits for a later GC). Returns the deleted point ids."""
    keep_pinned = set(pinned) | {b for b in staged_bases(repo).values() if b}
    pts = repo.points()
    stamps = [PointStamp(p.point_id, p.created_at, p.consistency is Consistency.APP,
                         p.point_id in keep_pinned, seq=p.seq) for p in pts]
    keep = points_to_keep(stamps, rule, now)
    deleted = [p.point_id for p in pts if p.point_id not in keep]
    for pid in deleted:
        delete_point(repo, pid)
    if sweep:
        gc(repo)
    return deleted


def _refs(repo: Catalog, point_id: str, into: set[str]) -> None:
    """Mark every object a point references (tables, maps, packs, changed lists)."""
    body = repo._load_manifest(point_id)
    for d in body["disks"].values():
        if d.get("changed_key"):
            into.add(d["changed_key"])
        for t in d["tables"]:
            if t is not None:
                into.add(t)
        for mk in repo._map_keys(d):
            if mk is not None and mk not in into:
                into.add(mk)
                into.update(repo._get_map(mk).packs)


def gc(repo: Catalog) -> GcReport:
    """Mark from kept manifests and staged cycles, sweep the rest of ``packs/`` and ``maps/``.

    Order matters against a concurrent commit: candidates are listed first, then staging
    markers, then manifests (a commit puts its manifest before dropping its marker, so every
    cycle is seen through one or the other). An unreadable manifest or map aborts the sweep
    (raises) rather than guess what it referenced.
    """
    report = GcReport()
    candidates = repo._list("packs/") + repo._list("maps/")
    staged = staged_bases(repo)
    marked: set[str] = set()
    committed_cycles: set[str] = set()
    for pid in repo._point_ids():
        try:
            _refs(repo, pid, marked)
            committed_cycles.add(repo._load_manifest(pid)["cycle_id"])
        except ObjectNotFound:
            continue  # deleted meanwhile
    for c, base in staged.items():
        if c in committed_cycles:
            repo.store.delete(repo.key(f"staging/{c}"))  # commit crashed after its manifest
            report.stale_markers_removed += 1
            continue
        if base is not None:
            try:
                _refs(repo, base, marked)
            except ObjectNotFound:
                pass
    live_cycles = set(staged) - committed_cycles
    for rel in candidates:
        cycle = rel.split("/")[1]
        if rel in marked or cycle in live_cycles:
            report.objects_kept += 1
            continue
        try:
            size = repo.store.size(repo.key(rel))
        except ObjectNotFound:
            continue
        repo.store.delete(repo.key(rel))
        repo._forget(rel)
        report.objects_deleted += 1
        report.bytes_freed += size
    return report


# --- verification ----------------------------------------------------------------------------

def verify(repo: Catalog, point_id: str) -> VerifyReport:
    """Read and hash-check every object the point references. Damage is reported (key,
    reason, disk ranges it covers), not raised; fix it with :func:`quarantine` + resync."""
    rep = VerifyReport(point_id)
    # read everything from the store again: cached metadata would hide damage
    repo._forget_all()
    try:
        body = repo._load_manifest(point_id)
    except CorruptData as exc:
        rep.damaged.append(DamagedObject(repo.key(f"points/{point_id}"), str(exc)))
        return rep
    rep.objects_checked += 1
    pack_ranges: dict[str, dict[str, list[tuple[int, int]]]] = {}
    for disk_id, d in body["disks"].items():
        size, seg = int(d["size"]), int(d["segment_size"])
        if d.get("changed_key"):
            try:
                repo._changed(d)
                rep.objects_checked += 1
            except (CorruptData, BrokenChain) as exc:
                rep.damaged.append(DamagedObject(repo.key(d["changed_key"]), str(exc)))
        keys: list[str | None] = []
        for ti, t in enumerate(d["tables"]):
            if t is None:
                keys.extend([None] * TABLE_SPAN)
                continue
            try:
                keys.extend(repo._get_table(t))
                rep.objects_checked += 1
            except (CorruptData, BrokenChain) as exc:
                lo = ti * TABLE_SPAN * seg
                rep.damaged.append(DamagedObject(repo.key(t), str(exc), {
                    disk_id: [(lo, max(0, min(size, lo + TABLE_SPAN * seg) - lo))]}))
                keys.extend([None] * TABLE_SPAN)
        for i, mk in enumerate(keys[: -(-size // seg)]):
            if mk is None:
                continue
            try:
                m = repo._get_map(mk)
                rep.objects_checked += 1
            except (CorruptData, BrokenChain) as exc:
                rep.damaged.append(DamagedObject(repo.key(mk), str(exc), {
                    disk_id: [(i * seg, min(seg, size - i * seg))]}))
                continue
            for pi, pk in enumerate(m.packs):
                sel = m.entries[m.entries["pack"] == pi]
                pack_ranges.setdefault(pk, {}).setdefault(disk_id, []).extend(
                    zip(sel["offset"].tolist(), sel["length"].tolist(), strict=True))
    for pk, ranges in pack_ranges.items():
        try:
            data = repo._get_blob(pk, "pack")
            rep.objects_checked += 1
            rep.bytes_checked += len(data)
        except (CorruptData, BrokenChain) as exc:
            rep.damaged.append(DamagedObject(repo.key(pk), str(exc), {
                disk: ExtentList.of(r).to_pairs() for disk, r in ranges.items()}))
    return rep


def quarantine(repo: Catalog, key: str) -> None:
    """Move an object (full or repository-relative key) to ``quarantine/<rel>.<ns>`` so the
    key can be written again. A missing object is a no-op."""
    rel = repo._rel(key)
    full = repo.key(rel)
    try:
        data = repo.store.get(full)
    except ObjectNotFound:
        return
    repo.store.put(repo.key(f"quarantine/{rel}.{time.time_ns()}"), data)
    repo.store.delete(full)
    repo._forget(rel)
