"""Failover actions end to end, in-process: two FileHypervisor roots = two sites, a
LocalObjectStore per site, real ItemReplicators, real guests for recovery VMs."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from drsite.core.errors import Conflict, Fenced, NetworkError
from drsite.core.model import Consistency, DiskSpec, Nic, PowerState, VmSpec
from drsite.failover import actions as fo
from drsite.failover import reprotect as fo_reprotect
from drsite.failover.network import NetworkMap, NetworkMapping, SubnetRule
from drsite.hypervisors.file import FileHypervisor
from drsite.replication.driver import ItemReplicator, ReplicationSettings
from drsite.replication.planner import ALWAYS
from drsite.replication.target import LocalTarget
from drsite.store.digest import file_digest, image_digest
from drsite.store.generation import GenerationStore
from drsite.store.local.backend import LocalObjectStore
from drsite.store.replica import ReplicaHydrator
from drsite.store.repository import Repository

MiB = 1 << 20
SETTINGS = ReplicationSettings(frequency_s=30, app_consistent_every_s=None, resync_window=ALWAYS)
NETMAP = NetworkMap((NetworkMapping("prod", "dr-prod", "dr-test",
                                   SubnetRule("10.0.0.0/24", "10.9.0.0/24")),))


@dataclass
class World:
    a: fo.Site
    b: fo.Site
    store_a: LocalObjectStore
    store_b: LocalObjectStore
    rng: np.random.Generator

    def protect(self, name: str = "app", sizes: tuple[int, ...] = (8 * MiB, 4 * MiB),
                fill: bool = True) -> fo.ProtectedItem:
        spec = VmSpec(name, 2, 1024, (Nic("prod", "52:54:00:00:00:11", "10.0.0.11"),),
                      tuple(DiskSpec(f"d{i}", s) for i, s in enumerate(sizes)))
        hv = self.a.hypervisor
        vm = hv.create_blank(spec)
        if fill:
            for d in vm.disks:
                for _ in range(6):
                    self.write(hv, vm.vm_id, d.disk_id, d.size)
        item_id = f"item-{name}"
        GenerationStore(self.store_b).ensure(item_id, self.a.name, now=time.time())
        repo = Repository(self.store_b, item_id)
        hydrator = ReplicaHydrator(repo, self.b.work_dir / "replicas" / item_id)
        engine = ItemReplicator(item_id=item_id, vm_id=vm.vm_id, driver=hv,
                                target=LocalTarget(repo, hydrator),
                                state_dir=self.a.work_dir / "engine", settings=SETTINGS,
                                generation=1)
        engine.run_initial()
        return fo.ProtectedItem(item_id, vm.vm_id, spec, self.a, self.b, repo, hydrator, engine,
                                NETMAP)

    def write(self, hv: FileHypervisor, vm_id: str, disk: str, size: int,
              n: int = 20_000) -> tuple[int, bytes]:
        off = int(self.rng.integers(0, size - n))
        data = self.rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        hv.write(vm_id, disk, off, data)
        return off, data


@pytest.fixture()
def world(tmp_path: Path) -> Iterator[World]:
    a = fo.Site("site-a", FileHypervisor(tmp_path / "a" / "vms"), tmp_path / "a" / "work")
    b = fo.Site("site-b", FileHypervisor(tmp_path / "b" / "vms"), tmp_path / "b" / "work")
    w = World(a, b, LocalObjectStore(tmp_path / "a" / "store"),
              LocalObjectStore(tmp_path / "b" / "store"), np.random.default_rng(11))
    yield w
    for site in (a, b):
        for vm in site.hypervisor.list_vms():
            site.hypervisor.power_off(vm.vm_id, force=True)


def vm_digests(hv: FileHypervisor, vm_id: str) -> dict[str, str]:
    out = {}
    for d in hv.get_vm(vm_id).disks:
        r = hv.open_live_reader(vm_id, d.disk_id)
        try:
            out[d.disk_id] = image_digest(r)
        finally:
            r.close()
    return out


def point_digests(repo: Repository, point_id: str) -> dict[str, str]:
    return {d: image_digest(repo.reader(point_id, d)) for d in repo.point(point_id).disk_sizes}


def replica_digests(item: fo.ProtectedItem) -> dict[str, str]:
    assert item.hydrator is not None
    return {d.disk_id: file_digest(item.hydrator.disk_path(d.disk_id), d.size)
            for d in item.spec.disks}


def test_test_failover_latest_and_older_point_never_changes_the_replica(world: World) -> None:
    item = world.protect()
    hv_a, hv_b = world.a.hypervisor, world.b.hypervisor
    assert item.replicator is not None
    world.write(hv_a, item.vm_id, "d0", 8 * MiB)
    p1 = item.replicator.run_cycle()
    world.write(hv_a, item.vm_id, "d1", 4 * MiB)
    p2 = item.replicator.run_cycle()
    replica_before = replica_digests(item)

    res = fo.test_failover(item, "latest", failover_id="tf1")
    assert res.state is fo.FailoverState.TEST_RUNNING and res.point_id == p2.point_id
    assert res.image_source == "replica-copy" and res.verified and res.rto_s is not None
    assert hv_b.get_vm(res.vm_id or "").power is PowerState.RUNNING
    assert vm_digests(hv_b, res.vm_id or "") == point_digests(item.repo, p2.point_id)
    cfg = json.loads((hv_b.vm_dir(res.vm_id or "") / "vm.json").read_text())
    assert cfg["nics"] == [{"network": "dr-test", "mac": "52:54:00:00:00:11", "ip": "10.9.0.11"}]
    assert all(d.get("backing") for d in cfg["disks"])
    assert fo.test_failover(item, "latest", failover_id="tf1").vm_id == res.vm_id  # idempotent

    # the test VM writes; replication goes on; neither disturbs the other
    hv_b.write(res.vm_id or "", "d0", 4096, b"test-vm-write" * 100)
    assert replica_digests(item) == replica_before
    world.write(hv_a, item.vm_id, "d0", 8 * MiB)
    p3 = item.replicator.run_cycle()
    assert item.hydrator is not None and item.hydrator.state() == (p3.point_id, None)
    assert item.hydrator.verify()

    old = fo.test_failover(item, p1.point_id, failover_id="tf2", vm_name="app-test-old")
    assert old.image_source == "restore" and old.bytes_restored > 0
    assert vm_digests(hv_b, old.vm_id or "") == point_digests(item.repo, p1.point_id)

    for r in (res, old):
        done = fo.cleanup_test_failover(item, r.failover_id, notes="app answered on :443")
        assert done.state is fo.FailoverState.CLEANED_UP and "app answered on :443" in done.notes
        assert not Path(r.backing_dir or "").exists()
    assert hv_b.list_vms() == []
    assert fo.cleanup_test_failover(item, "tf1").state is fo.FailoverState.CLEANED_UP
    assert item.hydrator.verify()


def test_test_failover_is_size_independent(world: World) -> None:
    small = world.protect("small", sizes=(64 * MiB,), fill=False)
    big = world.protect("big", sizes=(4096 * MiB,), fill=False)
    for it in (small, big):  # the same 1 MiB of data on each
        world.a.hypervisor.write(it.vm_id, "d0", 32 * MiB, b"z" * MiB)
        assert it.replicator is not None
        it.replicator.run_cycle()
    rs = fo.test_failover(small, failover_id="tf-small", verify=False)
    rb = fo.test_failover(big, failover_id="tf-big", verify=False)
    t_small = rs.timings["create_vm"] + rs.timings["frozen_copy"]
    t_big = rb.timings["create_vm"] + rb.timings["frozen_copy"]
    assert rb.timings["create_vm"] < 0.25, rb.timings
    assert t_big < 5 * t_small + 0.1, (rs.timings, rb.timings)
    for it, r in ((small, rs), (big, rb)):
        fo.cleanup_test_failover(it, r.failover_id)


def test_planned_failover_loses_nothing_then_reprotect_and_failback(world: World) -> None:
    item = world.protect()
    hv_a, hv_b = world.a.hypervisor, world.b.hypervisor
    rt = hv_a.guest(item.vm_id)  # the source runs
    acked = [world.write(hv_a, item.vm_id, "d0", 8 * MiB) for _ in range(3)]
    assert item.replicator is not None
    item.replicator.run_cycle()
    acked += [world.write(hv_a, item.vm_id, "d1", 4 * MiB) for _ in range(3)]  # not shipped yet
    assert not rt.stopped.is_set()

    res = fo.planned_failover(item, failover_id="pf1")
    assert rt.stopped.is_set() and hv_a.get_vm(item.vm_id).power is PowerState.STOPPED
    assert res.state is fo.FailoverState.PENDING_COMMIT and res.generation == 2 and res.verified
    assert res.image_source == "replica" and res.rto_s is not None and "final_cycle" in res.timings
    src = vm_digests(hv_a, item.vm_id)
    assert vm_digests(hv_b, res.vm_id or "") == src == point_digests(item.repo, res.point_id or "")
    cfg = json.loads((hv_b.vm_dir(res.vm_id or "") / "vm.json").read_text())
    assert cfg["nics"] == [{"network": "dr-prod", "mac": "52:54:00:00:00:11", "ip": "10.9.0.11"}]
    assert hv_b.get_vm(res.vm_id or "").power is PowerState.RUNNING
    assert fo.planned_failover(item, failover_id="pf1").vm_id == res.vm_id  # idempotent
    with pytest.raises(Fenced):
        item.replicator.run_cycle()  # the old primary's engine is fenced

    fo.commit(item, "pf1")
    assert [p.point_id for p in item.repo.points()] == [res.point_id]
    with pytest.raises(Conflict):
        fo.change_point(item, "pf1", "latest")

    # the recovery VM changes a little while the old primary is down
    changes = [world.write(hv_b, res.vm_id or "", "d0", 8 * MiB, n=3000) for _ in range(4)]
    rp = fo_reprotect.reprotect(item, "pf1", world.store_a)
    disk_bytes = 12 * MiB
    assert rp.item.item_id == "item-app-rev" and rp.generation == 2
    assert rp.disk_bytes == disk_bytes and rp.base_bytes_local > 0
    assert 0 < rp.bytes_sent <= len(changes) * 2 * 65536 and rp.bytes_sent < disk_bytes // 16
    assert point_digests(rp.item.repo, rp.point.point_id) == vm_digests(hv_b, res.vm_id or "")
    assert rp.item.replicator is not None
    world.write(hv_b, res.vm_id or "", "d1", 4 * MiB)
    rp.item.replicator.run_cycle()

    original = hv_a.get_vm(item.vm_id)
    fb = fo_reprotect.failback(rp.item, world.store_b, to_original_vm=original)
    back = hv_a.find_vm("app")
    assert fb.failover.vm_id == back.vm_id and back.power is PowerState.RUNNING
    assert back.nics == original.nics  # the original VM's own configuration
    assert hv_b.get_vm(res.vm_id or "").power is PowerState.STOPPED  # never both running
    assert vm_digests(hv_a, back.vm_id) == vm_digests(hv_b, res.vm_id or "")
    assert fb.failover.generation == 3 and fb.reprotect.generation == 3
    assert fb.reprotect.bytes_sent < disk_bytes // 16
    assert rp.item.replicator.generation == 2
    with pytest.raises(Fenced):
        rp.item.replicator.run_cycle()  # the reverse engine is fenced by the failback
    fwd = fb.reprotect.item
    assert fwd.replicator is not None and fwd.primary.name == "site-a"
    world.write(hv_a, back.vm_id, "d0", 8 * MiB)
    p = fwd.replicator.run_cycle()
    assert point_digests(fwd.repo, p.point_id)["d0"] == vm_digests(hv_a, back.vm_id)["d0"]


def test_planned_failover_after_an_interrupted_cycle_loses_nothing(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cycle the store outage interrupted left its frozen view sealed; the guest wrote on.
    The planned failover's final cycle must hold those writes (it once committed the old view
    and the proof failed: 'the replica differs from the stopped source')."""
    item = world.protect()
    hv_a = world.a.hypervisor
    world.write(hv_a, item.vm_id, "d0", 8 * MiB)
    real_put = world.store_b.put

    def unreachable(*a: Any, **k: Any) -> None:
        raise NetworkError("injected: the recovery site's store is unreachable")

    monkeypatch.setattr(world.store_b, "put", unreachable)
    assert item.replicator is not None
    with pytest.raises(NetworkError):
        item.replicator.run_cycle(wait_transient=False)
    monkeypatch.setattr(world.store_b, "put", real_put)
    world.write(hv_a, item.vm_id, "d1", 4 * MiB)   # acknowledged after the interrupted seal

    res = fo.planned_failover(item, failover_id="pf-int")
    assert res.state is fo.FailoverState.PENDING_COMMIT and res.verified
    src = vm_digests(hv_a, item.vm_id)
    assert vm_digests(world.b.hypervisor, res.vm_id or "") == src
    assert point_digests(item.repo, res.point_id or "") == src


def test_unplanned_failover_fences_the_old_primary_and_cancel(world: World) -> None:
    item = world.protect()
    hv_a, hv_b = world.a.hypervisor, world.b.hypervisor
    assert item.replicator is not None and item.hydrator is not None
    rt = hv_a.guest(item.vm_id)
    world.write(hv_a, item.vm_id, "d0", 8 * MiB)
    p1 = item.replicator.run_cycle()
    lost = world.write(hv_a, item.vm_id, "d1", 4 * MiB)  # never shipped: the site "dies"
    assert lost

    res = fo.unplanned_failover(item, "latest", failover_id="uf1")
    assert not rt.stopped.is_set()  # the source was not touched
    assert res.point_id == p1.point_id and res.generation == 2 and res.verified
    new_digests = vm_digests(hv_b, res.vm_id or "")
    assert new_digests == point_digests(item.repo, p1.point_id)

    # the old primary comes back and its engine tries to replicate: fenced, nothing written
    world.write(hv_a, item.vm_id, "d0", 8 * MiB)
    with pytest.raises(Fenced):
        item.replicator.run_cycle()
    with pytest.raises(Fenced):
        item.replicator.run_resync("old primary wants to resync")
    assert item.repo.latest() == p1
    assert vm_digests(hv_b, res.vm_id or "") == new_digests
    assert GenerationStore(world.store_b).read(item.item_id).primary == "site-b"  # type: ignore[union-attr]

    c = fo.cancel(item, "uf1")
    assert c.state is fo.FailoverState.CANCELLED and c.generation == 3
    assert hv_b.list_vms() == []
    rec = GenerationStore(world.store_b).read(item.item_id)
    assert rec is not None and (rec.generation, rec.primary) == (3, "site-a")
    assert item.replicator.generation == 3
    p2 = item.replicator.run_cycle()  # the original primary replicates again
    assert point_digests(item.repo, p2.point_id) == vm_digests(hv_a, item.vm_id)
    assert item.hydrator.state() == (p2.point_id, None) and item.hydrator.verify()
    hv_a.power_off(item.vm_id)


def test_unplanned_latest_app_change_point_commit(world: World) -> None:
    item = world.protect()
    hv_a, hv_b = world.a.hypervisor, world.b.hypervisor
    assert item.replicator is not None
    world.write(hv_a, item.vm_id, "d0", 8 * MiB)
    p_app = item.replicator.run_cycle(app_consistent=True)
    assert p_app.consistency is Consistency.APP
    world.write(hv_a, item.vm_id, "d1", 4 * MiB)
    p_crash = item.replicator.run_cycle(app_consistent=False)

    res = fo.unplanned_failover(item, "latest_app", failover_id="uf2")
    assert res.point_id == p_app.point_id and res.image_source == "restore"
    assert vm_digests(hv_b, res.vm_id or "") == point_digests(item.repo, p_app.point_id)
    moved = fo.change_point(item, "uf2", p_crash.point_id)
    assert moved.point_id == p_crash.point_id and moved.generation == 2
    assert len(hv_b.list_vms()) == 1
    assert vm_digests(hv_b, moved.vm_id or "") == point_digests(item.repo, p_crash.point_id)
    fo.commit(item, "uf2")
    assert fo.commit(item, "uf2").state is fo.FailoverState.COMMITTED
    with pytest.raises(Conflict):
        fo.cancel(item, "uf2")
    assert os.path.exists(hv_b.vm_dir(moved.vm_id or ""))


def test_unplanned_failover_killed_inside_vm_creation_resumes_from_the_store(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """Crash campaign finding (issue 19): a failover from the replica was killed inside
    ``create_vm`` after the first image had been moved out of the replica (and lost with the
    VM's staging directory). The resumed failover must not look for the replica's images again:
    it restores the point from the store, the VM equals the point, and the replica is rebuilt
    in full on its next catch-up."""
    import drsite.hypervisors.file.driver as file_driver

    item = world.protect()
    assert item.replicator is not None and item.hydrator is not None
    world.write(world.a.hypervisor, item.vm_id, "d0", 8 * MiB)
    p1 = item.replicator.run_cycle()
    item.hydrator.catch_up()
    real_move = file_driver.move_sparse
    moved: list[Path] = []

    def dying_move(src: Path, dst: Path) -> None:
        if moved:
            raise KeyboardInterrupt("SIGKILL inside create_vm")  # a BaseException, as a kill
        real_move(src, dst)
        moved.append(src)

    monkeypatch.setattr(file_driver, "move_sparse", dying_move)
    with pytest.raises(KeyboardInterrupt):
        fo.unplanned_failover(item, "latest", failover_id="uf-kill")
    monkeypatch.setattr(file_driver, "move_sparse", real_move)
    assert moved and not moved[0].exists()  # the replica lost that image
    res = fo.unplanned_failover(item, "latest", failover_id="uf-kill")
    assert res.point_id == p1.point_id and res.image_source == "restore" and res.verified
    hv_b = world.b.hypervisor
    assert vm_digests(hv_b, res.vm_id or "") == point_digests(item.repo, p1.point_id)
    item.hydrator.catch_up()
    assert item.hydrator.state() == (p1.point_id, None) and item.hydrator.verify()



def _cold_item(world: World, item: fo.ProtectedItem) -> fo.ProtectedItem:
    """``item`` as a recovery agent builds it for a failover command: a new Repository (no
    map or table cached by the replication that wrote the points) and a new hydrator."""
    repo = Repository(world.store_b, item.item_id)
    return dataclasses.replace(item, repo=repo, replicator=None, hydrator=ReplicaHydrator(
        repo, world.b.work_dir / "replicas" / item.item_id))


def test_unplanned_failover_work_does_not_grow_with_the_disk(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same 32 scattered 4 KiB writes on a 64 MiB and on a 64 GiB sparse disk: the
    unplanned failover from the replica (catch-up, verification of the replica against the
    point, VM creation, power on) makes the same number of image reads, point-reader calls and
    SEEK_DATA/SEEK_HOLE seeks for both, and allocates no memory sized by the disk (a 64 KiB
    digest array of 64 GiB alone is 16 MiB per side). Counted, not timed."""
    import tracemalloc

    from drsite.imagefile import RawImageReader
    from drsite.store.reader import PointReader

    counts: dict[str, int] = {}

    def counting(name: str, fn: Any) -> Any:
        def wrapped(*a: Any, **kw: Any) -> Any:
            counts[name] = counts.get(name, 0) + 1
            return fn(*a, **kw)
        return wrapped

    monkeypatch.setattr(os, "lseek", counting("lseek", os.lseek))
    monkeypatch.setattr(os, "preadv", counting("preadv", os.preadv))
    monkeypatch.setattr(os, "pread", counting("pread", os.pread))
    for cls, meth in ((PointReader, "readv"), (PointReader, "readinto"),
                      (RawImageReader, "readv"), (RawImageReader, "readinto")):
        monkeypatch.setattr(cls, meth, counting(f"{cls.__name__}.{meth}", getattr(cls, meth)))

    seen: dict[int, tuple[dict[str, int], int]] = {}
    for size in (64 * MiB, 64 * 1024 * MiB):
        item = world.protect(f"s{size >> 20}", sizes=(size,), fill=False)
        assert item.replicator is not None
        for i in range(32):
            world.a.hypervisor.write(item.vm_id, "d0", i * (size // 32) + 8192,
                                     bytes([i + 1]) * 4096)
        p = item.replicator.run_cycle()
        world.a.hypervisor.power_off(item.vm_id)  # the primary site is gone
        cold = _cold_item(world, item)
        counts.clear()
        tracemalloc.start()
        try:
            res = fo.unplanned_failover(cold, "latest", failover_id=f"uf-{size >> 20}")
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert res.point_id == p.point_id and res.verified and res.image_source == "replica"
        disk = world.b.hypervisor.open_live_reader(res.vm_id or "", "d0")
        try:
            assert disk.data_extents().total <= 32 * 64 * 1024  # the writes, nothing else
            for i in range(32):
                got = bytearray(4096)
                disk.readinto(i * (size // 32) + 8192, memoryview(got))
                assert got == bytes([i + 1]) * 4096
        finally:
            disk.close()
        seen[size] = (dict(counts), peak)
        world.b.hypervisor.power_off(res.vm_id or "", force=True)
    (small, peak_s), (big, peak_b) = seen[64 * MiB], seen[64 * 1024 * MiB]
    assert small.get("RawImageReader.readv", 0) > 0 and small.get("PointReader.readv", 0) > 0
    assert big == small, (small, big)
    # the 32 extents are read in one batch per side, not one call each
    assert big["PointReader.readv"] + big.get("PointReader.readinto", 0) <= 2, big
    assert peak_b < peak_s + 2 * MiB, (peak_s, peak_b)


def test_unplanned_failover_boots_a_pre_verified_replica_and_never_a_damaged_one(
        world: World) -> None:
    """The background verification proved the replica equal to the latest point: the failover
    compares nothing (its RTO does not read the data). A replica damaged in a range the last
    cycle wrote (not yet verified) is found by the failover's own comparison of those ranges,
    and the VM is restored from the store instead: its disks equal the point."""
    from contextlib import nullcontext

    item = world.protect("pv", sizes=(8 * MiB,))
    hv_a, hv_b = world.a.hypervisor, world.b.hypervisor
    assert item.replicator is not None and item.hydrator is not None
    p1 = item.replicator.run_cycle()
    assert item.hydrator.verify_step(nullcontext, None, budget_s=60.0) is None
    assert item.hydrator.verified() == p1.point_id
    res = fo.unplanned_failover(item, "latest", failover_id="pv1")
    assert res.verified and (res.verify_scope, res.verify_bytes) == ("pre-verified", 0)
    assert res.image_source == "replica"
    assert vm_digests(hv_b, res.vm_id or "") == point_digests(item.repo, p1.point_id)
    fo.cancel(item, "pv1")
    assert hv_b.list_vms() == []

    # the cancel rebuilt the replica (verified anew in the background); then one more cycle,
    # whose range the replica got wrong
    item.hydrator.catch_up()
    assert item.hydrator.verify_step(nullcontext, None, budget_s=60.0) is None
    off, _ = world.write(hv_a, item.vm_id, "d0", 8 * MiB)
    p2 = item.replicator.run_cycle()
    assert item.hydrator.state() == (p2.point_id, None) and item.hydrator.verified() != p2.point_id
    fd = os.open(item.hydrator.disk_path("d0"), os.O_RDWR)
    try:
        os.pwrite(fd, b"\xee" * 512, off)
    finally:
        os.close(fd)
    res = fo.unplanned_failover(item, "latest", failover_id="pv2")
    assert res.point_id == p2.point_id and res.image_source == "restore", res
    assert res.verify_scope == "full" and any("restored from the store" in n for n in res.notes)
    assert vm_digests(hv_b, res.vm_id or "") == point_digests(item.repo, p2.point_id)
    fo.cancel(item, "pv2")
    hv_a.power_off(item.vm_id)
