"""Raw image files: sparse-aware reads, writes, copies and moves (the one implementation for
the hypervisor drivers, failover and the replica side), and a reader of plain images.

Error policy: functions here raise :mod:`drsite.core.errors` (``classify_os_error``) for real
I/O errors, except the raw ``pread_full``/``pwrite_all`` loops, which raise ``OSError`` so that
their callers name what they were reading. A file system that cannot tell holes from data is
not an error: its files are read whole (an over-approximation, never an omission).
"""

from __future__ import annotations

import errno
import os
from contextlib import suppress
from pathlib import Path
from typing import Self

import numpy as np
import numpy.typing as npt

from drsite.core.errors import InvalidInput, classify_os_error
from drsite.core.extents import ExtentList, coalesce

# errnos of a file system (or kernel) that cannot do SEEK_DATA/SEEK_HOLE or copy_file_range
# here: fall back to the whole file / a plain copy
_UNSUPPORTED = frozenset({errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS})
_NO_KERNEL_COPY = _UNSUPPORTED | {errno.EXDEV}  # EXDEV: across file systems (Linux >= 5.19)
COPY_CHUNK = 8 << 20


def sparse_data_extents(fd: int, size: int) -> ExtentList:
    """Allocated ranges of ``[0, size)`` of an open file via SEEK_DATA/SEEK_HOLE.

    Where the file system or platform cannot seek data/holes, the whole range (may list
    zeros, never omits data). Any other error (EIO, a closed descriptor) is raised, classified:
    it must not pass for "all data" and hide a broken disk.
    """
    seek_data = getattr(os, "SEEK_DATA", None)
    seek_hole = getattr(os, "SEEK_HOLE", None)
    whole = ExtentList.of([(0, size)]) if size else ExtentList.empty()
    if seek_data is None or seek_hole is None:
        return whole
    starts: list[int] = []
    lengths: list[int] = []
    pos = 0
    try:
        while pos < size:
            try:
                data = os.lseek(fd, pos, seek_data)
            except OSError as e:
                if e.errno == errno.ENXIO:  # no data after pos
                    break
                raise
            if data >= size:
                break
            hole = min(os.lseek(fd, data, seek_hole), size)
            starts.append(data)
            lengths.append(hole - data)
            pos = hole
    except OSError as e:
        if e.errno in _UNSUPPORTED:
            return whole
        raise classify_os_error(e, "seek data/hole") from e
    return coalesce(starts, lengths)


def pread_full(fd: int, buf: memoryview, offset: int) -> None:
    """Fill ``buf`` from ``offset`` with ``os.preadv`` (no intermediate bytes); bytes past the
    end of the file read as zeros. Raises ``OSError``."""
    buf = buf.cast("B") if buf.format != "B" else buf
    while buf:
        n = os.preadv(fd, [buf], offset)
        if n == 0:
            buf[:] = bytes(len(buf))
            return
        buf, offset = buf[n:], offset + n


def pwrite_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    """Write all of ``data`` at ``offset`` (``os.pwrite`` may write less). Raises ``OSError``."""
    mv = memoryview(data).cast("B")
    while mv:
        n = os.pwrite(fd, mv, offset)
        mv, offset = mv[n:], offset + n


def _copy_range(fi: int, fo: int, offset: int, length: int) -> int:
    """Copy ``[offset, offset + length)`` between open files at the same offsets; returns the
    bytes copied (fewer if the source ends early: the rest stays a hole). ``copy_file_range``
    (a reflink on file systems that share extents, a kernel copy elsewhere), or a plain
    read/write loop where the kernel cannot (e.g. across file systems)."""
    start, end = offset, offset + length
    while offset < end:
        try:
            done = os.copy_file_range(fi, fo, end - offset, offset, offset)
        except OSError as e:
            if e.errno not in _NO_KERNEL_COPY:
                raise
            break
        if done == 0:
            return offset - start
        offset += done
    buf = memoryview(bytearray(min(COPY_CHUNK, end - offset))) if offset < end else None
    while buf is not None and offset < end:
        chunk = buf[:min(len(buf), end - offset)]
        n = os.preadv(fi, [chunk], offset)
        if n == 0:
            break
        pwrite_all(fo, chunk[:n], offset)
        offset += n
    return offset - start


def copy_sparse(src: Path, dest: Path, size: int) -> int:
    """Copy the data extents of ``src`` into a new sparse ``dest`` of ``size`` bytes (holes stay
    holes; a longer ``src`` is cut at ``size``). ``dest`` appears whole or not at all (a temp
    file beside it, fsync, rename). Returns the bytes copied. Raises drsite errors."""
    copied = 0
    tmp = dest.with_name(f".{dest.name}.copying")
    try:
        with open(src, "rb") as fi, open(tmp, "wb") as fo:
            fo.truncate(size)
            src_size = min(size, os.fstat(fi.fileno()).st_size)
            for s, n in sparse_data_extents(fi.fileno(), src_size):
                copied += _copy_range(fi.fileno(), fo.fileno(), s, n)
            os.fsync(fo.fileno())
        os.replace(tmp, dest)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise classify_os_error(e, f"copying {src} to {dest}") from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return copied


def move_sparse(src: Path, dest: Path) -> None:
    """Move an image file: a rename; across file systems a sparse copy (:func:`copy_sparse`),
    then ``src`` is removed. Raises drsite errors; on error ``src`` is still there."""
    try:
        os.replace(src, dest)
        return
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise classify_os_error(e, f"moving {src} to {dest}") from e
    try:
        size = src.stat().st_size
    except OSError as e:
        raise classify_os_error(e, f"moving {src} to {dest}") from e
    copy_sparse(src, dest, size)
    try:
        src.unlink()
    except OSError as e:
        raise classify_os_error(e, f"removing {src} after copying it to {dest}") from e


class RawImageReader:
    """A :class:`~drsite.hypervisors.contract.DiskReader` over a raw (sparse) image file of
    ``size`` bytes (default: the file's size; bytes past the file's end read as zeros). The
    file driver's live disks, replicas and restored images are all read with it."""

    def __init__(self, path: Path, size: int | None = None) -> None:
        self.path = path
        try:
            self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise classify_os_error(e, f"open {path}") from e
        self._size = size if size is not None else os.fstat(self._fd).st_size

    @property
    def size(self) -> int:
        return self._size

    def _check(self, offset: int, n: int) -> None:
        if self._fd < 0:
            raise InvalidInput(f"the reader of {self.path} is closed")
        if offset < 0 or offset + n > self._size:
            raise InvalidInput(f"read [{offset}, {offset + n}) passes the end of {self.path} "
                               f"({self._size} bytes)")

    def readinto(self, offset: int, buf: memoryview) -> None:
        self._check(offset, len(buf))
        try:
            pread_full(self._fd, buf, offset)
        except OSError as e:
            raise classify_os_error(e, f"read {self.path}") from e

    def readv(self, offsets: npt.NDArray[np.int64], lengths: npt.NDArray[np.int64],
              buf: memoryview) -> None:
        """Fill ``buf`` with the extents ``(offsets[i], lengths[i])``, concatenated in order:
        one ``preadv`` per extent, no Python call per extent for the caller."""
        mv = buf.cast("B") if buf.format != "B" else buf
        offs, lens = offsets.tolist(), lengths.tolist()
        if not offs:
            return
        if sum(lens) != len(mv):
            raise InvalidInput("readv: the extents do not fill the buffer")
        self._check(min(offs), 0)
        self._check(max(o + n for o, n in zip(offs, lens, strict=True)), 0)
        pos = 0
        try:
            for off, n in zip(offs, lens, strict=True):
                piece = mv[pos:pos + n]
                if os.preadv(self._fd, [piece], off) != n:
                    pread_full(self._fd, piece, off)
                pos += n
        except OSError as e:
            raise classify_os_error(e, f"read {self.path}") from e

    def data_extents(self) -> ExtentList:
        return sparse_data_extents(self._fd, self._size)

    def close(self) -> None:
        if self._fd >= 0:
            with suppress(OSError):
                os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
