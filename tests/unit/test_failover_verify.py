"""Verification of an image against a point (``failover.images.blocks_differ``): every byte
either side holds as data is compared, holes are zeros on both sides, unreadable data differs;
the work is batched (one ``readv`` per side per batch) and never sized by the disk."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from drsite.core.errors import CorruptData, InvalidReplicaState
from drsite.core.extents import ExtentList
from drsite.failover import images
from drsite.failover.reprotect import write_base_point
from drsite.imagefile import RawImageReader
from drsite.store.compare import COMPARE_BYTES, COMPARE_EXTENTS, blocks_differ, compare_batches
from drsite.store.local.backend import LocalObjectStore
from drsite.store.repository import Repository

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
BLOCK = 64 * KiB


class MemDisk:
    """A sparse in-memory disk: ``data`` maps offsets to bytes; ``bad`` ranges raise
    ``CorruptData`` when read (a damaged store object); counts its calls."""

    def __init__(self, size: int, data: dict[int, bytes], *,
                 bad: tuple[tuple[int, int], ...] = (), listed: ExtentList | None = None) -> None:
        self.size, self.data, self.bad = size, data, bad
        self.listed = listed
        self.calls = 0

    def data_extents(self) -> ExtentList:
        if self.listed is not None:
            return self.listed
        return ExtentList.of([(o, len(b)) for o, b in self.data.items()])

    def readinto(self, offset: int, buf: memoryview) -> None:
        self.calls += 1
        n = len(buf)
        if any(offset < b0 + bn and b0 < offset + n for b0, bn in self.bad):
            raise CorruptData(f"damaged at {offset}")
        out = bytearray(n)
        for o, b in self.data.items():
            lo, hi = max(o, offset), min(o + len(b), offset + n)
            if lo < hi:
                out[lo - offset:hi - offset] = b[lo - o:hi - o]
        buf[:] = out

    def readv(self, offsets: npt.NDArray[np.int64], lengths: npt.NDArray[np.int64],
              buf: memoryview) -> None:
        saved, pos = self.calls, 0
        for off, n in zip(offsets.tolist(), lengths.tolist(), strict=True):
            self.readinto(off, buf[pos:pos + n])
            pos += n
        self.calls = saved + 1


def test_equal_disks_with_different_layouts_are_equal() -> None:
    # zeros written as data on one side are a hole on the other: equal
    a = MemDisk(GiB, {0: b"x" * 4096, 10 * MiB: bytes(8192)})
    b = MemDisk(GiB, {0: b"x" * 4096})
    assert blocks_differ(a, b) == 0 and blocks_differ(b, a) == 0


def test_counts_the_blocks_that_differ_on_either_side() -> None:
    a = MemDisk(GiB, {0: b"x" * 4096, 5 * BLOCK + 10: b"y" * 3, 700 * MiB: b"z" * (2 * BLOCK)})
    b = MemDisk(GiB, {0: b"x" * 4096, 5 * BLOCK + 10: b"y" * 2, 900 * MiB: b"w"})
    # block 5 (one byte), the two blocks at 700 MiB (only in a), the block at 900 MiB (only in b)
    assert blocks_differ(a, b) == 4
    assert blocks_differ(a, MemDisk(2 * GiB, {})) >= 1  # sizes differ


def test_an_unreadable_extent_differs_in_its_blocks_and_only_those() -> None:
    data = {0: b"a" * BLOCK, 3 * BLOCK: b"b" * (2 * BLOCK), 50 * MiB: b"c" * 100}
    a = MemDisk(GiB, dict(data))
    b = MemDisk(GiB, dict(data), bad=((3 * BLOCK, 2 * BLOCK),))
    assert blocks_differ(a, b) == 2
    assert blocks_differ(b, a) == 2


def test_batches_bound_bytes_and_extents_and_calls_do_not_follow_the_disk() -> None:
    starts = np.arange(3 * COMPARE_EXTENTS, dtype=np.int64) * (4 * MiB)
    ext = ExtentList(starts, np.full(starts.size, 4096, np.int64))
    batches = compare_batches(ext)
    assert [hi - lo for lo, hi in batches] == [COMPARE_EXTENTS] * 3
    big = ExtentList.of([(0, COMPARE_BYTES), (COMPARE_BYTES + 1, 10)])
    assert compare_batches(big) == [(0, 1), (1, 2)]
    # the same 200 scattered writes on a 1 GiB and a 1 TiB disk: the same reads
    for size in (GiB, 1024 * GiB):
        d = {int(i * (size // 200)): bytes([i % 250 + 1]) * 4096 for i in range(200)}
        a, b = MemDisk(size, d), MemDisk(size, dict(d))
        assert blocks_differ(a, b) == 0
        assert (a.calls, b.calls) == (1, 1)


def test_verify_image_against_point_finds_a_flipped_byte(tmp_path: Path) -> None:
    """With the real readers: a replica image equal to the point passes, one flipped byte far
    into a sparse 64 GiB image fails with InvalidReplicaState."""
    size = 64 * GiB
    img = tmp_path / "d0.img"
    with open(img, "wb") as f:
        f.truncate(size)
    writes = {int(i * (size // 16)) + 4096: bytes([i + 1]) * 8192 for i in range(16)}
    fd = img.open("r+b")
    for off, b in writes.items():
        fd.seek(off)
        fd.write(b)
    fd.close()
    repo = Repository(LocalObjectStore(tmp_path / "store"), "item-v")
    with RawImageReader(img, size) as r:
        pt, _ = write_base_point(repo, "c1", {"d0": r}, 1.0)
    images.verify_image_against_point(repo, pt.point_id, "d0", img, size)
    with open(img, "r+b") as f:
        f.seek(15 * (size // 16) + 4096 + 100)
        f.write(b"\xff")
    with pytest.raises(InvalidReplicaState, match="in 1 block"):
        images.verify_image_against_point(repo, pt.point_id, "d0", img, size)
