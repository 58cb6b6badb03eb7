"""Unplanned failover of a synchronous item (failover layer, in-process guest, real TLS sync
journal): "latest" = the newest point + the journal after its seal, so the recovery VM equals
the primary's disks at its last acknowledged write; the replica is never left holding more
than its point; a journal with a gap is not replayed and the record says so."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from drsite.core.model import DiskSpec, VmSpec
from drsite.failover import actions as fo
from drsite.hypervisors.file import FileHypervisor
from drsite.replication.driver import ItemReplicator, ReplicationSettings
from drsite.replication.planner import ALWAYS
from drsite.replication.target import LocalTarget
from drsite.sitestore.server import held_marker
from drsite.sitestore.syncserver import SyncServer
from drsite.sitestore.testing import OpenAcl, TestCerts, make_test_certs
from drsite.store.digest import file_digest, image_digest
from drsite.store.generation import GenerationStore
from drsite.store.local.backend import LocalObjectStore
from drsite.store.replica import ReplicaHydrator
from drsite.store.repository import Repository
from drsite.tlsutil import server_context

MiB = 1 << 20
SETTINGS = ReplicationSettings(frequency_s=30, app_consistent_every_s=None, resync_window=ALWAYS)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> TestCerts:
    return make_test_certs(tmp_path_factory.mktemp("pki"))


class World:
    def __init__(self, tmp: Path, certs: TestCerts, budget_ms: int = 1000) -> None:
        self.a = fo.Site("site-a", FileHypervisor(tmp / "a" / "vms"), tmp / "a" / "work")
        self.b = fo.Site("site-b", FileHypervisor(tmp / "b" / "vms"), tmp / "b" / "work")
        self.store_b = LocalObjectStore(tmp / "b" / "store")
        ctx = server_context(certs.server_cert, certs.server_key, certs.ca_file,
                             client_cert="required")
        self.srv = SyncServer(tmp / "b" / "journals", tmp / "b" / "work" / "replicas", ctx,
                              OpenAcl())
        self.srv.start()
        self.rng = np.random.default_rng(18)
        spec = VmSpec("app", 2, 1024, (),
                      (DiskSpec("d0", 8 * MiB), DiskSpec("d1", 4 * MiB)))
        hv = self.a.hypervisor
        vm = hv.create_blank(spec)
        self.vm_id = vm.vm_id
        self.rt = hv.guest(vm.vm_id)
        hv.set_sync(vm.vm_id, {"item_id": "item-app", "host": "127.0.0.1", "port": self.srv.port,
                               "budget_ms": budget_ms, "ca_file": str(certs.ca_file),
                               "cert_file": str(certs.client_cert),
                               "key_file": str(certs.client_key)})
        GenerationStore(self.store_b).ensure("item-app", "site-a", now=time.time())
        repo = Repository(self.store_b, "item-app")
        hydrator = ReplicaHydrator(repo, self.b.work_dir / "replicas" / "item-app")
        engine = ItemReplicator(item_id="item-app", vm_id=vm.vm_id, driver=hv,
                                target=LocalTarget(repo, hydrator),
                                state_dir=self.a.work_dir / "engine", settings=SETTINGS,
                                generation=1)
        engine.run_initial()  # its seal begins the journal
        self.item = fo.ProtectedItem("item-app", vm.vm_id, spec, self.a, self.b, repo, hydrator,
                                     engine, sync_journal=self.srv.journal("item-app"))

    def write(self, n: int) -> None:
        for _ in range(n):
            d, size = ("d0", 8 * MiB) if self.rng.random() < 0.6 else ("d1", 4 * MiB)
            off = int(self.rng.integers(0, size // 512 - 16)) * 512
            self.rt.vm.write(d, off, self.rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())

    def primary_digests(self) -> dict[str, str]:
        hv = self.a.hypervisor
        return {d.disk_id: file_digest(hv.disk_path(self.vm_id, d.disk_id), d.size)
                for d in hv.get_vm(self.vm_id).disks}

    def recovery_digests(self, vm_id: str) -> dict[str, str]:
        hv = self.b.hypervisor
        return {d.disk_id: file_digest(hv.disk_path(vm_id, d.disk_id), d.size)
                for d in hv.get_vm(vm_id).disks}

    def close(self) -> None:
        self.rt.stop()
        self.srv.stop()
        for site in (self.a, self.b):
            for vm in site.hypervisor.list_vms():
                site.hypervisor.power_off(vm.vm_id, force=True)


@pytest.fixture()
def world(tmp_path: Path, certs: TestCerts) -> Any:
    w = World(tmp_path, certs)
    yield w
    w.close()


def test_latest_is_the_point_plus_every_acknowledged_write(world: World) -> None:
    item = world.item
    assert item.replicator is not None and item.hydrator is not None
    world.write(200)
    p1 = item.replicator.run_cycle()  # a later point: the journal runs on from its seal
    assert p1.meta["sync"]["stream"] == world.rt.vm.mirror.stream  # type: ignore[union-attr]
    world.write(300)  # acknowledged, never shipped as a point
    expected = world.primary_digests()
    world.rt.crash()  # the primary dies (nothing flushed)
    res = fo.unplanned_failover(item, "latest", failover_id="uf1")
    assert res.point_id == p1.point_id
    assert any("sync journal replayed: 300 write batch(es)" in n for n in res.notes), res.notes
    assert world.recovery_digests(res.vm_id or "") == expected
    # the replica's images were moved out and the replica forgotten: it never claims p1 with
    # journal writes in it; cancel rebuilds it from the store
    assert item.hydrator.state() == (None, None)
    assert fo.unplanned_failover(item, "latest", failover_id="uf1").vm_id == res.vm_id  # idempotent
    c = fo.cancel(item, "uf1", restart_source=False)
    assert c.state is fo.FailoverState.CANCELLED
    assert item.hydrator.state() == (p1.point_id, None) and item.hydrator.verify()


def test_a_journal_with_a_gap_is_not_replayed_and_the_record_says_so(world: World) -> None:
    item = world.item
    assert item.replicator is not None
    world.write(50)
    item.replicator.run_cycle()
    # the recovery site stops taking the journal (here: it refuses new runs of the item, as
    # for a failed-over item, and drops the connection): the mirror falls back to async
    held_marker(world.srv.replicas, "item-app").write_text("{}")
    world.srv.disconnect("item-app")
    world.write(50)
    st = world.a.hypervisor.sync_status(world.vm_id)
    assert st is not None and st["state"] == "suspended"
    p2 = item.replicator.run_cycle()  # sealed after the journal's end; its new run is refused
    world.write(20)
    world.rt.crash()
    held_marker(world.srv.replicas, "item-app").unlink()
    res = fo.unplanned_failover(item, "latest", failover_id="uf2")
    assert res.point_id == p2.point_id
    note = next(n for n in res.notes if "sync journal" in n)
    assert note.startswith("sync journal not replayed") and "ends at" in note, note
    hv = world.b.hypervisor
    for d in p2.disk_sizes:  # the VM holds the point, nothing more
        r = hv.open_live_reader(res.vm_id or "", d)
        try:
            assert image_digest(r) == image_digest(item.repo.reader(p2.point_id, d)), d
        finally:
            r.close()
