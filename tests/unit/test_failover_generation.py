"""The split-brain guard: generation records, fencing, direction checks, engine integration."""

from __future__ import annotations

from pathlib import Path

import pytest

from drsite.core.clock import FakeClock
from drsite.core.errors import CorruptData, Fenced, InvalidInput
from drsite.core.model import DiskSpec, VmSpec
from drsite.hypervisors.testing.memory import MemoryHypervisor
from drsite.replication.driver import ItemReplicator, ReplicationSettings
from drsite.replication.planner import ALWAYS
from drsite.replication.report import ItemState
from drsite.replication.target import LocalTarget
from drsite.store.generation import (
    GenerationRecord,
    GenerationStore,
    check_not_fenced,
    check_replication_direction,
    generation_key,
)
from drsite.store.repository import Repository
from drsite.store.testing.memory import MemoryObjectStore


def test_record_roundtrip_and_checksum() -> None:
    rec = GenerationRecord("app", 3, "site-b", 1.5, "planned failover", "f1")
    assert GenerationRecord.from_bytes(rec.to_bytes(), "k") == rec
    bad = rec.to_bytes().replace(b'"generation":3', b'"generation":2')
    with pytest.raises(CorruptData, match="checksum"):
        GenerationRecord.from_bytes(bad, "k")
    with pytest.raises(CorruptData):
        GenerationRecord.from_bytes(b"{trunc", "k")


def test_ensure_advance_monotonic_and_idempotent() -> None:
    store = MemoryObjectStore()
    gs = GenerationStore(store)
    assert gs.read("app") is None and gs.current("app") == 0
    r1 = gs.ensure("app", "site-a", now=1.0)
    assert (r1.generation, r1.primary) == (1, "site-a")
    assert gs.ensure("app", "site-x", now=2.0) == r1  # idempotent: existing record wins
    r2 = gs.advance("app", "site-b", now=3.0, failover_id="f1", reason="unplanned failover")
    assert (r2.generation, r2.primary) == (2, "site-b")
    # a resumed action does not advance twice
    assert gs.advance("app", "site-b", now=4.0, failover_id="f1", reason="unplanned failover") == r2
    # cancel: a NEW number for the original primary, never the old one
    r3 = gs.advance("app", "site-a", now=5.0, failover_id="f1", reason="failover cancelled")
    assert (r3.generation, r3.primary) == (3, "site-a")
    assert gs.ensure("app-rev", "site-b", now=6.0, at_least=7).generation == 7
    body = store.get(generation_key("app"))
    for word in (b"generation", b"primary", b"promoted_at", b"blake3"):
        assert word in body


def test_check_not_fenced_and_direction() -> None:
    store = MemoryObjectStore()
    check_not_fenced(store, "app", 0)  # no record: nothing to fence
    gs = GenerationStore(store)
    gs.ensure("app", "site-a", now=1.0)
    check_not_fenced(store, "app", 1)
    check_not_fenced(store, "app", 2)  # newer than the store (it was just promoted): fine
    gs.advance("app", "site-b", now=2.0, failover_id="f", reason="failover")
    with pytest.raises(Fenced, match="generation 1"):
        check_not_fenced(store, "app", 1)
    with pytest.raises(InvalidInput):
        check_not_fenced(store, "app", -1)
    assert check_replication_direction(store, "app", "site-b", 2) is not None
    with pytest.raises(Fenced, match="wrong direction"):
        check_replication_direction(store, "app", "site-a")
    with pytest.raises(Fenced):
        check_replication_direction(store, "app", "site-b", 1)
    assert check_replication_direction(store, "other", "anywhere") is None


def _engine(tmp: Path, store: MemoryObjectStore, generation: int | None) -> tuple[
        ItemReplicator, MemoryHypervisor, str]:
    clock = FakeClock()
    hv = MemoryHypervisor(clock)
    vm = hv.create_blank(VmSpec("vm1", disks=(DiskSpec("d0", 1 << 20),)))
    repo = Repository(store, "app", segment_size=1 << 20)
    it = ItemReplicator(item_id="app", vm_id=vm.vm_id, driver=hv, target=LocalTarget(repo),
                        state_dir=tmp / "state", clock=clock, generation=generation,
                        settings=ReplicationSettings(frequency_s=30, app_consistent_every_s=None,
                                                     resync_window=ALWAYS))
    return it, hv, vm.vm_id


def test_engine_is_fenced_before_commit(tmp_path: Path) -> None:
    store = MemoryObjectStore()
    GenerationStore(store).ensure("app", "site-a", now=1.0)
    it, hv, vm_id = _engine(tmp_path, store, generation=1)
    it.run_initial()
    hv.write(vm_id, "d0", 0, b"x" * 4096)
    p = it.run_cycle()
    GenerationStore(store).advance("app", "site-b", now=2.0, failover_id="f", reason="failover")
    hv.write(vm_id, "d0", 8192, b"y" * 4096)
    with pytest.raises(Fenced):
        it.run_cycle()
    assert it.rec.phase is ItemState.CRITICAL and it.report.last_error is not None
    assert it.report.last_error["code"] == "fenced"
    assert it.target.repo.latest() == p  # nothing committed
    with pytest.raises(Fenced):  # a resync would run in the wrong direction: refused too
        it.run_resync("by hand")
    assert it.target.repo.latest() == p


def test_fence_between_seal_and_commit(tmp_path: Path) -> None:
    """A promotion while a cycle ships: the commit is refused, nothing becomes visible."""
    store = MemoryObjectStore()
    GenerationStore(store).ensure("app", "site-a", now=1.0)
    it, hv, vm_id = _engine(tmp_path, store, generation=1)
    p0 = it.run_initial()
    hv.write(vm_id, "d0", 0, b"z" * 4096)
    real_ship = it._ship

    def ship_then_promote(*a: object, **kw: object) -> None:
        GenerationStore(store).advance("app", "site-b", now=3.0, failover_id="f", reason="x")
        real_ship(*a, **kw)  # type: ignore[arg-type]

    it._ship = ship_then_promote  # type: ignore[method-assign]
    with pytest.raises(Fenced):
        it.run_cycle()
    assert it.target.repo.latest() == p0


def test_engine_without_generation_is_unchanged(tmp_path: Path) -> None:
    store = MemoryObjectStore()
    GenerationStore(store).ensure("app", "site-a", now=1.0)
    GenerationStore(store).advance("app", "site-b", now=2.0, failover_id="f", reason="x")
    it, _, _ = _engine(tmp_path, store, generation=None)
    assert it.run_initial() is not None  # no check: the pre-failover behaviour


def test_first_promotion_without_a_record_fences_an_engine_at_1() -> None:
    """Agents' engines start at generation 1 and protection writes no record: the first
    promotion must be 2, or the old primary would go on writing (review finding)."""
    store = MemoryObjectStore()
    gs = GenerationStore(store)
    assert gs.current("app") == 0
    rec = gs.advance("app", "site-b", now=1.0, failover_id="f1", reason="unplanned failover")
    assert rec.generation == 2
    with pytest.raises(Fenced):
        check_not_fenced(store, "app", 1)
