"""Copy-on-write disks of the file driver: a read-only *backing* raw image, an *overlay* file and
an *allocation bitmap* (one byte per 64 KiB granule, the same granule as the change logs' dirty
map and the copy-before-write fleece).

```
VMDIR/<disk_id>.img      the overlay: sparse, the disk's size; holds every allocated granule whole
VMDIR/<disk_id>.alloc    allocation bitmap: byte g = 1 once granule g lives in the overlay
<backing>                a raw image outside the VM directory, opened read-only, never written
```

Reads take a granule from the overlay where its byte is set, else from the backing image (zeros
past the backing's end). The first write to a granule *copies it up*: the granule is built in
memory (backing bytes with the write applied), written to the overlay, the overlay is
``fdatasync``-ed, and only then is the granule's byte set; later writes to that granule go to the
overlay directly. So a set byte always names a durable, complete granule: a crash (guest or host)
can lose unflushed writes but never turn untouched backing data into zeros.

Creating a CoW disk is size-independent: the overlay and the bitmap are created with
``ftruncate`` (sparse), nothing is copied.

Responsible for: the read/write semantics above and their crash ordering. Not responsible for:
keeping the backing image unchanged (whoever made the VM owns that), change tracking (refused on
CoW disks, see ``design.md``), locking (the caller serialises writes under the VM's I/O lock).
"""

from __future__ import annotations

import os
from contextlib import suppress
from pathlib import Path

import numpy as np
import numpy.typing as npt

from drsite.core.errors import InvalidInput, NotFound, classify_os_error
from drsite.core.extents import ExtentList, blocks_to_extents
from drsite.hypervisors.file.layout import GRANULE
from drsite.imagefile import pread_full, pwrite_all, sparse_data_extents


def granule_count(size: int) -> int:
    return (size + GRANULE - 1) // GRANULE


def _runs(flags: npt.NDArray[np.uint8], g0: int) -> list[tuple[int, int, bool]]:
    """Runs of equal flags: ``(first granule, last granule, flag)``, absolute granule numbers."""
    if flags.size == 0:
        return []
    brk = np.flatnonzero(np.diff(flags.astype(np.int8)) != 0)
    firsts = np.concatenate([[0], brk + 1])
    lasts = np.concatenate([brk, [flags.size - 1]])
    return [(int(a) + g0, int(b) + g0, bool(flags[a])) for a, b in zip(firsts, lasts, strict=True)]


def create_cow_files(overlay: Path, bitmap: Path, size: int) -> None:
    """Create an empty overlay and bitmap for a ``size``-byte disk (sparse: O(1) in ``size``)."""
    for path, n in ((overlay, size), (bitmap, granule_count(size))):
        with open(path, "xb") as f:
            f.truncate(n)


class CowOverlay:
    """The writer side of one CoW disk, held by the VM's owner (guest or driver).

    ``overlay_fd`` is owned by the caller (it is the disk's fd in :class:`FileVm`); the bitmap
    and backing descriptors are owned here.
    """

    def __init__(self, overlay_fd: int, bitmap: Path, backing: Path, size: int) -> None:
        self.overlay_fd = overlay_fd
        self.size = size
        self.backing_path = backing
        n = granule_count(size)
        self._backing_fd = -1
        self._bitmap_fd = -1
        try:
            self._backing_fd = os.open(backing, os.O_RDONLY | os.O_CLOEXEC)
            self._bitmap_fd = os.open(bitmap, os.O_RDWR | os.O_CLOEXEC)
            if os.fstat(self._bitmap_fd).st_size != n:
                os.ftruncate(self._bitmap_fd, n)
            self.alloc = np.frombuffer(bytearray(os.pread(self._bitmap_fd, n, 0).ljust(n, b"\0")),
                                       np.uint8).copy()
        except FileNotFoundError as e:
            self.close()
            raise NotFound(f"copy-on-write disk: {e.filename} is gone",
                           hint="The backing image of a test-failover VM was removed; delete "
                                "the VM.") from e
        except OSError as e:
            self.close()
            raise classify_os_error(e, f"copy-on-write files of {bitmap}") from e
        self._dirty = False

    @property
    def allocated_granules(self) -> int:
        return int(np.count_nonzero(self.alloc))

    def read(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        if length:
            self.readinto(offset, memoryview(buf))
        return bytes(buf)

    def readinto(self, offset: int, buf: memoryview) -> None:
        n = len(buf)
        g0, g1 = offset // GRANULE, (offset + n - 1) // GRANULE
        for a, b, in_overlay in _runs(self.alloc[g0:g1 + 1], g0):
            lo, hi = max(offset, a * GRANULE), min(offset + n, (b + 1) * GRANULE)
            pread_full(self.overlay_fd if in_overlay else self._backing_fd,
                        buf[lo - offset:hi - offset], lo)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` at ``offset``: copy up new granules (durably, then mark them), write
        the rest to the overlay. The caller checked the range."""
        mv = memoryview(data).cast("B")
        n = len(mv)
        end = offset + n
        g0, g1 = offset // GRANULE, (end - 1) // GRANULE
        runs = _runs(self.alloc[g0:g1 + 1], g0)
        copied: list[tuple[int, int]] = []
        for a, b, allocated in runs:
            lo, hi = a * GRANULE, min((b + 1) * GRANULE, self.size)
            if allocated:
                continue
            # build the granules: backing bytes, then this write's bytes over them
            buf = bytearray(hi - lo)
            bv = memoryview(buf)
            pread_full(self._backing_fd, bv, lo)
            wlo, whi = max(lo, offset), min(hi, end)
            bv[wlo - lo:whi - lo] = mv[wlo - offset:whi - offset]
            if np.frombuffer(buf, np.uint8).any():  # an all-zero granule stays a hole
                pwrite_all(self.overlay_fd, bv, lo)
            copied.append((a, b))
        if copied:
            os.fdatasync(self.overlay_fd)  # the granules are durable before their bytes are set
            for a, b in copied:
                os.pwrite(self._bitmap_fd, b"\x01" * (b - a + 1), a)
                self.alloc[a:b + 1] = 1
            self._dirty = True
        for a, b, allocated in runs:
            if not allocated:
                continue
            lo, hi = max(offset, a * GRANULE), min(end, (b + 1) * GRANULE)
            pwrite_all(self.overlay_fd, mv[lo - offset:hi - offset], lo)

    def flush(self) -> None:
        """Make the bitmap durable (the caller fsyncs the overlay first)."""
        if self._dirty and self._bitmap_fd >= 0:
            os.fsync(self._bitmap_fd)
            self._dirty = False

    def close(self) -> None:
        for name in ("_backing_fd", "_bitmap_fd"):
            fd = getattr(self, name, -1)
            if fd >= 0:
                with suppress(OSError):
                    os.close(fd)
                setattr(self, name, -1)


class CowDiskReader:
    """A :class:`~drsite.hypervisors.contract.DiskReader` of a CoW disk as the guest sees it.

    Reads the bitmap first, then each run from the overlay or the backing: a granule whose byte
    is set is complete in the overlay (it was made durable before the byte), one whose byte is
    not set is still the backing's. Fuzzy while the guest writes, like any live reader.
    """

    def __init__(self, overlay: Path, bitmap: Path, backing: Path, size: int) -> None:
        self._size = size
        self._fds: list[int] = []
        try:
            for p in (overlay, bitmap, backing):
                self._fds.append(os.open(p, os.O_RDONLY | os.O_CLOEXEC))
        except FileNotFoundError as e:
            self.close()
            raise NotFound(f"copy-on-write disk: {e.filename} is gone") from e
        except OSError as e:
            self.close()
            raise classify_os_error(e, f"copy-on-write disk {overlay}") from e
        self._overlay, self._bitmap, self._backing = self._fds

    @property
    def size(self) -> int:
        return self._size

    def readinto(self, offset: int, buf: memoryview) -> None:
        n = len(buf)
        if not self._fds:
            raise InvalidInput("reader is closed")
        if offset < 0 or offset + n > self._size:
            raise InvalidInput(f"read [{offset}, {offset + n}) passes the end of a "
                               f"{self._size}-byte disk")
        if n == 0:
            return
        mv = buf.cast("B") if buf.format != "B" else buf
        g0, g1 = offset // GRANULE, (offset + n - 1) // GRANULE
        try:
            flags = np.frombuffer(os.pread(self._bitmap, g1 - g0 + 1, g0).ljust(g1 - g0 + 1, b"\0"),
                                  np.uint8)
            for a, b, in_overlay in _runs(flags, g0):
                lo, hi = max(offset, a * GRANULE), min(offset + n, (b + 1) * GRANULE)
                pread_full(self._overlay if in_overlay else self._backing,
                            mv[lo - offset:hi - offset], lo)
        except OSError as e:
            raise classify_os_error(e, "reading copy-on-write disk") from e

    def data_extents(self) -> ExtentList:
        """Backing data plus allocated granules (an over-approximation, never an omission)."""
        n = granule_count(self._size)
        flags = np.frombuffer(os.pread(self._bitmap, n, 0).ljust(n, b"\0"), np.uint8)
        allocated = blocks_to_extents(np.flatnonzero(flags), GRANULE, self._size)
        return sparse_data_extents(self._backing, self._size).clip(self._size).union(allocated)

    def close(self) -> None:
        for fd in self._fds:
            with suppress(OSError):
                os.close(fd)
        self._fds = []

    def __enter__(self) -> CowDiskReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
