"""Raw image files: sparse-aware random-access reads (the replica side and plain images)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

from drsite.core.errors import InvalidInput, classify_os_error
from drsite.core.extents import ExtentList, coalesce


def sparse_data_extents(fd: int, size: int) -> ExtentList:
    """Allocated ranges of an open file via SEEK_DATA/SEEK_HOLE (whole file if unsupported)."""
    starts: list[int] = []
    lengths: list[int] = []
    pos = 0
    try:
        while pos < size:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:  # no data after pos
                    break
                raise
            if data >= size:
                break
            hole = min(os.lseek(fd, data, os.SEEK_HOLE), size)
            starts.append(data)
            lengths.append(hole - data)
            pos = hole
    except OSError as e:
        if e.errno in (errno.EINVAL, errno.EOPNOTSUPP):
            return ExtentList.of([(0, size)]) if size else ExtentList.empty()
        raise classify_os_error(e, "seek data/hole") from e
    return coalesce(starts, lengths)


def pread_full(fd: int, offset: int, buf: memoryview) -> None:
    """Fill ``buf`` from ``offset``; bytes past the end of the file read as zeros."""
    done = 0
    total = len(buf)
    while done < total:
        n = os.preadv(fd, [buf[done:]], offset + done)
        if n == 0:
            buf[done:] = bytes(total - done)
            return
        done += n


class RawImageReader:
    """A :class:`~drsite.hypervisors.contract.DiskReader` over a raw (sparse) image file."""

    def __init__(self, path: Path, size: int | None = None) -> None:
        self.path = path
        try:
            self._fd = os.open(path, os.O_RDONLY)
        except OSError as e:
            raise classify_os_error(e, f"open {path}") from e
        self._size = size if size is not None else os.fstat(self._fd).st_size

    @property
    def size(self) -> int:
        return self._size

    def readinto(self, offset: int, buf: memoryview) -> None:
        if offset < 0 or offset + len(buf) > self._size:
            raise InvalidInput(f"read [{offset}, {offset + len(buf)}) past the end of {self.path}")
        try:
            pread_full(self._fd, offset, buf)
        except OSError as e:
            raise classify_os_error(e, f"read {self.path}") from e

    def data_extents(self) -> ExtentList:
        return sparse_data_extents(self._fd, self._size)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> RawImageReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
