"""Writing a cycle: :class:`PointWriter` stages packs, then commits segment maps and a manifest.

Order of a commit (what makes a point whole or absent): every pack is stored (:meth:`flush`) →
new maps, tables and changed-extent lists → ``seq`` → the manifest (the point is visible) → the
staging marker is deleted. A crash before the manifest leaves a staged cycle that
:func:`reopen` rebuilds from the store alone (the marker and the pack trailers); a crash after it
leaves a stale marker that ``Repository.resume`` and GC remove.
"""

from __future__ import annotations

import itertools
import json
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

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
from drsite.core.model import Consistency
from drsite.store.auth import MANIFEST
from drsite.store.catalog import DAMAGED_MAP, Catalog
from drsite.store.entries import classify_many, overlay, split_segments
from drsite.store.format import (
    ENTRY_DT,
    FRAME_MAX,
    INLINE_CHANGES,
    MAX_PACK_ENTRIES,
    PACK_FOOTER,
    TABLE_SPAN,
    ZERO,
    Entries,
    PointInfo,
    SegMap,
    canonical_json,
    compress_frame,
    compressor,
    decode_pack_trailer,
    empty_entries,
    encode_blob,
    encode_pack,
    hash16,
    hex_hash,
)

UPLOADS_IN_FLIGHT = 2  # packs being stored while the next one fills (memory: 2 x pack_target)
TEE_THREADS = 2        # threads writing the tee's copy (a replica): blocked on the device mostly
TEE_IN_FLIGHT = 8      # frames handed to the tee and not yet written (memory: 8 x FRAME_MAX)
# adaptive compression (``PointWriter.adaptive``): after the feeder waited for a compressor (and
# not the store since), at most this many windows of frames go raw
RAW_RUN = 4


@dataclass
class _Pending:
    disk: int
    entries: Entries | None  # None: the future classifies the piece
    future: Future[_Prepared] | None
    owner: object = None  # keeps the caller's buffer alive while the frame may point into it
    disk_id: str = ""
    level: int = 0  # the zstd level the frame was handed with (0: stored raw)
    tee: bool = True  # handed to the tee (not: re-homed bytes, which a replica holds already)


Tee = Callable[[str, Entries, bytes | memoryview], None]


def _union(parts: list[tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]]) -> ExtentList:
    """The ranges of ``(offsets, lengths)`` pairs, merged."""
    if not parts:
        return ExtentList.empty()
    return coalesce(np.concatenate([o for o, _ in parts]), np.concatenate([n for _, n in parts]))


# a frame's zero/data runs, codec, payload, blake3-128 of its data and the data itself
_Prepared = tuple[Entries, int, bytes | memoryview, bytes, bytes | memoryview]


def _prepare(frame: memoryview, offsets: npt.NDArray[np.int64],
             lengths: npt.NDArray[np.int64], level: int) -> _Prepared:
    """Worker-thread half of :meth:`PointWriter.write_many`: zero/data runs of one frame's
    pieces, then (codec, payload, blake3-128) of its data runs (codec 0 and empty payload if
    all zero), and the data runs' bytes (for the tee)."""
    e, raw = classify_many(frame, offsets, lengths)
    if not raw:
        return e, 0, b"", b"", b""
    codec, payload, h = compress_frame(raw, level)
    return e, codec, payload, h, raw


def _tee_call(tee: Tee, disk_id: str, e: Entries, raw: bytes | memoryview,
              owner: object) -> None:
    """One frame's runs to the tee, in a tee thread; ``owner`` keeps ``raw``'s buffer (the
    caller's slab) alive until the write returned."""
    tee(disk_id, e, raw)
    del owner  # (the executor's work item holds it until this returns)


def frame_pieces(offsets: npt.NDArray[np.int64], lengths: npt.NDArray[np.int64]
                 ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Cut extents at FRAME_MAX disk boundaries and group the pieces, in order, into frames of at
    most FRAME_MAX bytes: returns (piece offsets, piece lengths, frame start indexes into the
    pieces). A large write gives frames aligned on the disk's 1 MiB grid; many small writes
    share a frame (one zstd frame and one hash for up to 1 MiB of scattered 4 KiB writes)."""
    first = offsets // FRAME_MAX
    cnt = (offsets + lengths - 1) // FRAME_MAX - first + 1
    if cnt.size and int(cnt.max()) > 1:
        idx = np.repeat(np.arange(offsets.size), cnt)
        k = np.arange(int(cnt.sum())) - np.repeat(np.cumsum(cnt) - cnt, cnt)
        g = (first[idx] + k) * FRAME_MAX
        po = np.maximum(offsets[idx], g)
        pl = np.minimum(offsets[idx] + lengths[idx], g + FRAME_MAX) - po
    else:
        po, pl = offsets, lengths
    ends = np.cumsum(pl)
    starts: list[int] = []
    i, n, base = 0, po.size, 0
    while i < n:  # one iteration per frame, not per piece
        starts.append(i)
        j = int(np.searchsorted(ends, base + FRAME_MAX, "right"))
        i = max(j, i + 1)
        base = int(ends[i - 1])
    return po, pl, np.asarray(starts, np.int64)


def _same_table(repo: Catalog, rel: str, chunk: list[str | None]) -> bool:
    try:
        return repo._get_table(rel) == chunk
    except (CorruptData, BrokenChain):
        return False  # a damaged base table is never shared


class PointWriter:
    """Writes one cycle: buffers frames, compresses them in worker threads, uploads packs of about
    ``pack_target`` bytes, and on :meth:`commit` builds segment maps and the manifest.

    Within a cycle later writes win over earlier ones. Not thread-safe (one caller thread);
    not responsible for reading the source or deciding what to write.
    """

    def __init__(self, repo: Catalog, cycle_id: str, base: str | None,
                 disk_sizes: dict[str, int], kind: str) -> None:
        self.repo = repo
        self.cycle_id = cycle_id
        self.base = base
        self.kind = kind
        self.disk_sizes = dict(disk_sizes)
        self.disk_ids = sorted(self.disk_sizes)
        self._disk_idx = {d: i for i, d in enumerate(self.disk_ids)}
        self.bytes_written = 0     # every byte written (re-homed ones too)
        self.rehomed_bytes = 0     # of which re-homed: not the point's changes
        self.bytes_stored = 0
        self.zero_bytes = 0
        self.meta_bytes = 0
        self._pool: ThreadPoolExecutor | None = ThreadPoolExecutor(
            repo.threads, thread_name_prefix=f"drsite-pack-{cycle_id}")
        # zstd level for data frames; 0 stores frames as they are (policy: compression off)
        self.zstd_level = repo.zstd_level
        # policy "auto": each frame is compressed or stored raw depending on which side of the
        # pipeline waits for the other (:meth:`_frame_level`, store/design.md "Adaptive
        # compression"); ``zstd_level`` is the level of the frames it compresses
        self.adaptive = False
        self._frame_no = 0        # frames handed to the workers so far
        self._stall_at = -(1 << 62)  # frame count when the feeder last waited on the CPU
        self._store_wait_at = -(1 << 62)  # ... and when it last waited on the store
        self._stored_one = False  # an upload of this writer has returned (the store is known)
        self.raw_chosen_bytes = 0  # data bytes the adaptive rule stored raw (they were eligible)
        # also hand every write's zero/data runs to ``tee(disk_id, runs, raw)`` (a replica being
        # written from the same buffers). Called from tee threads (TEE_THREADS), in any order
        # across frames, while later frames are compressed: set it only for cycles whose writes
        # never overlap (the engine's cycles). Every call has returned when flush() returns;
        # the first error a call raised is raised by write_many/flush.
        self.tee: Tee | None = None
        self._tee_pool: ThreadPoolExecutor | None = None
        self._tees: deque[Future[None]] = deque()
        self._uploader: ThreadPoolExecutor | None = ThreadPoolExecutor(
            repo.upload_threads, thread_name_prefix=f"drsite-upload-{cycle_id}")
        self._uploads: deque[tuple[Future[tuple[str, int]], Entries]] = deque()
        self._bufs: list[npt.NDArray[np.uint8]] = []  # pack buffers to reuse
        self._bufs_lock = threading.Lock()
        self._broken = False
        self._queue: deque[_Pending] = deque()
        self._window = 4 * repo.threads
        # the open pack: frames and their entries (disk index in "disk"), and the owners of
        # the caller buffers that frames stored raw still point into
        self._frames: list[bytes | memoryview] = []
        self._owners: list[object] = []
        self._open: list[Entries] = []
        self._open_size = 0
        self._open_entries = 0
        self._pack_no = 0
        # uploaded packs, in order; per disk the entries of the cycle in write order
        self.pack_keys: list[str] = []
        self._done: dict[int, list[Entries]] = {i: [] for i in range(len(self.disk_ids))}
        self._covered: dict[int, ExtentList] = {}
        # per disk, the extents written with ``rehomed=True`` by this writer (not by an earlier
        # attempt of a resumed cycle: those count as changed, which is only conservative), and
        # the other writes that came after the first of them (a later write wins: where one
        # covers a re-homed range, the point holds its bytes there, a change)
        self._rehomed: dict[int, list[tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]]] = \
            {i: [] for i in range(len(self.disk_ids))}
        self._after_rehomed: dict[int, list[tuple[npt.NDArray[np.int64],
                                                  npt.NDArray[np.int64]]]] = \
            {i: [] for i in range(len(self.disk_ids))}
        self._maps_stored = [0, 0]  # segment maps this commit stored: count, bytes
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
            if size < PACK_FOOTER.size:
                raise CorruptData(f"pack {key} is truncated ({size} bytes)")
            tail = repo.store.get_range(key, size - PACK_FOOTER.size, PACK_FOOTER.size)
            hlen, n = decode_pack_trailer(tail, key)
            tlen = hlen + n * ENTRY_DT.itemsize
            if tlen + PACK_FOOTER.size > size:
                raise CorruptData(f"pack {key} has a trailer longer than itself")
            trailer = repo.store.get_range(key, size - PACK_FOOTER.size - tlen, tlen)
            if len(trailer) != tlen or hash16(trailer) != PACK_FOOTER.unpack(tail)[3]:
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
        n = len(memoryview(data).cast("B"))
        self.write_many(disk_id, np.array([offset], np.int64), np.array([n], np.int64), data)

    def write_many(self, disk_id: str, offsets: npt.ArrayLike, lengths: npt.ArrayLike,
                   data: bytes | bytearray | memoryview, *, owner: object = None,
                   rehomed: bool = False) -> None:
        """Record many extents of one disk at once: extent ``i`` is ``lengths[i]`` bytes at
        ``offsets[i]``, the extents' bytes concatenated in ``data``, in write order (a later
        extent wins where two overlap, as with separate :meth:`write` calls).

        Consecutive extents share zstd frames of up to ``FRAME_MAX`` bytes, so scattered small
        writes cost an index row each, not a frame each. Copied before this returns (the caller
        may reuse ``data``), unless ``owner`` is given: then ``data`` is used in place and the
        writer holds a reference to ``owner`` for as long as it may still read ``data`` (the
        caller must not change ``data`` while ``owner`` is alive: a ``batches.Slab`` goes back
        to its pool only when its last reference is dropped). Durable only after
        :meth:`flush`.

        ``rehomed``: the bytes are the base point's own, stored again (``store/compaction.py``;
        the caller's promise, not checked): they are not handed to the tee (a replica of the
        base holds them) and not listed in the point's changed extents (a replica moving on from
        the base need not write them), though the point's maps take them from this cycle. A
        later write over a re-homed range is listed as changed (it wins), an earlier one is
        not (the re-homed bytes win: the base's)."""
        view = memoryview(data).cast("B")
        off = np.asarray(offsets, np.int64).reshape(-1)
        ln = np.asarray(lengths, np.int64).reshape(-1)
        if off.size != ln.size:
            raise InvalidInput("write_many: offsets and lengths differ in number")
        keep = ln > 0
        if not keep.all():
            if (ln < 0).any():
                raise InvalidInput("write_many: negative length")
            off, ln = off[keep], ln[keep]
        total = int(ln.sum())
        if total != len(view):
            raise InvalidInput(f"write_many: extents hold {total} bytes, data has {len(view)}")
        if off.size == 0:
            self._check(disk_id, 0, 0)
            return
        i = self._check(disk_id, int(off.min()), 0)
        if int((off + ln).max()) > self.disk_sizes[disk_id] or int(off.min()) < 0:
            raise InvalidInput(f"a write passes the end of disk {disk_id} "
                               f"({self.disk_sizes[disk_id]} bytes)")
        self.bytes_written += total
        if rehomed:
            self._rehomed[i].append((off.copy(), ln.copy()))
            self.rehomed_bytes += total
        elif self._rehomed[i]:
            self._after_rehomed[i].append((off.copy(), ln.copy()))
        po, pl, fstarts = frame_pieces(off, ln)
        bounds = np.concatenate([fstarts, [po.size]]).tolist()
        ends = np.concatenate([[0], np.cumsum(pl)]).tolist()
        assert self._pool is not None
        # frames are views of the caller's buffer (``owner`` set: kept alive while needed) or
        # of one copy of the whole batch (the caller may reuse its buffer). Zero detection and
        # compression run in the worker threads so this thread only feeds them.
        if owner is None:
            slab = np.empty(total, np.uint8)
            slab[:] = np.frombuffer(view, np.uint8)
            smv, owner = slab.data, slab
        else:
            smv = view
        for a, b in itertools.pairwise(bounds):
            frame = smv[ends[a]:ends[b]]
            level = self._frame_level()
            fut = self._pool.submit(_prepare, frame, po[a:b], pl[a:b], level)
            self._queue.append(_Pending(i, None, fut, owner, disk_id, level, not rehomed))
            self._drain(self._window)

    def _frame_level(self) -> int:
        """The zstd level of the next frame handed to the workers (0: stored raw).

        Adaptive (policy "auto"; store/design.md "Adaptive compression"): a raw frame costs the
        store its bytes and saves the compressors' CPU, so frames go raw only while the
        compressors are the bottleneck. The signal is what the single feeding thread last
        waited for: a frame still being prepared while no sealed pack waited for an upload
        thread (a *CPU wait*, noted by :meth:`_drain`), or an upload (a *store wait*, noted by
        :meth:`_reap`: the uploads in flight are at their cap). A frame goes raw when the last
        wait was a CPU wait, at most ``RAW_RUN`` windows of frames ago, and no pack is queued
        for an upload thread now; otherwise it is compressed (the store is the bottleneck, so
        compressing is free and saves it bytes; or nothing waits for the CPU, e.g. a source
        read or a small delta is the bottleneck). Until one upload has returned the store's
        speed is unknown and every frame is compressed. A switch needs a wait of the other
        kind (a pack's upload, or a frame's preparation), so the choice cannot flip frame by
        frame. Either codec reads back the same bytes."""
        self._frame_no += 1
        if not self.adaptive or self.zstd_level == 0:
            return self.zstd_level
        if self._frame_no - self._stall_at > RAW_RUN * self._window or \
                self._store_wait_at >= self._stall_at:
            return self.zstd_level
        return 0 if self._uploading() <= self.repo.upload_threads else self.zstd_level

    def _uploading(self) -> int:
        """Packs handed to the uploader whose put has not returned."""
        return sum(1 for f, _e in self._uploads if not f.done())

    def write_zero(self, disk_id: str, offset: int, length: int) -> None:
        """Record ``[offset, offset+length)`` as zeros (overrides the base and earlier writes)."""
        i = self._check(disk_id, offset, length)
        if length == 0:
            return
        e = np.zeros(1, ENTRY_DT)
        e["offset"], e["length"], e["disk"], e["codec"] = offset, length, i, ZERO
        if self._rehomed[i]:
            self._after_rehomed[i].append((np.array([offset], np.int64),
                                           np.array([length], np.int64)))
        if self.tee is not None:
            self.tee(disk_id, e, b"")
        self.bytes_written += length
        self.zero_bytes += length
        self._queue.append(_Pending(i, e, None))
        self._drain(self._window)

    def _drain(self, keep: int) -> None:
        """Move finished work, in write order, into the open pack until ``keep`` items remain."""
        while len(self._queue) > keep:
            item = self._queue[0]
            if item.future is not None:
                if keep and self.adaptive and self._stored_one and not item.future.done() and \
                        self._uploading() <= self.repo.upload_threads:
                    self._stall_at = self._frame_no  # waits for the CPU; no pack waits
                e, codec, payload, h, raw = item.future.result()
                e["disk"] = item.disk
                self.zero_bytes += int(e["length"][e["codec"] == ZERO].sum())
                if payload:
                    data = e["codec"] != ZERO
                    e["codec"][data] = codec
                    e["foff"][data] = self._open_size
                    e["flen"][data] = len(payload)
                    e["hash"][data] = np.frombuffer(h, "V16")[0]
                    self._frames.append(payload)
                    if item.level == 0 and self.zstd_level:
                        self.raw_chosen_bytes += len(payload)
                    if isinstance(payload, memoryview):  # stored raw: may point into the batch
                        self._owners.append(item.owner)
                    self._open_size += len(payload)
                if self.tee is not None and item.tee:
                    # the replica's writes wait for the device, not a compression worker
                    self._tee_submit(item.disk_id, e, raw, item.owner)
            else:
                assert item.entries is not None
                e = item.entries
            self._queue.popleft()
            self._open.append(e)
            self._open_entries += e.size
            if self._open_size >= self.repo.pack_target or self._open_entries >= MAX_PACK_ENTRIES:
                self._seal()

    def _tee_submit(self, disk_id: str, e: Entries, raw: bytes | memoryview,
                    owner: object) -> None:
        assert self.tee is not None
        if self._tee_pool is None:
            self._tee_pool = ThreadPoolExecutor(TEE_THREADS,
                                                thread_name_prefix=f"drsite-tee-{self.cycle_id}")
        # ``e`` is not changed after this (the open pack concatenates copies of it)
        self._tees.append(self._tee_pool.submit(_tee_call, self.tee, disk_id, e, raw, owner))
        self._reap_tees(TEE_IN_FLIGHT)

    def _reap_tees(self, keep: int) -> None:
        """Wait for tee calls, oldest first, until at most ``keep`` are pending; raises the
        first error one raised."""
        while len(self._tees) > keep:
            try:
                self._tees[0].result()
            except BaseException:
                self._broken = True  # the tee's copy has a hole: resume with a new writer
                raise
            self._tees.popleft()

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
        frames, owners = self._frames, self._owners
        self._pack_no += 1
        self._frames, self._open, self._open_size, self._open_entries = [], [], 0, 0
        self._owners = []
        assert self._uploader is not None
        self._uploads.append((self._uploader.submit(self._upload, frames, owners, header, e),
                              e))
        self._reap(max(UPLOADS_IN_FLIGHT, self.repo.upload_threads + 1))

    def _upload(self, frames: list[bytes | memoryview], owners: list[object],
                header: dict[str, Any], e: Entries) -> tuple[str, int]:
        with self._bufs_lock:
            buf = self._bufs.pop() if self._bufs else None
        blob = encode_pack(frames, header, e, buf)
        frames.clear()  # copied into the pack: the batches' buffers may be reused now
        owners.clear()
        try:
            rel = f"packs/{self.cycle_id}/{hex_hash(blob)}"
            try:
                self.repo.store.put(self.repo.key(rel), blob)
            except ObjectExists:
                pass  # content-addressed: an earlier attempt landed
            self._stored_one = True
            failpoints.hit("store.pack-stored")
            return rel, len(blob)
        finally:
            # the store is done with the bytes once put returned (the contract copies or
            # writes them): the buffer serves the next pack
            base = blob.obj
            if isinstance(base, np.ndarray):
                with self._bufs_lock:
                    if len(self._bufs) <= self.repo.upload_threads:
                        self._bufs.append(base.base if isinstance(base.base, np.ndarray)
                                          else base)

    def _reap(self, keep: int) -> None:
        """Record finished uploads, in pack order, until at most ``keep`` are in flight."""
        while len(self._uploads) > keep:
            fut, e = self._uploads[0]
            if keep and not fut.done():
                self._store_wait_at = self._frame_no  # the feeder waits for the store
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
        self._reap_tees(0)
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
        e = np.concatenate(parts) if parts else empty_entries()
        if len(parts) > 1:
            parts[:] = [e]  # the same rows, held once (a retried commit finds them here)
        changed = coalesce(e["offset"], e["length"]) if e.size else ExtentList.empty()
        rehomed = self._rehomed[self._disk_idx[disk_id]]
        if rehomed and len(changed):
            # what a later write covers holds that write's bytes: a change
            same = _union(rehomed).subtract(_union(self._after_rehomed[self._disk_idx[disk_id]]))
            changed = changed.subtract(same)
        segs, pieces = split_segments(e, seg)
        del e
        # a cycle written in disk order (the engine's) has its pieces grouped by segment
        # already: slices of them, no reordering copy; otherwise a stable sort (write order
        # kept within a segment)
        order: npt.NDArray[np.int64] | None = None
        if segs.size > 1 and bool((segs[1:] < segs[:-1]).any()):
            order = np.argsort(segs, kind="stable")
            segs = segs[order]
        touched = segs[np.flatnonzero(np.diff(segs, prepend=-1))].tolist()  # sorted: no unique
        if bd and int(bd["size"]) > size and nseg:
            touched = sorted(set(touched) | {nseg - 1})  # shrink: clip the new last segment
        new: list[tuple[str, bytes]] = []
        pending: deque[tuple[int, SegMap, Future[tuple[str | None, int]]]] = deque()
        level = max(1, repo.zstd_level)
        assert self._pool is not None

        def settle(keep: int) -> None:
            """Take the stored maps, in segment order, until ``keep`` are left in flight."""
            while len(pending) > keep:
                s_, m_, fut = pending.popleft()
                rel, n = fut.result()
                if rel is None:
                    continue  # same content as the base: keeps its key
                keys[s_] = rel
                self._maps_stored[0] += 1
                self._maps_stored[1] += n
                # stored: the next cycle's base map, not read back and decompressed
                repo._cache_map(rel, m_)

        tarr = np.asarray(touched, np.int64)
        firsts = np.searchsorted(segs, tarr, "left").tolist()
        lasts = np.searchsorted(segs, tarr, "right").tolist()
        for s, a, b in zip(touched, firsts, lasts, strict=True):
            lo, hi = s * seg, min((s + 1) * seg, size)
            mine = pieces[a:b] if order is None else pieces[order[a:b]]  # not changed below
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
            packs = list(bm.packs) if bm is not None else []
            r = overlay(bm.entries if bm is not None else empty_entries(), mine, lo, hi,
                        len(packs))
            if r.size == 0:
                keys[s] = None
                continue
            all_packs = packs + self.pack_keys
            # the packs this segment uses, renumbered in order (np.unique(return_inverse)
            # without its sort: pack numbers are small, a segment's rows many)
            pk = r["pack"].astype(np.int64)
            present = np.zeros(len(all_packs), bool)
            present[pk] = True
            used = np.flatnonzero(present)
            r["pack"] = (np.cumsum(present) - 1)[pk].astype(np.uint32)
            r["disk"] = 0
            m = SegMap(r, [all_packs[int(u)] for u in used])
            pending.append((s, m, self._pool.submit(self._store_map, m, level, old)))
            settle(2 * repo.threads)  # the next segments are resolved while these are stored
        settle(0)
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
            blob = encode_blob("table", {"n": len(chunk)},
                                compressor(max(1, repo.zstd_level)).compress(canonical_json(chunk)))
            rel = f"maps/{self.cycle_id}/{hex_hash(blob)}"
            tables.append(rel)
            new.append((rel, blob))
        entry: dict[str, Any] = {"size": size, "segment_size": seg, "tables": tables,
                                 "changed": None, "changed_key": None}
        if len(changed) <= INLINE_CHANGES:
            entry["changed"] = changed.to_pairs()
        else:
            pairs = np.stack([changed.starts, changed.lengths], axis=1).astype("<i8")
            blob = encode_blob("changes", {"n": len(changed)},
                                compressor(max(1, repo.zstd_level)).compress(pairs.tobytes()))
            rel = f"maps/{self.cycle_id}/{hex_hash(blob)}"
            entry["changed_key"] = rel
            new.append((rel, blob))
        return entry, new

    def _store_map(self, m: SegMap, level: int, old: str | None) -> tuple[str | None, int]:
        """Encode and store a segment map (a worker thread's job: zstd, blake3 and the store
        drop the GIL); returns its key and size, or (None, 0) if it is ``old``'s content.
        Maps are content-addressed objects of the staged cycle: storing them before the
        manifest is safe (GC keeps a staged cycle's objects, a retry finds them stored)."""
        blob = encode_blob("map", {"packs": m.packs}, compressor(level).compress(m.entries.data))
        h = hex_hash(blob)
        if old is not None and old.rsplit("/", 1)[-1] == h:
            return None, 0
        return self._put_map(blob), len(blob)

    def _put_map(self, data: bytes) -> str:
        """Store a map, table or changed-extent list of this cycle under its content address."""
        rel = f"maps/{self.cycle_id}/{hex_hash(data)}"
        try:
            self.repo.store.put(self.repo.key(rel), data)
        except ObjectExists:
            pass  # content-addressed: same key, same bytes
        return rel

    def _next_seq(self) -> int:
        """One past the highest point sequence number ever used (points and ``seq`` marker)."""
        repo = self.repo
        ids = repo._point_ids()
        top = int(ids[-1][1:]) if ids else 0
        try:
            top = max(top, int(repo.store.get(repo.key("seq")).decode().strip() or 0))
        except ObjectNotFound:
            pass
        except ValueError as exc:
            raise CorruptData(f"sequence marker {repo.key('seq')} is damaged") from exc
        return top + 1

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
        self._maps_stored = [0, 0]
        for d in self.disk_ids:
            disks[d], objs = self._disk_maps(d, base_body)
            new.extend(objs)
        assert self._pool is not None
        for _ in self._pool.map(lambda kv: self._put_map(kv[1]), new):
            pass
        meta_bytes = sum(len(b) for _, b in new) + self._maps_stored[1]
        stats = {"zero_bytes": self.zero_bytes, "packs": len(self.pack_keys),
                 "metadata_bytes": meta_bytes,
                 "new_objects": len(new) + self._maps_stored[0] + len(self.pack_keys)}
        if self.adaptive:
            stats["raw_chosen_bytes"] = self.raw_chosen_bytes  # (this writer's, not a resumed part's)
        for _attempt in range(8):
            seq = self._next_seq()
            pid = f"p{seq:012d}"
            body = {"format": 1, "point_id": pid, "item_id": repo.item_id, "seq": seq,
                    "created_at": float(created_at), "consistency": Consistency(consistency).value,
                    "kind": self.kind, "cycle_id": self.cycle_id, "base_point_id": self.base,
                    # the cycle's changes (what the dashboard's change rate sums)
                    "disk_sizes": dict(self.disk_sizes),
                    "bytes_written": self.bytes_written - self.rehomed_bytes,
                    "bytes_stored": self.bytes_stored + meta_bytes,
                    "meta": {**(meta or {}), "stats": stats}, "disks": disks}
            canon = canonical_json(body)
            env: dict[str, Any] = {"blake3": hex_hash(canon), "body": body}
            if repo.auth is not None:
                env["mac"] = repo.auth.mac(MANIFEST, canon)
            blob = canonical_json(env)
            repo.store.put(repo.key("seq"), str(seq).encode(), overwrite=True)
            failpoints.hit("store.before-manifest")
            try:
                repo.store.put(repo.key(f"points/{pid}"), blob)
            except ObjectExists:
                repo._forget(f"points/{pid}")
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
        if self._tee_pool is not None:
            # calls already running finish (the tee's target may close once this returns)
            self._tee_pool.shutdown(wait=True, cancel_futures=True)
            self._tee_pool = None
            self._tees.clear()
        if self._uploader is not None:
            # uploads already running finish (a pack is whole or absent); queued ones are dropped
            self._uploader.shutdown(wait=True, cancel_futures=True)
            self._uploader = None
            self._uploads.clear()

    def __enter__(self) -> PointWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def reopen(repo: Catalog, cycle_id: str, marker: dict[str, Any]) -> PointWriter:
    """The writer of a staged cycle, rebuilt from its staging marker and its packs' trailers."""
    w = PointWriter(repo, cycle_id, marker["base"],
                    {str(k): int(v) for k, v in marker["disk_sizes"].items()}, str(marker["kind"]))
    try:
        w._load_packs()
    except BaseException:
        w.close()
        raise
    return w
