"""Resynchronisation by fixed-block checksums (the seed's resync).

Source and target are cut into fixed blocks (64 KiB); each block's xxh3_128 digest is computed
on its own side; only blocks whose digests differ are shipped. Blocks that are holes read as
zeros and take the precomputed digest of a zero block without being read. A target block that
cannot be read back intact (corrupt store object) is marked *bad* and always differs, so a
resync also repairs a damaged store.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt
import xxhash

from drsite.core.errors import BrokenChain, CorruptData, ObjectNotFound
from drsite.core.extents import ExtentList, blocks_to_extents

RESYNC_BLOCK = 64 * 1024
READ_SIZE = 4 * 1024 * 1024

Digests = npt.NDArray[np.uint8]  # shape (n_blocks, 16)
Mask = npt.NDArray[np.bool_]


class Readable(Protocol):
    @property
    def size(self) -> int: ...

    def readinto(self, offset: int, buf: memoryview) -> None: ...

    def data_extents(self) -> ExtentList: ...


def zero_digest(block: int) -> bytes:
    return bytes(xxhash.xxh3_128_digest(bytes(block)))


@dataclass
class DigestResult:
    digests: Digests
    bad: Mask            # blocks that could not be read intact (always differ)
    bytes_read: int


def block_digests(reader: Readable, *, block: int = RESYNC_BLOCK,
                  progress: Callable[[int], None] | None = None) -> DigestResult:
    """Digest every ``block`` of ``reader``; holes take the zero digest without being read."""
    size = reader.size
    n = (size + block - 1) // block
    zd = np.frombuffer(zero_digest(block), dtype=np.uint8)
    digests = np.tile(zd, (n, 1))
    bad = np.zeros(n, dtype=bool)
    data = reader.data_extents().align(block, size).split(READ_SIZE)
    buf = bytearray(READ_SIZE)
    mv = memoryview(buf)
    read = 0
    h = xxhash.xxh3_128_digest
    for off, length in data:
        piece = mv[:length]
        first = off // block
        try:
            reader.readinto(off, piece)
        except (CorruptData, ObjectNotFound, BrokenChain):
            last = (off + length + block - 1) // block
            bad[first:last] = True
            continue
        out = bytearray()
        for i in range(0, length, block):
            chunk = piece[i:i + block]
            if len(chunk) < block:  # the last block of a disk whose size is not a multiple
                out += h(bytes(chunk) + bytes(block - len(chunk)))
            else:
                out += h(chunk)
        k = (length + block - 1) // block
        digests[first:first + k] = np.frombuffer(bytes(out), dtype=np.uint8).reshape(k, 16)
        read += length
        if progress is not None:
            progress(length)
    return DigestResult(digests, bad, read)


def differing_blocks(source: DigestResult, target: DigestResult) -> npt.NDArray[np.int64]:
    """Indexes of blocks whose digests differ or whose target copy is bad."""
    if source.digests.shape != target.digests.shape:
        raise ValueError("source and target digests cover different sizes")
    # compare 16-byte digests as two 64-bit words: one vectorised pass, cheap for big disks
    diff = (source.digests.view(np.uint64) != target.digests.view(np.uint64)).any(axis=1) \
        | target.bad
    return np.nonzero(diff)[0].astype(np.int64)


def differing_extents(source: DigestResult, target: DigestResult, block: int, size: int) -> ExtentList:
    return blocks_to_extents(differing_blocks(source, target), block, size)
