"""Property test on the real embedded stack (file hypervisor with its guest runtime, change logs,
copy-before-write, local store, hydrated replica): any sequence of writes, cycles, crashes of
the guest or of the engine, and resyncs ends with every committed point equal, byte for byte,
to the source as it was at that point's instant."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from drsite.core.model import DiskSpec, SealedCycle, VmSpec
from drsite.hypervisors.file.driver import FileHypervisor
from drsite.hypervisors.file.runtime import GuestRuntime
from drsite.replication.driver import ItemReplicator, ReplicationSettings
from drsite.replication.planner import ALWAYS
from drsite.replication.target import LocalTarget
from drsite.store.local.backend import LocalObjectStore
from drsite.store.replica import ReplicaHydrator
from drsite.store.repository import Repository

pytestmark = pytest.mark.slow

KiB = 1024
MiB = 1024 * KiB
SIZES = {"d0": 2 * MiB, "d1": 1 * MiB + 12 * KiB}


class Crash(BaseException):
    pass


class CrashingStore(LocalObjectStore):
    crash_after: int | None = None

    def put(self, key: str, data: bytes | memoryview, *, overwrite: bool = False) -> None:
        if self.crash_after is not None:
            if self.crash_after <= 0:
                raise Crash()
            self.crash_after -= 1
        super().put(key, data, overwrite=overwrite)


class World:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.hv = FileHypervisor(root / "vms")
        self.vm = self.hv.create_blank(VmSpec(name="prop", disks=tuple(
            DiskSpec(d, s) for d, s in SIZES.items())))
        self.model = {d: bytearray(s) for d, s in SIZES.items()}
        self.store = CrashingStore(root / "store")
        self.rt: GuestRuntime | None = self.hv.guest(self.vm.vm_id)
        self.sealed: dict[str, dict[str, bytes]] = {}   # cycle id -> the model at its seal
        self.expected: dict[str, dict[str, bytes]] = {}
        real_seal = self.hv.seal

        def seal(vm_id: str, *, app_consistent: bool = False) -> SealedCycle:
            c = real_seal(vm_id, app_consistent=app_consistent)
            self.sealed[c.cycle_id] = {d: bytes(b) for d, b in self.model.items()}
            return c

        self.hv.seal = seal  # type: ignore[method-assign]
        self.rng = np.random.default_rng(11)
        self.item = self.new_item()

    def repo(self) -> Repository:
        return Repository(self.store, "item", segment_size=1 * MiB, pack_target=256 * KiB)

    def new_item(self) -> ItemReplicator:
        repo = self.repo()
        self.hydrator = ReplicaHydrator(repo, self.root / "replica")
        st = ReplicationSettings(frequency_s=5, app_consistent_every_s=None, resync_window=ALWAYS,
                                 io_size=256 * KiB, save_every_bytes=256 * KiB)
        return ItemReplicator(item_id="item", vm_id=self.vm.vm_id, driver=self.hv,
                              target=LocalTarget(repo, self.hydrator), state_dir=self.root / "state",
                              settings=st)

    def write(self, disk: str, off: int, n: int, zero: bool) -> None:
        n = min(n, SIZES[disk] - off)
        data = bytes(n) if zero else self.rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        if self.rt is not None:
            self.rt.vm.write(disk, off, data)
        else:
            self.hv.write(self.vm.vm_id, disk, off, data)
        self.model[disk][off:off + n] = data

    def scatter(self, disk: str, seed: int, count: int, aligned: bool) -> None:
        """A guest's queue of small scattered writes (4 KiB blocks or odd sizes, some zero) in
        one batch: one log append for all, shared frames when shipped."""
        rng = np.random.default_rng(seed)
        size = SIZES[disk]
        writes = []
        for i in range(count):
            if aligned:
                off, n = int(rng.integers(0, size // 4096)) * 4096, 4096
            else:
                off = int(rng.integers(0, size - 1))
                n = min(int(rng.integers(1, 9000)), size - off)
            data = bytes(n) if i % 4 == 0 else rng.integers(0, 256, n, dtype=np.uint8).tobytes()
            writes.append((disk, off, data))
            self.model[disk][off:off + n] = data  # later writes of the batch win
        if self.rt is not None:
            self.rt.vm.write_many(writes)
        else:
            for d, off, data in writes:
                self.hv.write(self.vm.vm_id, d, off, data)

    def record(self) -> None:
        for p in self.repo().points():
            if p.point_id not in self.expected:
                self.expected[p.point_id] = self.sealed[p.cycle_id]

    def advance(self) -> None:
        if self.repo().latest() is None:
            self.item.run_initial()
        else:
            self.item.run_cycle()
        self.record()

    def point_bytes(self, pid: str) -> dict[str, bytes]:
        out = {}
        for d, s in SIZES.items():
            buf = bytearray(s)
            self.repo().reader(pid, d).readinto(0, memoryview(buf))
            out[d] = bytes(buf)
        return out

    def close(self) -> None:
        if self.rt is not None:
            self.rt.stop()


ops = st.lists(st.one_of(
    st.tuples(st.just("write"), st.sampled_from(sorted(SIZES)), st.integers(0, 2 * MiB - 1),
              st.integers(1, 200 * KiB), st.booleans()),
    st.tuples(st.just("scatter"), st.sampled_from(sorted(SIZES)), st.integers(0, 2**16),
              st.integers(1, 300), st.booleans()),
    st.tuples(st.just("cycle")),
    st.tuples(st.just("engine_crash"), st.integers(0, 5)),
    st.tuples(st.just("guest_crash")),
    st.tuples(st.just("guest_stop")),
    st.tuples(st.just("resync")),
), min_size=1, max_size=12)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops)
def test_points_equal_source_under_crashes(steps: list[tuple[Any, ...]]) -> None:
    root = Path(tempfile.mkdtemp(prefix="drsite-prop-"))
    w = World(root)
    try:
        w.write("d0", 0, 300 * KiB, False)
        for o in steps:
            if o[0] == "write":
                _, disk, off, n, zero = o
                w.write(disk, min(off, SIZES[disk] - 1), n, zero)
            elif o[0] == "scatter":
                _, disk, seed, count, aligned = o
                w.scatter(disk, seed, count, aligned)
            elif o[0] == "cycle":
                w.advance()
            elif o[0] == "engine_crash":
                w.store.crash_after = o[1]
                try:
                    w.advance()
                except Crash:
                    pass
                w.store.crash_after = None
                w.record()
                w.item = w.new_item()
            elif o[0] == "guest_crash":
                if w.rt is not None:
                    w.rt.crash()
                w.rt = w.hv.guest(w.vm.vm_id)  # the VM restarts after its crash
            elif o[0] == "guest_stop":
                if w.rt is not None:
                    w.rt.stop()
                    w.rt = None
                else:
                    w.rt = w.hv.guest(w.vm.vm_id)
            elif o[0] == "resync" and w.repo().latest() is not None:
                w.item.run_resync()
                w.record()
        if w.repo().latest() is None:
            w.advance()
        # one call: a cycle sealed before a crash is finished as its own point, then a cycle
        # sealed after every write (run_cycle's contract: the point holds the writes before it)
        last = w.item.run_cycle()
        w.record()
        assert w.expected[last.point_id] == {d: bytes(b) for d, b in w.model.items()}
        for pid, want in w.expected.items():
            assert w.point_bytes(pid) == want, pid
        for d, s in SIZES.items():
            assert w.hydrator.disk_path(d).read_bytes().ljust(s, b"\0") == bytes(w.model[d])
    finally:
        w.close()
        shutil.rmtree(root, ignore_errors=True)
