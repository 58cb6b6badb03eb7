"""The recovery-point format over any :class:`~drsite.store.contract.ObjectStore`.

One repository per protected item, under ``items/<item_id>/``::

    staging/<cycle_id>            marker of a cycle in flight (base, disk sizes, kind)
    packs/<cycle_id>/<blake3>     zstd frames of written data + trailer index; key = blake3(pack)
    maps/<cycle_id>/<blake3>      segment maps, segment tables, large changed-extent lists
    points/p<seq:012d>            manifest; its existence is the point's visibility
    seq                           high-water mark of point sequence numbers (never reused)
    quarantine/...                corrupt objects moved aside

Invariants:
- a point is visible only after its manifest is put, and the manifest is put only after every
  object it references (directly or through maps) is durably stored;
- every object is content-addressed and verified on read (pack frames by their blake3-128,
  maps/tables/pack blobs by the blake3 in their key, manifests by the checksum in their body);
- GC keeps every object reachable from a manifest, everything under ``packs/<c>/`` and
  ``maps/<c>/`` of a staged cycle ``c``, and what the base point of a staged cycle references;
- a segment map lists sorted, non-overlapping data extents of one segment; what it does not list
  reads as zeros. Unchanged segments are shared between points by key.

See ``store/design.md`` for the reasons and the costs.
"""

from __future__ import annotations

import json
import struct
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
import zstandard
from blake3 import blake3

from drsite import failpoints
from drsite.core.errors import (
    BrokenChain,
    Conflict,
    CorruptData,
    InvalidInput,
    ObjectExists,
    ObjectNotFound,
)
from drsite.core.extents import ExtentList, coalesce
from drsite.core.model import Consistency, validate_name
from drsite.core.retention import PointStamp, RetentionRule, points_to_keep
from drsite.store.contract import ObjectStore, validate_key

BLOCK = 4096                 # zero detection granule: all-zero aligned blocks are never stored
FRAME_MAX = 1 << 20          # raw bytes per zstd frame
TABLE_SPAN = 256             # segment-map keys per segment table
MAX_PACK_ENTRIES = 1 << 16
INLINE_CHANGES = 128         # changed extents kept inside the manifest up to this count

ZERO, RAW, ZSTD = 0, 1, 2    # codec of an entry: zeros (no frame), stored raw, zstd frame

# One record type for pack trailers, in-memory cycle entries and segment maps. ``roff`` is the
# offset of the extent's first byte inside the frame's raw data; ``pack`` indexes a pack-key table
# (the cycle's in memory, the map's own in a map); ``disk`` indexes the trailer's disk table.
ENTRY_DT = np.dtype([("offset", "<i8"), ("length", "<i8"), ("foff", "<i8"), ("pack", "<u4"),
                     ("flen", "<u4"), ("roff", "<u4"), ("rlen", "<u4"), ("disk", "<u2"),
                     ("codec", "u1"), ("hash", "V16")])
Entries = npt.NDArray[Any]

PACK_MAGIC = b"DRSPACK1"
_FOOTER = struct.Struct("<8sII16s")       # magic, header length, entry count, blake3-128(trailer)
BLOB_MAGIC = {"map": b"DRSMAP1\n", "table": b"DRSTAB1\n", "changes": b"DRSCHG1\n"}
_BLOB_HDR = struct.Struct("<8sI")

KINDS = ("initial", "delta", "resync")
T = TypeVar("T")


def _h16(data: bytes | memoryview) -> bytes:
    return bytes(blake3(data).digest(length=16))


def _hex(data: bytes | memoryview) -> str:
    return str(blake3(data).hexdigest())


def _canon(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


_tls = threading.local()


def _compressor(level: int) -> Any:
    c = getattr(_tls, "zc", None)
    if c is None or _tls.zlevel != level:
        c = _tls.zc = zstandard.ZstdCompressor(level=level)
        _tls.zlevel = level
    return c


def _decompressor() -> Any:
    d = getattr(_tls, "zd", None)
    if d is None:
        d = _tls.zd = zstandard.ZstdDecompressor()
    return d


def _compress(raw: bytes, level: int) -> tuple[int, bytes, bytes]:
    """(codec, payload, blake3-128 of raw). Runs in worker threads: blake3/zstd drop the GIL.
    ``level`` 0 means no compression (a policy with compression off): frames are stored RAW."""
    h = _h16(raw)
    if level == 0:
        return RAW, raw, h
    z = _compressor(level).compress(raw)
    if len(z) >= len(raw):
        return RAW, raw, h
    return ZSTD, bytes(z), h


# --- pure array helpers ---------------------------------------------------------------------

def _empty() -> Entries:
    return np.zeros(0, ENTRY_DT)


def _classify(view: memoryview, disk_off: int) -> tuple[Entries, bytes]:
    """Split one piece (≤ FRAME_MAX) into zero and data runs on the disk's 4 KiB grid.

    Returns the run entries in disk order (zero runs with codec ZERO; data runs with ``roff``
    into the returned raw bytes, the concatenation of the data runs) and those raw bytes.
    """
    n = len(view)
    p1 = disk_off + n
    a0 = min(-(-disk_off // BLOCK) * BLOCK, p1)
    a1 = max((p1 // BLOCK) * BLOCK, a0)
    head, inner = a0 - disk_off, a1 - a0
    arr = np.frombuffer(view, np.uint8)
    starts: list[npt.NDArray[np.int64]] = []
    nz: list[npt.NDArray[np.bool_]] = []
    if head:
        starts.append(np.array([disk_off], np.int64))
        nz.append(np.array([arr[:head].any()], bool))
    if inner:
        starts.append(np.arange(a0, a1, BLOCK, dtype=np.int64))
        blocks = np.frombuffer(view[head:head + inner], np.uint64).reshape(-1, BLOCK // 8)
        nz.append(np.asarray(blocks.any(axis=1), bool))
    if p1 > a1:
        starts.append(np.array([a1], np.int64))
        nz.append(np.array([arr[head + inner:].any()], bool))
    s = np.concatenate(starts)
    m = np.concatenate(nz)
    e = np.empty_like(s)
    e[:-1] = s[1:]
    e[-1] = p1
    first = np.concatenate([[0], np.flatnonzero(m[1:] != m[:-1]) + 1])
    last = np.concatenate([first[1:], [m.size]]) - 1
    rs, re_, rnz = s[first], e[last], m[first]
    out = np.zeros(rs.size, ENTRY_DT)
    out["offset"] = rs
    out["length"] = re_ - rs
    if not rnz.any():
        return out, b""
    if rnz.all():
        whole = view.obj
        raw = whole if isinstance(whole, bytes) and len(whole) == n else bytes(view)
    else:
        raw = arr[np.repeat(m, e - s)].tobytes()
    dl = np.where(rnz, re_ - rs, 0)
    out["roff"] = np.cumsum(dl) - dl
    out["rlen"] = len(raw)
    out["codec"] = np.where(rnz, ZSTD, ZERO)  # data codec is fixed once the frame is compressed
    return out, raw


def _split_segments(e: Entries, seg: int) -> tuple[npt.NDArray[np.int64], Entries]:
    """Cut entries at segment boundaries; returns (segment index per piece, pieces), pieces in
    the original order within each segment (order = priority: later writes win)."""
    if e.size == 0:
        return np.zeros(0, np.int64), e
    s0 = e["offset"] // seg
    s1 = (e["offset"] + e["length"] - 1) // seg
    cnt = s1 - s0 + 1
    if int(cnt.max()) == 1:
        return s0.astype(np.int64), e
    idx = np.repeat(np.arange(e.size), cnt)
    k = np.arange(int(cnt.sum())) - np.repeat(np.cumsum(cnt) - cnt, cnt)
    segs = (s0[idx] + k).astype(np.int64)
    out = e[idx].copy()
    lo = np.maximum(out["offset"], segs * seg)
    hi = np.minimum(out["offset"] + out["length"], (segs + 1) * seg)
    out["roff"] = out["roff"] + (lo - out["offset"]).astype(np.uint32)
    out["offset"] = lo
    out["length"] = hi - lo
    return segs, out


def _resolve(e: Entries, lo: int, hi: int) -> Entries:
    """Overlay entries (later rows win) clipped to ``[lo, hi)``; returns sorted, non-overlapping
    data entries (zero runs win over earlier data and then vanish: unlisted bytes read as zero)."""
    off = e["offset"]
    end = off + e["length"]
    cs = np.maximum(off, lo)
    ce = np.minimum(end, hi)
    keep = ce > cs
    if not keep.any():
        return _empty()
    e = e[keep].copy()
    cs, ce = cs[keep], ce[keep]
    e["roff"] = e["roff"] + (cs - e["offset"]).astype(np.uint32)
    e["offset"] = cs
    e["length"] = ce - cs
    bounds = np.unique(np.concatenate([cs, ce]))
    i0 = np.searchsorted(bounds, cs)
    i1 = np.searchsorted(bounds, ce)
    cnt = i1 - i0
    elem = np.repeat(i0, cnt) + (np.arange(int(cnt.sum())) - np.repeat(np.cumsum(cnt) - cnt, cnt))
    owner = np.full(bounds.size - 1, -1, np.int64)
    np.maximum.at(owner, elem, np.repeat(np.arange(e.size), cnt))
    xs, xe = bounds[:-1], bounds[1:]
    valid = owner >= 0
    xs, xe, owner = xs[valid], xe[valid], owner[valid]
    if owner.size == 0:
        return _empty()
    run = np.ones(owner.size, bool)
    run[1:] = (owner[1:] != owner[:-1]) | (xs[1:] != xe[:-1])
    first = np.flatnonzero(run)
    last = np.concatenate([first[1:], [owner.size]]) - 1
    own = owner[first]
    out = e[own].copy()
    out["roff"] = out["roff"] + (xs[first] - out["offset"]).astype(np.uint32)
    out["offset"] = xs[first]
    out["length"] = xe[last] - xs[first]
    res: Entries = out[out["codec"] != ZERO]
    return res


def _diff_entries(a: Entries, pa: list[str], b: Entries, pb: list[str], lo: int,
                  hi: int) -> ExtentList:
    """Ranges of ``[lo, hi)`` where two resolved maps name different bytes (or data vs hole)."""
    ids: dict[str, int] = {}
    ga = np.array([ids.setdefault(k, len(ids)) for k in pa], np.int64)[a["pack"]] if a.size else \
        np.zeros(0, np.int64)
    gb = np.array([ids.setdefault(k, len(ids)) for k in pb], np.int64)[b["pack"]] if b.size else \
        np.zeros(0, np.int64)
    bounds = np.unique(np.concatenate([[lo, hi], a["offset"], a["offset"] + a["length"],
                                       b["offset"], b["offset"] + b["length"]]))
    bounds = bounds[(bounds >= lo) & (bounds <= hi)]
    xs, ln = bounds[:-1], np.diff(bounds)

    def ident(e: Entries, g: npt.NDArray[np.int64]) -> tuple[npt.NDArray[Any], ...]:
        if e.size == 0:
            z = np.zeros(xs.size, np.int64)
            return np.zeros(xs.size, bool), z, z, z
        i = np.searchsorted(e["offset"], xs, "right") - 1
        ic = np.clip(i, 0, None)
        ok = (i >= 0) & (xs < e["offset"][ic] + e["length"][ic])
        return ok, g[ic], e["foff"][ic], e["roff"][ic].astype(np.int64) - e["offset"][ic]

    oa, ka, fa, ra = ident(a, ga)
    ob, kb, fb, rb = ident(b, gb)
    differ = (oa != ob) | (oa & ob & ((ka != kb) | (fa != fb) | (ra != rb)))
    return coalesce(xs[differ], ln[differ])


# --- object encodings -----------------------------------------------------------------------

def _encode_blob(kind: str, header: dict[str, Any], payload: bytes = b"") -> bytes:
    hdr = _canon(header)
    return _BLOB_HDR.pack(BLOB_MAGIC[kind], len(hdr)) + hdr + payload


def _decode_blob(kind: str, data: bytes, key: str) -> tuple[dict[str, Any], memoryview]:
    try:
        magic, hlen = _BLOB_HDR.unpack_from(data)
        if magic != BLOB_MAGIC[kind]:
            raise ValueError("bad magic")
        header = json.loads(data[_BLOB_HDR.size:_BLOB_HDR.size + hlen])
        return header, memoryview(data)[_BLOB_HDR.size + hlen:]
    except (ValueError, struct.error) as exc:
        raise CorruptData(f"object {key} is not a valid {kind} object: {exc}") from exc


def _entries_from(payload: bytes | memoryview, key: str) -> Entries:
    try:
        raw = _decompressor().decompress(payload) if len(payload) else b""
    except zstandard.ZstdError as exc:
        raise CorruptData(f"object {key}: cannot decompress its entries: {exc}") from exc
    if len(raw) % ENTRY_DT.itemsize:
        raise CorruptData(f"object {key}: entry table has a bad length")
    return np.frombuffer(raw, ENTRY_DT).copy()


def encode_pack(frames: list[bytes], header: dict[str, Any], entries: Entries) -> bytes:
    """frames ‖ header JSON ‖ entry table ‖ footer; the trailer carries its own blake3-128 so it
    can be read and trusted alone (resume) without fetching the whole pack."""
    hdr = _canon(header)
    trailer = hdr + entries.astype(ENTRY_DT).tobytes()
    footer = _FOOTER.pack(PACK_MAGIC, len(hdr), entries.size, _h16(trailer))
    return b"".join([*frames, trailer, footer])


def decode_pack_trailer(tail: bytes, key: str) -> tuple[int, int]:
    """(header length, entry count) from a pack's footer bytes."""
    if len(tail) != _FOOTER.size:
        raise CorruptData(f"pack {key} is truncated (no footer)")
    magic, hlen, n, _h = _FOOTER.unpack(tail)
    if magic != PACK_MAGIC:
        raise CorruptData(f"pack {key} has a bad footer")
    return int(hlen), int(n)


# --- public records -------------------------------------------------------------------------

@dataclass(frozen=True)
class PointInfo:
    """What a recovery point is, as listed to the engine and to humans (no data locations)."""

    point_id: str
    item_id: str
    seq: int
    created_at: float
    consistency: Consistency
    kind: str
    cycle_id: str
    base_point_id: str | None
    disk_sizes: dict[str, int]
    bytes_written: int
    bytes_stored: int
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"point_id": self.point_id, "item_id": self.item_id, "seq": self.seq,
                "created_at": self.created_at, "consistency": self.consistency.value,
                "kind": self.kind, "cycle_id": self.cycle_id,
                "base_point_id": self.base_point_id, "disk_sizes": dict(self.disk_sizes),
                "bytes_written": self.bytes_written, "bytes_stored": self.bytes_stored,
                "meta": dict(self.meta)}

    @staticmethod
    def from_dict(d: dict[str, Any]) -> PointInfo:
        return PointInfo(point_id=str(d["point_id"]), item_id=str(d["item_id"]), seq=int(d["seq"]),
                         created_at=float(d["created_at"]),
                         consistency=Consistency(d["consistency"]), kind=str(d["kind"]),
                         cycle_id=str(d["cycle_id"]), base_point_id=d.get("base_point_id"),
                         disk_sizes={str(k): int(v) for k, v in d["disk_sizes"].items()},
                         bytes_written=int(d["bytes_written"]),
                         bytes_stored=int(d["bytes_stored"]), meta=dict(d.get("meta") or {}))


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


@dataclass(frozen=True)
class _SegMap:
    entries: Entries           # sorted, non-overlapping data extents
    packs: list[str]           # relative pack keys indexed by entries["pack"]


class _Lru(OrderedDict[str, Any]):
    def __init__(self, cap: int) -> None:
        super().__init__()
        self.cap = cap
        self.lock = threading.Lock()

    def fetch(self, key: str, load: Callable[[], T]) -> T:
        with self.lock:
            if key in self:
                self.move_to_end(key)
                return self[key]  # type: ignore[no-any-return]
        val = load()
        with self.lock:
            self[key] = val
            while len(self) > self.cap:
                self.popitem(last=False)
        return val

    def clear(self) -> None:
        with self.lock:
            super().clear()

    def drop(self, key: str) -> None:
        with self.lock:
            self.pop(key, None)


# --- repository -----------------------------------------------------------------------------

class Repository:
    """Recovery points of one protected item over an object store.

    Responsible for: the on-store format, atomic visibility of points, verified reads,
    retention/GC that never drops data a kept point or a staged cycle needs, resumable cycles.
    Not responsible for: retries (wrap the store in ``RetryingStore``), locking between two
    writers of the same item (the engine runs one cycle per item at a time), scheduling.
    """

    def __init__(self, store: ObjectStore, item_id: str, *, segment_size: int = 64 << 20,
                 pack_target: int = 8 << 20, zstd_level: int = 1, threads: int = 2,
                 upload_threads: int = 1) -> None:
        validate_name("item", item_id)
        if segment_size <= 0 or segment_size % BLOCK:
            raise InvalidInput(f"segment size {segment_size} is not a positive multiple of {BLOCK}")
        self.store = store
        self.item_id = item_id
        self.prefix = f"items/{item_id}/"
        self.segment_size = segment_size
        self.pack_target = max(pack_target, 1)
        self.zstd_level = zstd_level
        self.threads = max(threads, 1)
        # packs stored at once by a writer (cloud stores: several, one request each; packs may
        # land out of order, which resume() handles: it sorts trailers by pack number)
        self.upload_threads = max(upload_threads, 1)
        self._manifests = _Lru(4096)
        self._maps = _Lru(2048)
        self._tables = _Lru(1024)
        self._pool_lock = threading.Lock()
        self._pool_: ThreadPoolExecutor | None = None

    # -- plumbing ----------------------------------------------------------------------------

    def key(self, rel: str) -> str:
        """Full store key of a repository-relative key."""
        return validate_key(self.prefix + rel)

    def _rel(self, key: str) -> str:
        return key[len(self.prefix):] if key.startswith(self.prefix) else key

    def _pool(self) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._pool_ is None:
                self._pool_ = ThreadPoolExecutor(self.threads, thread_name_prefix="drsite-read")
            return self._pool_

    def close(self) -> None:
        """Stop the read worker threads (writers own and stop their own)."""
        with self._pool_lock:
            if self._pool_ is not None:
                self._pool_.shutdown(wait=True)
                self._pool_ = None

    def _list(self, rel_prefix: str) -> list[str]:
        return [self._rel(k) for k in self.store.list(self.prefix + rel_prefix)]

    def _get_blob(self, rel: str, what: str) -> bytes:
        """A content-addressed blob, verified against the blake3 in its key."""
        key = self.key(rel)
        try:
            data = self.store.get(key)
        except ObjectNotFound as exc:
            raise BrokenChain(f"{what} {key} is missing from the recovery store") from exc
        got = _hex(data)
        if got != rel.rsplit("/", 1)[-1]:
            raise CorruptData(f"{what} {key} failed its hash check ({len(data)} bytes read, "
                              f"blake3 {got[:16]}…)")
        return data

    def _put_blob(self, cycle_id: str, data: bytes) -> str:
        rel = f"maps/{cycle_id}/{_hex(data)}"
        try:
            self.store.put(self.key(rel), data)
        except ObjectExists:
            pass  # content-addressed: same key, same bytes
        return rel

    # -- manifests ---------------------------------------------------------------------------

    def _load_manifest(self, point_id: str) -> dict[str, Any]:
        def load() -> dict[str, Any]:
            key = self.key(f"points/{point_id}")
            try:
                data = self.store.get(key)
            except ObjectNotFound as exc:
                raise ObjectNotFound(f"recovery point {point_id} of {self.item_id} not found") \
                    from exc
            try:
                env = json.loads(data)
                body = env["body"]
                ok = env.get("blake3") == _hex(_canon(body))
            except (ValueError, KeyError, TypeError) as exc:
                raise CorruptData(f"manifest {key} is unreadable (truncated or damaged): {exc}") \
                    from exc
            if not ok:
                raise CorruptData(f"manifest {key} failed its checksum")
            return body  # type: ignore[no-any-return]

        return self._manifests.fetch(point_id, load)

    def _point_ids(self) -> list[str]:
        return sorted(k.rsplit("/", 1)[-1] for k in self._list("points/"))

    def points(self) -> list[PointInfo]:
        """Committed points, ascending ``seq``."""
        out = [PointInfo.from_dict(self._load_manifest(p)) for p in self._point_ids()]
        return sorted(out, key=lambda p: p.seq)

    def latest(self) -> PointInfo | None:
        ids = self._point_ids()
        return PointInfo.from_dict(self._load_manifest(ids[-1])) if ids else None

    def point(self, point_id: str) -> PointInfo:
        """One committed point. Raises ``ObjectNotFound``."""
        return PointInfo.from_dict(self._load_manifest(point_id))

    def committed_cycle(self, cycle_id: str) -> PointInfo | None:
        """The point ``cycle_id`` produced, if its manifest is visible."""
        for p in reversed(self._point_ids()):
            try:
                body = self._load_manifest(p)
            except ObjectNotFound:
                continue
            if body["cycle_id"] == cycle_id:
                return PointInfo.from_dict(body)
        return None

    def _next_seq(self) -> int:
        ids = self._point_ids()
        top = int(ids[-1][1:]) if ids else 0
        try:
            top = max(top, int(self.store.get(self.key("seq")).decode().strip() or 0))
        except ObjectNotFound:
            pass
        except ValueError as exc:
            raise CorruptData(f"sequence marker {self.key('seq')} is damaged") from exc
        return top + 1

    # -- cycles ------------------------------------------------------------------------------

    def begin(self, cycle_id: str, *, base: str | None, disk_sizes: dict[str, int],
              kind: str) -> PointWriter:
        """Stage a new cycle (writes its marker first) and return its writer.

        ``base=None`` makes a full point (unwritten ranges are zero); otherwise unwritten ranges
        come from ``base``. If ``cycle_id`` is already staged with the same parameters this is
        :meth:`resume`; a committed ``cycle_id`` raises ``Conflict``.
        """
        validate_name("cycle", cycle_id)
        if kind not in KINDS:
            raise InvalidInput(f"unknown point kind {kind!r}; expected one of {KINDS}")
        for d, sz in disk_sizes.items():
            validate_name("disk", d)
            if sz < 0:
                raise InvalidInput(f"disk {d}: negative size {sz}")
        if base is not None:
            self._load_manifest(base)  # must exist and be readable
        if self.committed_cycle(cycle_id) is not None:
            raise Conflict(f"cycle {cycle_id} of {self.item_id} is already committed",
                           hint="Use committed_cycle() to find its point.")
        sizes = {d: int(s) for d, s in sorted(disk_sizes.items())}
        marker = {"cycle_id": cycle_id, "base": base, "kind": kind, "disk_sizes": sizes,
                  "started_at": time.time()}
        try:
            self.store.put(self.key(f"staging/{cycle_id}"), _canon(marker))
        except ObjectExists:
            w = self.resume(cycle_id)
            if w is None:
                raise Conflict(f"cycle {cycle_id} of {self.item_id} is already committed") \
                    from None
            if w.base != base or w.disk_sizes != sizes or w.kind != kind:
                w.close()
                raise Conflict(f"cycle {cycle_id} of {self.item_id} is staged with other "
                               f"parameters (base {w.base}, kind {w.kind})",
                               hint="Abort the staged cycle or resume it as it is.") from None
            return w
        return PointWriter(self, cycle_id, base, sizes, kind)

    def _marker(self, cycle_id: str) -> dict[str, Any] | None:
        key = self.key(f"staging/{cycle_id}")
        try:
            data = self.store.get(key)
        except ObjectNotFound:
            return None
        try:
            m = json.loads(data)
            if m["cycle_id"] != cycle_id:
                raise ValueError("cycle id mismatch")
            return m  # type: ignore[no-any-return]
        except (ValueError, KeyError, TypeError) as exc:
            raise CorruptData(f"staging marker {key} is damaged: {exc}") from exc

    def resume(self, cycle_id: str) -> PointWriter | None:
        """Rebuild the writer of a staged cycle from its marker and its pack trailers.

        Returns None if the cycle is not staged (never begun, aborted or committed; a marker left
        behind by a commit that crashed after its manifest is removed here).
        """
        validate_name("cycle", cycle_id)
        m = self._marker(cycle_id)
        if m is None:
            return None
        if self.committed_cycle(cycle_id) is not None:
            self.store.delete(self.key(f"staging/{cycle_id}"))
            return None
        w = PointWriter(self, cycle_id, m["base"], {str(k): int(v) for k, v in
                                                    m["disk_sizes"].items()}, str(m["kind"]))
        try:
            w._load_packs()
        except BaseException:
            w.close()
            raise
        return w

    def staged_cycles(self) -> list[str]:
        """Cycles with a staging marker (in flight or crashed, not yet committed or aborted)."""
        return sorted(k.rsplit("/", 1)[-1] for k in self._list("staging/"))

    def abort(self, cycle_id: str) -> None:
        """Drop a staged cycle: its packs and maps, then its marker. A committed cycle keeps its
        objects (only a stale marker is removed). Idempotent."""
        validate_name("cycle", cycle_id)
        if self.committed_cycle(cycle_id) is None:
            for rel in self._list(f"packs/{cycle_id}/") + self._list(f"maps/{cycle_id}/"):
                self.store.delete(self.key(rel))
        self.store.delete(self.key(f"staging/{cycle_id}"))

    # -- maps and reads ----------------------------------------------------------------------

    def _get_table(self, rel: str) -> list[str | None]:
        def load() -> list[str | None]:
            key = self.key(rel)
            header, payload = _decode_blob("table", self._get_blob(rel, "segment table"), key)
            try:
                maps = json.loads(_decompressor().decompress(payload))
            except (zstandard.ZstdError, ValueError) as exc:
                raise CorruptData(f"segment table {key} is damaged: {exc}") from exc
            if not isinstance(maps, list) or len(maps) != header.get("n"):
                raise CorruptData(f"segment table {key} is damaged: bad length")
            return maps

        return self._tables.fetch(rel, load)

    def _get_map(self, rel: str) -> _SegMap:
        if rel.startswith(DAMAGED_MAP):
            raise CorruptData(f"segment table {self.key(rel[len(DAMAGED_MAP):])} is damaged: "
                              "the maps it lists cannot be read")

        def load() -> _SegMap:
            key = self.key(rel)
            header, payload = _decode_blob("map", self._get_blob(rel, "segment map"), key)
            e = _entries_from(payload, key)
            packs = [str(p) for p in header["packs"]]
            if e.size and int(e["pack"].max()) >= len(packs):
                raise CorruptData(f"segment map {key} names a pack it does not list")
            return _SegMap(e, packs)

        return self._maps.fetch(rel, load)

    def _disk(self, body: dict[str, Any], disk_id: str) -> dict[str, Any]:
        d = body["disks"].get(disk_id)
        if d is None:
            raise InvalidInput(f"point {body['point_id']} of {self.item_id} has no disk {disk_id!r}")
        return d  # type: ignore[no-any-return]

    def _map_keys(self, disk: dict[str, Any], *, tolerant: bool = False) -> list[str | None]:
        """Segment-map key (or None: all zero) of every segment of a disk of a manifest.

        ``tolerant``: the segments of an unreadable table get :data:`DAMAGED_MAP`, whose reads
        raise ``CorruptData`` (readers and resyncs); otherwise the error propagates (GC, diff:
        they must not guess)."""
        nseg = -(-int(disk["size"]) // int(disk["segment_size"]))
        keys: list[str | None] = []
        for t in disk["tables"]:
            if t is None:
                keys.extend([None] * TABLE_SPAN)
                continue
            try:
                keys.extend(self._get_table(t))
            except (CorruptData, BrokenChain):
                if not tolerant:
                    raise
                keys.extend([DAMAGED_MAP + t] * TABLE_SPAN)
        return (keys + [None] * nseg)[:nseg]

    def _changed(self, disk: dict[str, Any]) -> ExtentList:
        if disk.get("changed_key"):
            rel = disk["changed_key"]
            key = self.key(rel)
            _, payload = _decode_blob("changes", self._get_blob(rel, "changed-extent list"), key)
            try:
                pairs = np.frombuffer(_decompressor().decompress(payload), "<i8").reshape(-1, 2)
            except (zstandard.ZstdError, ValueError) as exc:
                raise CorruptData(f"changed-extent list {key} is damaged: {exc}") from exc
            return coalesce(pairs[:, 0], pairs[:, 1])
        return ExtentList.of([(int(a), int(b)) for a, b in disk.get("changed") or []])

    def read_frame(self, pack_rel: str, foff: int, flen: int, codec: int, rlen: int,
                   h: bytes) -> bytes:
        """One frame's raw bytes, verified by its blake3-128 (truncation and bit flips →
        ``CorruptData`` naming the pack)."""
        key = self.key(pack_rel)
        try:
            data = self.store.get_range(key, foff, flen)
        except ObjectNotFound as exc:
            raise BrokenChain(f"pack {key} is missing from the recovery store") from exc
        if len(data) != flen:
            raise CorruptData(f"pack {key} is truncated: frame at {foff} wants {flen} bytes, "
                              f"got {len(data)}")
        if codec == ZSTD:
            try:
                raw = _decompressor().decompress(data, max_output_size=rlen)
            except zstandard.ZstdError as exc:
                raise CorruptData(f"pack {key}: frame at {foff}+{flen} does not decompress "
                                  f"({exc})") from exc
        else:
            raw = data
        if len(raw) != rlen or _h16(raw) != h:
            raise CorruptData(f"pack {key}: frame at {foff}+{flen} failed its hash check")
        return bytes(raw)

    def reader(self, point_id: str, disk_id: str) -> PointReader:
        """A verified random-access reader of one disk of a committed point."""
        body = self._load_manifest(point_id)
        return PointReader(self, point_id, disk_id, self._disk(body, disk_id))

    def diff(self, a: str | None, b: str, disk_id: str) -> ExtentList:
        """Ranges of disk ``disk_id`` that may differ between points ``a`` and ``b`` (reading
        ``b`` over them turns an image of ``a`` into ``b``; an image must also be resized to
        ``b``'s size). ``a=None`` (or ``a`` without the disk) gives every data extent of ``b``.
        Compares segment maps only: shared segments cost nothing, no data is read."""
        bd = self._disk(self._load_manifest(b), disk_id)
        if a is None or disk_id not in self._load_manifest(a)["disks"]:
            return self.reader(b, disk_id).data_extents()
        ad = self._disk(self._load_manifest(a), disk_id)
        size = int(bd["size"])
        if int(ad["segment_size"]) != int(bd["segment_size"]):
            # different grids (repository re-created with another segment size): be safe
            return ExtentList.of([(0, size)]) if size else ExtentList.empty()
        seg = int(bd["segment_size"])
        ka, kb = self._map_keys(ad), self._map_keys(bd)
        parts: list[ExtentList] = []
        for i, k in enumerate(kb):
            old = ka[i] if i < len(ka) else None
            if k == old:
                continue
            lo, hi = i * seg, min((i + 1) * seg, size)
            ma = self._get_map(old) if old else _SegMap(_empty(), [])
            mb = self._get_map(k) if k else _SegMap(_empty(), [])
            parts.append(_diff_entries(ma.entries, ma.packs, mb.entries, mb.packs, lo, hi))
        if not parts:
            return ExtentList.empty()
        return coalesce(np.concatenate([p.starts for p in parts]),
                        np.concatenate([p.lengths for p in parts])).clip(size)

    # -- retention, GC, verification ---------------------------------------------------------

    def delete_point(self, point_id: str) -> None:
        """Remove a point's manifest (its data goes at the next :meth:`gc`). Idempotent."""
        validate_name("point", point_id)
        self.store.delete(self.key(f"points/{point_id}"))
        self._manifests.drop(point_id)

    def _staged_bases(self) -> dict[str, str | None]:
        out: dict[str, str | None] = {}
        for c in self.staged_cycles():
            try:
                m = self._marker(c)
            except CorruptData:
                m = None
            out[c] = m.get("base") if m else None
        return out

    def apply_retention(self, rule: RetentionRule, now: float,
                        pinned: set[str] | frozenset[str] = frozenset()) -> list[str]:
        """Delete the points :func:`points_to_keep` drops (never a pinned point, the latest, or
        the base of a staged cycle), then :meth:`gc`. Returns the deleted point ids."""
        keep_pinned = set(pinned) | {b for b in self._staged_bases().values() if b}
        pts = self.points()
        stamps = [PointStamp(p.point_id, p.created_at, p.consistency is Consistency.APP,
                             p.point_id in keep_pinned, seq=p.seq) for p in pts]
        keep = points_to_keep(stamps, rule, now)
        deleted = [p.point_id for p in pts if p.point_id not in keep]
        for pid in deleted:
            self.delete_point(pid)
        self.gc()
        return deleted

    def _refs(self, point_id: str, into: set[str]) -> None:
        """Mark every object a point references (tables, maps, packs, changed lists)."""
        body = self._load_manifest(point_id)
        for d in body["disks"].values():
            if d.get("changed_key"):
                into.add(d["changed_key"])
            for t in d["tables"]:
                if t is not None:
                    into.add(t)
            for mk in self._map_keys(d):
                if mk is not None and mk not in into:
                    into.add(mk)
                    into.update(self._get_map(mk).packs)

    def gc(self) -> GcReport:
        """Mark from kept manifests and staged cycles, sweep the rest of ``packs/`` and ``maps/``.

        Order matters against a concurrent commit: candidates are listed first, then staging
        markers, then manifests (a commit puts its manifest before dropping its marker, so every
        cycle is seen through one or the other). An unreadable manifest or map aborts the sweep
        (raises) rather than guess what it referenced.
        """
        report = GcReport()
        candidates = self._list("packs/") + self._list("maps/")
        staged = self._staged_bases()
        marked: set[str] = set()
        committed_cycles: set[str] = set()
        for pid in self._point_ids():
            try:
                self._refs(pid, marked)
                committed_cycles.add(self._load_manifest(pid)["cycle_id"])
            except ObjectNotFound:
                continue  # deleted meanwhile
        for c, base in staged.items():
            if c in committed_cycles:
                self.store.delete(self.key(f"staging/{c}"))  # commit crashed after its manifest
                report.stale_markers_removed += 1
                continue
            if base is not None:
                try:
                    self._refs(base, marked)
                except ObjectNotFound:
                    pass
        live_cycles = set(staged) - committed_cycles
        for rel in candidates:
            cycle = rel.split("/")[1]
            if rel in marked or cycle in live_cycles:
                report.objects_kept += 1
                continue
            try:
                size = self.store.size(self.key(rel))
            except ObjectNotFound:
                continue
            self.store.delete(self.key(rel))
            self._maps.drop(rel)
            self._tables.drop(rel)
            report.objects_deleted += 1
            report.bytes_freed += size
        return report

    def verify(self, point_id: str) -> VerifyReport:
        """Read and hash-check every object the point references. Damage is reported (key,
        reason, disk ranges it covers), not raised; fix it with :meth:`quarantine` + resync."""
        rep = VerifyReport(point_id)
        # read everything from the store again: cached metadata would hide damage
        self._manifests.clear()
        self._maps.clear()
        self._tables.clear()
        try:
            body = self._load_manifest(point_id)
        except CorruptData as exc:
            rep.damaged.append(DamagedObject(self.key(f"points/{point_id}"), str(exc)))
            return rep
        rep.objects_checked += 1
        pack_ranges: dict[str, dict[str, list[tuple[int, int]]]] = {}
        for disk_id, d in body["disks"].items():
            size, seg = int(d["size"]), int(d["segment_size"])
            if d.get("changed_key"):
                try:
                    self._changed(d)
                    rep.objects_checked += 1
                except (CorruptData, BrokenChain) as exc:
                    rep.damaged.append(DamagedObject(self.key(d["changed_key"]), str(exc)))
            keys: list[str | None] = []
            for ti, t in enumerate(d["tables"]):
                if t is None:
                    keys.extend([None] * TABLE_SPAN)
                    continue
                try:
                    keys.extend(self._get_table(t))
                    rep.objects_checked += 1
                except (CorruptData, BrokenChain) as exc:
                    lo = ti * TABLE_SPAN * seg
                    rep.damaged.append(DamagedObject(self.key(t), str(exc), {
                        disk_id: [(lo, max(0, min(size, lo + TABLE_SPAN * seg) - lo))]}))
                    keys.extend([None] * TABLE_SPAN)
            for i, mk in enumerate(keys[: -(-size // seg)]):
                if mk is None:
                    continue
                try:
                    m = self._get_map(mk)
                    rep.objects_checked += 1
                except (CorruptData, BrokenChain) as exc:
                    rep.damaged.append(DamagedObject(self.key(mk), str(exc), {
                        disk_id: [(i * seg, min(seg, size - i * seg))]}))
                    continue
                for pi, pk in enumerate(m.packs):
                    sel = m.entries[m.entries["pack"] == pi]
                    pack_ranges.setdefault(pk, {}).setdefault(disk_id, []).extend(
                        zip(sel["offset"].tolist(), sel["length"].tolist(), strict=True))
        for pk, ranges in pack_ranges.items():
            try:
                data = self._get_blob(pk, "pack")
                rep.objects_checked += 1
                rep.bytes_checked += len(data)
            except (CorruptData, BrokenChain) as exc:
                rep.damaged.append(DamagedObject(self.key(pk), str(exc), {
                    disk: ExtentList.of(r).to_pairs() for disk, r in ranges.items()}))
        return rep

    def quarantine(self, key: str) -> None:
        """Move an object (full or repository-relative key) to ``quarantine/<rel>.<ns>`` so the
        key can be written again. A missing object is a no-op."""
        rel = self._rel(key)
        full = self.key(rel)
        try:
            data = self.store.get(full)
        except ObjectNotFound:
            return
        self.store.put(self.key(f"quarantine/{rel}.{time.time_ns()}"), data)
        self.store.delete(full)
        self._maps.drop(rel)
        self._tables.drop(rel)
        if rel.startswith("points/"):
            self._manifests.drop(rel.split("/", 1)[1])

    def storage_bytes(self) -> int:
        """Bytes of every object of this item (quarantine included)."""
        return sum(self.store.size(k) for k in self.store.list(self.prefix))


# --- writer ---------------------------------------------------------------------------------

@dataclass
class _Pending:
    disk: int
    entries: Entries | None  # None: the future classifies the piece
    future: Future[tuple[Entries, int, bytes, bytes]] | None


def _prepare(piece: bytes, at: int, level: int) -> tuple[Entries, int, bytes, bytes]:
    """Worker-thread half of :meth:`PointWriter.write`: zero/data runs of one piece, then
    (codec, payload, blake3-128) of its data runs (codec 0 and empty payload if all zero)."""
    e, raw = _classify(memoryview(piece), at)
    if not raw:
        return e, 0, b"", b""
    codec, payload, h = _compress(raw, level)
    return e, codec, payload, h


def _same_table(repo: Repository, rel: str, chunk: list[str | None]) -> bool:
    try:
        return repo._get_table(rel) == chunk
    except (CorruptData, BrokenChain):
        return False  # a damaged base table is never shared


# prefix (+ the table's key) standing for the map of a segment whose table could not be read
# (never a valid key: keys are validated names, this one starts with a NUL)
DAMAGED_MAP = "\x00damaged-table:"

UPLOADS_IN_FLIGHT = 2  # packs being stored while the next one fills (memory: 2 x pack_target)


class PointWriter:
    """Writes one cycle: buffers frames, compresses them in worker threads, uploads packs of about
    ``pack_target`` bytes, and on :meth:`commit` builds segment maps and the manifest.

    Within a cycle later writes win over earlier ones. Not thread-safe (one caller thread);
    not responsible for reading the source or deciding what to write.
    """

    def __init__(self, repo: Repository, cycle_id: str, base: str | None,
                 disk_sizes: dict[str, int], kind: str) -> None:
        self.repo = repo
        self.cycle_id = cycle_id
        self.base = base
        self.kind = kind
        self.disk_sizes = dict(disk_sizes)
        self.disk_ids = sorted(self.disk_sizes)
        self._disk_idx = {d: i for i, d in enumerate(self.disk_ids)}
        self.bytes_written = 0
        self.bytes_stored = 0
        self.zero_bytes = 0
        self.meta_bytes = 0
        self._pool: ThreadPoolExecutor | None = ThreadPoolExecutor(
            repo.threads, thread_name_prefix=f"drsite-pack-{cycle_id}")
        # zstd level for data frames; 0 stores frames as they are (policy: compression off)
        self.zstd_level = repo.zstd_level
        self._uploader: ThreadPoolExecutor | None = ThreadPoolExecutor(
            repo.upload_threads, thread_name_prefix=f"drsite-upload-{cycle_id}")
        self._uploads: deque[tuple[Future[tuple[str, int]], Entries]] = deque()
        self._broken = False
        self._queue: deque[_Pending] = deque()
        self._window = 4 * repo.threads
        # the open pack: frames and their entries (disk index in "disk")
        self._frames: list[bytes] = []
        self._open: list[Entries] = []
        self._open_size = 0
        self._open_entries = 0
        self._pack_no = 0
        # uploaded packs, in order; per disk the entries of the cycle in write order
        self.pack_keys: list[str] = []
        self._done: dict[int, list[Entries]] = {i: [] for i in range(len(self.disk_ids))}
        self._covered: dict[int, ExtentList] = {}
        self._finished: PointInfo | None = None

    # -- resume ------------------------------------------------------------------------------

    def _load_packs(self) -> None:
        """Rebuild state from the trailers of the packs already in the store (sorted by pack_no,
        so that write order, and thus which write wins, is preserved)."""
        repo = self.repo
        found: list[tuple[int, str, Entries, int]] = []
        for rel in repo._list(f"packs/{self.cycle_id}/"):
            key = repo.key(rel)
            size = repo.store.size(key)
            if size < _FOOTER.size:
                raise CorruptData(f"pack {key} is truncated ({size} bytes)")
            tail = repo.store.get_range(key, size - _FOOTER.size, _FOOTER.size)
            hlen, n = decode_pack_trailer(tail, key)
            tlen = hlen + n * ENTRY_DT.itemsize
            if tlen + _FOOTER.size > size:
                raise CorruptData(f"pack {key} has a trailer longer than itself")
            trailer = repo.store.get_range(key, size - _FOOTER.size - tlen, tlen)
            if len(trailer) != tlen or _h16(trailer) != _FOOTER.unpack(tail)[3]:
                raise CorruptData(f"pack {key}: trailer failed its hash check")
            header = json.loads(trailer[:hlen])
            e = np.frombuffer(trailer[hlen:], ENTRY_DT).copy()
            # remap the pack's disk table onto this writer's
            names = [str(x) for x in header["disks"]]
            if any(nm not in self._disk_idx for nm in names):
                raise CorruptData(f"pack {key} names disks outside its cycle: {names}")
            remap = np.array([self._disk_idx[nm] for nm in names], np.uint16)
            if e.size:
                e["disk"] = remap[e["disk"]]
            found.append((int(header["pack_no"]), rel, e, size))
        found.sort(key=lambda t: (t[0], t[1]))
        for pack_no, rel, e, size in found:
            self._record_pack(rel, e)
            self.bytes_stored += size
            self._pack_no = max(self._pack_no, pack_no + 1)
            self.bytes_written += int(e["length"].sum())
            self.zero_bytes += int(e["length"][e["codec"] == ZERO].sum())

    # -- writing -----------------------------------------------------------------------------

    def _check(self, disk_id: str, offset: int, length: int) -> int:
        if self._finished is not None or self._pool is None or self._broken:
            raise InvalidInput(f"writer of cycle {self.cycle_id} is closed")
        i = self._disk_idx.get(disk_id)
        if i is None:
            raise InvalidInput(f"cycle {self.cycle_id} has no disk {disk_id!r}")
        if offset < 0 or length < 0 or offset + length > self.disk_sizes[disk_id]:
            raise InvalidInput(f"write {offset}+{length} passes the end of disk {disk_id} "
                               f"({self.disk_sizes[disk_id]} bytes)")
        return i

    def write(self, disk_id: str, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Record ``data`` at ``offset``. All-zero 4 KiB blocks become zero extents (not stored).
        The data is copied before this returns; it is durable only after :meth:`flush`."""
        view = memoryview(data).cast("B")
        n = len(view)
        i = self._check(disk_id, offset, n)
        self.bytes_written += n
        pos = 0
        assert self._pool is not None
        while pos < n:
            at = offset + pos
            step = min(n - pos, FRAME_MAX - at % FRAME_MAX)
            # the one copy (the caller may reuse its buffer); zero detection and compression
            # run in the worker threads so this thread only feeds them
            piece = bytes(view[pos:pos + step])
            fut = self._pool.submit(_prepare, piece, at, self.zstd_level)
            self._queue.append(_Pending(i, None, fut))
            pos += step
            self._drain(self._window)

    def write_zero(self, disk_id: str, offset: int, length: int) -> None:
        """Record ``[offset, offset+length)`` as zeros (overrides the base and earlier writes)."""
        i = self._check(disk_id, offset, length)
        if length == 0:
            return
        e = np.zeros(1, ENTRY_DT)
        e["offset"], e["length"], e["disk"], e["codec"] = offset, length, i, ZERO
        self.bytes_written += length
        self.zero_bytes += length
        self._queue.append(_Pending(i, e, None))
        self._drain(self._window)

    def _drain(self, keep: int) -> None:
        """Move finished work, in write order, into the open pack until ``keep`` items remain."""
        while len(self._queue) > keep:
            item = self._queue[0]
            if item.future is not None:
                e, codec, payload, h = item.future.result()
                e["disk"] = item.disk
                self.zero_bytes += int(e["length"][e["codec"] == ZERO].sum())
                if payload:
                    data = e["codec"] != ZERO
                    e["codec"][data] = codec
                    e["foff"][data] = self._open_size
                    e["flen"][data] = len(payload)
                    e["hash"][data] = np.frombuffer(h, "V16")[0]
                    self._frames.append(payload)
                    self._open_size += len(payload)
            else:
                assert item.entries is not None
                e = item.entries
            self._queue.popleft()
            self._open.append(e)
            self._open_entries += e.size
            if self._open_size >= self.repo.pack_target or self._open_entries >= MAX_PACK_ENTRIES:
                self._seal()

    def _seal(self) -> None:
        """Hand the open pack to the uploader thread (encode, hash, put + fsync) so that reading
        and compressing the next pack overlap with storing this one. A pack counts as covered
        only once its put returned; :meth:`flush` waits for every upload. An upload that fails
        makes the writer unusable: the caller resumes the staged cycle with a new writer."""
        if not self._open:
            return
        e = np.concatenate(self._open)
        header = {"v": 1, "cycle": self.cycle_id, "pack_no": self._pack_no,
                  "disks": self.disk_ids}
        frames = self._frames
        self._pack_no += 1
        self._frames, self._open, self._open_size, self._open_entries = [], [], 0, 0
        assert self._uploader is not None
        self._uploads.append((self._uploader.submit(self._upload, frames, header, e), e))
        self._reap(max(UPLOADS_IN_FLIGHT, self.repo.upload_threads + 1))

    def _upload(self, frames: list[bytes], header: dict[str, Any], e: Entries) -> tuple[str, int]:
        blob = encode_pack(frames, header, e)
        rel = f"packs/{self.cycle_id}/{_hex(blob)}"
        try:
            self.repo.store.put(self.repo.key(rel), blob)
        except ObjectExists:
            pass  # content-addressed: an earlier attempt landed
        failpoints.hit("store.pack-stored")
        return rel, len(blob)

    def _reap(self, keep: int) -> None:
        """Record finished uploads, in pack order, until at most ``keep`` are in flight."""
        while len(self._uploads) > keep:
            fut, e = self._uploads[0]
            try:
                rel, size = fut.result()
            except BaseException:
                self._broken = True
                raise
            self._uploads.popleft()
            self._record_pack(rel, e)
            self.bytes_stored += size

    def _record_pack(self, rel: str, e: Entries) -> None:
        pidx = len(self.pack_keys)
        self.pack_keys.append(rel)
        e = e.copy()
        e["pack"] = pidx
        for di in np.unique(e["disk"]).tolist():
            self._done[int(di)].append(e[e["disk"] == di])
            self._covered.pop(int(di), None)

    def flush(self) -> None:
        """Upload everything written so far; afterwards :meth:`covered` includes it."""
        if self._broken:
            raise InvalidInput(f"writer of cycle {self.cycle_id} failed an upload; resume the "
                               "cycle with a new writer")
        self._drain(0)
        self._seal()
        self._reap(0)

    def covered(self, disk_id: str) -> ExtentList:
        """Ranges of ``disk_id`` durably stored by this cycle so far (data and zeros)."""
        i = self._disk_idx.get(disk_id)
        if i is None:
            raise InvalidInput(f"cycle {self.cycle_id} has no disk {disk_id!r}")
        if i not in self._covered:
            parts = self._done[i]
            if parts:
                e = np.concatenate(parts)
                self._covered[i] = coalesce(e["offset"], e["length"])
            else:
                self._covered[i] = ExtentList.empty()
        return self._covered[i]

    # -- commit ------------------------------------------------------------------------------

    def _disk_maps(self, disk_id: str, base_body: dict[str, Any] | None
                   ) -> tuple[dict[str, Any], list[tuple[str, bytes]]]:
        """Manifest entry of one disk plus the new (key, blob) objects it needs."""
        repo = self.repo
        size = self.disk_sizes[disk_id]
        bd = base_body["disks"].get(disk_id) if base_body else None
        seg = int(bd["segment_size"]) if bd else repo.segment_size
        nseg = -(-size // seg)
        base_keys = repo._map_keys(bd, tolerant=True)[:nseg] if bd else []
        keys: list[str | None] = base_keys + [None] * (nseg - len(base_keys))
        parts = self._done[self._disk_idx[disk_id]]
        e = np.concatenate(parts) if parts else _empty()
        changed = coalesce(e["offset"], e["length"]) if e.size else ExtentList.empty()
        segs, pieces = _split_segments(e, seg)
        order = np.argsort(segs, kind="stable")
        segs, pieces = segs[order], pieces[order]
        touched = np.unique(segs).tolist()
        if bd and int(bd["size"]) > size and nseg:
            touched = sorted(set(touched) | {nseg - 1})  # shrink: clip the new last segment
        new: list[tuple[str, bytes]] = []
        for s in touched:
            lo, hi = s * seg, min((s + 1) * seg, size)
            a, b = np.searchsorted(segs, s, "left"), np.searchsorted(segs, s, "right")
            mine = pieces[a:b].copy()
            old = keys[s]
            bm = None
            if old is not None:
                try:
                    bm = repo._get_map(old)
                except (CorruptData, BrokenChain):
                    # a damaged (quarantined) base map is not needed when this cycle rewrote the
                    # whole segment, which is what a resync against the damaged store does
                    whole = ExtentList.of([(lo, hi - lo)])
                    if whole.subtract(coalesce(mine["offset"], mine["length"])).total:
                        raise
            if bm is not None:
                packs = list(bm.packs)
                mine["pack"] += len(packs)
                stack = np.concatenate([bm.entries, mine])
            else:
                packs, stack = [], mine
            r = _resolve(stack, lo, hi)
            if r.size == 0:
                keys[s] = None
                continue
            all_packs = packs + self.pack_keys
            used, inv = np.unique(r["pack"], return_inverse=True)
            r["pack"] = inv.astype(np.uint32)
            r["disk"] = 0
            blob = _encode_blob("map", {"packs": [all_packs[int(u)] for u in used]},
                                _compressor(max(1, repo.zstd_level)).compress(r.tobytes()))
            h = _hex(blob)
            if old is not None and old.rsplit("/", 1)[-1] == h:
                continue  # same content as the base: share its key
            rel = f"maps/{self.cycle_id}/{h}"
            keys[s] = rel
            new.append((rel, blob))
        base_tables = list(bd["tables"]) if bd and int(bd["segment_size"]) == seg else []
        tables: list[str | None] = []
        for t in range(-(-nseg // TABLE_SPAN)):
            chunk = keys[t * TABLE_SPAN:(t + 1) * TABLE_SPAN]
            if all(k is None for k in chunk):
                tables.append(None)
                continue
            if any(k is not None and k.startswith(DAMAGED_MAP) for k in chunk):
                raise CorruptData(f"cycle {self.cycle_id} would keep segments of a damaged "
                                  f"segment table of disk {disk_id}: resync them against the store")
            if t < len(base_tables) and base_tables[t] is not None and \
                    _same_table(repo, str(base_tables[t]), chunk):
                tables.append(base_tables[t])
                continue
            blob = _encode_blob("table", {"n": len(chunk)},
                                _compressor(max(1, repo.zstd_level)).compress(_canon(chunk)))
            rel = f"maps/{self.cycle_id}/{_hex(blob)}"
            tables.append(rel)
            new.append((rel, blob))
        entry: dict[str, Any] = {"size": size, "segment_size": seg, "tables": tables,
                                 "changed": None, "changed_key": None}
        if len(changed) <= INLINE_CHANGES:
            entry["changed"] = changed.to_pairs()
        else:
            pairs = np.stack([changed.starts, changed.lengths], axis=1).astype("<i8")
            blob = _encode_blob("changes", {"n": len(changed)},
                                _compressor(max(1, repo.zstd_level)).compress(pairs.tobytes()))
            rel = f"maps/{self.cycle_id}/{_hex(blob)}"
            entry["changed_key"] = rel
            new.append((rel, blob))
        return entry, new

    def commit(self, *, created_at: float, consistency: Consistency,
               meta: dict[str, Any] | None = None) -> PointInfo:
        """Flush, write maps and tables, then the manifest (the point becomes visible), then drop
        the staging marker. Idempotent: a cycle already committed returns its point."""
        if self._finished is not None:
            return self._finished
        repo = self.repo
        done = repo.committed_cycle(self.cycle_id)
        if done is not None:
            self._finish(done)
            return done
        self.flush()
        base_body = None
        if self.base is not None:
            try:
                base_body = repo._load_manifest(self.base)
            except ObjectNotFound as exc:
                raise BrokenChain(f"base point {self.base} of cycle {self.cycle_id} is gone") \
                    from exc
        disks: dict[str, Any] = {}
        new: list[tuple[str, bytes]] = []
        for d in self.disk_ids:
            disks[d], objs = self._disk_maps(d, base_body)
            new.extend(objs)
        assert self._pool is not None
        for _ in self._pool.map(lambda kv: repo._put_blob(self.cycle_id, kv[1]), new):
            pass
        meta_bytes = sum(len(b) for _, b in new)
        stats = {"zero_bytes": self.zero_bytes, "packs": len(self.pack_keys),
                 "metadata_bytes": meta_bytes, "new_objects": len(new) + len(self.pack_keys)}
        for _attempt in range(8):
            seq = repo._next_seq()
            pid = f"p{seq:012d}"
            body = {"format": 1, "point_id": pid, "item_id": repo.item_id, "seq": seq,
                    "created_at": float(created_at), "consistency": Consistency(consistency).value,
                    "kind": self.kind, "cycle_id": self.cycle_id, "base_point_id": self.base,
                    "disk_sizes": dict(self.disk_sizes), "bytes_written": self.bytes_written,
                    "bytes_stored": self.bytes_stored + meta_bytes,
                    "meta": {**(meta or {}), "stats": stats}, "disks": disks}
            blob = _canon({"blake3": _hex(_canon(body)), "body": body})
            repo.store.put(repo.key("seq"), str(seq).encode(), overwrite=True)
            failpoints.hit("store.before-manifest")
            try:
                repo.store.put(repo.key(f"points/{pid}"), blob)
            except ObjectExists:
                repo._manifests.drop(pid)
                other = repo._load_manifest(pid)
                if other["cycle_id"] == self.cycle_id:
                    info = PointInfo.from_dict(other)
                    break
                continue  # another commit took this seq: take the next one
            info = PointInfo.from_dict(body)
            break
        else:
            raise Conflict(f"could not allocate a point id for cycle {self.cycle_id}")
        failpoints.hit("store.after-manifest")
        repo.store.delete(repo.key(f"staging/{self.cycle_id}"))
        self._finish(info)
        return info

    def _finish(self, info: PointInfo) -> None:
        self._finished = info
        self.close()

    def close(self) -> None:
        """Stop the worker threads without committing; buffered, unflushed data is dropped (the
        staged cycle stays resumable from what was flushed)."""
        if self._pool is not None:
            for item in self._queue:
                if item.future is not None:
                    item.future.cancel()
            self._queue.clear()
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        if self._uploader is not None:
            # uploads already running finish (a pack is whole or absent); queued ones are dropped
            self._uploader.shutdown(wait=True, cancel_futures=True)
            self._uploader = None
            self._uploads.clear()

    def __enter__(self) -> PointWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- reader ---------------------------------------------------------------------------------

class PointReader:
    """Random-access verified reads of one disk of one point; holes read as zeros.

    Holds a small cache of decompressed frames; frames needed by one ``readinto`` are fetched in
    parallel. Not responsible for retries (wrap the store) or repairs.
    """

    def __init__(self, repo: Repository, point_id: str, disk_id: str, disk: dict[str, Any]) -> None:
        self.repo = repo
        self.point_id = point_id
        self.disk_id = disk_id
        self._disk = disk
        self.size = int(disk["size"])
        self.segment_size = int(disk["segment_size"])
        self._keys = repo._map_keys(disk, tolerant=True)
        self._frames: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self._cache_cap = 16

    def _frame(self, spec: tuple[str, int, int, int, int, bytes]) -> bytes:
        pk, foff, flen, codec, rlen, h = spec
        try:
            return self.repo.read_frame(pk, foff, flen, codec, rlen, h)
        except CorruptData as exc:
            raise CorruptData(f"{exc} (point {self.point_id}, disk {self.disk_id})") from exc

    def readinto(self, offset: int, buf: memoryview) -> None:
        """Fill ``buf`` with ``[offset, offset + len(buf))``; verified; ``CorruptData`` on damage."""
        out = np.frombuffer(buf.cast("B") if buf.format != "B" else buf, np.uint8)
        n = out.size
        if offset < 0 or offset + n > self.size:
            raise InvalidInput(f"read {offset}+{n} passes the end of disk {self.disk_id} "
                               f"({self.size} bytes)")
        out[:] = 0
        if n == 0:
            return
        end = offset + n
        seg = self.segment_size
        picks: list[tuple[_SegMap, Entries]] = []
        for s in range(offset // seg, (end - 1) // seg + 1):
            mk = self._keys[s]
            if mk is None:
                continue
            m = self.repo._get_map(mk)
            e = m.entries
            a = int(np.searchsorted(e["offset"] + e["length"], offset, "right"))
            b = int(np.searchsorted(e["offset"], end, "left"))
            if b > a:
                picks.append((m, e[a:b]))
        want: dict[tuple[str, int], tuple[str, int, int, int, int, bytes]] = {}
        for m, e in picks:
            for pk, foff, flen, codec, rlen, h in zip(
                    e["pack"].tolist(), e["foff"].tolist(), e["flen"].tolist(),
                    e["codec"].tolist(), e["rlen"].tolist(), e["hash"].tolist(), strict=True):
                k = (m.packs[pk], foff)
                if k not in self._frames and k not in want:
                    want[k] = (m.packs[pk], foff, flen, codec, rlen, bytes(h))
        if len(want) > 1:
            got = dict(zip(want, self.repo._pool().map(self._frame, want.values()), strict=True))
        else:
            got = {k: self._frame(v) for k, v in want.items()}
        frames: dict[tuple[str, int], bytes] = {}
        for m, e in picks:
            for pk, foff, eo, el, ro in zip(e["pack"].tolist(), e["foff"].tolist(),
                                            e["offset"].tolist(), e["length"].tolist(),
                                            e["roff"].tolist(), strict=True):
                k = (m.packs[pk], foff)
                raw = frames.get(k)
                if raw is None:
                    raw = got.get(k) or self._frames[k]
                    frames[k] = raw
                s, t = max(eo, offset), min(eo + el, end)
                src = ro + (s - eo)
                out[s - offset:t - offset] = np.frombuffer(raw, np.uint8, t - s, src)
        for k, raw in got.items():
            self._frames[k] = raw
        for k in frames:
            self._frames.move_to_end(k)
        while len(self._frames) > self._cache_cap:
            self._frames.popitem(last=False)

    def data_extents(self) -> ExtentList:
        """Ranges that hold stored data (everything else reads as zeros)."""
        st: list[npt.NDArray[np.int64]] = []
        ln: list[npt.NDArray[np.int64]] = []
        seg = self.segment_size
        for i, mk in enumerate(self._keys):
            if mk is not None:
                try:
                    e = self.repo._get_map(mk).entries
                except (CorruptData, BrokenChain):
                    # unreadable map: report its whole segment (over-approximation is allowed);
                    # reading it then fails, which a resync counts as "differs"
                    st.append(np.array([i * seg], np.int64))
                    ln.append(np.array([max(0, min(seg, self.size - i * seg))], np.int64))
                    continue
                st.append(e["offset"])
                ln.append(e["length"])
        if not st:
            return ExtentList.empty()
        return coalesce(np.concatenate(st), np.concatenate(ln))

    def changed_extents(self) -> ExtentList:
        """What this point's cycle wrote (data and zeros), relative to its base."""
        return self.repo._changed(self._disk)

    def close(self) -> None:
        self._frames.clear()


def iter_pieces(ext: Iterable[tuple[int, int]], piece: int) -> Iterable[tuple[int, int]]:
    """Cut ``(offset, length)`` ranges into pieces of at most ``piece`` bytes."""
    for off, n in ext:
        pos = 0
        while pos < n:
            step = min(piece, n - pos)
            yield off + pos, step
            pos += step


__all__ = ["BLOCK", "FRAME_MAX", "DamagedObject", "GcReport", "PointInfo",
           "PointReader", "PointWriter", "Repository", "VerifyReport", "iter_pieces"]
