"""Disk readers of the file driver: the live disk and the frozen view of a sealed cycle.

The frozen-view read order is the mirror of the guest's write order (see ``design.md``): read
the disk, THEN read the copy-before-write bitmap, then re-read the preserved granules from the
fleece. Any post-seal data the disk read saw implies its bitmap byte was already set.
"""

from __future__ import annotations

import os
from contextlib import suppress
from pathlib import Path

import numpy as np

from drsite.core.errors import InvalidInput, NotFound, classify_os_error
from drsite.core.extents import ExtentList, coalesce
from drsite.hypervisors.file.layout import GRANULE


def _open_ro(path: Path, what: str) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NotFound(f"{what}: {path} is gone") from None
    except OSError as e:
        raise classify_os_error(e, what) from e


def preadv_full(fd: int, buf: memoryview, offset: int) -> None:
    """Fill ``buf`` from ``offset`` with ``os.preadv`` (no intermediate bytes); EOF reads zeros."""
    while buf:
        n = os.preadv(fd, [buf], offset)
        if n == 0:
            buf[:] = bytes(len(buf))
            return
        buf, offset = buf[n:], offset + n


def file_data_extents(fd: int, size: int) -> ExtentList:
    """Allocated ranges of a file via SEEK_DATA/SEEK_HOLE (all of it where unsupported)."""
    starts: list[int] = []
    ends: list[int] = []
    pos = 0
    try:
        while pos < size:
            try:
                d = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as e:  # ENXIO: no data after pos
                if e.errno == 6:
                    break
                raise
            if d >= size:
                break
            h = min(os.lseek(fd, d, os.SEEK_HOLE), size)
            starts.append(d)
            ends.append(h)
            pos = h
    except (OSError, AttributeError):
        return ExtentList.of([(0, size)]) if size else ExtentList.empty()
    s = np.asarray(starts, np.int64)
    return coalesce(s, np.asarray(ends, np.int64) - s)


class LiveDiskReader:
    """Reads a disk image as it is now (fuzzy while the guest writes)."""

    def __init__(self, path: Path, size: int) -> None:
        self._fd = _open_ro(path, "disk image")
        self._size = size

    @property
    def size(self) -> int:
        return self._size

    def _check(self, offset: int, n: int) -> None:
        if self._fd < 0:
            raise InvalidInput("reader is closed")
        if offset < 0 or offset + n > self._size:
            raise InvalidInput(f"read [{offset}, {offset + n}) passes the end of a "
                               f"{self._size}-byte disk")

    def readinto(self, offset: int, buf: memoryview) -> None:
        self._check(offset, len(buf))
        try:
            preadv_full(self._fd, buf.cast("B") if buf.format != "B" else buf, offset)
        except OSError as e:
            raise classify_os_error(e, "reading disk") from e

    def data_extents(self) -> ExtentList:
        return file_data_extents(self._fd, self._size)

    def close(self) -> None:
        if self._fd >= 0:
            with suppress(OSError):
                os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> LiveDiskReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class CycleDiskReader(LiveDiskReader):
    """The frozen view of one disk at a seal: live disk patched with preserved granules.

    Frozen over every granule the copy-before-write protects: the cycle's changed extents for a
    trusted cycle, the whole disk for an untrusted one. Open descriptors keep working after a
    release, but the guest then stops preserving: read before releasing.
    """

    def __init__(self, disk: Path, fleece: Path, bitmap: Path, size: int) -> None:
        super().__init__(disk, size)
        try:
            self._fleece = _open_ro(fleece, "cycle fleece (cycle released?)")
            self._bitmap = _open_ro(bitmap, "cycle bitmap (cycle released?)")
        except BaseException:
            self.close()
            raise

    def readinto(self, offset: int, buf: memoryview) -> None:
        n = len(buf)
        self._check(offset, n)
        if n == 0:
            return
        mv = buf.cast("B") if buf.format != "B" else buf
        try:
            preadv_full(self._fd, mv, offset)  # 1. the disk
            g0, g1 = offset // GRANULE, (offset + n - 1) // GRANULE
            bits = np.frombuffer(os.pread(self._bitmap, g1 - g0 + 1, g0), np.uint8)  # 2. bitmap
            set_idx = np.flatnonzero(bits)
            if set_idx.size == 0:
                return
            # runs of consecutive preserved granules → one fleece read each
            brk = np.flatnonzero(np.diff(set_idx) != 1)
            run_first = np.concatenate([set_idx[:1], set_idx[brk + 1]]) + g0
            run_last = np.concatenate([set_idx[brk], set_idx[-1:]]) + g0
            for a, b in zip(run_first.tolist(), run_last.tolist(), strict=True):
                lo = max(offset, a * GRANULE)
                hi = min(offset + n, (b + 1) * GRANULE)
                preadv_full(self._fleece, mv[lo - offset: hi - offset], lo)  # 3. the fleece
        except OSError as e:
            raise classify_os_error(e, "reading frozen view") from e

    def data_extents(self) -> ExtentList:
        return file_data_extents(self._fd, self._size).union(
            file_data_extents(self._fleece, self._size))

    def close(self) -> None:
        for name in ("_fleece", "_bitmap"):
            fd = getattr(self, name, -1)
            if fd >= 0:
                with suppress(OSError):
                    os.close(fd)
                setattr(self, name, -1)
        super().close()
