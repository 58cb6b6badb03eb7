"""The initial copy's data path: batches read into pooled slabs that the point writer keeps
(no copy), compressibility probes, and the local store's chunked writes. Every point must still
equal its source, however the slabs are recycled."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from drsite.core.errors import InvalidInput
from drsite.core.extents import ExtentList
from drsite.core.model import Consistency
from drsite.replication.batches import Slab, SlabPool, read_batches
from drsite.store.format import (
    PROBE_MIN,
    RAW,
    ZSTD,
    compress_frame,
    looks_incompressible,
)
from drsite.store.local import LocalObjectStore
from drsite.store.local.backend import WRITE_CHUNK
from drsite.store.replica import ReplicaHydrator
from drsite.store.repository import Repository
from drsite.store.testing import MemoryObjectStore

KiB, MiB = 1 << 10, 1 << 20


class ArrayReader:
    """A disk held in memory (a DiskReader); ``reads`` counts calls."""

    def __init__(self, data: npt.NDArray[np.uint8]) -> None:
        self.data = data
        self.size = int(data.size)
        self.reads = 0

    def readinto(self, offset: int, buf: memoryview) -> None:
        self.reads += 1
        buf[:] = self.data[offset:offset + len(buf)].tobytes()

    def data_extents(self) -> ExtentList:
        return ExtentList.of([(0, self.size)])

    def close(self) -> None:
        pass


def text(rng: np.random.Generator, n: int) -> bytes:
    words = [b"alpha", b"beta", b"gamma", b"delta", b"epsilon", b"zeta", b"eta", b"theta"]
    out = b" ".join(words[int(i)] for i in rng.integers(0, len(words), n // 3))
    return out[:n].ljust(n, b" ")


def test_slab_returns_to_its_pool_only_when_the_last_reference_goes() -> None:
    pool = SlabPool(64 * KiB, keep=2)
    s = pool.take(10)
    arr = s.array
    held = [s]
    del s
    assert pool._free == [], "given back while still referenced"
    held.clear()
    assert len(pool._free) == 1 and pool._free[0] is arr
    again = pool.take(64 * KiB)
    assert again.array is arr, "a free slab is reused"
    big = pool.take(128 * KiB)
    assert big.array.size >= 128 * KiB
    extra = [pool.take(1) for _ in range(4)]
    del again, big, extra
    assert len(pool._free) == 2, "the pool keeps at most `keep` free slabs"


def test_slabs_are_page_aligned() -> None:
    pool = SlabPool(64 * KiB)
    for n in (1, 4096, 64 * KiB, 100 * KiB + 3):
        s = pool.take(n)
        assert s.array.ctypes.data % 4096 == 0 and s.array.size >= n


def test_compressibility_probes() -> None:
    rng = np.random.default_rng(1)
    rnd = rng.integers(0, 256, MiB, dtype=np.uint8).tobytes()
    txt = text(rng, MiB)
    assert looks_incompressible(rnd, 1)
    assert not looks_incompressible(txt, 1)
    codec, payload, _ = compress_frame(rnd, 1)
    assert codec == RAW and bytes(payload) == rnd
    codec, payload, _ = compress_frame(txt, 1)
    assert codec == ZSTD and len(payload) < len(txt) // 2
    # compressible data under one probe is enough to compress the frame
    mixed = rnd[:3 * MiB // 4] + txt[:MiB // 4]
    assert not looks_incompressible(mixed, 1)
    assert compress_frame(mixed, 1)[0] == ZSTD
    # small frames are never probed: zstd decides
    small = rnd[:PROBE_MIN - 1]
    assert not looks_incompressible(small, 1)
    assert compress_frame(small, 1)[0] == RAW
    assert compress_frame(txt, 0)[0] == RAW  # compression off


def test_local_store_writes_large_objects_whole(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path / "s")
    rng = np.random.default_rng(2)
    blob = rng.integers(0, 256, 3 * WRITE_CHUNK + 17, dtype=np.uint8).tobytes()
    store.put("a/b", memoryview(blob))
    assert store.size("a/b") == len(blob) and store.get("a/b") == blob
    assert store.get_range("a/b", WRITE_CHUNK - 5, 10) == blob[WRITE_CHUNK - 5:WRITE_CHUNK + 5]


def _disk(rng: np.random.Generator, size: int, runs: list[tuple[int, int, int]]
          ) -> npt.NDArray[np.uint8]:
    """A disk image: zero, random and text runs at the given (offset, length, kind) spots."""
    d = np.zeros(size, np.uint8)
    for off, n, kind in runs:
        n = min(n, size - off)
        if n <= 0:
            continue
        if kind == 0:
            d[off:off + n] = rng.integers(0, 256, n, dtype=np.uint8)
        elif kind == 1:
            d[off:off + n] = np.frombuffer(text(rng, n), np.uint8)
    return d


run_st = st.lists(st.tuples(st.integers(0, 3 * MiB), st.integers(1, 700 * KiB),
                            st.integers(0, 2)), min_size=1, max_size=10)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# random data (stored raw: frames point into the slabs until their pack is encoded), small
# batches, a pool that recycles: fails if a slab were reused before its frames were packed
@example(runs=[(0, 3 * MiB, 0)], batch=64 * KiB, keep=3, pack=8 * MiB, extents=[(0, 3 * MiB)])
@given(runs=run_st, batch=st.sampled_from([64 * KiB, 300 * KiB, 4 * MiB]),
       keep=st.integers(0, 3), pack=st.sampled_from([128 * KiB, 8 * MiB]),
       extents=st.lists(st.tuples(st.integers(0, 3 * MiB), st.integers(1, MiB)), min_size=1,
                        max_size=8))
def test_point_from_pooled_slabs_equals_the_source(runs: list[tuple[int, int, int]], batch: int,
                                                   keep: int, pack: int,
                                                   extents: list[tuple[int, int]]) -> None:
    """Batches read into pooled slabs and handed to the writer without a copy: whatever the
    batch size, pack size and how few free slabs the pool keeps (so slabs are recycled while
    frames of earlier batches still wait in the open pack or in an upload), the point equals
    the source, and every slab goes back once the writer is done."""
    size = 3 * MiB + 4096
    rng = np.random.default_rng(len(runs) * 7 + keep)
    disk = _disk(rng, size, runs)
    todo = ExtentList.of([(o, min(n, size - o)) for o, n in extents if o < size])
    repo = Repository(MemoryObjectStore(), "vm1", segment_size=MiB, pack_target=pack, threads=2)
    pool = SlabPool(batch, keep=keep)
    w = repo.begin("c0", base=None, disk_sizes={"d0": size}, kind="initial")
    seen: set[int] = set()
    for offs, lens, data, slab in read_batches(ArrayReader(disk), todo.split(batch), batch, pool):
        assert isinstance(slab, Slab)
        seen.add(id(slab.array))
        w.write_many("d0", offs, lens, data, owner=slab)
        # the engine drops its references here; the writer's keep the bytes alive
        del data, slab
    p = w.commit(created_at=1.0, consistency=Consistency.CRASH)
    want = np.zeros(size, np.uint8)
    for o, n in zip(todo.starts.tolist(), todo.lengths.tolist(), strict=True):
        want[o:o + n] = disk[o:o + n]
    r = repo.reader(p.point_id, "d0")
    got = bytearray(size)
    r.readinto(0, memoryview(got))
    assert bytes(got) == want.tobytes()
    assert len(pool._free) <= keep


def test_written_buffer_is_copied_without_owner() -> None:
    """Without ``owner`` the writer copies: the caller may overwrite its buffer at once."""
    repo = Repository(MemoryObjectStore(), "vm1", segment_size=MiB, pack_target=MiB, threads=2)
    rng = np.random.default_rng(5)
    data = bytearray(rng.integers(0, 256, 512 * KiB, dtype=np.uint8).tobytes())
    keep = bytes(data)
    w = repo.begin("c0", base=None, disk_sizes={"d0": MiB}, kind="initial")
    w.write_many("d0", np.array([0], np.int64), np.array([len(data)], np.int64), data)
    data[:] = bytes(len(data))  # reuse the buffer before the writer is done
    p = w.commit(created_at=1.0, consistency=Consistency.CRASH)
    got = bytearray(MiB)
    repo.reader(p.point_id, "d0").readinto(0, memoryview(got))
    assert bytes(got[:len(keep)]) == keep


def _has_direct_io(d: Path) -> bool:
    try:
        fd = os.open(d / "probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644)
    except OSError:
        return False
    os.close(fd)
    return True


def test_replica_streamed_from_slabs_uses_direct_writes_and_equals_the_point(tmp_path: Path
                                                                            ) -> None:
    """An initial copy streamed into the replica from page-aligned slabs: large aligned runs go
    through the O_DIRECT descriptor (where the filesystem has one), odd ones through the page
    cache, and after the commit the image equals the point, byte for byte; a delta of small
    writes streams on top of it."""
    repo = Repository(LocalObjectStore(tmp_path / "store"), "vm1", segment_size=MiB,
                      pack_target=2 * MiB, threads=2)
    h = ReplicaHydrator(repo, tmp_path / "replica")
    rng = np.random.default_rng(9)
    size = 4 * MiB + 3 * 4096
    disk = _disk(rng, size, [(0, 1536 * KiB, 0), (1536 * KiB, 512 * KiB, 1),
                             (3 * MiB + 100, 300 * KiB, 0)])
    pool = SlabPool(MiB)
    w = repo.begin("c0", base=None, disk_sizes={"d0": size}, kind="initial")
    stream = h.stream("c0", None, {"d0": size})
    assert stream is not None
    w.tee = stream.write_runs
    todo = ExtentList.of([(0, 2 * MiB), (3 * MiB + 100, 300 * KiB)])
    for offs, lens, data, slab in read_batches(ArrayReader(disk), todo.split(MiB), MiB, pool):
        w.write_many("d0", offs, lens, data, owner=slab)
    p0 = w.commit(created_at=1.0, consistency=Consistency.CRASH)
    direct = "d0" in stream._direct and "d0" not in stream._no_direct
    stream.finish(p0)
    model = np.zeros(size, np.uint8)
    for o, n in zip(todo.starts.tolist(), todo.lengths.tolist(), strict=True):
        model[o:o + n] = disk[o:o + n]
    img = h.disk_path("d0").read_bytes().ljust(size, b"\0")
    assert img == model.tobytes()
    assert h.state() == (p0.point_id, None) and h.verify()
    if _has_direct_io(tmp_path):
        assert direct, "large aligned runs did not take the direct path"
    # a delta of scattered small writes (page cache path) over the directly written image
    w = repo.begin("c1", base=p0.point_id, disk_sizes={"d0": size}, kind="delta")
    stream = h.stream("c1", p0.point_id, {"d0": size})
    assert stream is not None
    w.tee = stream.write_runs
    offs = np.array([4096, 700 * KiB + 512, 3 * MiB + 200], np.int64)
    lens = np.array([4096, 1000, 8192], np.int64)
    data = rng.integers(0, 256, int(lens.sum()), dtype=np.uint8)
    w.write_many("d0", offs, lens, data.tobytes())
    pos = 0
    for o, n in zip(offs.tolist(), lens.tolist(), strict=True):
        model[o:o + n] = data[pos:pos + n]
        pos += n
    p1 = w.commit(created_at=2.0, consistency=Consistency.CRASH)
    stream.finish(p1)
    assert h.disk_path("d0").read_bytes().ljust(size, b"\0") == model.tobytes()
    assert h.verify()


def test_tee_runs_beside_the_workers_and_is_done_when_flush_returns() -> None:
    """The tee gets every frame's runs from its own threads while later frames are
    compressed; each call still has the slab's bytes (the writer holds the slab until the call
    returned), and flush (so commit) returns only after every call returned."""
    repo = Repository(MemoryObjectStore(), "vm1", segment_size=MiB, pack_target=MiB, threads=2)
    rng = np.random.default_rng(3)
    size = 6 * MiB
    disk = rng.integers(0, 256, size, dtype=np.uint8)
    disk[MiB:2 * MiB] = 0  # a zero frame: its runs reach the tee too
    image = np.full(size, 255, np.uint8)
    threads: set[str] = set()
    lock = threading.Lock()

    def tee(disk_id: str, runs: np.ndarray, raw: bytes | memoryview) -> None:
        time.sleep(0.01)  # a slow device: the slab must still hold this frame's bytes
        rb = np.frombuffer(raw, np.uint8) if len(raw) else np.zeros(0, np.uint8)
        for r in runs:
            o, n = int(r["offset"]), int(r["length"])
            image[o:o + n] = 0 if r["codec"] == 0 else rb[int(r["roff"]):int(r["roff"]) + n]
        with lock:
            threads.add(threading.current_thread().name)

    pool = SlabPool(MiB, keep=1)
    w = repo.begin("c0", base=None, disk_sizes={"d0": size}, kind="initial")
    w.tee = tee
    todo = ExtentList.of([(0, size)])
    for offs, lens, data, slab in read_batches(ArrayReader(disk), todo.split(MiB), MiB, pool):
        w.write_many("d0", offs, lens, data, owner=slab)
        del data, slab
    w.commit(created_at=1.0, consistency=Consistency.CRASH)
    assert (image == disk).all()
    assert threads and all(t.startswith("drsite-tee-") for t in threads)


def test_a_failing_tee_fails_the_cycle_and_breaks_the_writer() -> None:
    """An error in a tee call reaches the caller (write_many or flush/commit) and the writer
    refuses more work: the cycle is resumed with a new writer, whose replica catches up from
    the store."""
    repo = Repository(MemoryObjectStore(), "vm1", segment_size=MiB, pack_target=MiB, threads=2)

    def tee(disk_id: str, runs: np.ndarray, raw: bytes | memoryview) -> None:
        raise OSError(28, "No space left on device")

    w = repo.begin("c0", base=None, disk_sizes={"d0": 4 * MiB}, kind="initial")
    w.tee = tee
    data = np.random.default_rng(1).integers(0, 256, 2 * MiB, dtype=np.uint8).tobytes()
    with pytest.raises(OSError):
        w.write_many("d0", np.array([0], np.int64), np.array([len(data)], np.int64), data)
        w.commit(created_at=1.0, consistency=Consistency.CRASH)
    with pytest.raises(InvalidInput):
        w.write("d0", 3 * MiB, data[:4096])
    w.close()
    assert repo.points() == []


def _committed_base(size: int, seed: int) -> tuple[Repository, npt.NDArray[np.uint8], str]:
    """A repository holding one point of a disk ``d0`` of random bytes: (repo, bytes, id)."""
    repo = Repository(MemoryObjectStore(), "vm1", segment_size=MiB, pack_target=MiB, threads=2)
    data = np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)
    w = repo.begin("c0", base=None, disk_sizes={"d0": size}, kind="initial")
    w.write("d0", 0, data.tobytes())
    return repo, data, w.commit(created_at=1.0, consistency=Consistency.CRASH).point_id


def test_rehomed_writes_are_stored_but_neither_teed_nor_listed_as_changed() -> None:
    """``write_many(rehomed=True)``: the base's own bytes stored again (re-homing). The point
    reads them, its maps take them from this cycle's packs, but its changed list holds only
    the other writes, and the tee (a replica at the base) is not handed them."""
    repo, base_bytes, p0 = _committed_base(4 * MiB, 5)
    rng = np.random.default_rng(15)
    teed: list[tuple[int, int]] = []

    def tee(disk_id: str, runs: np.ndarray, raw: bytes | memoryview) -> None:
        teed.extend((int(r["offset"]), int(r["length"])) for r in runs)

    w = repo.begin("c1", base=p0, disk_sizes={"d0": 4 * MiB}, kind="delta")
    w.tee = tee
    change = rng.integers(0, 256, 8 * KiB, dtype=np.uint8).tobytes()
    w.write_many("d0", [MiB, 3 * MiB], [4 * KiB, 4 * KiB], change)
    offs, lens = np.array([0, 2 * MiB], np.int64), np.array([64 * KiB, 128 * KiB], np.int64)
    again = np.concatenate([base_bytes[0:64 * KiB], base_bytes[2 * MiB:2 * MiB + 128 * KiB]])
    w.write_many("d0", offs, lens, again.tobytes(), rehomed=True)
    p1 = w.commit(created_at=2.0, consistency=Consistency.CRASH)
    r = repo.reader(p1.point_id, "d0")
    assert r.changed_extents() == ExtentList.of([(MiB, 4 * KiB), (3 * MiB, 4 * KiB)])
    assert p1.bytes_written == 8 * KiB    # the change rate counts the changes only
    assert sorted(teed) == [(MiB, 4 * KiB), (3 * MiB, 4 * KiB)]
    want = base_bytes.copy()
    want[MiB:MiB + 4 * KiB] = np.frombuffer(change[:4 * KiB], np.uint8)
    want[3 * MiB:3 * MiB + 4 * KiB] = np.frombuffer(change[4 * KiB:], np.uint8)
    got = bytearray(4 * MiB)
    r.readinto(0, memoryview(got))
    assert bytes(got) == want.tobytes()
    # the re-homed ranges are this cycle's now: the map diff lists them (they moved)
    assert repo.diff(p0, p1.point_id, "d0").total == 8 * KiB + 192 * KiB


def test_a_write_after_a_rehomed_range_is_a_change_one_before_it_is_not() -> None:
    """Overlapping re-homed and ordinary writes (the engine never makes them; the writer stays
    right anyway): the later write wins in the point, so a later ordinary write over a
    re-homed range is listed as changed, and an earlier one that the re-homed bytes (the
    base's) overwrote is not — a replica at the base applying the list ends equal to the point."""
    repo, base, p0 = _committed_base(2 * MiB, 6)
    rng = np.random.default_rng(16)
    w = repo.begin("c1", base=p0, disk_sizes={"d0": 2 * MiB}, kind="delta")
    early = rng.integers(0, 256, 4 * KiB, dtype=np.uint8).tobytes()
    w.write("d0", 0, early)                                   # overwritten by the re-homing
    w.write_many("d0", [0, MiB], [64 * KiB, 64 * KiB],
                 np.concatenate([base[:64 * KiB], base[MiB:MiB + 64 * KiB]]).tobytes(),
                 rehomed=True)
    late = rng.integers(0, 256, 4 * KiB, dtype=np.uint8).tobytes()
    w.write("d0", MiB + 8 * KiB, late)                        # wins over the re-homed bytes
    w.write_zero("d0", MiB + 32 * KiB, 4 * KiB)               # so does a zero range
    p1 = w.commit(created_at=2.0, consistency=Consistency.CRASH)
    r = repo.reader(p1.point_id, "d0")
    assert r.changed_extents() == ExtentList.of([(MiB + 8 * KiB, 4 * KiB),
                                                 (MiB + 32 * KiB, 4 * KiB)])
    want = base.copy()
    want[MiB + 8 * KiB:MiB + 12 * KiB] = np.frombuffer(late, np.uint8)
    want[MiB + 32 * KiB:MiB + 36 * KiB] = 0
    got = bytearray(2 * MiB)
    r.readinto(0, memoryview(got))
    assert bytes(got) == want.tobytes()
    # a replica at the base that writes only the changed list ends equal to the point
    replica = base.copy()
    for off, n in r.changed_extents().to_pairs():
        replica[off:off + n] = np.frombuffer(bytes(got[off:off + n]), np.uint8)
    assert replica.tobytes() == bytes(got)
