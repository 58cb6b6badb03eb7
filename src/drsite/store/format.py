"""The on-store format of a recovery-point repository: keys, object encodings, value types.

One repository per protected item, under ``items/<item_id>/``::

    staging/<cycle_id>            marker of a cycle in flight (base, disk sizes, kind)
    packs/<cycle_id>/<blake3>     zstd frames of written data + trailer index; key = blake3(pack)
    maps/<cycle_id>/<blake3>      segment maps, segment tables, large changed-extent lists
    points/p<seq:012d>            manifest; its existence is the point's visibility
    seq                           high-water mark of point sequence numbers (never reused)
    quarantine/...                corrupt objects moved aside

Every object is content-addressed and verified on read: pack frames by their blake3-128 (kept in
the entry that points at them), maps/tables/pack blobs by the blake3 in their key, manifests by
the checksum in their body. A segment map lists sorted, non-overlapping data extents of one
segment; what it does not list reads as zeros.

This module holds bytes ↔ values only; who reads and writes them is in ``catalog``, ``writer``,
``reader`` and ``maintenance`` (see ``store/design.md``).
"""

from __future__ import annotations

import json
import struct
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import zstandard
from blake3 import blake3

from drsite.core.errors import CorruptData
from drsite.core.model import Consistency

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
PACK_FOOTER = struct.Struct("<8sII16s")   # magic, header length, entry count, blake3-128(trailer)
BLOB_MAGIC = {"map": b"DRSMAP1\n", "table": b"DRSTAB1\n", "changes": b"DRSCHG1\n"}
_BLOB_HDR = struct.Struct("<8sI")

KINDS = ("initial", "delta", "resync")


def hash16(data: bytes | memoryview) -> bytes:
    """blake3-128 digest: the checksum of a frame's raw bytes and of a pack trailer."""
    return bytes(blake3(data).digest(length=16))


def hex_hash(data: bytes | memoryview) -> str:
    """blake3-256 hex digest: the content address in the key of packs, maps and tables."""
    return str(blake3(data).hexdigest())


def canonical_json(obj: Any) -> bytes:
    """The canonical JSON form that manifests, markers and table bodies are hashed in."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


_tls = threading.local()


def compressor(level: int) -> Any:
    """This thread's zstd compressor at ``level`` (zstd contexts are not thread-safe)."""
    c = getattr(_tls, "zc", None)
    if c is None or _tls.zlevel != level:
        c = _tls.zc = zstandard.ZstdCompressor(level=level)
        _tls.zlevel = level
    return c


def decompressor() -> Any:
    """This thread's zstd decompressor."""
    d = getattr(_tls, "zd", None)
    if d is None:
        d = _tls.zd = zstandard.ZstdDecompressor()
    return d


PROBE = 8 << 10      # bytes of each compressibility probe
PROBES = 4           # probes spread over a frame of at least PROBE_MIN bytes
PROBE_MIN = 256 << 10
PROBE_GAIN = 0.9     # a probe compressing below this ratio means "compress the frame"


def looks_incompressible(raw: bytes | memoryview, level: int) -> bool:
    """Whether ``PROBES`` small slices spread over a large frame all fail to compress: then the
    frame is stored raw without running zstd over it. zstd itself passes random data quickly,
    but its output buffer (the frame's size, fresh memory) cost a page fault per 4 KiB: for
    incompressible data that was most of the kernel time of an initial copy. A frame mixing
    random and compressible data may be stored raw: correct, only less compact."""
    n = len(raw)
    if n < PROBE_MIN:
        return False
    c = compressor(level)
    mv = memoryview(raw)
    step = (n - PROBE) // (PROBES - 1)
    for k in range(PROBES):
        at = k * step
        if len(c.compress(mv[at:at + PROBE])) < PROBE * PROBE_GAIN:
            return False
    return True


def compress_frame(raw: bytes | memoryview, level: int) -> tuple[int, bytes | memoryview, bytes]:
    """(codec, payload, blake3-128 of raw). Runs in worker threads: blake3/zstd drop the GIL.
    ``level`` 0 means no compression (a policy with compression off): frames are stored RAW,
    as are frames that :func:`looks_incompressible`."""
    h = hash16(raw)
    if level == 0 or looks_incompressible(raw, level):
        return RAW, raw, h
    z = compressor(level).compress(raw)
    if len(z) >= len(raw):
        return RAW, raw, h
    return ZSTD, bytes(z), h


def empty_entries() -> Entries:
    return np.zeros(0, ENTRY_DT)


# --- object encodings -----------------------------------------------------------------------

def encode_blob(kind: str, header: dict[str, Any], payload: bytes = b"") -> bytes:
    """A map, table or changed-extent list: magic ‖ header length ‖ header JSON ‖ payload."""
    hdr = canonical_json(header)
    return _BLOB_HDR.pack(BLOB_MAGIC[kind], len(hdr)) + hdr + payload


def decode_blob(kind: str, data: bytes, key: str) -> tuple[dict[str, Any], memoryview]:
    """(header, payload) of a blob of ``kind``; ``CorruptData`` naming ``key`` if it is not one.
    The caller has already checked the blob's hash against its key."""
    try:
        magic, hlen = _BLOB_HDR.unpack_from(data)
        if magic != BLOB_MAGIC[kind]:
            raise ValueError("bad magic")
        header = json.loads(data[_BLOB_HDR.size:_BLOB_HDR.size + hlen])
        return header, memoryview(data)[_BLOB_HDR.size + hlen:]
    except (ValueError, struct.error) as exc:
        raise CorruptData(f"object {key} is not a valid {kind} object: {exc}") from exc


def decode_entries(payload: bytes | memoryview, key: str) -> Entries:
    """The zstd-compressed entry table of a segment map."""
    try:
        raw = decompressor().decompress(payload) if len(payload) else b""
    except zstandard.ZstdError as exc:
        raise CorruptData(f"object {key}: cannot decompress its entries: {exc}") from exc
    if len(raw) % ENTRY_DT.itemsize:
        raise CorruptData(f"object {key}: entry table has a bad length")
    return np.frombuffer(raw, ENTRY_DT).copy()


def encode_pack(frames: list[bytes | memoryview], header: dict[str, Any],
                entries: Entries, out: npt.NDArray[np.uint8] | None = None) -> memoryview:
    """frames ‖ header JSON ‖ entry table ‖ footer; the trailer carries its own blake3-128 so it
    can be read and trusted alone (resume) without fetching the whole pack.

    Assembled in one numpy buffer: ``out`` when it is large enough (a writer reuses its pack
    buffers: no fresh memory to fault in and zero per pack), else a new one."""
    hdr = canonical_json(header)
    trailer = hdr + entries.astype(ENTRY_DT).tobytes()
    footer = PACK_FOOTER.pack(PACK_MAGIC, len(hdr), entries.size, hash16(trailer))
    parts = [*frames, trailer, footer]
    total = sum(len(p) for p in parts)
    if out is None or out.size < total:
        out = np.empty(total, np.uint8)
    pos = 0
    for p in parts:
        n = len(p)
        out[pos:pos + n] = np.frombuffer(p, np.uint8)
        pos += n
    return out[:total].data


def decode_pack_trailer(tail: bytes, key: str) -> tuple[int, int]:
    """(header length, entry count) from a pack's footer bytes."""
    if len(tail) != PACK_FOOTER.size:
        raise CorruptData(f"pack {key} is truncated (no footer)")
    magic, hlen, n, _h = PACK_FOOTER.unpack(tail)
    if magic != PACK_MAGIC:
        raise CorruptData(f"pack {key} has a bad footer")
    return int(hlen), int(n)


# --- values ---------------------------------------------------------------------------------

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


@dataclass(frozen=True)
class SegMap:
    """A decoded segment map."""

    entries: Entries           # sorted, non-overlapping data extents
    packs: list[str]           # relative pack keys indexed by entries["pack"]
