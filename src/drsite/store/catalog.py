"""The catalogue of one item's repository: its keys and verified, cached reads of its metadata.

:class:`Catalog` is what the writer, the reader and maintenance share: the store and the item's
settings, manifests (the points), staging markers, segment tables and maps, and single frames,
each verified on read (see :mod:`drsite.store.format`). It writes nothing.
:class:`~drsite.store.repository.Repository` is a catalogue plus cycles and maintenance.

Underscored methods are the store package's own surface (``writer``, ``reader``,
``maintenance``, ``repository``), not for callers outside ``drsite.store``.
Caches hold only immutable objects (manifests, maps and tables never change under their key);
:meth:`Catalog._forget` drops what a deletion or a quarantine made stale.
"""

from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np
import zstandard

from drsite.core.errors import (
    BrokenChain,
    CorruptData,
    DrsiteError,
    InvalidInput,
    ObjectNotFound,
)
from drsite.core.extents import ExtentList, coalesce
from drsite.core.model import validate_name
from drsite.store.auth import MANIFEST, PointAuth
from drsite.store.contract import ObjectStore, validate_key
from drsite.store.format import (
    BLOCK,
    TABLE_SPAN,
    ZSTD,
    PointInfo,
    SegMap,
    canonical_json,
    decode_blob,
    decode_entries,
    decompressor,
    hash16,
    hex_hash,
)

T = TypeVar("T")

# prefix (+ the table's key) standing for the map of a segment whose table could not be read
# (never a valid key: keys are validated names, this one starts with a NUL)
DAMAGED_MAP = "\x00damaged-table:"
# a repository's own segment maps (engine memory per item): what a commit finds of its base's
# maps. A disk written in scattered 4 KiB pieces has ~1 MiB of map per 64 MiB segment and a
# cycle reads them in segment order, a scan an LRU of a few dozen never hits (32 MiB: no
# faster commits in the churn bench, 23 MiB more engine RSS); small disks' maps still fit
MAP_CACHE_BYTES = 8 << 20
# a cold read of a point whose data is scattered loads one small map per 64 MiB segment: fetch
# them MAP_FETCHERS at a time (a disk or object-store round trip each, not CPU), at most
# MAP_PREFETCH ahead of their use (the map cache must still hold them when they are used)
MAP_FETCHERS = 8
MAP_PREFETCH = 256
# a stored object larger than this is not decoded to seed a MapCache (a map of a segment
# written in scattered 4 KiB pieces is ~1 MiB of entries before compression)
MAP_OFFER_MAX = 4 << 20


class _Lru(OrderedDict[str, Any]):
    """At most ``cap`` values and, with ``weigh``, at most ``max_weight`` of their weight."""

    def __init__(self, cap: int, weigh: Callable[[Any], int] | None = None,
                 max_weight: int = 0) -> None:
        super().__init__()
        self.cap = cap
        self.lock = threading.Lock()
        self._weigh = weigh
        self._max_weight = max_weight
        self._weights: dict[str, int] = {}
        self.weight = 0

    def room(self) -> int:
        """Half the weight this cache may hold (unbounded by weight: no bound)."""
        return self._max_weight // 2 if self._weigh is not None and self._max_weight else \
            2**62

    def fetch(self, key: str, load: Callable[[], T]) -> T:
        with self.lock:
            if key in self:
                self.move_to_end(key)
                return self[key]  # type: ignore[no-any-return]
        val = load()
        with self.lock:
            if key not in self and self._weigh is not None:
                w = self._weigh(val)
                self._weights[key] = w
                self.weight += w
            self[key] = val
            while len(self) > self.cap or (self._weigh is not None and len(self) > 1
                                           and self.weight > self._max_weight):
                old, _ = self.popitem(last=False)
                self.weight -= self._weights.pop(old, 0)
        return val

    def clear(self) -> None:
        with self.lock:
            super().clear()
            self._weights.clear()
            self.weight = 0

    def drop(self, key: str) -> None:
        with self.lock:
            self.pop(key, None)
            self.weight -= self._weights.pop(key, 0)

    def drop_prefix(self, prefix: str) -> None:
        with self.lock:
            for k in [k for k in self if k.startswith(prefix)]:
                self.pop(k)
                self.weight -= self._weights.pop(k, 0)


def _map_weight(m: SegMap) -> int:
    return int(m.entries.nbytes) + 100 * len(m.packs)


def _decode_map(data: bytes, key: str) -> SegMap:
    """A segment map's bytes (hash already checked) → its entries and packs."""
    header, payload = decode_blob("map", data, key)
    e = decode_entries(payload, key)
    packs = [str(p) for p in header["packs"]]
    if e.size and int(e["pack"].max()) >= len(packs):
        raise CorruptData(f"segment map {key} names a pack it does not list")
    return SegMap(e, packs)


class MapCache(_Lru):
    """Segment maps shared by the repositories of one process (one agent's catch-ups and
    failovers of the items its store holds), keyed by full store key.

    Safe to share: a map's key ends in the blake3 of its bytes and a map is never rewritten,
    so a copy verified once is the map for every reader of any store holding that key. Not for
    scrub or repair, which must read the store itself (a cached copy would hide damage).
    Bounded by count and by bytes; sized for a disk whose data is scattered over many
    segments (one map per 64 MiB segment holding data: 1,600 for 100 GiB)."""

    def __init__(self, max_maps: int = 16384, max_bytes: int = 64 << 20) -> None:
        super().__init__(max_maps, _map_weight, max_bytes)

    def offer(self, key: str, data: bytes | memoryview) -> bool:
        """An object just stored under ``key`` (a store server's PUT): cached if it is a
        segment map whose bytes match the blake3 in its key and decode as a read would
        decode them; anything else (tables, packs, damage) is ignored. Returns whether it was
        cached. (A recovery site's replica is written from the shipping stream, so no
        catch-up reads the maps there; the failover would load them all cold.)"""
        parts = key.split("/")
        if len(parts) != 5 or parts[0] != "items" or parts[2] != "maps" \
                or len(data) > MAP_OFFER_MAX or hex_hash(data) != parts[4]:
            return False
        try:
            m = _decode_map(bytes(data), key)
        except (DrsiteError, KeyError, TypeError, ValueError):
            return False   # a segment table or a changed-extent list (or damage): not a map
        self.fetch(key, lambda: m)
        return True


class Catalog:
    """Read access to the recovery points of one protected item over an object store.

    Responsible for: keys, verified reads of manifests, markers, tables, maps and frames, and
    caching the immutable ones. Not responsible for: writing (``writer``), retention and GC
    (``maintenance``), retries (wrap the store in ``RetryingStore``).
    """

    def __init__(self, store: ObjectStore, item_id: str, *, segment_size: int = 64 << 20,
                 pack_target: int = 8 << 20, zstd_level: int = 1, threads: int | None = None,
                 upload_threads: int = 2, auth: PointAuth | None = None,
                 map_cache: MapCache | None = None) -> None:
        validate_name("item", item_id)
        if segment_size <= 0 or segment_size % BLOCK:
            raise InvalidInput(f"segment size {segment_size} is not a positive multiple of {BLOCK}")
        self.store = store
        self.item_id = item_id
        self.prefix = f"items/{item_id}/"
        self.segment_size = segment_size
        self.pack_target = max(pack_target, 1)
        self.zstd_level = zstd_level
        # zero detection, hashing and compression: one worker per core by default
        self.threads = max(threads if threads is not None else (os.cpu_count() or 2), 1)
        # packs stored at once by a writer (local stores: their fsyncs overlap; remote ones:
        # one request each; packs may land out of order, which resume() handles: it sorts
        # trailers by pack number)
        self.upload_threads = max(upload_threads, 1)
        # the item's point key: with it, every manifest read must carry a valid MAC
        # (PointNotAuthentic otherwise) and the writer signs what it commits; set it before
        # the first read (cached manifests were checked under the key in force when read)
        self.auth: PointAuth | None = auth
        self._manifests = _Lru(4096)
        # maps of a disk written in scattered 4 KiB pieces hold ~1 MiB of entries per 64 MiB
        # segment: bound the cache by bytes, not only by count (engine memory per item). Keyed
        # by full store key (the cache may be a process's MapCache, shared by items)
        self._shared_maps = map_cache is not None
        self._maps: _Lru = map_cache if map_cache is not None else \
            _Lru(2048, _map_weight, MAP_CACHE_BYTES)
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

    def _forget(self, rel: str) -> None:
        """Drop the cached copy of an object that was deleted or moved aside."""
        self._maps.drop(self.prefix + rel)
        self._tables.drop(rel)
        if rel.startswith("points/"):
            self._manifests.drop(rel.split("/", 1)[1])

    def _forget_all(self) -> None:
        """Empty the caches: the next reads go to the store."""
        self._manifests.clear()
        if self._shared_maps:
            self._maps.drop_prefix(self.prefix)
        else:
            self._maps.clear()
        self._tables.clear()

    def _get_blob(self, rel: str, what: str) -> bytes:
        """A content-addressed blob, verified against the blake3 in its key."""
        key = self.key(rel)
        try:
            data = self.store.get(key)
        except ObjectNotFound as exc:
            raise BrokenChain(f"{what} {key} is missing from the recovery store") from exc
        got = hex_hash(data)
        if got != rel.rsplit("/", 1)[-1]:
            raise CorruptData(f"{what} {key} failed its hash check ({len(data)} bytes read, "
                              f"blake3 {got[:16]}…)")
        return data

    # -- manifests and markers ---------------------------------------------------------------

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
                canon = canonical_json(body)
                ok = env.get("blake3") == hex_hash(canon)
            except (ValueError, KeyError, TypeError) as exc:
                raise CorruptData(f"manifest {key} is unreadable (truncated or damaged): {exc}") \
                    from exc
            if not ok:
                raise CorruptData(f"manifest {key} failed its checksum")
            if self.auth is not None:
                self.auth.check(MANIFEST, canon, env, f"recovery point {point_id}")
            if body.get("point_id") != point_id or body.get("item_id") != self.item_id:
                raise CorruptData(f"manifest {key} names point {body.get('point_id')!r} of item "
                                  f"{body.get('item_id')!r}")
            return body  # type: ignore[no-any-return]

        return self._manifests.fetch(point_id, load)

    def _point_ids(self) -> list[str]:
        return sorted(k.rsplit("/", 1)[-1] for k in self._list("points/"))

    def point_ids(self) -> list[str]:
        """The ids of the committed points (their manifests' keys), sorted; nothing is read or
        checked: :meth:`point` does that, one point at a time."""
        return self._point_ids()

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

    def staged_cycles(self) -> list[str]:
        """Cycles with a staging marker (in flight or crashed, not yet committed or aborted)."""
        return sorted(k.rsplit("/", 1)[-1] for k in self._list("staging/"))

    # -- tables, maps, frames ----------------------------------------------------------------

    def _get_table(self, rel: str) -> list[str | None]:
        def load() -> list[str | None]:
            key = self.key(rel)
            header, payload = decode_blob("table", self._get_blob(rel, "segment table"), key)
            try:
                maps = json.loads(decompressor().decompress(payload))
            except (zstandard.ZstdError, ValueError) as exc:
                raise CorruptData(f"segment table {key} is damaged: {exc}") from exc
            if not isinstance(maps, list) or len(maps) != header.get("n"):
                raise CorruptData(f"segment table {key} is damaged: bad length")
            return maps

        return self._tables.fetch(rel, load)

    def _get_map(self, rel: str) -> SegMap:
        if rel.startswith(DAMAGED_MAP):
            raise CorruptData(f"segment table {self.key(rel[len(DAMAGED_MAP):])} is damaged: "
                              "the maps it lists cannot be read")

        def load() -> SegMap:
            return _decode_map(self._get_blob(rel, "segment map"), self.key(rel))

        return self._maps.fetch(self.prefix + rel, load)

    def _map_cached(self, rel: str) -> bool:
        return self.prefix + rel in self._maps

    def _cache_map(self, rel: str, m: SegMap) -> None:
        """A map this process just stored (the next cycle's base: not read back)."""
        self._maps.fetch(self.prefix + rel, lambda: m)

    def _prefetch_maps(self, rels: list[str | None]) -> None:
        """Load the maps of ``rels`` that are not cached yet, ``MAP_FETCHERS`` in parallel (a
        hint: an error is left to the caller's own ``_get_map`` of that map to raise)."""
        todo = list(dict.fromkeys(r for r in rels if r and not r.startswith(DAMAGED_MAP)
                                  and not self._map_cached(r)))
        if len(todo) < 2:
            return
        # no further than the cache holds: a map fetched ahead and evicted before its use is
        # fetched twice (the rest are read as they are used)
        room = self._maps.room()
        lock = threading.Lock()
        fetched = [0]

        def one(rel: str) -> None:
            if fetched[0] >= room:
                return
            try:
                m = self._get_map(rel)
            except DrsiteError:
                return
            with lock:
                fetched[0] += _map_weight(m)

        with ThreadPoolExecutor(min(MAP_FETCHERS, len(todo)),
                                thread_name_prefix="drsite-maps") as pool:
            for _ in pool.map(one, todo):
                pass

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
            _, payload = decode_blob("changes", self._get_blob(rel, "changed-extent list"), key)
            try:
                pairs = np.frombuffer(decompressor().decompress(payload), "<i8").reshape(-1, 2)
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
                raw = decompressor().decompress(data, max_output_size=rlen)
            except zstandard.ZstdError as exc:
                raise CorruptData(f"pack {key}: frame at {foff}+{flen} does not decompress "
                                  f"({exc})") from exc
        else:
            raw = data
        if len(raw) != rlen or hash16(raw) != h:
            raise CorruptData(f"pack {key}: frame at {foff}+{flen} failed its hash check")
        return bytes(raw)
