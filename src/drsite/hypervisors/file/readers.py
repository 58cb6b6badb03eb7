"""The frozen view of a sealed cycle, the file driver's own disk reader (a live disk is read
with :class:`~drsite.imagefile.RawImageReader`, a copy-on-write disk with
:class:`~drsite.hypervisors.file.cow.CowDiskReader`).

The frozen-view read order is the mirror of the guest's write order (see ``design.md``): read
the disk, THEN read the copy-before-write bitmap, then re-read the preserved granules from the
fleece. Any post-seal data the disk read saw implies its bitmap byte was already set. The
bitmap is read through a shared read-only ``mmap`` of the guest's file: a byte the guest set
is in the page cache page that the mapping shows, so no syscall per extent is needed. In the
packed fleece layout a preserved block's place in the fleece comes from the slot index, which
the guest appended before setting the byte.
"""

from __future__ import annotations

import mmap
import os
from contextlib import suppress
from pathlib import Path

import numpy as np
import numpy.typing as npt

from drsite.core.errors import InvalidInput, NotFound, classify_os_error
from drsite.core.extents import ExtentList, blocks_to_extents
from drsite.hypervisors.file.cbw import SlotIndex
from drsite.hypervisors.file.layout import GRANULE
from drsite.imagefile import RawImageReader, pread_full, sparse_data_extents


def _open_ro(path: Path, what: str) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NotFound(f"{what}: {path} is gone") from None
    except OSError as e:
        raise classify_os_error(e, what) from e


class CycleDiskReader(RawImageReader):
    """The frozen view of one disk at a seal: live disk patched with preserved blocks.

    Frozen over every block the copy-before-write protects: the cycle's changed extents for a
    trusted cycle, the whole disk for an untrusted one. ``block`` is the cycle's
    copy-before-write block (the bitmap holds one byte per block); ``slots``: the cycle's slot
    index when its fleece is packed (``cbw.CopyBeforeWrite``). Open descriptors keep working
    after a release, but the guest then stops preserving: read before releasing.
    """

    def __init__(self, disk: Path, fleece: Path, bitmap: Path, size: int,
                 block: int = GRANULE, *, whole: bool = False,
                 slots: Path | None = None) -> None:
        super().__init__(disk, size)
        # Keep the guest's page cache free of the large folios our reads would leave: on Linux
        # a small write into a large cached folio dirties (and writes back) all of it, and the
        # guest's 4 KiB random writes ran 10-30x slower after an initial copy. A view read
        # ``whole`` (initial copy, resync) reads ahead and drops what it read behind it; a
        # delta's scattered extents are read without readahead.
        self._drop_behind = whole
        with suppress(OSError, AttributeError):
            os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_SEQUENTIAL if whole
                             else os.POSIX_FADV_RANDOM)
        self._block = block
        self._fleece = self._bitmap = self._slots = -1
        self._map: mmap.mmap | None = None
        self._index: SlotIndex | None = None
        try:
            self._fleece = _open_ro(fleece, "cycle fleece (cycle released?)")
            self._bitmap = _open_ro(bitmap, "cycle bitmap (cycle released?)")
            n = (size + block - 1) // block
            if slots is not None:
                self._slots = _open_ro(slots, "cycle slot index (cycle released?)")
                self._index = SlotIndex(self._slots, n)
            if n:
                if os.fstat(self._bitmap).st_size < n:
                    raise NotFound(f"cycle bitmap {bitmap} is shorter than the disk")
                self._map = mmap.mmap(self._bitmap, n, prot=mmap.PROT_READ)
        except OSError as e:
            self.close()
            raise classify_os_error(e, "opening frozen view") from e
        except BaseException:
            self.close()
            raise

    def readinto(self, offset: int, buf: memoryview) -> None:
        n = len(buf)
        self._check(offset, n)
        if n == 0:
            return
        self.readv(np.array([offset], np.int64), np.array([n], np.int64), buf)

    def readv(self, offsets: npt.NDArray[np.int64], lengths: npt.NDArray[np.int64],
              buf: memoryview) -> None:
        """Read many extents into ``buf`` (their bytes concatenated, in order): every extent from
        the disk first, THEN the bitmap bytes of all their blocks, then the preserved blocks
        from the fleece. The one read order of :meth:`readinto` holds for each extent, so a
        batch costs one syscall per extent plus one per preserved run."""
        mv = buf.cast("B") if buf.format != "B" else buf
        offs, lens = offsets.tolist(), lengths.tolist()
        if not offs:
            return
        if self._fd < 0:
            raise InvalidInput(f"the reader of {self.path} is closed")
        if min(offs) < 0 or max(o + n for o, n in zip(offs, lens, strict=True)) > self._size:
            raise InvalidInput(f"a read passes the end of {self.path} ({self._size} bytes)")
        fd = self._fd
        try:
            pos = 0
            for off, n in zip(offs, lens, strict=True):  # 1. the disk
                piece = mv[pos:pos + n]
                if os.preadv(fd, [piece], off) != n:
                    pread_full(fd, piece, off)
                if self._drop_behind:
                    with suppress(OSError):
                        os.posix_fadvise(fd, off, n, os.POSIX_FADV_DONTNEED)
                pos += n
            if self._map is None:
                return
            bs = self._block
            b0 = offsets // bs
            b1 = (offsets + lengths - 1) // bs
            cnt = b1 - b0 + 1
            if int(cnt.max()) == 1:
                blocks, owner = b0, np.arange(b0.size)
            else:
                owner = np.repeat(np.arange(b0.size), cnt)
                blocks = b0[owner] + (np.arange(int(cnt.sum()))
                                      - np.repeat(np.cumsum(cnt) - cnt, cnt))
            bits = np.frombuffer(self._map, np.uint8)[blocks]  # 2. the bitmap
            hit = np.flatnonzero(bits)
            if hit.size == 0:
                return
            starts = np.cumsum(lengths) - lengths  # of each extent in ``buf``
            for i in hit.tolist():  # 3. the fleece (rare: blocks written since the seal)
                e = int(owner[i])
                o = offs[e]
                lo = max(o, int(blocks[i]) * bs)
                hi = min(o + lens[e], (int(blocks[i]) + 1) * bs)
                at = int(starts[e]) + lo - o
                src = lo if self._index is None else \
                    self._index.offset(int(blocks[i]), bs) + lo - int(blocks[i]) * bs
                pread_full(self._fleece, mv[at:at + hi - lo], src)
        except OSError as e:
            raise classify_os_error(e, "reading frozen view") from e

    def data_extents(self) -> ExtentList:
        live = sparse_data_extents(self._fd, self._size)
        if self._index is None:   # a fleece at the disk's offsets
            return live.union(sparse_data_extents(self._fleece, self._size))
        if self._map is None:
            return live
        # preserved blocks may hold pre-seal data the disk no longer has (a block preserved
        # as zeros is read and found zero: an over-approximation, as a hole-punched disk's).
        # Over a copy (``mmap[:]``: no buffer of the map stays exported): the guest sets bytes
        # meanwhile, and numpy's nonzero refuses an array whose count changes under it
        preserved = np.flatnonzero(np.frombuffer(self._map[:], np.uint8))
        return live.union(blocks_to_extents(preserved, self._block, self._size))

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None
        for name in ("_fleece", "_bitmap", "_slots"):
            fd = getattr(self, name, -1)
            if fd >= 0:
                with suppress(OSError):
                    os.close(fd)
                setattr(self, name, -1)
        super().close()
