"""Reading a cycle's extents in batches, with read-ahead: what keeps the disk busy while the
engine compresses and stores (``replication/design.md``, "Data path")."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from drsite.core.extents import I64, ExtentList
from drsite.hypervisors.contract import DiskReader, VectorDiskReader

READ_AHEAD_BATCHES = 3
MAX_BATCH_EXTENTS = 4096


def read_batches(reader: DiskReader, extents: ExtentList, batch_bytes: int
                 ) -> Iterator[tuple[I64, I64, memoryview]]:
    """Yield ``(offsets, lengths, data)`` batches covering ``extents`` in order (``data`` = the
    batch's extents concatenated; about ``batch_bytes`` and at most ``MAX_BATCH_EXTENTS``
    extents each), while up to ``READ_AHEAD_BATCHES`` batches are read by worker threads: reads
    overlap with compressing and storing, and small random reads get queue depth. A
    :class:`VectorDiskReader` reads a batch in one call; no Python object is made per extent.
    Buffers are reused: a yielded view is valid only until the next batch is asked for
    (``PointWriter.write_many`` copies what it keeps)."""
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
    free: list[bytearray] = [bytearray(0) for _ in range(READ_AHEAD_BATCHES + 1)]

    def read(a: int, b: int, buf: bytearray) -> tuple[bytearray, I64, I64, memoryview]:
        offs, lens = starts[a:b], lengths[a:b]
        total = int(ends[b - 1]) - (int(ends[a - 1]) if a else 0)
        if len(buf) < total:
            buf = bytearray(total)
        mv = memoryview(buf)[:total]
        if vector is not None:
            vector.readv(offs, lens, mv)
        else:
            pos = 0
            for off, n in zip(offs.tolist(), lens.tolist(), strict=True):
                reader.readinto(off, mv[pos:pos + n])
                pos += n
        return buf, offs, lens, mv

    with ThreadPoolExecutor(READ_AHEAD_BATCHES, thread_name_prefix="drsite-read") as pool:
        pending: deque[Future[tuple[bytearray, I64, I64, memoryview]]] = deque()
        nxt = 0
        try:
            while nxt < len(cuts) - 1 or pending:
                while nxt < len(cuts) - 1 and len(pending) < READ_AHEAD_BATCHES:
                    pending.append(pool.submit(read, cuts[nxt], cuts[nxt + 1], free.pop()))
                    nxt += 1
                buf, offs, lens, mv = pending.popleft().result()
                yield offs, lens, mv
                free.append(buf)  # consumed: the next submitted read may reuse it
        finally:
            for f in pending:
                f.cancel()
