"""Planning the re-homing of sparse packs (``store/compaction.py``): which packs a point uses
for little of their bytes, and which of its extents sit in them."""

from __future__ import annotations

import numpy as np
import pytest

from drsite.core.extents import ExtentList, coalesce
from drsite.core.model import Consistency
from drsite.store import compaction
from drsite.store.compaction import plan_rehome
from drsite.store.repository import Repository
from drsite.store.testing.memory import MemoryObjectStore

KiB = 1024
MiB = 1024 * KiB
SIZE = 4 * MiB


def _repo(store: MemoryObjectStore) -> Repository:
    return Repository(store, "item1", segment_size=1 * MiB, pack_target=512 * KiB, zstd_level=0)


def _points(rng: np.random.Generator) -> tuple[Repository, str, str, ExtentList]:
    """p1: the whole disk, random; p2: 80 % of the first half overwritten in 16 KiB pieces.
    Returns the repository, both point ids and what p2 overwrote."""
    repo = _repo(MemoryObjectStore())
    w = repo.begin("c1", base=None, disk_sizes={"d0": SIZE}, kind="initial")
    w.write_many("d0", [0], [SIZE], rng.integers(0, 256, SIZE, dtype=np.uint8).tobytes())
    p1 = w.commit(created_at=1.0, consistency=Consistency.CRASH).point_id
    w.close()
    blocks = np.sort(rng.choice((SIZE // 2) // (16 * KiB), int(0.8 * (SIZE // 2) // (16 * KiB)),
                                replace=False)) * (16 * KiB)
    lens = np.full(blocks.size, 16 * KiB, np.int64)
    w = repo.begin("c2", base=p1, disk_sizes={"d0": SIZE}, kind="delta")
    w.write_many("d0", blocks, lens, rng.integers(0, 256, int(lens.sum()), dtype=np.uint8)
                 .tobytes())
    p2 = w.commit(created_at=2.0, consistency=Consistency.CRASH).point_id
    w.close()
    return repo, p1, p2, coalesce(blocks, lens)


def _read(repo: Repository, point_id: str, ext: ExtentList) -> bytes:
    buf = bytearray(ext.total)
    repo.reader(point_id, "d0").readv(ext.starts, ext.lengths, memoryview(buf))
    return bytes(buf)


def test_the_sparse_packs_of_the_first_half_are_planned_and_nothing_overwritten() -> None:
    repo, p1, p2, overwritten = _points(np.random.default_rng(3))
    plan = plan_rehome(repo, p2, budget=1 << 40)
    assert not plan.empty
    got = plan.ranges["d0"]
    # only p1's packs of the first half are sparse (~20 % live); p2's and the second half's
    # packs are used whole
    assert plan.packs and all(k.startswith("packs/c1/") for k in plan.packs)
    assert int(got.starts.max() + got.lengths[-1]) <= SIZE // 2 + 512 * KiB
    # never a byte p2 holds from its own cycle; and what is planned reads the same in p1 and p2
    assert got.intersect(overwritten).total == 0
    assert _read(repo, p2, got) == _read(repo, p1, got)
    # every untouched byte of a planned pack is planned: its pack must have no user left
    half = ExtentList.of([(0, SIZE // 2)]).subtract(overwritten)
    assert got.total >= half.total - 2 * 512 * KiB
    assert plan.live_bytes == got.total and plan.pack_bytes > plan.live_bytes


def test_the_budget_caps_the_plan_and_an_empty_budget_plans_nothing() -> None:
    repo, _p1, p2, _ = _points(np.random.default_rng(4))
    whole = plan_rehome(repo, p2, budget=1 << 40)
    small = plan_rehome(repo, p2, budget=whole.live_bytes // 2)
    assert 0 < small.live_bytes <= whole.live_bytes // 2 and len(small.packs) < len(whole.packs)
    assert plan_rehome(repo, p2, budget=0).empty


def test_a_point_whose_packs_are_all_used_plans_nothing() -> None:
    repo, p1, _p2, _ = _points(np.random.default_rng(5))
    assert plan_rehome(repo, p1, budget=1 << 40).empty   # p1 uses every frame of its packs


def test_a_plan_asks_the_store_for_a_bounded_number_of_pack_sizes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """On a remote store every pack size is a request: a plan asks at most
    ``MAX_SIZE_REQUESTS`` of them, the likeliest candidates first."""
    repo, _p1, p2, _ = _points(np.random.default_rng(6))
    whole = plan_rehome(repo, p2, budget=1 << 40)
    asked: list[str] = []
    real = repo.store.size

    def size(key: str) -> int:
        asked.append(key)
        return real(key)

    monkeypatch.setattr(repo.store, "size", size)
    monkeypatch.setattr(compaction, "MAX_SIZE_REQUESTS", 1)
    one = plan_rehome(repo, p2, budget=1 << 40)
    assert len(asked) == 1 and len(one.packs) == 1 and one.packs[0] in whole.packs
