"""Byte-for-byte comparison of two disk readers over chosen ranges (a replica image against a
point, an image against the stopped source): batches of many extents, one ``readv`` per side,
numpy comparison; no loop or array sized by the disk.

Responsible for: saying in how many blocks two readers differ over the ranges asked. Not
responsible for: choosing the ranges (:func:`blocks_differ` takes every byte either side lists
as data; a replica's incremental verification takes what changed since it was last verified)."""

from __future__ import annotations

from typing import Protocol

import numpy as np
import numpy.typing as npt

from drsite.core.errors import BrokenChain, CorruptData, ObjectNotFound
from drsite.core.extents import ExtentList

BLOCK = 64 * 1024           # the unit differences are counted in


class Readable(Protocol):
    @property
    def size(self) -> int: ...

    def readinto(self, offset: int, buf: memoryview) -> None: ...

    def data_extents(self) -> ExtentList: ...


COMPARE_BYTES = 4 << 20     # bytes of each side a comparison batch holds
COMPARE_EXTENTS = 512       # extents per batch: a batch's map lookups stay O(batch) numpy work


def _read_batch(r: Readable, offs: npt.NDArray[np.int64], lens: npt.NDArray[np.int64],
                buf: memoryview) -> None:
    """Fill ``buf`` with the extents, concatenated: one ``readv`` when the reader has one (a
    point reader, an image), else one ``readinto`` per extent."""
    readv = getattr(r, "readv", None)
    if readv is not None:
        readv(offs, lens, buf)
        return
    pos = 0
    for off, n in zip(offs.tolist(), lens.tolist(), strict=True):
        r.readinto(off, buf[pos:pos + n])
        pos += n


def compare_batches(extents: ExtentList) -> list[tuple[int, int]]:
    """``[lo, hi)`` index ranges cutting ``extents`` (each at most ``COMPARE_BYTES`` long) into
    batches of at most ``COMPARE_BYTES`` bytes and ``COMPARE_EXTENTS`` extents, in order."""
    out: list[tuple[int, int]] = []
    lo = total = 0
    for i, n in enumerate(extents.lengths.tolist()):
        if i > lo and (total + n > COMPARE_BYTES or i - lo >= COMPARE_EXTENTS):
            out.append((lo, i))
            lo, total = i, 0
        total += n
    if lo < len(extents):
        out.append((lo, len(extents)))
    return out


def blocks_differ(a: Readable, b: Readable, *, block: int = BLOCK) -> int:
    """Number of ``block``-sized blocks in which two readers of equal size differ.

    Every byte either side lists as data (``data_extents``) is read on both sides and compared;
    everything else reads as zeros on both (the readers' contract), so equal there without
    reading. An extent either side cannot read intact (``CorruptData``, ``BrokenChain``,
    ``ObjectNotFound``) differs in all its blocks."""
    size = a.size
    if size != b.size:
        return max(1, (max(size, b.size) + block - 1) // block)
    return ranges_differ(a, b, a.data_extents().union(b.data_extents()), block=block)


def ranges_differ(a: Readable, b: Readable, ranges: ExtentList, *, block: int = BLOCK) -> int:
    """Number of ``block``-sized blocks of ``ranges`` in which two readers of equal size
    differ (both read over ``ranges`` only, in batches; unreadable extents differ in every
    block they touch)."""
    size = a.size
    if size != b.size:
        return max(1, (max(size, b.size) + block - 1) // block)
    ext = ranges.clip(size).split(COMPARE_BYTES)
    if len(ext) == 0:
        return 0
    buf_a, buf_b = bytearray(COMPARE_BYTES), bytearray(COMPARE_BYTES)
    va, vb = np.frombuffer(buf_a, np.uint8), np.frombuffer(buf_b, np.uint8)
    differ: list[npt.NDArray[np.int64]] = []
    for lo, hi in compare_batches(ext):
        offs, lens = ext.starts[lo:hi], ext.lengths[lo:hi]
        n = int(lens.sum())
        try:
            _read_batch(a, offs, lens, memoryview(buf_a)[:n])
            _read_batch(b, offs, lens, memoryview(buf_b)[:n])
        except (CorruptData, BrokenChain, ObjectNotFound):
            differ.append(_unreadable_blocks(a, b, offs, lens, block))
            continue
        ne = va[:n] != vb[:n]
        if not ne.any():
            continue
        at = np.flatnonzero(ne)
        pos = np.cumsum(lens) - lens
        i = np.searchsorted(pos, at, "right") - 1
        differ.append(np.unique((offs[i] + (at - pos[i])) // block))
    return int(np.unique(np.concatenate(differ)).size) if differ else 0


def _unreadable_blocks(a: Readable, b: Readable, offs: npt.NDArray[np.int64],
                       lens: npt.NDArray[np.int64], block: int) -> npt.NDArray[np.int64]:
    """A batch that failed to read: compare it extent by extent; an extent that cannot be
    read intact on either side differs in every block it touches."""
    out: list[npt.NDArray[np.int64]] = []
    for off, n in zip(offs.tolist(), lens.tolist(), strict=True):
        one = ExtentList(np.array([off], np.int64), np.array([n], np.int64))
        x, y = bytearray(n), bytearray(n)
        try:
            a.readinto(off, memoryview(x))
            b.readinto(off, memoryview(y))
        except (CorruptData, BrokenChain, ObjectNotFound):
            out.append(one.blocks(block))
            continue
        ne = np.flatnonzero(np.frombuffer(x, np.uint8) != np.frombuffer(y, np.uint8))
        if ne.size:
            out.append(np.unique((off + ne) // block))
    return np.concatenate(out) if out else np.zeros(0, np.int64)
