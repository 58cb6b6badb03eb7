"""Recovery-point format: round trips, deltas, zeros, costs, atomicity, resume, retention/GC,
corruption, quarantine, replica hydration, and a model-based property test."""

from __future__ import annotations

import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from drsite.core.errors import BrokenChain, Conflict, CorruptData, InvalidInput
from drsite.core.extents import ExtentList
from drsite.core.model import Consistency
from drsite.core.retention import RetentionRule
from drsite.store.catalog import MapCache
from drsite.store.contract import ObjectStore
from drsite.store.digest import file_digest, image_digest
from drsite.store.local import LocalObjectStore
from drsite.store.reader import PointReader
from drsite.store.replica import ReplicaHydrator
from drsite.store.repository import Repository
from drsite.store.testing import FaultyObjectStore, MemoryObjectStore, SimulatedCrash
from drsite.store.wrappers import RetryingStore
from drsite.store.writer import PointWriter

KiB, MiB = 1 << 10, 1 << 20
SEG = 256 * KiB
PACK = 512 * KiB
CRASH = Consistency.CRASH


def repo_on(store: ObjectStore, **kw: int) -> Repository:
    return Repository(store, "vm1", segment_size=kw.get("segment_size", SEG),
                      pack_target=kw.get("pack_target", PACK), threads=2)


def rand(rng: np.random.Generator, n: int) -> bytes:
    return rng.integers(0, 256, n, dtype=np.uint8).tobytes()


def read_all(r: PointReader) -> bytes:
    buf = bytearray(r.size)
    r.readinto(0, memoryview(buf))
    return bytes(buf)


def read_point(repo: Repository, pid: str, disk: str = "d0") -> bytes:
    return read_all(repo.reader(pid, disk))


class Model:
    """A model of disks plus the point ids committed so far."""

    def __init__(self, sizes: dict[str, int]) -> None:
        self.disks = {d: bytearray(n) for d, n in sizes.items()}


def commit_cycle(repo: Repository, cycle: str, base: str | None, sizes: dict[str, int],
                 writes: list[tuple[str, int, bytes | None, int]], t: float) -> str:
    """writes: (disk, offset, data or None for zeros, length)."""
    w = repo.begin(cycle, base=base, disk_sizes=sizes, kind="delta" if base else "initial")
    for disk, off, data, n in writes:
        if data is None:
            w.write_zero(disk, off, n)
        else:
            w.write(disk, off, data)
    return w.commit(created_at=t, consistency=CRASH).point_id


@pytest.fixture
def mem() -> MemoryObjectStore:
    return MemoryObjectStore()


# --- round trips ------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["memory", "local"])
def test_full_point_roundtrip(backend: str, tmp_path: Path) -> None:
    store: ObjectStore = MemoryObjectStore() if backend == "memory" else \
        LocalObjectStore(tmp_path / "s")
    repo = repo_on(store)
    rng = np.random.default_rng(1)
    size = 3 * MiB + 12345  # not a multiple of anything
    model = bytearray(size)
    w = repo.begin("c1", base=None, disk_sizes={"d0": size, "d1": 64 * KiB}, kind="initial")
    data = rand(rng, 2 * MiB + 777)
    w.write("d0", 1000, data)
    model[1000:1000 + len(data)] = data
    w.write("d0", 3 * MiB, b"\x07" * 12345)  # up to the very end
    model[3 * MiB:] = b"\x07" * 12345
    w.write_zero("d0", 5000, 70000)          # zeros over earlier data, same cycle
    model[5000:75000] = bytes(70000)
    w.write("d0", 600 * KiB, bytes(200 * KiB))  # a big zero write is recorded, not stored
    model[600 * KiB:800 * KiB] = bytes(200 * KiB)
    w.write("d1", 3, b"abc")
    info = w.commit(created_at=10.0, consistency=Consistency.APP, meta={"note": "x"})
    assert info.point_id == "p000000000001" and info.kind == "initial"
    assert info.consistency is Consistency.APP and info.meta["note"] == "x"
    assert info.bytes_written == len(data) + 12345 + 70000 + 200 * KiB + 3
    assert repo.points() == [info]
    assert read_point(repo, info.point_id) == bytes(model)
    assert read_point(repo, info.point_id, "d1") == b"\0\0\0abc" + bytes(64 * KiB - 6)
    # random-offset reads
    r = repo.reader(info.point_id, "d0")
    for off, n in [(0, 1), (999, 3), (1 * MiB - 5, 10), (size - 7, 7), (4096, 0)]:
        buf = bytearray(n)
        r.readinto(off, memoryview(buf))
        assert buf == model[off:off + n]
    with pytest.raises(InvalidInput):
        r.readinto(size - 1, memoryview(bytearray(2)))
    assert image_digest(r) == image_digest(_Buf(model))
    # zero blocks never reached a pack: stored ≈ the random data only
    assert info.bytes_stored < len(data) + 12345 + 64 * KiB
    assert r.data_extents().total <= len(data) + 12345 + 2 * 4096
    assert info.to_dict() == type(info).from_dict(info.to_dict()).to_dict()


class _Buf:
    def __init__(self, b: bytes | bytearray) -> None:
        self.b = bytes(b)
        self.size = len(b)

    def readinto(self, offset: int, buf: memoryview) -> None:
        buf[:] = self.b[offset:offset + len(buf)]


def test_delta_points_over_base_and_zero_override(mem: MemoryObjectStore) -> None:
    repo = repo_on(mem)
    rng = np.random.default_rng(2)
    size = 2 * MiB
    base_data = rand(rng, size)
    p1 = commit_cycle(repo, "c1", None, {"d0": size}, [("d0", 0, base_data, size)], 1.0)
    m = bytearray(base_data)
    p2 = commit_cycle(repo, "c2", p1, {"d0": size},
                      [("d0", 100, b"A" * 5000, 5000), ("d0", SEG * 3 + 1, None, 9000),
                       ("d0", SEG * 5, bytes(8192), 8192)], 2.0)
    m[100:5100] = b"A" * 5000
    m[SEG * 3 + 1:SEG * 3 + 9001] = bytes(9000)
    m[SEG * 5:SEG * 5 + 8192] = bytes(8192)
    assert read_point(repo, p2) == bytes(m)
    assert read_point(repo, p1) == base_data  # the base is untouched
    r2 = repo.reader(p2, "d0")
    assert r2.changed_extents().to_pairs() == [(100, 5000), (SEG * 3 + 1, 9000),
                                               (SEG * 5, 8192)]
    # diff compares maps: exactly the changed ranges, nothing from unchanged segments
    assert repo.diff(p1, p2, "d0").to_pairs() == r2.changed_extents().to_pairs()
    assert repo.diff(None, p2, "d0").to_pairs() == r2.data_extents().to_pairs()
    # segments the delta did not touch are shared by key
    b1 = repo._map_keys(repo._load_manifest(p1)["disks"]["d0"])
    b2 = repo._map_keys(repo._load_manifest(p2)["disks"]["d0"])
    assert [i for i in range(len(b1)) if b1[i] != b2[i]] == [0, 3, 5]


def test_disk_resize_and_new_disk(mem: MemoryObjectStore) -> None:
    repo = repo_on(mem)
    rng = np.random.default_rng(3)
    d = rand(rng, 1 * MiB)
    p1 = commit_cycle(repo, "c1", None, {"d0": 1 * MiB}, [("d0", 0, d, MiB)], 1.0)
    p2 = commit_cycle(repo, "c2", p1, {"d0": 700 * KiB, "d1": 8192},
                      [("d1", 0, b"z" * 10, 10)], 2.0)
    assert read_point(repo, p2) == d[:700 * KiB]
    p3 = commit_cycle(repo, "c3", p2, {"d0": 2 * MiB, "d1": 8192}, [], 3.0)
    assert read_point(repo, p3) == d[:700 * KiB] + bytes(2 * MiB - 700 * KiB)
    assert read_point(repo, p3, "d1")[:11] == b"z" * 10 + b"\0"
    assert repo.diff(p1, p3, "d0").total >= MiB - 700 * KiB


# --- costs --------------------------------------------------------------------------------------

def test_288_small_points_cost_changed_data_not_disks(mem: MemoryObjectStore) -> None:
    repo = repo_on(mem, segment_size=1 * MiB, pack_target=1 * MiB)
    rng = np.random.default_rng(4)
    size = 32 * MiB
    full = rand(rng, size)
    pid = commit_cycle(repo, "c0", None, {"d0": size}, [("d0", 0, full, size)], 0.0)
    after_full = repo.storage_bytes()
    assert size <= after_full < size * 1.05
    model = bytearray(full)
    for i in range(1, 289):
        off = int(rng.integers(0, size // 4096)) * 4096
        blk = rand(rng, 4096)
        model[off:off + 4096] = blk
        pid = commit_cycle(repo, f"c{i}", pid, {"d0": size}, [("d0", off, blk, 4096)], float(i))
        assert repo.point(pid).bytes_stored < 4096 + 16 * KiB
    growth = repo.storage_bytes() - after_full
    # 288 x (4 KiB of data + metadata of one changed segment): nowhere near 288 disks
    assert growth < 288 * (4096 + 16 * KiB), growth
    assert len(repo.points()) == 289
    assert read_point(repo, pid) == bytes(model)


# --- atomic commit, resume ------------------------------------------------------------------------

def test_failed_manifest_put_leaves_point_invisible(mem: MemoryObjectStore) -> None:
    faulty = FaultyObjectStore(mem)
    repo = repo_on(faulty)
    p1 = commit_cycle(repo, "c1", None, {"d0": MiB}, [("d0", 0, b"a" * 9000, 9000)], 1.0)
    before = repo.points()
    faulty.inject("put", "crash", prefix="items/vm1/points/")
    w = repo.begin("c2", base=p1, disk_sizes={"d0": MiB}, kind="delta")
    w.write("d0", 0, b"b" * 9000)
    with pytest.raises(SimulatedCrash):
        w.commit(created_at=2.0, consistency=CRASH)
    w.close()
    # a fresh repository (process restart) sees exactly the old points and a staged cycle
    repo2 = repo_on(faulty)
    assert repo2.points() == before
    assert repo2.latest() is not None and repo2.latest().point_id == p1  # type: ignore[union-attr]
    assert repo2.staged_cycles() == ["c2"]
    assert repo2.committed_cycle("c2") is None
    # GC keeps the staged cycle's packs and maps
    repo2.gc()
    w2 = repo2.resume("c2")
    assert w2 is not None and w2.covered("d0").to_pairs() == [(0, 9000)]
    info = w2.commit(created_at=2.0, consistency=CRASH)
    assert info.point_id == "p000000000003"  # seq 2 was burnt: ids are never reused
    assert read_point(repo2, info.point_id)[:9001] == b"b" * 9000 + b"\0"
    assert repo2.staged_cycles() == []
    # commit is idempotent, and a committed cycle cannot be begun again
    assert w2.commit(created_at=9.0, consistency=CRASH) == info
    assert repo2.committed_cycle("c2") == info
    with pytest.raises(Conflict):
        repo2.begin("c2", base=p1, disk_sizes={"d0": MiB}, kind="delta")
    assert repo2.resume("c2") is None


def test_crash_after_manifest_before_marker_delete(mem: MemoryObjectStore) -> None:
    faulty = FaultyObjectStore(mem)
    repo = repo_on(faulty)
    faulty.inject("delete", "crash", prefix="items/vm1/staging/")
    w = repo.begin("c1", base=None, disk_sizes={"d0": MiB}, kind="initial")
    w.write("d0", 0, b"q" * 100)
    with pytest.raises(SimulatedCrash):
        w.commit(created_at=1.0, consistency=CRASH)
    repo2 = repo_on(faulty)
    assert [p.cycle_id for p in repo2.points()] == ["c1"]
    assert repo2.resume("c1") is None  # committed: the stale marker is dropped
    assert repo2.staged_cycles() == []


def test_resume_from_pack_trailers(mem: MemoryObjectStore) -> None:
    repo = repo_on(mem)
    rng = np.random.default_rng(5)
    size = 4 * MiB
    src = bytearray(rand(rng, size))
    src[MiB:MiB + 300 * KiB] = bytes(300 * KiB)
    w = repo.begin("c1", base=None, disk_sizes={"d0": size}, kind="initial")
    w.write("d0", 0, bytes(src[: 2 * MiB]))
    w.flush()
    w.write("d0", 2 * MiB, bytes(src[2 * MiB: 3 * MiB]))  # buffered, not flushed: lost
    assert w.covered("d0").to_pairs() == [(0, 2 * MiB)]
    w.close()
    del w
    w2 = repo.begin("c1", base=None, disk_sizes={"d0": size}, kind="initial")  # = resume
    assert w2.covered("d0").to_pairs() == [(0, 2 * MiB)]
    assert w2.bytes_written == 2 * MiB and w2.zero_bytes == 300 * KiB
    with pytest.raises(Conflict):
        repo.begin("c1", base=None, disk_sizes={"d0": size * 2}, kind="initial")
    for off, n in ExtentList.of([(0, size)]).subtract(w2.covered("d0")):
        w2.write("d0", off, bytes(src[off:off + n]))
    info = w2.commit(created_at=1.0, consistency=CRASH)
    assert read_point(repo, info.point_id) == bytes(src)


def test_abort_drops_cycle_objects(mem: MemoryObjectStore) -> None:
    repo = repo_on(mem)
    p1 = commit_cycle(repo, "c1", None, {"d0": MiB}, [("d0", 0, b"x" * 5000, 5000)], 1.0)
    kept = set(mem.objects)
    w = repo.begin("c2", base=p1, disk_sizes={"d0": MiB}, kind="delta")
    w.write("d0", 0, b"y" * 70000)
    w.flush()
    w.close()
    assert set(mem.objects) > kept
    repo.abort("c2")
    repo.abort("c2")
    assert set(mem.objects) == kept
    assert repo.staged_cycles() == []


def test_commit_with_transient_store_faults() -> None:
    faulty = FaultyObjectStore(MemoryObjectStore())
    store = RetryingStore(faulty, attempts=8, base_delay=0.0, sleep=lambda _s: None)
    repo = repo_on(store)
    faulty.inject("put", "network", nth=2, times=6, after=True)  # replies lost after landing
    faulty.inject("get", "timeout", nth=3, times=3)
    faulty.inject("put", "enospc", prefix="items/vm1/packs/", nth=1, times=1)
    rng = np.random.default_rng(6)
    data = rand(rng, 3 * MiB)
    p1 = commit_cycle(repo, "c1", None, {"d0": 3 * MiB}, [("d0", 0, data, 3 * MiB)], 1.0)
    assert read_point(repo, p1) == data
    assert [p.point_id for p in repo.points()] == [p1]


# --- retention, GC ------------------------------------------------------------------------------

def test_retention_and_gc_keep_what_is_needed(mem: MemoryObjectStore) -> None:
    repo = repo_on(mem)
    rng = np.random.default_rng(7)
    size = 2 * MiB
    model = bytearray(rand(rng, size))
    pid = commit_cycle(repo, "c0", None, {"d0": size}, [("d0", 0, bytes(model), size)], 0.0)
    images = {pid: bytes(model)}
    for i in range(1, 10):
        off = int(rng.integers(0, size - 100 * KiB))
        blk = rand(rng, 100 * KiB)
        model[off:off + len(blk)] = blk
        pid = commit_cycle(repo, f"c{i}", pid, {"d0": size}, [("d0", off, blk, len(blk))],
                           i * 100.0)
        images[pid] = bytes(model)
    ids = [p.point_id for p in repo.points()]
    # a staged cycle based on an old point: its base and its packs must survive
    staged_base = ids[2]
    w = repo.begin("cs", base=staged_base, disk_sizes={"d0": size}, kind="delta")
    w.write("d0", 0, b"S" * 10000)
    w.flush()
    before = repo.storage_bytes()
    rule = RetentionRule(retention_s=10_000, keep_all_s=150, thin_interval_s=400,
                         app_interval_s=400)
    deleted = repo.apply_retention(rule, now=1000.0, pinned={ids[4]})
    kept = [p.point_id for p in repo.points()]
    assert staged_base in kept and ids[4] in kept and ids[-1] in kept
    assert deleted and set(deleted).isdisjoint(kept)
    assert repo.storage_bytes() < before  # something was freed
    for k in kept:
        assert read_point(repo, k) == images[k]
    assert repo.verify(kept[0]).ok
    # the staged cycle still commits correctly on top of its base
    info = w.commit(created_at=2000.0, consistency=CRASH)
    exp = bytearray(images[staged_base])
    exp[:10000] = b"S" * 10000
    assert read_point(repo, info.point_id) == bytes(exp)
    # deleting everything but the latest frees every pack only old points used
    for p in repo.points()[:-1]:
        repo.delete_point(p.point_id)
    rep = repo.gc()
    assert rep.objects_deleted > 0 and rep.bytes_freed > 0
    assert read_point(repo, info.point_id) == bytes(exp)
    assert repo.storage_bytes() < 1.3 * size
    assert repo.gc().objects_deleted == 0


# --- corruption, quarantine, verify -------------------------------------------------------------

def _pack_keys(mem: MemoryObjectStore) -> list[str]:
    return sorted(k for k in mem.objects if "/packs/" in k)


@pytest.mark.parametrize("damage", ["bitflip", "truncate"])
def test_corrupt_pack_raises_with_key(mem: MemoryObjectStore, damage: str) -> None:
    repo = repo_on(mem)
    rng = np.random.default_rng(8)
    data = rand(rng, MiB)
    p1 = commit_cycle(repo, "c1", None, {"d0": MiB}, [("d0", 0, data, MiB)], 1.0)
    (key,) = _pack_keys(mem)
    good = mem.objects[key]
    mem.objects[key] = good[: len(good) // 3] if damage == "truncate" else \
        good[:1000] + bytes([good[1000] ^ 1]) + good[1001:]
    with pytest.raises(CorruptData) as ei:
        read_point(repo_on(mem), p1)
    assert key in str(ei.value)
    rep = repo.verify(p1)
    assert not rep.ok and rep.damaged_keys == [key]
    assert rep.damaged[0].ranges == {"d0": [(0, MiB)]}
    # quarantine moves it aside; the point now has a broken chain, not wrong data
    repo.quarantine(key)
    assert key not in mem.objects
    assert any(k.startswith("items/vm1/quarantine/packs/") for k in mem.objects)
    with pytest.raises(BrokenChain):
        read_point(repo_on(mem), p1)
    # a rewrite under the same key is possible again and heals the point
    mem.put(key, good)
    assert read_point(repo_on(mem), p1) == data
    assert repo.verify(p1).ok


def test_bitflip_on_read_path_is_caught() -> None:
    faulty = FaultyObjectStore(MemoryObjectStore())
    repo = repo_on(faulty)
    data = b"hello world" * 50000
    p1 = commit_cycle(repo, "c1", None, {"d0": MiB}, [("d0", 0, data, len(data))], 1.0)
    faulty.inject("get_range", "bitflip", prefix="items/vm1/packs/")
    with pytest.raises(CorruptData, match="items/vm1/packs/c1/"):
        read_point(repo_on(faulty), p1)
    faulty.inject("get", "truncate", prefix="items/vm1/maps/")
    with pytest.raises(CorruptData, match="items/vm1/maps/"):
        read_point(repo_on(faulty), p1)
    faulty.inject("get", "bitflip", prefix="items/vm1/points/")
    with pytest.raises(CorruptData, match="items/vm1/points/p000000000001"):
        repo_on(faulty).points()
    assert read_point(repo_on(faulty), p1)[: len(data)] == data


# --- replica hydration --------------------------------------------------------------------------

def _replica_bytes(h: ReplicaHydrator, disk: str, size: int) -> bytes:
    return h.disk_path(disk).read_bytes().ljust(size, b"\0")


class _CrashingHydrator(ReplicaHydrator):
    crash_after = -1

    def _write_batch(self, fd: int, reader: PointReader, offs: npt.NDArray[np.int64],
                     lens: npt.NDArray[np.int64], buf: memoryview) -> None:
        if self.crash_after == 0:
            raise SimulatedCrash("killed mid-apply")
        self.crash_after -= 1
        super()._write_batch(fd, reader, offs, lens, buf)


def test_replica_catch_up_crash_and_pruned_points(tmp_path: Path) -> None:
    repo = repo_on(LocalObjectStore(tmp_path / "store"))
    rng = np.random.default_rng(9)
    size = 6 * MiB
    model = bytearray(rand(rng, size))
    model[MiB:2 * MiB] = bytes(MiB)
    p = commit_cycle(repo, "c0", None, {"d0": size}, [("d0", 0, bytes(model), size)], 0.0)
    h = _CrashingHydrator(repo, tmp_path / "replica")
    assert h.state() == (None, None)
    assert h.catch_up() == [p]
    assert _replica_bytes(h, "d0", size) == bytes(model) and h.verify()
    assert h.catch_up() == []

    def delta(i: int, parent: str) -> str:
        off = int(rng.integers(0, size - 5 * MiB))
        blk = rand(rng, 4 * MiB + 3)
        model[off:off + len(blk)] = blk
        model[off + 10:off + 9000] = bytes(8990)
        return commit_cycle(repo, f"c{i}", parent, {"d0": size},
                            [("d0", off, blk, len(blk)), ("d0", off + 10, None, 8990)], float(i))

    p1 = delta(1, p)
    h.crash_after = 1  # dies after one batch (4 MiB)
    with pytest.raises(SimulatedCrash):
        h.catch_up()
    assert h.state() == (p, p1)
    h.crash_after = -1
    assert h.catch_up() == [p1]
    assert h.state() == (p1, None)
    assert _replica_bytes(h, "d0", size) == bytes(model) and h.verify(p1)
    # several points, the middle ones pruned before the replica catches up
    p2 = delta(2, p1)
    p3 = delta(3, p2)
    p4 = delta(4, p3)
    repo.delete_point(p2)
    repo.delete_point(p3)
    repo.gc()
    assert h.catch_up() == [p4]  # p4's base is gone: a map diff against p1
    assert file_digest(h.disk_path("d0"), size) == image_digest(repo.reader(p4, "d0"))
    # the point the replica holds is pruned: full rebuild from the latest
    p5 = delta(5, p4)
    p6 = delta(6, p5)
    repo.delete_point(p4)
    repo.delete_point(p5)
    h.crash_after = 2
    with pytest.raises(SimulatedCrash):
        h.catch_up()
    h.crash_after = -1
    assert h.catch_up() == [p6]
    assert _replica_bytes(h, "d0", size) == bytes(model)
    assert h.pinned() == {p6}


def test_replica_whose_images_were_moved_out_is_rebuilt_in_full(tmp_path: Path) -> None:
    """A failover killed inside ``create_vm`` moved an image out of the replica (and lost it
    with the VM's staging directory) while ``state.json`` still names the point: catch-up
    rebuilds in full instead of writing the next delta onto a missing image (which left zeros
    where the point had data: "the replica differs from the stopped source"), and a delta does
    not stream onto it."""
    repo = repo_on(LocalObjectStore(tmp_path / "store"))
    rng = np.random.default_rng(4)
    size = 2 * MiB
    model = bytearray(rand(rng, size))
    p = commit_cycle(repo, "c0", None, {"d0": size}, [("d0", 0, bytes(model), size)], 0.0)
    h = ReplicaHydrator(repo, tmp_path / "replica")
    assert h.catch_up() == [p]
    h.disk_path("d0").unlink()  # moved into a VM that was never created
    assert h.stream("c1", p, {"d0": size}) is None
    blk = rand(rng, 4096)
    model[8192:8192 + 4096] = blk
    p1 = commit_cycle(repo, "c1", p, {"d0": size}, [("d0", 8192, blk, 4096)], 1.0)
    assert h.catch_up() == [p1]
    assert _replica_bytes(h, "d0", size) == bytes(model) and h.verify()


def _stream_cycle(repo: Repository, h: ReplicaHydrator, cycle: str, base: str | None,
                  size: int, writes: list[tuple[int, bytes]], *, commit: bool = True
                  ) -> str | None:
    """A cycle written with ``write_many`` while streamed into the replica (the engine's way)."""
    w = repo.begin(cycle, base=base, disk_sizes={"d0": size}, kind="delta" if base else "initial")
    stream = h.stream(cycle, base, {"d0": size})
    assert stream is not None
    w.tee = stream.write_runs
    offs = np.array([o for o, _ in writes], np.int64)
    lens = np.array([len(d) for _, d in writes], np.int64)
    w.write_many("d0", offs, lens, b"".join(d for _, d in writes))
    if not commit:
        w.flush()
        w.close()
        stream.close()
        return None
    p = w.commit(created_at=1.0, consistency=CRASH)
    stream.finish(p)
    return p.point_id


def test_replica_streamed_while_shipping(tmp_path: Path) -> None:
    """A replica written from the writer's buffers equals the point; zero blocks over old data
    are zeroed; an interrupted stream is settled by catch_up (re-applied from the store once
    the cycle commits, rebuilt in full when it never does)."""
    repo = repo_on(LocalObjectStore(tmp_path / "store"))
    h = ReplicaHydrator(repo, tmp_path / "replica")
    rng = np.random.default_rng(4)
    size = 2 * MiB
    model = bytearray(size)
    init = [(0, rand(rng, 300 * KiB)), (MiB, rand(rng, 8 * KiB)), (1500 * KiB, bytes(8 * KiB))]
    for o, d in init:
        model[o:o + len(d)] = d
    p0 = _stream_cycle(repo, h, "c0", None, size, init)
    assert h.state() == (p0, None) and _replica_bytes(h, "d0", size) == bytes(model)
    # a delta of scattered 4 KiB writes sharing frames, zeros over old data among them
    blocks = sorted(set((rng.integers(0, size // 4096, 300) * 4096).tolist()))
    delta = [(o, bytes(4096) if i % 5 == 0 else rand(rng, 4096)) for i, o in enumerate(blocks)]
    for o, d in delta:
        model[o:o + 4096] = d
    p1 = _stream_cycle(repo, h, "c1", p0, size, delta)
    assert h.state() == (p1, None) and h.verify(p1)
    assert _replica_bytes(h, "d0", size) == bytes(model) == read_point(repo, p1)
    # not at the base: no stream (the replica catches up from the store instead)
    assert h.stream("c9", p0, {"d0": size}) is None
    # interrupted after writing (crash before commit): the marker says so ...
    more = [(o, rand(rng, 4096)) for o in range(0, 64 * 4096, 8192)]
    assert _stream_cycle(repo, h, "c2", p1, size, more, commit=False) is None
    held, applying = h.state()
    assert held == p1 and applying == "cycle:c2"
    assert h.pinned() == {p1}
    # ... the same cycle may stream again onto the same base, then commits
    for o, d in more:
        model[o:o + 4096] = d
    w = repo.resume("c2")
    assert w is not None
    w.close()
    repo.abort("c2")
    p2 = _stream_cycle(repo, h, "c2", p1, size, more)
    assert h.state() == (p2, None) and _replica_bytes(h, "d0", size) == bytes(model)
    # interrupted, then committed without the stream (a resumed cycle): catch_up re-applies
    late = [(o, rand(rng, 4096)) for o in range(4096, 40 * 4096, 8192)]
    assert _stream_cycle(repo, h, "c3", p2, size, late, commit=False) is None
    for o, d in late:
        model[o:o + 4096] = d
    w = repo.resume("c3")
    assert w is not None
    p3 = w.commit(created_at=2.0, consistency=CRASH).point_id
    assert h.catch_up() == [p3]
    assert h.state() == (p3, None) and _replica_bytes(h, "d0", size) == bytes(model)
    # interrupted and never committed (aborted): the mix is rebuilt from the latest in full
    junk = [(o, rand(rng, 4096)) for o in range(0, 32 * 4096, 4096)]
    assert _stream_cycle(repo, h, "c4", p3, size, junk, commit=False) is None
    repo.abort("c4")
    p5 = commit_cycle(repo, "c5", p3, {"d0": size}, [("d0", 5 * 4096, b"\x05" * 10, 10)], 3.0)
    model[5 * 4096:5 * 4096 + 10] = b"\x05" * 10
    assert h.catch_up() == [p5]
    assert h.state() == (p5, None) and _replica_bytes(h, "d0", size) == bytes(model)


# --- property test ------------------------------------------------------------------------------

SIZE = 96 * KiB
ops = st.lists(
    st.one_of(
        st.tuples(st.just("w"), st.integers(0, SIZE - 1), st.integers(1, 20 * KiB),
                  st.integers(0, 255), st.booleans()),
        st.tuples(st.just("z"), st.integers(0, SIZE - 1), st.integers(1, 40 * KiB),
                  st.just(0), st.just(False)),
        st.tuples(st.just("c"), st.just(0), st.just(0), st.just(0), st.just(False)),
        st.tuples(st.just("f"), st.just(0), st.just(0), st.just(0), st.just(False)),
        st.tuples(st.just("r"), st.integers(0, 9), st.just(0), st.just(0), st.just(False)),
        st.tuples(st.just("x"), st.just(0), st.just(0), st.just(0), st.just(False)),
        st.tuples(st.just("h"), st.just(0), st.just(0), st.just(0), st.just(False)),
        # several scattered extents in one write_many call (shared frames), seeded by ``a``
        st.tuples(st.just("m"), st.integers(0, 2**16), st.integers(1, 24), st.integers(0, 255),
                  st.booleans()),
    ),
    max_size=40,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops)
def test_property_points_match_model(script: list[tuple[str, int, int, int, bool]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        _run_script(script, Path(tmp))


def _run_script(script: list[tuple[str, int, int, int, bool]], tmp: Path) -> None:
    mem = MemoryObjectStore()
    repo = Repository(mem, "vm1", segment_size=16 * KiB, pack_target=8 * KiB, threads=2)
    model = bytearray(SIZE)
    images: dict[str, bytes] = {}
    base: str | None = None
    n = 0
    w: PointWriter | None = None
    t = 0.0
    hydrator = ReplicaHydrator(repo, tmp / "replica")
    for op, a, b, c, flag in script:
        if w is None:
            w = repo.begin(f"c{n}", base=base, disk_sizes={"d0": SIZE},
                           kind="delta" if base else "initial")
        if op == "w":
            ln = min(b, SIZE - a)
            # mostly-constant data with zero holes exercises zero-block detection
            blob = bytearray([c]) * ln if flag else bytearray(
                (np.arange(ln) * (c | 1) % 251).astype(np.uint8).tobytes())
            if ln > 8192:
                blob[4096:8192] = bytes(4096)
            w.write("d0", a, bytes(blob))
            model[a:a + ln] = blob
        elif op == "m":
            rng = np.random.default_rng(a)
            offs = rng.integers(0, SIZE - 1, b)
            lens = np.minimum(rng.integers(1, 9 * KiB, b), SIZE - offs)
            if flag:  # block-aligned 4 KiB writes: the vectorised zero-detection path
                offs = offs // 4096 * 4096
                lens = np.minimum(4096, SIZE - offs)
            parts = []
            for i, (o, ln) in enumerate(zip(offs.tolist(), lens.tolist(), strict=True)):
                piece = bytes(ln) if (c + i) % 3 == 0 else bytes([(c + i) % 251 + 1]) * ln
                parts.append(piece)
                model[o:o + ln] = piece  # later extents win where they overlap
            w.write_many("d0", offs, lens, b"".join(parts))
        elif op == "z":
            ln = min(b, SIZE - a)
            w.write_zero("d0", a, ln)
            model[a:a + ln] = bytes(ln)
        elif op == "f":
            w.flush()
        elif op == "c":
            t += 60.0
            base = w.commit(created_at=t, consistency=CRASH).point_id
            images[base] = bytes(model)
            n += 1
            w = None
        elif op == "r":
            rule = RetentionRule(retention_s=60.0 * (a + 1), keep_all_s=30.0 * a,
                                 thin_interval_s=120.0, app_interval_s=120.0)
            w.flush()
            repo.apply_retention(rule, now=t, pinned=set())
        elif op == "x":  # the writer dies after a flush; a new one resumes from the store
            w.flush()
            w.close()
            w = repo.resume(f"c{n}")
            assert w is not None
        elif op == "h" and base is not None:
            hydrator.catch_up()
            assert hydrator.state() == (base, None)
            assert _replica_bytes(hydrator, "d0", SIZE) == images[base]
            # what a failover compares (only what changed since the last check) agrees
            assert hydrator.check(repo.point(base)).how in ("full", "incremental",
                                                             "pre-verified")
    if w is not None:
        w.close()
    kept = [p.point_id for p in repo.points()]
    assert base is None or base in kept
    rng = np.random.default_rng(len(script))
    for pid in kept:
        assert read_point(repo, pid) == images[pid], pid
        # batched reads of scattered extents (any order, across segments) agree too
        offs = rng.integers(0, SIZE, 40)
        lens = np.minimum(rng.integers(0, 40 * KiB, 40), SIZE - offs)
        buf = bytearray(int(lens.sum()))
        repo.reader(pid, "d0").readv(offs, lens, memoryview(buf))
        assert bytes(buf) == b"".join(images[pid][o:o + n] for o, n in
                                      zip(offs.tolist(), lens.tolist(), strict=True)), pid
    # after GC a reopened repository (fresh caches) still reads every kept point
    repo.gc()
    fresh = Repository(mem, "vm1", segment_size=16 * KiB, pack_target=8 * KiB)
    for pid in kept:
        assert read_point(fresh, pid) == images[pid], pid


class _SlowMaps(MemoryObjectStore):
    """Segment maps take 5 ms to fetch (an object-store round trip); counts how many are
    fetched at once."""

    def __init__(self) -> None:
        super().__init__()
        self.slow = False
        self.in_flight = self.most = 0
        self._count_lock = threading.Lock()

    def get(self, key: str) -> bytes:
        if not (self.slow and "/maps/" in key):
            return super().get(key)
        with self._count_lock:
            self.in_flight += 1
            self.most = max(self.most, self.in_flight)
        try:
            time.sleep(0.005)
            return super().get(key)
        finally:
            with self._count_lock:
                self.in_flight -= 1


def test_a_cold_reader_fetches_the_maps_of_scattered_data_in_parallel() -> None:
    """A point with data in 32 segments: a new reader's data_extents fetches the 32 maps
    several at a time (MAP_FETCHERS), lists the same extents, and a damaged map still reports
    its whole segment (the prefetch leaves the error to the reader's own read)."""
    store = _SlowMaps()
    size = 64 * SEG
    writes = [("d0", i * SEG + 4096, bytes([i + 1]) * 4096, 4096) for i in range(0, 80, 2)
              if i * SEG < size]
    pid = commit_cycle(repo_on(store), "c1", None, {"d0": size}, writes, 1.0)
    want = ExtentList.of([(off, n) for _, off, _, n in writes])
    store.slow = True
    assert repo_on(store).reader(pid, "d0").data_extents() == want
    assert store.most >= 2
    # damage one map: its segment is reported whole, the others as they are
    cold = repo_on(store)
    keys = cold._map_keys(cold._load_manifest(pid)["disks"]["d0"])
    bad = keys[4]
    assert bad is not None
    store.objects[cold.key(bad)] = b"garbage"
    got = cold.reader(pid, "d0").data_extents()
    assert got == want.subtract(ExtentList.of([(4 * SEG, SEG)])).union(
        ExtentList.of([(4 * SEG, SEG)]))


class _CountingStore(MemoryObjectStore):
    """Counts the gets of ``counted`` keys (segment maps; tables share their prefix)."""

    def __init__(self) -> None:
        super().__init__()
        self.counted: set[str] = set()
        self.map_gets = 0

    def get(self, key: str) -> bytes:
        self.map_gets += key in self.counted
        return super().get(key)


def test_prefetch_goes_no_further_than_the_map_cache_holds(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A cold data_extents over more maps than a repository's map cache holds fetches each
    map once: maps fetched far ahead were evicted before their use and fetched again."""
    import drsite.store.catalog as catalog

    store = _CountingStore()
    size = 48 * SEG
    writes = [("d0", i * SEG + b * 8192, bytes([i + 1]) * 4096, 4096)
              for i in range(48) for b in range(32)]   # 32 entries in each of 48 maps
    pid = commit_cycle(repo_on(store), "c1", None, {"d0": size}, writes, 1.0)
    want = ExtentList.of([(off, n) for _, off, _, n in writes])
    monkeypatch.setattr(catalog, "MAP_CACHE_BYTES", 16 * 32 * 64)   # ~8 maps of 32 entries
    cold = repo_on(store)
    keys = [k for k in cold._map_keys(cold._load_manifest(pid)["disks"]["d0"]) if k]
    assert len(keys) == 48
    store.counted = {cold.key(k) for k in keys}
    assert cold.reader(pid, "d0").data_extents() == want
    assert store.map_gets == 48, f"{store.map_gets} map reads for 48 maps"



def test_map_cache_shared_by_repositories_serves_verified_maps_warm(tmp_path: Path) -> None:
    """An agent's catch-ups and failovers share one MapCache: the maps a catch-up verified are
    not loaded again by the failover's new Repository (a 100 GiB disk with scattered data
    loaded 1,543 maps cold). A Repository without it (scrub) still reads the store, and so
    still finds a map damaged after it was cached."""
    store = _CountingStore()
    cache = MapCache()
    rng = np.random.default_rng(3)
    size = 16 * SEG
    writer = Repository(store, "vm1", segment_size=SEG, pack_target=PACK, threads=2)
    model = bytearray(size)
    writes = []
    for i in range(0, 16, 2):   # data in every other segment
        blk = rand(rng, 8192)
        model[i * SEG + 4096:i * SEG + 4096 + len(blk)] = blk
        writes.append(("d0", i * SEG + 4096, blk, len(blk)))
    p0 = commit_cycle(writer, "c0", None, {"d0": size}, writes, 1.0)
    blk = rand(rng, 4096)
    model[3 * SEG:3 * SEG + 4096] = blk
    p1 = commit_cycle(writer, "c1", p0, {"d0": size}, [("d0", 3 * SEG, blk, 4096)], 2.0)

    h = ReplicaHydrator(Repository(store, "vm1", map_cache=cache), tmp_path / "replica")
    assert h.catch_up() == [p1]
    store.counted = set(cache)
    assert len(store.counted) == 9   # the maps of 9 segments holding data
    store.map_gets = 0
    failover_repo = Repository(store, "vm1", map_cache=cache)
    assert read_point(failover_repo, p1) == bytes(model)
    assert store.map_gets == 0, "the catch-up's maps were loaded again"
    assert read_point(Repository(store, "vm1"), p1) == bytes(model)
    assert store.map_gets == 9   # a repository of its own: every map with data, from the store

    # another item's maps in the same cache are not dropped by this item's forget-all
    other = Repository(store, "vm2", segment_size=SEG, pack_target=PACK, threads=2,
                       map_cache=cache)
    q0 = commit_cycle(other, "c0", None, {"d0": size}, [("d0", 0, blk, 4096)], 1.0)
    n_other = sum(k.startswith("items/vm2/") for k in cache)
    assert n_other == 1
    failover_repo._forget_all()
    assert not any(k.startswith("items/vm1/") for k in cache)
    assert sum(k.startswith("items/vm2/") for k in cache) == n_other
    assert read_point(other, q0, "d0")[:4096] == blk

    # damage after caching: the shared copy (verified) still reads right; scrub sees the store
    assert read_point(failover_repo, p1) == bytes(model)
    key = next(k for k in store.list("items/vm1/maps/"))
    store.put(key, b"damaged", overwrite=True)
    assert read_point(Repository(store, "vm1", map_cache=cache), p1) == bytes(model)
    rep = Repository(store, "vm1").verify(p1)
    assert not rep.ok and key in rep.damaged_keys


def test_map_cache_offer_takes_only_verified_segment_maps(mem: MemoryObjectStore) -> None:
    """A store server offers every object it stores to the host's MapCache: segment maps whose
    bytes match their key are cached (a replica written from the shipping stream is read by
    no catch-up, so a failover would load them cold); tables, packs, a map whose bytes do not
    match its key and a key of another shape are not."""
    repo = repo_on(mem)
    rng = np.random.default_rng(4)
    commit_cycle(repo, "c0", None, {"d0": 4 * SEG},
                 [("d0", i * SEG, rand(rng, 4096), 4096) for i in range(4)], 1.0)
    cache = MapCache()
    offered = {k: cache.offer(k, mem.get(k)) for k in mem.list("items/vm1/")}
    maps = {k for k, ok in offered.items() if ok}
    assert len(maps) == 4 and all("/maps/" in k for k in maps)
    assert all(not ok for k, ok in offered.items() if "/maps/" not in k)   # packs, manifest
    assert sum(1 for k, ok in offered.items() if "/maps/" in k and not ok) == 1   # the table
    key = next(iter(maps))
    good = mem.get(key)
    fresh = MapCache()
    assert not fresh.offer(key, good[:-1] + bytes([good[-1] ^ 1]))   # hash mismatch
    assert not fresh.offer("items/vm1/maps/" + key.rsplit("/", 1)[-1], good)   # no cycle part
    assert not list(fresh)
    # what a read of the point finds in the shared cache is what it would decode itself
    r = Repository(mem, "vm1", segment_size=SEG, map_cache=cache)
    own = repo_on(mem)
    pid = own.latest().point_id   # type: ignore[union-attr]
    assert read_point(r, pid) == read_point(own, pid)
    assert set(own._maps) == maps


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 60))
def test_property_readv_of_scattered_extents_equals_the_model(seed: int, n: int) -> None:
    """``readv`` of any batch of extents — scattered over many segments, crossing segment
    boundaries, unsorted, overlapping, empty, in holes — equals the model, on a point whose
    segments' maps come from several cycles (the lookups of a batch run over the slices of all
    its segments' maps at once)."""
    seg = 16 * KiB
    size = 64 * seg + 5000
    store = MemoryObjectStore()
    repo = Repository(store, "vm1", segment_size=seg, pack_target=64 * KiB, threads=2)
    rng = np.random.default_rng(seed)
    model = bytearray(size)
    base = None
    for c in range(3):
        writes: list[tuple[str, int, bytes | None, int]] = []
        for _ in range(int(rng.integers(1, 25))):
            off = int(rng.integers(0, size - 1))
            ln = int(rng.integers(1, min(3 * seg, size - off) + 1))
            data = None if rng.random() < 0.2 else rand(rng, ln)
            model[off:off + ln] = data if data is not None else bytes(ln)
            writes.append(("d0", off, data, ln))
        base = commit_cycle(repo, f"c{c}", base, {"d0": size}, writes, float(c))
    assert base is not None
    offs = rng.integers(0, size, n).astype(np.int64)
    lens = np.minimum(rng.integers(0, 2 * seg, n), size - offs).astype(np.int64)
    lens[rng.random(n) < 0.1] = 0
    buf = bytearray(int(lens.sum()))
    reader = Repository(store, "vm1", segment_size=seg).reader(base, "d0")
    reader.readv(offs, lens, memoryview(buf))
    want = b"".join(bytes(model[o:o + ln]) for o, ln in zip(offs.tolist(), lens.tolist(),
                                                              strict=True))
    assert bytes(buf) == want


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2**32 - 1))
def test_property_readv_over_damaged_frames_fails_exactly_when_it_touches_them(seed: int) -> None:
    """A batched ``readv`` over a point one of whose cycles' packs reads back damaged (every
    frame of cycle c1 bit-flipped on the read path): a batch that touches a byte c1 holds
    raises ``CorruptData`` naming that cycle's pack; a batch that does not equals the model —
    the batch's lookups never take a frame of the wrong cycle, and never return damaged bytes."""
    seg = 16 * KiB
    size = 40 * seg + 3000
    faulty = FaultyObjectStore(MemoryObjectStore())
    repo = Repository(faulty, "vm1", segment_size=seg, pack_target=64 * KiB, threads=2)
    rng = np.random.default_rng(seed)
    model = bytearray(size)
    owner = np.full(size, -1, np.int64)   # the cycle whose frame holds each byte (-1: zero)
    base = None
    for c in range(3):
        writes: list[tuple[str, int, bytes | None, int]] = []
        for _ in range(int(rng.integers(1, 20))):
            off = int(rng.integers(0, size - 1))
            ln = int(rng.integers(1, min(2 * seg, size - off) + 1))
            data = None if rng.random() < 0.2 else rand(rng, ln)
            model[off:off + ln] = data if data is not None else bytes(ln)
            owner[off:off + ln] = c if data is not None else -1
            writes.append(("d0", off, data, ln))
        base = commit_cycle(repo, f"c{c}", base, {"d0": size}, writes, float(c))
    assert base is not None
    faulty.inject("get_range", "bitflip", prefix="items/vm1/packs/c1/", times=None)
    for _ in range(6):
        n = int(rng.integers(1, 40))
        offs = rng.integers(0, size, n).astype(np.int64)
        lens = np.minimum(rng.integers(0, seg, n), size - offs).astype(np.int64)
        touches = any(bool((owner[o:o + ln] == 1).any())
                      for o, ln in zip(offs.tolist(), lens.tolist(), strict=True))
        buf = bytearray(int(lens.sum()))
        reader = Repository(faulty, "vm1", segment_size=seg).reader(base, "d0")
        if touches:
            with pytest.raises(CorruptData, match="items/vm1/packs/c1/"):
                reader.readv(offs, lens, memoryview(buf))
            continue
        reader.readv(offs, lens, memoryview(buf))
        want = b"".join(bytes(model[o:o + ln]) for o, ln in zip(offs.tolist(), lens.tolist(),
                                                                  strict=True))
        assert bytes(buf) == want
