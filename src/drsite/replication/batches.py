"""Reading a cycle's extents in batches, with read-ahead: what keeps the disk busy while the
engine compresses and stores (``replication/design.md``, "Data path")."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import numpy.typing as npt

from drsite.core.extents import I64, ExtentList
from drsite.hypervisors.contract import DiskReader, VectorDiskReader

READ_AHEAD_BATCHES = 3
MAX_BATCH_EXTENTS = 4096
ALIGN = 4096
KEEP_FREE_SLABS = 8  # free batch buffers a pool keeps for reuse (more are freed)


class Slab:
    """One batch's buffer, lent by a :class:`SlabPool`: it goes back to the pool when its last
    reference is dropped (whoever holds it last: the engine, or a point writer that kept it
    while its frames still pointed into it), so a buffer is reused only once nobody reads it."""

    __slots__ = ("_pool", "array")

    def __init__(self, array: npt.NDArray[np.uint8], pool: SlabPool) -> None:
        self.array = array
        self._pool: SlabPool | None = pool

    def __del__(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.give_back(self.array)


class SlabPool:
    """Reused batch buffers: fresh memory costs a page fault per 4 KiB on first touch, which
    made a copy's worth of kernel work per byte shipped. Thread-safe."""

    def __init__(self, size: int, keep: int = KEEP_FREE_SLABS) -> None:
        self.size = size
        self.keep = keep
        self._free: list[npt.NDArray[np.uint8]] = []
        self._lock = threading.Lock()

    def take(self, n: int) -> Slab:
        """A slab of at least ``n`` bytes (contents undefined)."""
        with self._lock:
            arr = self._free.pop() if self._free else None
        if arr is None or arr.size < n:
            m = max(n, self.size)
            base = np.empty(m + ALIGN, np.uint8)
            at = -base.ctypes.data % ALIGN
            arr = base[at:at + m]  # page-aligned (direct I/O can write from it)
        return Slab(arr, self)

    def give_back(self, arr: npt.NDArray[np.uint8]) -> None:
        with self._lock:
            if len(self._free) < self.keep:
                self._free.append(arr)


def read_batches(reader: DiskReader, extents: ExtentList, batch_bytes: int,
                 pool: SlabPool | None = None) -> Iterator[tuple[I64, I64, memoryview, Slab]]:
    """Yield ``(offsets, lengths, data, slab)`` batches covering ``extents`` in order (``data``
    = the batch's extents concatenated, a view of ``slab``; about ``batch_bytes`` and at most
    ``MAX_BATCH_EXTENTS`` extents each), while up to ``READ_AHEAD_BATCHES`` batches are read by
    worker threads: reads overlap with compressing and storing, and small random reads get
    queue depth. A :class:`VectorDiskReader` reads a batch in one call; no Python object is
    made per extent. ``data`` stays valid and unchanged while ``slab`` is referenced (pass it
    as ``owner`` to ``PointWriter.write_many``, which then needs no copy); buffers come from
    ``pool`` (default: one for this call) and are reused once released."""
    starts, lengths = extents.starts, extents.lengths
    if starts.size == 0:
        return
    ends = np.cumsum(lengths)
    cuts = [0]
    while cuts[-1] < starts.size:
        i = cuts[-1]
        base = int(ends[i - 1]) if i else 0
        j = int(np.searchsorted(ends, base + batch_bytes, "right"))
        cuts.append(min(max(j, i + 1), i + MAX_BATCH_EXTENTS))
    vector = reader if isinstance(reader, VectorDiskReader) else None
    slabs = pool if pool is not None else SlabPool(batch_bytes)

    def read(a: int, b: int) -> tuple[I64, I64, memoryview, Slab]:
        offs, lens = starts[a:b], lengths[a:b]
        total = int(ends[b - 1]) - (int(ends[a - 1]) if a else 0)
        slab = slabs.take(total)
        mv = slab.array.data[:total]
        if vector is not None:
            vector.readv(offs, lens, mv)
        else:
            pos = 0
            for off, n in zip(offs.tolist(), lens.tolist(), strict=True):
                reader.readinto(off, mv[pos:pos + n])
                pos += n
        return offs, lens, mv, slab

    with ThreadPoolExecutor(READ_AHEAD_BATCHES, thread_name_prefix="drsite-read") as pool_:
        pending: deque[Future[tuple[I64, I64, memoryview, Slab]]] = deque()
        nxt = 0
        try:
            while nxt < len(cuts) - 1 or pending:
                while nxt < len(cuts) - 1 and len(pending) < READ_AHEAD_BATCHES:
                    pending.append(pool_.submit(read, cuts[nxt], cuts[nxt + 1]))
                    nxt += 1
                item = pending.popleft().result()
                yield item
                del item  # the consumer's references decide when the slab is reused
        finally:
            for f in pending:
                f.cancel()
