"""Digests of whole logical disk images, to compare source disks, points and replicas."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

from blake3 import blake3

PIECE = 4 << 20


class SizedReadable(Protocol):
    @property
    def size(self) -> int: ...

    def readinto(self, offset: int, buf: memoryview) -> None: ...


def image_digest(src: SizedReadable | Path | str, size: int | None = None) -> str:
    """blake3 hex digest of the logical image: ``size`` bytes, holes as zeros.

    ``src`` is any object with ``size`` and ``readinto(offset, memoryview)`` (a point reader, a
    disk reader), or a path to a raw image (then ``size`` defaults to the file's size; a file
    shorter than ``size`` is read as if zero-extended).
    """
    if isinstance(src, (str, Path)):
        return file_digest(Path(src), size)
    total = src.size if size is None else size
    h = blake3()
    buf = bytearray(min(PIECE, max(total, 1)))
    mv = memoryview(buf)
    off = 0
    while off < total:
        n = min(PIECE, total - off)
        src.readinto(off, mv[:n])
        h.update(mv[:n])
        off += n
    return str(h.hexdigest())


def file_digest(path: Path, size: int | None = None) -> str:
    """blake3 hex digest of a raw image file read as ``size`` bytes (zero-extended if short)."""
    h = blake3()
    with open(path, "rb") as f:
        total = os.fstat(f.fileno()).st_size if size is None else size
        buf = bytearray(PIECE)
        mv = memoryview(buf)
        off = 0
        while off < total:
            n = min(PIECE, total - off)
            got = f.readinto(mv[:n]) or 0
            if got < n:
                mv[got:n] = bytes(n - got)
                if got == 0:
                    f.seek(off + n)
            h.update(mv[:n])
            off += n
    return str(h.hexdigest())
