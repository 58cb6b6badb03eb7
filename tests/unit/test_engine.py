"""The replication engine with fakes: in-memory hypervisor, in-memory store, fake clock."""

from __future__ import annotations

import errno
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from drsite.core.clock import FakeClock
from drsite.core.errors import (
    DrsiteError,
    Forbidden,
    LowDiskSpace,
    NetworkError,
    ObjectNotFound,
    PermanentError,
)
from drsite.core.model import DiskSpec, VmSpec
from drsite.core.retention import RetentionRule
from drsite.hypervisors.testing.memory import MemoryHypervisor
from drsite.replication import driver as driver_mod
from drsite.replication.driver import ItemReplicator, ReplicationSettings
from drsite.replication.planner import ALWAYS, ResyncWindow
from drsite.replication.report import Health, ItemReport, ItemState
from drsite.replication.target import LocalTarget
from drsite.store.replica import ReplicaHydrator
from drsite.store.repository import Repository
from drsite.store.testing.memory import MemoryObjectStore

KiB = 1024
MiB = 1024 * KiB
SIZE = 2 * MiB


class Crash(BaseException):
    """Stands in for the engine process dying (not an Exception: nothing may catch it)."""


class CrashingStore(MemoryObjectStore):
    """A memory store that 'kills the process' on the Nth put, or fails puts transiently."""

    def __init__(self) -> None:
        super().__init__()
        self.crash_after: int | None = None
        self.fail_puts = 0
        self.full_puts = 0
        self.refuse_puts = 0
        self.puts = 0

    def put(self, key: str, data: bytes | memoryview, *, overwrite: bool = False) -> None:
        if self.fail_puts > 0:
            self.fail_puts -= 1
            raise NetworkError("injected: store unreachable")
        if self.full_puts > 0:
            self.full_puts -= 1
            raise LowDiskSpace(f"injected: {key}: no space left on device")
        if self.refuse_puts > 0:
            self.refuse_puts -= 1
            raise Forbidden(f"injected: host h1 may not put {key}: item item1 is not assigned "
                            "to it")
        if self.crash_after is not None:
            if self.crash_after <= 0:
                raise Crash()
            self.crash_after -= 1
        self.puts += 1
        super().put(key, data, overwrite=overwrite)


class Env:
    def __init__(self, tmp: Path, *, sizes: tuple[int, ...] = (SIZE, SIZE)) -> None:
        self.tmp = tmp
        self.clock = FakeClock()
        self.hv = MemoryHypervisor(self.clock)
        self.store = CrashingStore()
        self.vm = self.hv.create_blank(VmSpec(name="vm1", disks=tuple(
            DiskSpec(f"d{i}", s) for i, s in enumerate(sizes))))
        self.settings = ReplicationSettings(frequency_s=30, app_consistent_every_s=None,
                                            resync_window=ALWAYS, io_size=256 * KiB,
                                            save_every_bytes=256 * KiB)
        self.rng = np.random.default_rng(7)
        self.item = self.new_item()

    def repo(self) -> Repository:
        return Repository(self.store, "item1", segment_size=1 * MiB, pack_target=256 * KiB)

    def new_item(self) -> ItemReplicator:
        """A fresh engine over the same durable state: what a restarted agent builds."""
        repo = self.repo()
        self.hydrator = ReplicaHydrator(repo, self.tmp / "replica")
        return ItemReplicator(item_id="item1", vm_id=self.vm.vm_id, driver=self.hv,
                              target=LocalTarget(repo, self.hydrator), state_dir=self.tmp / "state",
                              settings=self.settings, clock=self.clock)

    def write(self, disk: str, off: int, n: int, zero: bool = False) -> None:
        data = bytes(n) if zero else self.rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        self.hv.write(self.vm.vm_id, disk, off, data)

    def source(self) -> dict[str, bytes]:
        return {d.disk_id: self.hv.disk_bytes(self.vm.vm_id, d.disk_id) for d in self.vm.disks}

    def point_bytes(self, point_id: str) -> dict[str, bytes]:
        out = {}
        repo = self.repo()
        for d in self.vm.disks:
            r = repo.reader(point_id, d.disk_id)
            buf = bytearray(r.size)
            r.readinto(0, memoryview(buf))
            out[d.disk_id] = bytes(buf)
        return out

    def replica_bytes(self) -> dict[str, bytes]:
        return {d.disk_id: self.hydrator.disk_path(d.disk_id).read_bytes().ljust(d.size, b"\0")
                for d in self.vm.disks}


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    yield Env(tmp_path)


def test_initial_then_delta_points_equal_source(env: Env) -> None:
    env.write("d0", 0, 300 * KiB)
    env.write("d1", 1 * MiB + 123, 5000)
    p0 = env.item.run_initial()
    assert p0.kind == "initial"
    assert env.point_bytes(p0.point_id) == env.source()
    # holes were skipped: only the written ranges (rounded to the reader's 4 KiB blocks) travel
    assert env.item.report.bytes_sent <= 300 * KiB + 3 * 4096
    snap0 = env.source()
    env.write("d0", 100 * KiB + 7, 4096)
    env.write("d1", 12345, 1)
    env.write("d0", 0, 4096, zero=True)
    p1 = env.item.run_cycle()
    assert p1.kind == "delta" and p1.base_point_id == p0.point_id
    assert env.point_bytes(p1.point_id) == env.source()
    assert env.point_bytes(p0.point_id) == snap0
    assert env.replica_bytes() == env.source()
    rep = env.item.report
    assert rep.state is ItemState.PROTECTED and rep.health is Health.NORMAL
    assert rep.last_point_id == p1.point_id and rep.rpo_s is not None


def test_delta_ships_only_written_bytes(env: Env) -> None:
    env.write("d0", 0, 1 * MiB)
    env.item.run_initial()
    before = env.item.report.bytes_sent
    offsets = env.rng.choice(SIZE // 4096, 50, replace=False) * 4096
    for off in offsets:
        env.write("d1", int(off), 4096)
    env.item.run_cycle()
    assert env.item.report.bytes_sent - before == 50 * 4096


def test_transient_store_failure_retries_on_the_seed_schedule(env: Env) -> None:
    env.write("d0", 0, 64 * KiB)
    env.store.fail_puts = 3
    t0 = env.clock.now()
    env.item.step()
    rep = env.item.report
    assert rep.last_error is not None and rep.last_error["class"] == "transient"
    assert rep.next_attempt_at == t0 + 60
    assert rep.health is Health.WARNING
    env.item.step()  # not due yet: nothing happens
    assert env.store.fail_puts == 2
    p = env.item.run_initial()  # sleeps on the fake clock: +60 s, +120 s, +240 s, then succeeds
    assert env.clock.sleeps[:3] == [60.0, 120.0, 240.0]
    assert env.point_bytes(p.point_id) == env.source()
    assert env.item.report.last_error is None


def test_a_store_refusal_is_retried_not_critical(env: Env) -> None:
    """A site store that refuses this host's writes ('not assigned to it') may hold an access
    list older than the vault's grant (a cancelled failover): the engine reports the refusal,
    keeps its state and tries again when told (the vault decides whether it is Critical)."""
    env.item.run_initial()
    env.write("d0", 0, 64 * KiB)
    env.store.refuse_puts = 1
    with pytest.raises(DrsiteError) as got:
        env.item.run_cycle(wait_transient=False)
    assert got.value.code == "forbidden" and got.value.transient
    rep = env.item.report
    assert rep.state is not ItemState.CRITICAL and rep.health is not Health.CRITICAL
    assert rep.last_error is not None and rep.last_error["code"] == "forbidden"
    p = env.item.run_cycle(wait_transient=False)  # the vault sends the next cycle: it runs
    assert env.point_bytes(p.point_id) == env.source()
    assert env.item.report.last_error is None


def test_run_cycle_after_an_interrupted_cycle_holds_the_writes_made_since(env: Env) -> None:
    """A planned failover's final cycle (run_cycle) came after a cycle the store outage had
    interrupted: it finished the old frozen view and returned that point, so the replica
    lacked the writes made since and the failover failed its proof (CI, crash campaign). The
    old cycle is committed as its own point, then a fresh one holds every write."""
    env.item.run_initial()
    env.write("d0", 0, 64 * KiB)
    old_view = env.source()
    env.store.fail_puts = 1
    with pytest.raises(DrsiteError) as got:
        env.item.run_cycle(wait_transient=False)
    assert got.value.transient and env.item.rec.cycle_id is not None
    env.write("d1", 4096, 8192)   # the guest writes on, then the source stops
    n = len(env.repo().points())
    p = env.item.run_cycle(wait_transient=False)
    assert env.point_bytes(p.point_id) == env.source()
    points = env.repo().points()
    assert len(points) == n + 2
    assert env.point_bytes(points[-2].point_id) == old_view


def test_run_cycle_after_a_crash_mid_cycle_holds_the_writes_made_since(env: Env) -> None:
    """The same after a crash: the restarted engine (a new replicator over the same state)
    finds the sealed cycle and must not hand it back as the point of 'now'."""
    env.item.run_initial()
    env.write("d0", 256 * KiB, 300 * KiB)
    env.store.crash_after = 1
    with pytest.raises(Crash):
        env.item.run_cycle()
    env.store.crash_after = None
    env.write("d0", 0, 4096)
    item = env.new_item()
    p = item.run_cycle()
    assert env.point_bytes(p.point_id) == env.source()
    assert env.hv.pending_cycle(env.vm.vm_id) is None


def test_vm_not_found_is_permanent_and_critical(env: Env) -> None:
    env.item.run_initial()
    env.hv.remove(env.vm.vm_id)
    env.item.step()
    rep = env.item.report
    assert rep.state is ItemState.CRITICAL and rep.health is Health.CRITICAL
    assert rep.last_error and rep.last_error["code"] == "vm_not_found"
    assert rep.next_attempt_at is None
    env.clock.advance(10_000)
    env.item.step()  # no retry
    assert env.item.report.state is ItemState.CRITICAL
    with pytest.raises(PermanentError):
        env.item.run_cycle()


def test_request_resync_recomputes_the_report_at_once(env: Env) -> None:
    """Issue 19, finding 2: the record leaves Critical and the report (what the heartbeat
    carries) says so at once — resync required, then resyncing, then protected."""
    env.write("d0", 0, 64 * KiB)
    env.item.run_initial()
    env.item.generation = 1
    from drsite.store.generation import GenerationStore
    GenerationStore(env.store).ensure("item1", "elsewhere", now=env.clock.now(), at_least=2,
                                      reason="promoted on the other site")
    env.item.step()
    rep = env.item.report
    assert rep.state is ItemState.CRITICAL and rep.last_error["code"] == "fenced"
    env.item.generation = 2  # the cancelled failover hands the item back
    env.item.request_resync("failover cancelled")
    rep = env.item.report
    assert rep.state is ItemState.RESYNC_REQUIRED and rep.health is Health.WARNING, rep
    assert rep.last_error is None and "failover cancelled" in " ".join(rep.health_reasons)
    seen: list[ItemState] = []
    env.item.on_progress = lambda r: seen.append(r.state)
    env.item.step()
    assert ItemState.RESYNCING in seen
    assert env.item.report.state is ItemState.PROTECTED and env.item.report.health is Health.NORMAL


def test_crash_mid_initial_resumes_where_it_stopped(env: Env) -> None:
    for i in range(8):
        env.write(f"d{i % 2}", i * 256 * KiB, 200 * KiB)
    env.store.crash_after = 5
    with pytest.raises(Crash):
        env.item.run_initial()
    puts_before = env.store.puts
    env.store.crash_after = None
    item = env.new_item()  # the restarted agent
    p = item.run_initial()
    assert item.report.initial_resumed_from > 0, "resumed from zero"
    assert env.point_bytes(p.point_id) == env.source()
    # the first attempt's packs were reused, not re-sent
    assert env.store.puts - puts_before < 12


def test_crash_between_commit_and_release(env: Env) -> None:
    env.write("d0", 0, 100 * KiB)
    env.item.run_initial()
    env.write("d0", 8192, 4096)

    real_release = env.hv.release

    def dying_release(cycle):  # type: ignore[no-untyped-def]
        raise Crash()

    env.hv.release = dying_release  # type: ignore[method-assign]
    with pytest.raises(Crash):
        env.item.run_cycle()
    env.hv.release = real_release  # type: ignore[method-assign]
    item = env.new_item()
    n_points = len(env.repo().points())
    item.step()  # finishes the committed cycle: releases, no second point for it
    assert len(env.repo().points()) == n_points
    assert env.hv.pending_cycle(env.vm.vm_id) is None
    latest = env.repo().latest()
    assert latest is not None and env.point_bytes(latest.point_id) == env.source()


def test_untrusted_tracking_resyncs_only_differences(env: Env) -> None:
    env.write("d0", 0, 1 * MiB)
    env.write("d1", 0, 1 * MiB)
    env.item.run_initial()
    env.hv.lose_tracking(env.vm.vm_id, "log lost in host crash")
    env.write("d0", 512 * KiB, 100)  # written while tracking was not trusted
    env.item.step()
    assert env.item.report.state is ItemState.RESYNC_REQUIRED
    before = env.item.report.bytes_sent
    env.item.step()
    rep = env.item.report
    assert rep.state is ItemState.PROTECTED and rep.resyncs == 1
    assert rep.bytes_sent - before == 64 * KiB  # one 64 KiB block differs
    latest = env.repo().latest()
    assert latest is not None and latest.kind == "resync"
    assert env.point_bytes(latest.point_id) == env.source()
    assert env.replica_bytes() == env.source()


def test_log_over_half_the_disk_triggers_resync_in_window(tmp_path: Path) -> None:
    env = Env(tmp_path)
    env.item.settings = ReplicationSettings(frequency_s=30, resync_window=ResyncWindow("01:00", "02:00"),
                                            io_size=256 * KiB)
    env.item.minute_of_day = lambda t: 12 * 60  # noon: outside the window
    env.item.run_initial()
    env.write("d0", 0, SIZE // 2 + 4096)
    env.item.step()
    assert env.item.report.state is ItemState.RESYNC_REQUIRED
    assert "50%" in env.item.report.resync_reason
    env.item.step()
    assert env.item.report.state is ItemState.RESYNC_REQUIRED  # window closed: pending
    assert env.item.report.health is Health.WARNING
    env.item.minute_of_day = lambda t: 90
    env.item.step()
    assert env.item.report.state is ItemState.PROTECTED
    latest = env.repo().latest()
    assert latest is not None and env.point_bytes(latest.point_id) == env.source()


def test_corrupt_pack_detected_and_repaired_by_resync(env: Env) -> None:
    env.write("d0", 0, 512 * KiB)
    env.item.run_initial()
    env.write("d0", 64 * KiB, 64 * KiB)
    env.write("d1", 0, 64 * KiB)
    # corrupt every object of the next cycle right after it is stored, before hydration reads it
    repo = env.repo()
    env.item.rec.last_cycle_started = None
    env.item.step()
    latest = repo.latest()
    assert latest is not None
    keys = [k for k in env.store.list("items/item1/packs/") if latest.cycle_id in k]
    assert keys
    for k in keys:
        data = bytearray(env.store.get(k))
        data[len(data) // 3] ^= 0xFF
        env.store.put(k, bytes(data), overwrite=True)
    with pytest.raises(Exception) as ei:
        env.point_bytes(latest.point_id)
    assert "corrupt" in str(ei.value).lower() or "hash" in str(ei.value).lower()
    # the next hydration or resync request finds the damage: quarantine + resync against the store
    env.item.request_resync("store scrub found damage")
    env.item.rec.resync_from_store = True
    env.item.step()
    rep = env.item.report
    assert rep.state is ItemState.PROTECTED, rep.to_dict()
    newest = env.repo().latest()
    assert newest is not None and newest.kind == "resync"
    assert env.point_bytes(newest.point_id) == env.source()


def test_report_round_trips_and_rpo_warning(env: Env) -> None:
    from drsite.replication.report import ItemReport

    env.item.run_initial()
    env.clock.advance(env.settings.rpo_threshold_s + 1)
    env.item.step()  # a cycle runs and the RPO is fresh again
    assert env.item.report.health is Health.NORMAL
    env.hv.lose_tracking(env.vm.vm_id)
    env.item.settings = ReplicationSettings(frequency_s=30, resync_window=ResyncWindow("01:00", "01:01"))
    env.item.minute_of_day = lambda t: 600
    env.clock.advance(env.settings.rpo_threshold_s + 1)
    env.item.step()
    rep = env.item.report
    assert rep.health is Health.WARNING
    assert any("RPO" in r for r in rep.health_reasons)
    assert ItemReport.from_dict(rep.to_dict()) == rep


def test_missing_store_object_is_broken_chain_critical(env: Env) -> None:
    env.write("d0", 0, 256 * KiB)
    p = env.item.run_initial()
    for k in list(env.store.list("items/item1/packs/")):
        env.store.delete(k)
    with pytest.raises((ObjectNotFound, PermanentError)):
        env.point_bytes(p.point_id)


# ------------------------------------------------------------------- property: points are exact

op = st.one_of(
    st.tuples(st.just("write"), st.integers(0, 1), st.integers(0, SIZE - 1), st.integers(1, 70_000),
              st.booleans()),
    st.tuples(st.just("cycle")),
    st.tuples(st.just("crash"), st.integers(0, 6)),
    st.tuples(st.just("lose_tracking")),
    st.tuples(st.just("resync")),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(op, min_size=1, max_size=14))
def test_property_every_point_equals_the_source_at_its_instant(tmp_path_factory: pytest.TempPathFactory,
                                                               ops: list[tuple]) -> None:  # type: ignore[type-arg]
    env = Env(tmp_path_factory.mktemp("prop"), sizes=(SIZE, 1 * MiB + 4096 * 3))
    # every delta cycle plans re-homing (store/compaction.py): crashes land in it too
    env.settings = replace(env.settings, rehome_every_s=0.0, retention=SHORT)
    env.item = env.new_item()
    env.write("d0", 0, 100 * KiB)
    expected: dict[str, dict[str, bytes]] = {}

    def record_new_points() -> None:
        for p in env.repo().points():
            if p.point_id not in expected:
                expected[p.point_id] = sealed[p.cycle_id]

    sealed: dict[str, dict[str, bytes]] = {}   # cycle id -> the source at its seal
    real_seal = env.hv.seal

    def seal_and_remember(vm_id: str, *, app_consistent: bool = False):  # type: ignore[no-untyped-def]
        c = real_seal(vm_id, app_consistent=app_consistent)
        sealed[c.cycle_id] = env.source()
        return c

    env.hv.seal = seal_and_remember  # type: ignore[method-assign]
    item = env.item
    for o in ops:
        if o[0] == "write":
            _, disk, off, n, zero = o
            size = env.vm.disks[disk].size
            off = min(off, size - 1)
            env.write(f"d{disk}", off, min(n, size - off), zero=zero)
        elif o[0] == "cycle":
            item.run_cycle() if env.repo().latest() else item.run_initial()
            record_new_points()
        elif o[0] == "crash":
            env.store.crash_after = o[1]
            try:
                item.run_cycle() if env.repo().latest() else item.run_initial()
            except Crash:
                pass
            env.store.crash_after = None
            record_new_points()
            item = env.new_item()
        elif o[0] == "lose_tracking":
            env.hv.lose_tracking(env.vm.vm_id)
        elif o[0] == "resync" and env.repo().latest() is not None:
            item.run_resync()
            record_new_points()
    if env.repo().latest() is None:
        item.run_initial()
        record_new_points()
    # one call: a cycle sealed before a crash is finished as its own point, then a cycle
    # sealed after every write, so then the point and the replica equal the source
    last = item.run_cycle()
    record_new_points()
    assert expected[last.point_id] == env.source()
    points = env.repo().points()
    assert points
    for p in points:
        assert env.point_bytes(p.point_id) == expected[p.point_id], p.point_id
    assert env.replica_bytes() == env.source()


def _damage(store: MemoryObjectStore, key: str, how: str) -> None:
    data = bytearray(store.get(key))
    if how == "truncate":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 3] ^= 0x5A
    store.put(key, bytes(data), overwrite=True)


@pytest.mark.parametrize("how", ["flip", "truncate"])
def test_damage_found_by_hydration_is_quarantined_and_resynced(env: Env, how: str) -> None:
    """A pack damaged between upload and hydration: the hydrator's verified read fails, the
    engine quarantines the object and resyncs against the store; nothing wrong is ever served."""
    env.write("d0", 0, 512 * KiB)
    env.item.run_initial()
    env.write("d0", 64 * KiB, 64 * KiB)
    env.write("d1", 4096, 100)
    target = env.item.target
    assert isinstance(target, LocalTarget)
    # the replica catches up from the store (the path that reads, and so finds, the damage; a
    # streamed replica is written from the source's buffers and never reads the packs back)
    target.stream_replica = False
    real_after_commit = target.after_commit

    def damaging_after_commit(point):  # type: ignore[no-untyped-def]
        for k in env.store.list(f"items/item1/packs/{point.cycle_id}/"):
            _damage(env.store, k, how)
        real_after_commit(point)

    target.after_commit = damaging_after_commit  # type: ignore[method-assign]
    env.item.rec.last_cycle_started = None
    env.item.step()
    target.after_commit = real_after_commit  # type: ignore[method-assign]
    rep = env.item.report
    assert rep.state is ItemState.RESYNC_REQUIRED and rep.health is Health.WARNING
    assert rep.last_error is not None and rep.last_error["code"] == "corrupt_data"
    assert "items/item1/packs/" in rep.last_error["message"]
    assert list(env.store.list("items/item1/quarantine/")), "damaged object not quarantined"
    env.item.step()  # the repair runs at once, window or not
    rep = env.item.report
    assert rep.state is ItemState.PROTECTED, rep.to_dict()
    latest = env.repo().latest()
    assert latest is not None and latest.kind == "resync"
    assert env.point_bytes(latest.point_id) == env.source()
    assert env.replica_bytes() == env.source()
    assert env.repo().verify(latest.point_id).ok


def test_scrub_finds_truncated_object_and_repairs(env: Env) -> None:
    env.write("d0", 0, 1 * MiB)
    env.write("d1", 0, 300 * KiB)
    env.item.run_initial()
    keys = list(env.store.list("items/item1/packs/"))
    _damage(env.store, keys[0], "truncate")
    report = env.item.scrub()
    assert report is not None and not report.ok
    assert env.item.report.state is ItemState.RESYNC_REQUIRED
    sent = env.item.report.bytes_sent
    env.item.step()
    assert env.item.report.state is ItemState.PROTECTED
    latest = env.repo().latest()
    assert latest is not None and env.repo().verify(latest.point_id).ok
    assert env.point_bytes(latest.point_id) == env.source()
    # only the ranges of the damaged pack travelled again, not the whole disk
    assert env.item.report.bytes_sent - sent < 1 * MiB + 300 * KiB


def test_resync_pending_outside_window_is_not_critical(tmp_path: Path) -> None:
    """A cycle asked for while a resync waits for its window reports TrackingLost (the vault
    treats it as self-remedied), never a permanent error that would make the item Critical."""
    from drsite.core.errors import TrackingLost

    env = Env(tmp_path)
    env.item.settings = ReplicationSettings(frequency_s=30, resync_window=ResyncWindow("01:00", "02:00"),
                                            io_size=256 * KiB)
    env.item.minute_of_day = lambda t: 12 * 60
    env.item.run_initial()
    env.write("d0", 0, SIZE // 2 + 4096)
    with pytest.raises(TrackingLost):
        env.item.run_cycle(wait_transient=False)
    assert env.item.report.state is ItemState.RESYNC_REQUIRED
    assert env.item.report.health is Health.WARNING


def test_crash_after_initial_commit_before_release(env: Env) -> None:
    env.write("d0", 0, 200 * KiB)
    real_release = env.hv.release

    def dying_release(cycle):  # type: ignore[no-untyped-def]
        raise Crash()

    env.hv.release = dying_release  # type: ignore[method-assign]
    with pytest.raises(Crash):
        env.item.run_initial()
    env.hv.release = real_release  # type: ignore[method-assign]
    assert env.hv.pending_cycle(env.vm.vm_id) is not None
    item = env.new_item()
    env.write("d1", 0, 4096)
    p = item.run_cycle()
    assert item.report.state is ItemState.PROTECTED, item.report.to_dict()
    assert p.kind == "delta"
    assert env.point_bytes(p.point_id) == env.source()
    assert env.replica_bytes() == env.source()


@pytest.mark.parametrize("which", ["first", "all"])
def test_damaged_segment_map_is_repaired_by_resync(env: Env, which: str) -> None:
    """Segment maps and tables (metadata, under maps/) damaged: scrub finds it, the resync
    against the store rewrites the affected segments, the new point verifies."""
    env.write("d0", 0, 1 * MiB)
    env.write("d1", 512 * KiB, 100 * KiB)
    env.item.run_initial()
    env.write("d0", 4096, 4096)
    latest = env.item.run_cycle()
    maps = [k for k in env.store.list("items/item1/maps/") if latest.cycle_id in k]
    assert maps
    for k in maps if which == "all" else maps[:1]:
        _damage(env.store, k, "flip")
    report = env.item.scrub()
    assert report is not None and not report.ok
    env.item.step()
    rep = env.item.report
    assert rep.state is ItemState.PROTECTED, rep.to_dict()
    newest = env.repo().latest()
    assert newest is not None and newest.kind == "resync"
    assert env.repo().verify(newest.point_id).ok
    assert env.point_bytes(newest.point_id) == env.source()


def test_bandwidth_limit_paces_shipping(tmp_path: Path) -> None:
    env = Env(tmp_path)
    env.item.settings = ReplicationSettings(frequency_s=30, resync_window=ALWAYS,
                                            bandwidth_limit_bps=1 * MiB, io_size=256 * KiB)
    env.write("d0", 0, 2 * MiB)
    env.write("d1", 0, 2 * MiB)
    t0 = env.clock.now()
    env.item.run_initial()
    # 4 MiB at 1 MiB/s: about 4 s on the (fake) clock, less the initial burst allowance
    assert env.clock.now() - t0 >= 3.5
    assert env.point_bytes(env.repo().latest().point_id) == env.source()  # type: ignore[union-attr]


def test_compression_off_stores_frames_as_they_are(tmp_path: Path) -> None:
    env = Env(tmp_path)
    env.item.settings = ReplicationSettings(frequency_s=30, resync_window=ALWAYS, compression=False)
    text = (b"compressible text " * 100_000)[: 1 * MiB]
    env.hv.write(env.vm.vm_id, "d0", 0, text)
    p = env.item.run_initial()
    assert p.bytes_stored >= 1 * MiB  # not compressed
    assert env.point_bytes(p.point_id) == env.source()


def test_compression_auto_reaches_the_writer_and_points_equal_the_source(tmp_path: Path) -> None:
    """Policy "auto": the engine's writer is adaptive (its stats count the bytes it chose to
    store raw); the initial point and a delta over it equal the source."""
    env = Env(tmp_path, sizes=(8 * MiB,))
    env.item.settings = ReplicationSettings(frequency_s=30, resync_window=ALWAYS,
                                            compression="auto")
    env.hv.write(env.vm.vm_id, "d0", 0, (b"compressible text " * 200_000)[: 3 * MiB])
    p = env.item.run_initial()
    assert "raw_chosen_bytes" in p.meta["stats"]
    assert env.point_bytes(p.point_id) == env.source()
    env.hv.write(env.vm.vm_id, "d0", MiB, b"changed " * 512)
    q = env.item.run_cycle()
    assert q is not None and q.base_point_id == p.point_id
    assert env.point_bytes(q.point_id) == env.source()


def test_a_full_disk_under_the_record_is_a_transient_error_not_a_crash(
        env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine's record cannot be saved (no space left where it lives): the step raises
    what it is — transient, "no space left" — instead of a raw OSError that would end its
    process; nothing committed is lost, and once there is room the next cycle runs."""
    env.write("d0", 0, 64 * KiB)
    p0 = env.item.run_initial()
    env.write("d0", 64 * KiB, 4096)
    save = env.item._file.save

    def full(rec: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(env.item._file, "save", full)
    with pytest.raises(LowDiskSpace, match="no space left") as got:
        env.item.step()
    assert got.value.transient
    assert env.repo().latest() is not None and env.point_bytes(p0.point_id)
    monkeypatch.setattr(env.item._file, "save", save)   # room again
    p1 = env.item.run_cycle()
    assert env.point_bytes(p1.point_id) == env.source()


# a retention short enough for re-homing (REHOME_RETENTION_CYCLES at a 30 s policy) that
# keeps every point of these tests (the fake clock hardly moves): all of them are checked
SHORT = RetentionRule(retention_s=120.0, keep_all_s=120.0)


def _scatter(env: Env, share: float) -> None:
    """Overwrite ``share`` of each disk in random 4 KiB blocks."""
    for d in env.vm.disks:
        n = int(share * d.size // 4096)
        for off in (env.rng.choice(d.size // 4096, n, replace=False) * 4096).tolist():
            env.write(d.disk_id, off, 4096)


def test_rehoming_keeps_the_store_small_and_every_point_equal_to_its_source(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Scattered writes leave most packs with a few live blocks, kept for many cycles (the
    store grew to 5-8 x the disk: bench/store_growth.py). Re-homing stores those blocks again
    (store/compaction.py): with the same writes the store ends far smaller, every point still
    equals the source at its instant (also across crashes in the middle of a cycle that
    re-homes), and so does the replica."""
    stored: dict[float, int] = {}
    rehomed: dict[float, int] = {}
    died_rehoming: dict[float, int] = {}   # cycles that died after they began re-homing
    real_rehome = ItemReplicator._rehome_into
    began = [False]

    def rehome_into(self: ItemReplicator, *args: Any) -> int:
        began[0] = True
        return real_rehome(self, *args)

    monkeypatch.setattr(ItemReplicator, "_rehome_into", rehome_into)
    for share in (0.0, 0.5, 0.1):
        # 0.1 with a small floor: a plan larger than a cycle's share is spread over cycles
        # (what is left is taken later, minus what the guest changed meanwhile)
        monkeypatch.setattr(driver_mod, "REHOME_MIN_BYTES", 16 * KiB if share == 0.1
                            else 32 * MiB)
        env = Env(tmp_path / f"share{share}")
        env.settings = replace(env.settings, rehome_share=share, rehome_every_s=0.0,
                               retention=SHORT)
        env.item = env.new_item()
        for d in env.vm.disks:
            env.write(d.disk_id, 0, d.size)
        env.item.run_initial()
        repo = env.repo()
        rehomed[share] = died_rehoming[share] = 0
        for c in range(16):
            _scatter(env, 0.3)
            if c >= 4:
                # a fresh cycle dies at its n-th put (in its changes, its re-homing or its
                # maps); a new engine finishes it as its own point, then runs a fresh one
                env.store.crash_after = (7 * c) % 19
                began[0] = False
                try:
                    env.item.run_cycle()
                except Crash:
                    died_rehoming[share] += began[0]
                finally:
                    env.store.crash_after = None
                env.item = env.new_item()
            p = env.item.run_cycle()
            assert env.point_bytes(p.point_id) == env.source(), (share, c)
            rehomed[share] += int(p.meta.get("rehomed") or 0)
            for old in repo.points()[:-3]:
                repo.delete_point(old.point_id)
            repo.gc()
        assert env.replica_bytes() == env.source()
        for p in repo.points():   # the kept points are whole
            repo.reader(p.point_id, "d0").readinto(0, memoryview(bytearray(SIZE)))
        stored[share] = repo.storage_bytes()
    assert died_rehoming[0.5] >= 1 and died_rehoming[0.1] >= 1, died_rehoming
    assert rehomed[0.0] == 0 and rehomed[0.5] > 0 and rehomed[0.1] > 0
    assert stored[0.5] < 0.7 * stored[0.0], stored
    assert stored[0.1] < stored[0.0], stored


def _rehoming_env(tmp_path: Path) -> Env:
    """An item whose store has sparse packs (scattered writes over full disks, short
    retention, re-homing planned at every cycle)."""
    env = Env(tmp_path)
    env.settings = replace(env.settings, rehome_share=0.5, rehome_every_s=0.0, retention=SHORT)
    env.item = env.new_item()
    for d in env.vm.disks:
        env.write(d.disk_id, 0, d.size)
    env.item.run_initial()
    for _ in range(3):
        _scatter(env, 0.3)
        env.item.run_cycle()
    return env


def test_rehoming_reads_the_base_point_not_the_disk_written_since_the_seal(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The guest writes on after the seal, also where re-homing reads: the point holds the
    disk as it was at the seal (re-homed bytes come from the base point, never from the live
    disk), and the next point holds the new writes."""
    env = _rehoming_env(tmp_path)
    real = ItemReplicator._rehome_into
    seen: dict[str, Any] = {}

    def write_then_rehome(self: ItemReplicator, writer: Any, base: str,
                          todo: dict[str, Any], rehome: dict[str, Any], bucket: Any) -> int:
        seen["at_seal"] = env.source()
        for d, ext in rehome.items():
            for off, n in zip(ext.starts.tolist()[:20], ext.lengths.tolist()[:20], strict=True):
                env.write(d, off, n)    # the live disk changes under the re-homed ranges
        seen["rehome"] = sum(e.total for e in rehome.values())
        seen["ranges"] = dict(rehome)
        return real(self, writer, base, todo, rehome, bucket)

    monkeypatch.setattr(ItemReplicator, "_rehome_into", write_then_rehome)
    _scatter(env, 0.3)
    p = env.item.run_cycle()
    assert seen.get("rehome", 0) > 0 and int(p.meta.get("rehomed") or 0) > 0
    assert env.point_bytes(p.point_id) == seen["at_seal"]
    assert env.source() != seen["at_seal"]
    # not what the cycle changed: the point's changed list (what a replica at the base
    # rewrites) leaves the re-homed ranges out
    for d, ext in seen["ranges"].items():
        assert env.repo().reader(p.point_id, d).changed_extents().intersect(ext).total == 0
    monkeypatch.setattr(ItemReplicator, "_rehome_into", real)
    q = env.item.run_cycle()
    assert env.point_bytes(q.point_id) == env.source()


def test_a_resumed_cycle_whose_changed_list_differs_is_staged_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Staged re-homed base bytes count as covered on a resume; if the resumed cycle's
    changed list were not the one it was sealed with, they could cover a change. The engine
    records a digest of the list when it adopts a cycle and stages a cycle again whose list
    differs."""
    env = _rehoming_env(tmp_path)
    _scatter(env, 0.3)
    env.store.crash_after = 4
    with pytest.raises(Crash):
        env.item.run_cycle()
    env.store.crash_after = None
    staged = env.repo().staged_cycles()
    assert staged
    monkeypatch.setattr(driver_mod, "_changed_digest", lambda cycle: "another list")
    env.item = env.new_item()
    aborted: list[str] = []
    real_abort = Repository.abort

    def abort(self: Repository, cycle_id: str) -> None:
        aborted.append(cycle_id)
        real_abort(self, cycle_id)

    monkeypatch.setattr(Repository, "abort", abort)
    p = env.item.run_cycle()
    assert staged[0] in aborted
    assert env.point_bytes(p.point_id) == env.source()


def test_rehoming_yields_when_the_last_cycle_left_no_slack(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """At capacity the RPO comes first: after a delta cycle that took more than
    REHOME_SLACK of the frequency, the next cycle re-homes nothing; with slack again, it does."""
    env = _rehoming_env(tmp_path)
    real_seal = env.hv.seal

    def slow_seal(vm_id: str, *, app_consistent: bool = False):  # type: ignore[no-untyped-def]
        c = real_seal(vm_id, app_consistent=app_consistent)
        env.clock.advance(0.9 * env.settings.frequency_s)   # this cycle leaves no slack
        return c

    monkeypatch.setattr(env.hv, "seal", slow_seal)
    _scatter(env, 0.3)
    env.item.run_cycle()
    monkeypatch.setattr(env.hv, "seal", real_seal)
    _scatter(env, 0.3)
    busy = env.item.run_cycle()
    assert not busy.meta.get("rehomed")
    assert env.point_bytes(busy.point_id) == env.source()
    _scatter(env, 0.3)
    calm = env.item.run_cycle()
    assert int(calm.meta.get("rehomed") or 0) > 0
    assert env.point_bytes(calm.point_id) == env.source()


def test_a_damaged_pack_under_rehoming_stops_rehoming_not_the_cycle(tmp_path: Path) -> None:
    """A corrupt pack of the base, found while re-homing reads it: re-homing stops with a
    warning, the cycle still commits what the guest changed (those ranges come from the base,
    as without re-homing: finding the damage is the scrub's and the hydration's work)."""
    from drsite.store.compaction import plan_rehome

    env = _rehoming_env(tmp_path)
    repo = env.repo()
    base = repo.latest()
    assert base is not None
    plan = plan_rehome(repo, base.point_id, budget=1 << 40)
    assert plan.packs
    _damage(env.store, repo.key(plan.packs[0]), "flip")
    _scatter(env, 0.3)
    changed = env.source()
    p = env.item.run_cycle()
    assert env.item.report.last_error is None and p.base_point_id == base.point_id
    assert int(p.meta.get("rehomed") or 0) < plan.live_bytes
    # what the guest wrote is in the point: a scattered 4 KiB of it reads back exactly
    r = repo.reader(p.point_id, "d0")
    cyc = repo.diff(base.point_id, p.point_id, "d0")
    off = int(cyc.starts[0])
    buf = bytearray(4096)
    r.readinto(off, memoryview(buf))
    assert bytes(buf) == changed["d0"][off:off + 4096]


def test_a_full_disk_while_rehoming_is_transient_and_loses_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The store's disk fills while a cycle re-homes: the cycle fails as a transient
    ``low_disk`` (the item is not critical, no point becomes visible), its staged pieces stay;
    once space is back the engine commits that cycle as its own point (the disk as it was at its
    seal) and then a fresh one (the writes made since): nothing the guest wrote is lost."""
    env = _rehoming_env(tmp_path)
    real = ItemReplicator._rehome_into
    at_seal: dict[str, bytes] = {}

    def fill_then_rehome(self: ItemReplicator, *args: Any) -> int:
        at_seal.update(env.source())   # nothing wrote since the seal
        env.store.full_puts = 1000     # full from here on, for the rest of this attempt
        return real(self, *args)

    monkeypatch.setattr(ItemReplicator, "_rehome_into", fill_then_rehome)
    repo = env.repo()
    before = [p.point_id for p in repo.points()]
    _scatter(env, 0.3)
    with pytest.raises(DrsiteError) as got:
        env.item.run_cycle(wait_transient=False)
    assert at_seal, "the cycle never re-homed"
    assert got.value.code == "low_disk" and got.value.transient, got.value
    rep = env.item.report
    assert rep.state is not ItemState.CRITICAL and rep.health is not Health.CRITICAL
    assert rep.last_error is not None and rep.last_error["code"] == "low_disk"
    assert [p.point_id for p in repo.points()] == before, "a point of a failed cycle is visible"
    assert len(repo.staged_cycles()) == 1

    env.store.full_puts = 0   # space is back; the guest wrote on meanwhile
    monkeypatch.setattr(ItemReplicator, "_rehome_into", real)
    _scatter(env, 0.1)
    fresh = env.item.run_cycle(wait_transient=False)
    points = repo.points()
    assert [p.point_id for p in points[:len(before)]] == before and len(points) == len(before) + 2
    assert env.point_bytes(points[-2].point_id) == at_seal
    assert env.point_bytes(fresh.point_id) == env.source()
    assert env.replica_bytes() == env.source()
    assert repo.staged_cycles() == [] and env.item.report.last_error is None


def test_rehoming_takes_only_what_fits_in_the_slack(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Re-homing may use the time left before REHOME_SLACK of the frequency: with the last
    cycle's shipping taking half the frequency and the last re-homing's measured rate, a cycle
    re-homes about (0.6 - 0.5) x frequency x rate bytes, not its whole share (a 5-minute churn
    run at capacity: re-homing cycles took 9-12 s of a 10 s policy and broke the RPO)."""
    monkeypatch.setattr(driver_mod, "REHOME_MIN_STEP", 16 * KiB)
    env = _rehoming_env(tmp_path)
    rate = 64 * KiB   # bytes per (fake) second re-homing goes at
    real = ItemReplicator._rehome_into

    def timed(self: ItemReplicator, *args: Any) -> int:
        n = real(self, *args)
        env.clock.advance(n / rate)
        return n

    monkeypatch.setattr(ItemReplicator, "_rehome_into", timed)
    real_seal = env.hv.seal
    ship_s = [0.0]

    def slow_seal(vm_id: str, *, app_consistent: bool = False):  # type: ignore[no-untyped-def]
        c = real_seal(vm_id, app_consistent=app_consistent)
        env.clock.advance(ship_s[0])   # stands for the cycle's shipping time
        return c

    monkeypatch.setattr(env.hv, "seal", slow_seal)
    freq = env.settings.frequency_s
    got: list[int] = []
    for share_of_freq in (0.0, 0.5, 0.5, 0.59, 0.6, 0.0):
        ship_s[0] = share_of_freq * freq
        _scatter(env, 0.3)
        p = env.item.run_cycle()
        assert env.point_bytes(p.point_id) == env.source()
        got.append(int(p.meta.get("rehomed") or 0))
    # a cycle goes by the previous cycle's shipping time (0, 0, 15, 15, 17.7, 18 s here): the
    # first re-homing has no rate yet (its share), the second 18 s of slack (more than is
    # pending), the third and fourth 3 s (192 KiB at 64 KiB/s), the fifth 0.3 s (19 KiB), the
    # sixth none
    assert got[0] > 0 and got[1] > 0, got
    assert 0 < got[2] <= 3 * rate and 0 < got[3] <= 3 * rate, got
    assert 0 < got[4] <= int(0.3 * rate) + 1 and got[5] == 0, got


def test_the_report_says_where_the_last_cycle_spent_its_time(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``ItemReport.last_cycle``: the phases of the last fresh delta cycle in seconds (what a
    slow cycle waited for), with flush and re-homing only when it re-homed; a report from an
    agent keeps only known phases with sane numbers."""
    from drsite.replication.report import cycle_phases

    env = _rehoming_env(tmp_path)
    real_seal = env.hv.seal

    def slow_seal(vm_id: str, *, app_consistent: bool = False):  # type: ignore[no-untyped-def]
        c = real_seal(vm_id, app_consistent=app_consistent)
        env.clock.advance(1.5)
        return c

    monkeypatch.setattr(env.hv, "seal", slow_seal)
    _scatter(env, 0.3)
    p = env.item.run_cycle()
    phases = env.item.report.last_cycle
    assert phases is not None and phases["seal"] == 1.5 and phases["total"] >= 1.5
    assert {"ship", "commit", "replica", "retention"} <= set(phases)
    assert ("rehome" in phases) == bool(p.meta.get("rehomed")), (phases, p.meta)
    again = ItemReport.from_dict(env.item.report.to_dict())
    assert again.last_cycle == phases
    assert cycle_phases({"seal": 1, "ship": -1, "x": 2, "commit": True, "total": "9"}) \
        == {"seal": 1.0}
    assert cycle_phases([1, 2]) is None


def test_a_cycle_that_overran_settles_its_replica_after_the_next_seal(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A delta cycle that took longer than the frequency leaves its replica stream unsettled
    (images written by the tee, not yet fsynced; the marker says "applying"): the next cycle
    is due at once, and its seal does not wait for the device. That next cycle settles it
    right after its seal (closing the stream), a crash in between is caught up from the store
    (the unsynced writes lost), and a settle after someone else caught the replica up past it
    records nothing stale."""
    from drsite.store.replica import ReplicaStream

    env = Env(tmp_path)
    env.write("d0", 0, 512 * KiB)
    env.item.run_initial()
    real_seal = env.hv.seal
    slow = [True]
    events: list[str] = []

    def seal(vm_id: str, *, app_consistent: bool = False):  # type: ignore[no-untyped-def]
        c = real_seal(vm_id, app_consistent=app_consistent)
        events.append("seal")
        if slow[0]:
            env.clock.advance(1.2 * env.settings.frequency_s)   # this cycle overruns
        return c

    monkeypatch.setattr(env.hv, "seal", seal)
    orig = ReplicaStream.finish

    def finish(self: ReplicaStream, point: Any) -> None:
        events.append("finish")
        orig(self, point)

    monkeypatch.setattr(ReplicaStream, "finish", finish)
    target = env.item.target
    assert isinstance(target, LocalTarget)
    env.write("d0", 4096, 8192)
    env.item.run_cycle()
    assert events == ["seal"] and env.hydrator.state()[1] is not None
    assert env.replica_bytes() == env.source()    # written, only not yet synced/recorded
    assert target._unsettled is not None
    stream = target._unsettled[0]
    slow[0] = False
    env.write("d1", 0, 4096)
    p2 = env.item.run_cycle()
    # the overrun cycle's replica settled after the next seal, then that cycle's own
    assert events == ["seal", "seal", "finish", "finish"], events
    assert env.item.report.last_cycle is not None and "settle" in env.item.report.last_cycle
    assert not stream._fds and stream._flusher is not None and not stream._flusher.is_alive()
    assert env.hydrator.state() == (p2.point_id, None)
    assert env.replica_bytes() == env.source()

    # overrun again, then the engine dies before its next cycle and the unsynced writes are
    # lost: the next engine catches the replica up from the store
    slow[0] = True
    env.write("d0", 65536, 4096)
    env.item.run_cycle()
    assert env.hydrator.state()[1] is not None
    target._unsettled[0].close()   # type: ignore[index]   # the process is gone
    with open(env.hydrator.disk_path("d0"), "r+b") as f:
        f.seek(65536)
        f.write(bytes(4096))
    slow[0] = False
    env.item = env.new_item()
    env.write("d1", 8192, 4096)
    p4 = env.item.run_cycle()
    assert env.hydrator.state() == (p4.point_id, None)
    assert env.replica_bytes() == env.source()

    # overrun; then another engine over the same state (a restart while the old object
    # lingers) commits the next point and catches the replica up past it: the old one's
    # deferred settle must not record its older point over that
    slow[0] = True
    env.write("d0", 131072, 4096)
    old = env.item
    old.run_cycle()
    slow[0] = False
    env.item = env.new_item()
    env.write("d1", 12288, 4096)
    p6 = env.item.run_cycle()
    assert env.hydrator.state() == (p6.point_id, None)
    old.settle_replica()
    assert env.hydrator.state() == (p6.point_id, None)
    assert env.replica_bytes() == env.source()


def test_a_deferred_replica_settle_that_fails_is_caught_up_from_the_store(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The device fails the deferred replica's fsync (EIO) when the next cycle settles it: the
    cycle goes on (the failure is logged, the stream closed), the replica keeps its applying
    marker, and that cycle's catch-up settles it from the store — the replica ends equal to
    the source and names the new point."""
    import errno

    from drsite.store.replica import ReplicaStream

    env = Env(tmp_path)
    env.write("d0", 0, 512 * KiB)
    env.item.run_initial()
    real_seal = env.hv.seal
    slow = [True]

    def seal(vm_id: str, *, app_consistent: bool = False):  # type: ignore[no-untyped-def]
        c = real_seal(vm_id, app_consistent=app_consistent)
        if slow[0]:
            env.clock.advance(1.2 * env.settings.frequency_s)
        return c

    monkeypatch.setattr(env.hv, "seal", seal)
    env.write("d0", 4096, 8192)
    env.item.run_cycle()
    assert env.hydrator.state()[1] is not None   # deferred
    orig = ReplicaStream.finish
    failed: list[ReplicaStream] = []

    def finish(self: ReplicaStream, point: Any) -> None:
        if not failed:
            failed.append(self)
            self.close()
            raise OSError(errno.EIO, "Input/output error")
        orig(self, point)

    monkeypatch.setattr(ReplicaStream, "finish", finish)
    slow[0] = False
    # the tee's unsynced writes of the deferred cycle are lost with the device error
    with open(env.hydrator.disk_path("d0"), "r+b") as f:
        f.seek(4096)
        f.write(bytes(8192))
    env.write("d1", 0, 4096)
    p = env.item.run_cycle()
    assert failed and not failed[0]._fds
    assert env.item.report.last_error is None
    assert env.hydrator.state() == (p.point_id, None)
    assert env.replica_bytes() == env.source()
    with pytest.raises(DrsiteError):   # settle_replica, by contrast, says what it met
        failed.clear()
        slow[0] = True
        env.write("d0", 65536, 4096)
        env.item.run_cycle()
        env.item.settle_replica()
