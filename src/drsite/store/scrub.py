"""Scrubbing a repository and proving a point: damage is found before a failover needs the data.

:func:`scrub` reads back every object the kept points of one item reference and checks its hash
(manifests by their checksum, tables and maps by the blake3 in their key — both while walking
the references — and every pack whole, by the blake3 in its key), and compares the store's
listing with the references to find missing objects. :func:`verify_point` proves that one point
restores to exactly what its manifest says: every data extent of every disk read through
:class:`~drsite.store.reader.PointReader` (each frame checked against the hash its map entry
carries), with the blake3 digest of each restored disk.

Invariants:
- **Resumable**: a pass walks the packs referenced when the pass started, in key order. The
  :class:`ScrubCursor` (pass start, last pack checked, counters, damage found so far) is handed
  to ``on_progress`` while the pass runs and returned when a budget ends it early, so an
  interrupted pass goes on after the last pack it checked. Metadata (manifests, tables, maps,
  changed lists) is small and is read and checked again on every resume.
- **Only kept points count**: an object is damage only while a point that still exists
  references it. Objects deleted by retention/GC during the pass are not reported; points
  committed during the pass are checked by the next pass.
- **Never repairs**: damage is reported (and corrupt packs and maps are moved aside with
  :func:`~drsite.store.maintenance.quarantine`, so nothing reads them again and the evidence is
  kept under ``quarantine/``); the newest point is repaired by a resync from the source, older
  points with unique damaged data cannot be repaired at all.
- **Paced**: bytes read are paid to a token bucket (``rate_bps``) that starts empty, so the
  rate holds from the first byte; the caller's clock sleeps. Unpaced, packs are read ahead
  (``READ_AHEAD``) while the one before is hashed: a pass runs near the store's read speed
  (``bench/scrub.py``).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from blake3 import blake3

from drsite.core.clock import Clock, SystemClock
from drsite.core.errors import BrokenChain, CorruptData, DrsiteError, ObjectNotFound
from drsite.core.extents import ExtentList
from drsite.core.throttle import TokenBucket
from drsite.store import maintenance
from drsite.store.catalog import Catalog
from drsite.store.format import TABLE_SPAN
from drsite.store.reader import PointReader, iter_pieces

CORRUPT, MISSING = "corrupt", "missing"
SAVE_EVERY_S = 1.0
READ_AHEAD = 2  # packs read while the one before is hashed (each up to the pack target, 8 MiB)
VERIFY_PIECE = 4 << 20


@dataclass
class ScrubFinding:
    """One damaged object: its repository-relative key, ``corrupt`` or ``missing``, why, the
    kept points that reference it, and where it was moved aside (if it was)."""

    key: str
    kind: str
    reason: str
    points: list[str] = field(default_factory=list)
    quarantined_to: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "kind": self.kind, "reason": self.reason,
                "points": list(self.points), "quarantined_to": self.quarantined_to}

    @staticmethod
    def from_dict(d: dict[str, Any]) -> ScrubFinding:
        return ScrubFinding(str(d["key"]), str(d["kind"]), str(d.get("reason") or ""),
                            [str(p) for p in d.get("points") or []], d.get("quarantined_to"))


@dataclass
class ScrubCursor:
    """Where a pass is: what the caller persists between calls (JSON-able)."""

    pass_started_at: float
    after: str = ""                      # last pack key checked ("" = none yet)
    objects_checked: int = 0
    bytes_checked: int = 0
    findings: dict[str, dict[str, Any]] = field(default_factory=dict)  # pack key -> finding

    def to_dict(self) -> dict[str, Any]:
        return {"pass_started_at": self.pass_started_at, "after": self.after,
                "objects_checked": self.objects_checked, "bytes_checked": self.bytes_checked,
                "findings": {k: dict(v) for k, v in self.findings.items()}}

    @staticmethod
    def from_dict(d: dict[str, Any]) -> ScrubCursor:
        return ScrubCursor(float(d["pass_started_at"]), str(d.get("after") or ""),
                           int(d.get("objects_checked") or 0), int(d.get("bytes_checked") or 0),
                           {str(k): dict(v) for k, v in dict(d.get("findings") or {}).items()})


@dataclass
class ScrubReport:
    """The outcome of one call of :func:`scrub`. ``finished_at`` is None while the pass is
    incomplete (a budget ended the call; the returned cursor goes on from there)."""

    item_id: str
    pass_started_at: float
    finished_at: float | None
    objects_checked: int
    bytes_checked: int
    packs_total: int
    packs_done: int
    findings: list[ScrubFinding]
    points: list[str]
    latest_point: str | None
    rate_bps: int | None = None
    seconds: float = 0.0

    @property
    def complete(self) -> bool:
        return self.finished_at is not None

    @property
    def damaged_points(self) -> list[str]:
        """Kept points that reference a damaged object, ascending."""
        return sorted({p for f in self.findings for p in f.points})

    @property
    def latest_damaged(self) -> bool:
        return self.latest_point is not None and self.latest_point in self.damaged_points

    def to_dict(self) -> dict[str, Any]:
        return {"item_id": self.item_id, "pass_started_at": self.pass_started_at,
                "finished_at": self.finished_at, "complete": self.complete,
                "objects_checked": self.objects_checked, "bytes_checked": self.bytes_checked,
                "packs_total": self.packs_total, "packs_done": self.packs_done,
                "findings": [f.to_dict() for f in self.findings], "points": list(self.points),
                "latest_point": self.latest_point, "damaged_points": self.damaged_points,
                "latest_damaged": self.latest_damaged, "rate_bps": self.rate_bps,
                "seconds": round(self.seconds, 3)}


def _kind(exc: DrsiteError) -> str:
    return MISSING if isinstance(exc, (BrokenChain, ObjectNotFound)) else CORRUPT


def _references(repo: Catalog, point_ids: list[str], meta: dict[str, tuple[str, str]],
                cursor: ScrubCursor) -> tuple[dict[str, set[str]], list[str]]:
    """Every object each point references (``rel -> points``), checking the metadata on the
    way (damage into ``meta``: ``rel -> (kind, reason)``). Returns the refs and the points that
    still exist."""
    refs: dict[str, set[str]] = {}
    kept: list[str] = []
    for pid in point_ids:
        mrel = f"points/{pid}"
        try:
            body = repo._load_manifest(pid)
        except ObjectNotFound:
            continue  # deleted meanwhile (retention)
        except CorruptData as exc:
            kept.append(pid)
            refs.setdefault(mrel, set()).add(pid)
            meta[mrel] = (CORRUPT, str(exc))
            continue
        kept.append(pid)
        refs.setdefault(mrel, set()).add(pid)
        cursor.objects_checked += 1
        for d in body["disks"].values():
            nseg = -(-int(d["size"]) // int(d["segment_size"]))
            ck = d.get("changed_key")
            if ck:
                refs.setdefault(ck, set()).add(pid)
                try:
                    repo._changed(d)
                except (CorruptData, BrokenChain) as exc:
                    meta[ck] = (_kind(exc), str(exc))
            keys: list[str | None] = []
            for t in d["tables"]:
                if t is None:
                    keys.extend([None] * TABLE_SPAN)
                    continue
                refs.setdefault(t, set()).add(pid)
                try:
                    keys.extend(repo._get_table(t))
                except (CorruptData, BrokenChain) as exc:
                    meta[t] = (_kind(exc), str(exc))
                    keys.extend([None] * TABLE_SPAN)
            for mk in keys[:nseg]:
                if mk is None:
                    continue
                seen = mk in refs
                refs.setdefault(mk, set()).add(pid)
                try:
                    m = repo._get_map(mk)
                except (CorruptData, BrokenChain) as exc:
                    meta[mk] = (_kind(exc), str(exc))
                    continue
                for pk in m.packs:
                    refs.setdefault(pk, set()).add(pid)
                if not seen:
                    cursor.objects_checked += 1
    return refs, kept


def references(repo: Catalog) -> dict[str, set[str]]:
    """Which kept points reference each object (repository-relative key → point ids): what a
    pass checks, for tools and tests that need to know what damage to an object would cost.
    Unreadable metadata is left out (its objects are not listed)."""
    repo._forget_all()
    refs, _kept = _references(repo, repo._point_ids(), {}, ScrubCursor(0.0))
    return refs


def _quarantine(repo: Catalog, rel: str) -> str | None:
    """Move a corrupt pack/map/table aside; manifests stay (a point must not vanish from the
    catalogue silently: reading it keeps failing loudly)."""
    if not rel.startswith(("packs/", "maps/")):
        return None
    before = set(repo._list(f"quarantine/{rel}."))
    try:
        maintenance.quarantine(repo, rel)
    except DrsiteError:
        return None
    after = sorted(set(repo._list(f"quarantine/{rel}.")) - before)
    return after[-1] if after else None


def scrub(repo: Catalog, cursor: ScrubCursor | None = None, *, rate_bps: int | None = None,
          budget_s: float | None = None, clock: Clock | None = None,
          on_progress: Callable[[ScrubCursor], None] | None = None,
          quarantine: bool = True,
          yield_to: Callable[[], bool] | None = None) -> tuple[ScrubReport, ScrubCursor | None]:
    """Scrub the item's repository: one pass, or its continuation from ``cursor``.

    Returns the report and the cursor to keep (None: the pass completed, the next call starts a
    new one). ``budget_s`` ends the call early, after at least one pack (incomplete report,
    cursor returned); so does ``yield_to`` returning True (checked after each pack: other work
    waits for the caller, e.g. a failover queued behind the scrub). ``rate_bps`` paces the
    bytes read. Not responsible for repairs (see the module docstring), nor for retries (wrap
    the store).
    """
    clock = clock or SystemClock()
    t0 = time.monotonic()
    if cursor is None:
        cursor = ScrubCursor(clock.now())
    bucket = TokenBucket(rate_bps, clock, full=False) if rate_bps else None
    repo._forget_all()  # cached metadata would hide damage
    meta: dict[str, tuple[str, str]] = {}
    refs, kept = _references(repo, repo._point_ids(), meta, cursor)
    listed = set(repo._list("packs/"))
    packs = sorted(k for k in refs if k.startswith("packs/"))
    last_save = time.monotonic()
    complete = True
    remaining = [p for p in packs if p > cursor.after]

    def fetch(rel: str) -> bytes | None:
        if rel not in listed:
            return None
        try:
            return repo.store.get(repo.key(rel))
        except ObjectNotFound:
            return None

    # packs are read ahead (READ_AHEAD in flight) while the one before is hashed: the pass runs
    # at the store's read speed, not read + hash; a budget or yield drops what was read ahead
    with ThreadPoolExecutor(max_workers=READ_AHEAD, thread_name_prefix="scrub-read") as pool:
        ahead: deque[Future[bytes | None]] = deque(
            pool.submit(fetch, rel) for rel in remaining[:READ_AHEAD])
        for i, rel in enumerate(remaining):
            data = ahead.popleft().result()
            if i + READ_AHEAD < len(remaining):
                ahead.append(pool.submit(fetch, remaining[i + READ_AHEAD]))
            if data is None:
                cursor.findings[rel] = {"kind": MISSING,
                                        "reason": f"pack {repo.key(rel)} is missing from the store"}
            else:
                if bucket is not None:
                    bucket.consume(len(data))
                got = str(blake3(data).hexdigest())
                cursor.objects_checked += 1
                cursor.bytes_checked += len(data)
                if got != rel.rsplit("/", 1)[-1]:
                    f: dict[str, Any] = {
                        "kind": CORRUPT,
                        "reason": f"pack {repo.key(rel)} failed its hash check ({len(data)} bytes "
                                  f"read, blake3 {got[:16]}…)"}
                    if quarantine:
                        f["quarantined_to"] = _quarantine(repo, rel)
                    cursor.findings[rel] = f
            del data
            cursor.after = rel
            if on_progress is not None and time.monotonic() - last_save >= SAVE_EVERY_S:
                on_progress(cursor)
                last_save = time.monotonic()
            # the budget is checked after a pack: every call makes progress
            out_of_time = budget_s is not None and time.monotonic() - t0 >= budget_s
            if (out_of_time or (yield_to is not None and yield_to())) and i < len(remaining) - 1:
                complete = False
                for fut in ahead:
                    fut.cancel()
                break
    findings: list[ScrubFinding] = []
    quarantined: dict[str, str | None] = {}
    for rel, (kind, reason) in sorted(meta.items()):
        if kind == CORRUPT and quarantine:
            quarantined[rel] = _quarantine(repo, rel)
        findings.append(ScrubFinding(rel, kind, reason, sorted(refs.get(rel, set())),
                                     quarantined.get(rel)))
    for rel, f in sorted(cursor.findings.items()):
        if rel not in refs:
            continue  # no kept point references it any more (retention/GC)
        findings.append(ScrubFinding(rel, str(f["kind"]), str(f["reason"]),
                                     sorted(refs[rel]), f.get("quarantined_to")))
    # a point deleted during the pass does not make its objects damage
    alive = {p for p in kept if repo.store.exists(repo.key(f"points/{p}"))} if findings else set(kept)
    findings = [ScrubFinding(f.key, f.kind, f.reason, [p for p in f.points if p in alive],
                             f.quarantined_to) for f in findings]
    findings = [f for f in findings if f.points]
    kept_alive = [p for p in kept if p in alive]
    done = sum(1 for p in packs if p <= cursor.after)
    report = ScrubReport(
        item_id=repo.item_id, pass_started_at=cursor.pass_started_at,
        finished_at=clock.now() if complete else None, objects_checked=cursor.objects_checked,
        bytes_checked=cursor.bytes_checked, packs_total=len(packs), packs_done=done,
        findings=findings, points=kept_alive,
        latest_point=kept_alive[-1] if kept_alive else None, rate_bps=rate_bps,
        seconds=time.monotonic() - t0)
    return report, (None if complete else cursor)


# --- proving one point ------------------------------------------------------------------------

@dataclass
class DiskProof:
    disk_id: str
    size: int
    bytes_read: int = 0
    digest: str | None = None            # blake3 of the restored disk (holes as zeros)
    damaged: list[tuple[int, int]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"disk_id": self.disk_id, "size": self.size, "bytes_read": self.bytes_read,
                "digest": self.digest, "ok": not self.damaged and not self.errors,
                "damaged": [list(r) for r in self.damaged], "errors": self.errors[:20]}


@dataclass
class PointProof:
    """What :func:`verify_point` found: per disk, bytes read, its digest or its damage."""

    point_id: str
    created_at: float | None
    disks: list[DiskProof] = field(default_factory=list)
    error: str | None = None             # the manifest itself could not be read
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None and all(not d.damaged and not d.errors for d in self.disks)

    def to_dict(self) -> dict[str, Any]:
        return {"point_id": self.point_id, "created_at": self.created_at, "ok": self.ok,
                "error": self.error, "disks": [d.to_dict() for d in self.disks],
                "bytes_read": sum(d.bytes_read for d in self.disks),
                "seconds": round(self.seconds, 3)}


def verify_point(repo: Catalog, point_id: str, *, rate_bps: int | None = None,
                 clock: Clock | None = None) -> PointProof:
    """Prove that ``point_id`` restores to exactly what its manifest says: read every disk whole
    (data extents through verified reads, holes as zeros) and digest it. Damage is reported per
    disk range, never raised; a missing point raises ``ObjectNotFound``."""
    clock = clock or SystemClock()
    t0 = time.monotonic()
    bucket = TokenBucket(rate_bps, clock, full=False) if rate_bps else None
    repo._forget_all()
    try:
        body = repo._load_manifest(point_id)
    except CorruptData as exc:
        return PointProof(point_id, None, error=str(exc), seconds=time.monotonic() - t0)
    proof = PointProof(point_id, float(body.get("created_at") or 0.0))
    for disk_id in sorted(body["disks"]):
        d = body["disks"][disk_id]
        dp = DiskProof(disk_id, int(d["size"]))
        proof.disks.append(dp)
        reader = PointReader(repo, point_id, disk_id, d)
        try:
            data = reader.data_extents()
            h = blake3()
            buf = bytearray(VERIFY_PIECE)
            pos = 0
            zeros = bytes(VERIFY_PIECE)
            for off, n in iter_pieces(data.to_pairs(), VERIFY_PIECE):
                while pos < off:  # a hole: zeros
                    k = min(VERIFY_PIECE, off - pos)
                    h.update(zeros[:k])
                    pos += k
                mv = memoryview(buf)[:n]
                try:
                    reader.readinto(off, mv)
                except (CorruptData, BrokenChain) as exc:
                    dp.damaged.append((off, n))
                    if str(exc) not in dp.errors:
                        dp.errors.append(str(exc))
                    mv[:] = bytes(n)
                if bucket is not None:
                    bucket.consume(n)
                dp.bytes_read += n
                h.update(mv)
                pos = off + n
            while pos < dp.size:
                k = min(VERIFY_PIECE, dp.size - pos)
                h.update(zeros[:k])
                pos += k
            if not dp.damaged:
                dp.digest = str(h.hexdigest())
            dp.damaged = ExtentList.of(dp.damaged).to_pairs() if dp.damaged else []
        finally:
            reader.close()
    proof.seconds = time.monotonic() - t0
    return proof
