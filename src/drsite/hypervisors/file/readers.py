"""The frozen view of a sealed cycle, the file driver's own disk reader (a live disk is read
with :class:`~drsite.imagefile.RawImageReader`, a copy-on-write disk with
:class:`~drsite.hypervisors.file.cow.CowDiskReader`).

The frozen-view read order is the mirror of the guest's write order (see ``design.md``): read
the disk, THEN read the copy-before-write bitmap, then re-read the preserved granules from the
fleece. Any post-seal data the disk read saw implies its bitmap byte was already set.
"""

from __future__ import annotations

import os
from contextlib import suppress
from pathlib import Path

import numpy as np

from drsite.core.errors import NotFound, classify_os_error
from drsite.core.extents import ExtentList
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
            pread_full(self._fd, mv, offset)  # 1. the disk
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
                pread_full(self._fleece, mv[lo - offset: hi - offset], lo)  # 3. the fleece
        except OSError as e:
            raise classify_os_error(e, "reading frozen view") from e

    def data_extents(self) -> ExtentList:
        return sparse_data_extents(self._fd, self._size).union(
            sparse_data_extents(self._fleece, self._size))

    def close(self) -> None:
        for name in ("_fleece", "_bitmap"):
            fd = getattr(self, name, -1)
            if fd >= 0:
                with suppress(OSError):
                    os.close(fd)
                setattr(self, name, -1)
        super().close()
