"""Copy-before-write of a file VM's disk while a sealed cycle is read (guest side): the first
guest write to a block the cycle's frozen view covers copies that block's old data into the
cycle's fleece file (and, in the packed layout, its block number into the slot index) and sets
its byte in the shared bitmap, in that order, before the write reaches the disk (readers check
the bitmap after reading the disk: see ``design.md``).
"""

from __future__ import annotations

import mmap
import os
import threading
from array import array
from bisect import bisect_right
from contextlib import suppress
from pathlib import Path

import numpy as np
import numpy.typing as npt

from drsite.core.errors import TrackingLost, classify_os_error
from drsite.core.extents import ExtentList
from drsite.hypervisors.file.layout import CBW_BLOCK, GRANULE
from drsite.imagefile import pwrite_all

_ZEROS = memoryview(bytes(1 << 20))
# one slot index entry: 1 + the block number (little-endian int64) of the fleece's slot at its
# place; 0 (a hole: a slot taken by a copy that failed before its entry landed) names no block
SLOT_ENTRY = 8


def granule_count(size: int) -> int:
    return (size + GRANULE - 1) // GRANULE


def all_zero(b: bytes) -> bool:
    return _ZEROS[:len(b)] == b if len(b) <= len(_ZEROS) else b.count(0) == len(b)


def granule_mask(extents: ExtentList, size: int) -> bytearray:
    """One byte per 64 KiB granule: 1 where ``extents`` touch it."""
    m = np.zeros(granule_count(size), dtype=np.uint8)
    b = extents.clip(size).blocks(GRANULE)
    m[b] = 1
    return bytearray(m.tobytes())


class CopyBeforeWrite:
    """Copy-before-write state of one disk for one sealed cycle (guest side).

    ``mask`` (one byte per 64 KiB granule) names the granules the cycle's view protects; None
    means every granule (a full or untrusted cycle is read whole). Preservation is per
    ``block`` (4 KiB; 64 KiB in cycles sealed before blocks were introduced): the first write to
    a protected block copies that block only, so a 4 KiB write costs a 4 KiB copy, not 64 KiB.
    The bitmap file holds one byte per block and is shared through ``mmap`` (what the reader
    maps too); a set byte is visible to every reader of the file as soon as it is stored.

    Fleece layouts: with ``slots`` (the packed layout, cycles whose record has ``cbw_slots``)
    preserved blocks are appended to the fleece in the order they are copied — slot k at
    ``k * block`` — and the ``slots`` file says which block each slot holds (one little-endian
    int64 per slot, the block + 1: an entry never written reads 0, no block). Without it, a
    block is kept at its own offset in a sparse fleece the disk's size: scattered 4 KiB blocks
    there made a fleece of ~250,000 extents per GB whose unlink at release took 16-20 s on ext4
    with online discard (the packed one: ~0.3 s).
    """

    def __init__(self, disk_fd: int, size: int, fleece: Path, bitmap: Path,
                 mask: bytearray | None, block: int = CBW_BLOCK,
                 exact: ExtentList | None = None, slots: Path | None = None) -> None:
        self.disk_fd = disk_fd
        self.size = size
        self.mask = mask
        self.block = block
        self._per_granule = max(1, GRANULE // block)
        # ``exact`` (the cycle's changed extents, with ``mask``): only blocks the view is read
        # over are preserved. A dirty granule's other blocks were not written in the cycle, so
        # they are mostly not in the page cache: copying them cost the guest a disk read each.
        self._lo: array[int] | None = None
        self._hi: array[int] | None = None
        if mask is not None and exact is not None:
            blocks = exact.align(block, size)
            self._lo = array("q", (blocks.starts // block).tolist())
            self._hi = array("q", (-(-blocks.ends // block)).tolist())
        n = (size + block - 1) // block
        self.fleece_fd = self.bitmap_fd = self.slots_fd = -1
        self.next_slot = 0   # packed layout: the slot the next preserved block takes
        try:
            self.fleece_fd = os.open(fleece, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            self.bitmap_fd = os.open(bitmap, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            if slots is not None:
                # resumed after a guest restart: slots listed are taken (one whose block's
                # bitmap byte was never set is an orphan, never read: its block was not
                # written, so preserving it again to a later slot copies the same bytes)
                self.slots_fd = os.open(slots, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                have = os.fstat(self.slots_fd).st_size
                self.next_slot = have // SLOT_ENTRY
                if have % SLOT_ENTRY:
                    os.ftruncate(self.slots_fd, self.next_slot * SLOT_ENTRY)
                # bytes past the listed slots are a copy whose entry was never appended: cut
                # them, so an all-zero block given that slot later reads as the hole it is
                if os.fstat(self.fleece_fd).st_size > self.next_slot * block:
                    os.ftruncate(self.fleece_fd, self.next_slot * block)
            elif os.fstat(self.fleece_fd).st_size != size:
                os.ftruncate(self.fleece_fd, size)
            if os.fstat(self.bitmap_fd).st_size != n:
                os.ftruncate(self.bitmap_fd, n)
            self.done = mmap.mmap(self.bitmap_fd, n)
        except OSError as e:
            self._close_fds()
            raise classify_os_error(e, f"copy-before-write files {fleece}") from e
        self.copied = n - self.done[:].count(0)
        self._dirty = False

    def before_write(self, offset: int, length: int) -> None:
        bs, done, mask = self.block, self.done, self.mask
        b0, b1 = offset // bs, (offset + length - 1) // bs
        if b0 == b1:  # the common case: one block, no numpy
            if done[b0] or (mask is not None and not mask[b0 // self._per_granule]):
                return
            if self._lo is not None and self._hi is not None:
                i = bisect_right(self._lo, b0) - 1
                if i < 0 or b0 >= self._hi[i]:
                    return
            self._preserve(b0, b0 + 1)
            return
        cur = done[b0:b1 + 1]
        if cur.count(0) == 0:
            return
        need = np.frombuffer(cur, np.uint8) == 0
        if mask is not None:
            blocks = np.arange(b0, b1 + 1)
            need &= np.frombuffer(mask, np.uint8)[blocks // self._per_granule] != 0
            if self._lo is not None and self._hi is not None and len(self._lo):
                lo = np.frombuffer(self._lo, np.int64)
                hi = np.frombuffer(self._hi, np.int64)
                k = np.searchsorted(lo, blocks, "right") - 1
                need &= (k >= 0) & (blocks < hi[np.clip(k, 0, None)])
            elif self._lo is not None:
                need[:] = False
        idx = np.flatnonzero(need)
        if idx.size == 0:
            return
        brk = np.flatnonzero(np.diff(idx) != 1)
        firsts = np.concatenate([idx[:1], idx[brk + 1]]) + b0
        lasts = np.concatenate([idx[brk], idx[-1:]]) + b0
        for a, b in zip(firsts.tolist(), lasts.tolist(), strict=True):
            self._preserve(a, b + 1)

    def _preserve(self, a: int, b: int) -> None:
        """Preserve blocks ``[a, b)``. Order matters (readers check the bitmap AFTER reading
        the disk): the old data is in the fleece (and its slots in the index) before the bytes
        are set, and the bytes are set before the caller changes the disk."""
        lo, hi = a * self.block, min(b * self.block, self.size)
        old = os.pread(self.disk_fd, hi - lo, lo)
        if self.slots_fd >= 0:
            # the slots are taken before anything is written: a copy that fails half-way (a
            # full disk) leaves them unlisted, never reused — a later all-zero block given
            # one of them would read that copy's bytes through its hole
            s = self.next_slot
            self.next_slot = s + (b - a)
            if not all_zero(old):   # all-zero blocks stay holes (slots are written once)
                pwrite_all(self.fleece_fd, old, s * self.block)
            pwrite_all(self.slots_fd, np.arange(a + 1, b + 1, dtype="<i8").tobytes(),
                       s * SLOT_ENTRY)
        elif not all_zero(old):
            pwrite_all(self.fleece_fd, old, lo)  # all-zero blocks stay holes in the fleece
        self.done[a:b] = b"\x01" * (b - a)
        self.copied += b - a
        self._dirty = True

    def flush(self) -> None:
        if self._dirty:
            os.fsync(self.fleece_fd)
            if self.slots_fd >= 0:
                os.fsync(self.slots_fd)
            self.done.flush()  # msync: the bitmap's pages
            os.fsync(self.bitmap_fd)
            self._dirty = False

    def close(self, *, sync: bool) -> None:
        if self.fleece_fd < 0:
            return
        if sync:
            self.flush()
        self.done.close()
        self._close_fds()

    def _close_fds(self) -> None:
        for fd in (self.fleece_fd, self.bitmap_fd, self.slots_fd):
            if fd >= 0:
                with suppress(OSError):
                    os.close(fd)
        self.fleece_fd = self.bitmap_fd = self.slots_fd = -1


SLOT_MERGE_MIN = 4096   # recent slot entries a reader keeps apart before merging
_Slots = tuple[npt.NDArray[np.int64], npt.NDArray[np.uint32]]   # (blocks sorted, slot + 1)
_NO_SLOTS: _Slots = (np.empty(0, np.int64), np.empty(0, np.uint32))


class SlotIndex:
    """A reader's view of a packed fleece's slot index: block → slot, loaded as it grows.

    The guest appends a slot's entry before it sets the block's bitmap byte, so a reader that
    saw the byte finds the entry by reading what was appended since it last looked. A block
    listed twice (its first copy orphaned by a guest restart, or a failed write, before the byte
    was set) may map to either slot: both hold its pre-seal bytes whole (the entry is appended
    only after the copy).

    Kept as sorted arrays of (block, slot + 1) — 12 bytes per listed slot, whatever the disk's
    size: a per-block table of a 1 TiB disk touched a page per scattered preserved block (up to
    4 KiB each, hundreds of MiB under heavy random writes). Two levels: what was loaded lately
    (small, re-sorted on each load) and the rest, merged into it once the recent part passes an
    eighth of it (amortised O(n log n)). Thread-safe (a reader's read-ahead threads share it):
    a load replaces each level's pair of arrays in one assignment, the older level first, and a
    lookup that misses looks again after taking the load's lock."""

    def __init__(self, fd: int, blocks: int) -> None:
        self._fd = fd
        self._blocks = blocks
        self._old: _Slots = _NO_SLOTS
        self._new: _Slots = _NO_SLOTS
        self._loaded = 0   # entries read so far
        self._lock = threading.Lock()   # one load at a time: each reads from ``_loaded`` on

    def offset(self, block: int, block_size: int) -> int:
        """Where ``block``'s preserved bytes start in the fleece. ``TrackingLost`` if the
        index does not list it (a damaged or truncated index: the view cannot be trusted)."""
        s = self._slot(block)
        if not s:
            with self._lock:
                self._load()
            s = self._slot(block)
            if not s:
                raise TrackingLost(f"the copy-before-write slot index lists no slot for block "
                                   f"{block} its bitmap marks preserved")
        return (s - 1) * block_size

    def _slot(self, block: int) -> int:
        """``block``'s slot + 1 as loaded so far; 0 if none."""
        for keys, vals in (self._new, self._old):
            i = int(np.searchsorted(keys, block))
            if i < keys.size and keys[i] == block:
                return int(vals[i])
        return 0

    @property
    def listed(self) -> int:
        """Slots loaded so far (holes and damaged entries not counted)."""
        return int(self._old[0].size + self._new[0].size)

    def _load(self) -> None:
        n = os.fstat(self._fd).st_size // SLOT_ENTRY
        if n <= self._loaded:
            return
        raw = os.pread(self._fd, (n - self._loaded) * SLOT_ENTRY, self._loaded * SLOT_ENTRY)
        got = len(raw) // SLOT_ENTRY
        if self._loaded + got >= 2**32 - 1:
            raise TrackingLost("the copy-before-write slot index lists more slots than a "
                               "reader can hold (2^32 - 2)")
        blocks = np.frombuffer(raw, "<i8", got) - 1
        slot1 = np.arange(self._loaded + 1, self._loaded + 1 + got, dtype=np.uint32)
        # a hole (-1: a slot whose copy failed before its entry) or damage names no block
        ok = (blocks >= 0) & (blocks < self._blocks)
        parts = [self._new, (blocks[ok], slot1[ok])]
        merge = self._new[0].size + int(ok.sum()) > max(SLOT_MERGE_MIN, self._old[0].size // 8)
        if merge:
            parts.insert(0, self._old)
        keys = np.concatenate([k for k, _ in parts])
        order = np.argsort(keys, kind="stable")
        level = (keys[order], np.concatenate([v for _, v in parts])[order])
        if merge:
            self._old, self._new = level, _NO_SLOTS   # the older level first (see above)
        else:
            self._new = level
        self._loaded += got
