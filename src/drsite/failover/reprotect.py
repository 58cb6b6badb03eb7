"""Re-protect and failback: after a committed failover, the recovery VM replicates back to the
old primary's side, reusing the old primary's disks as the base (only differing blocks travel);
failback is a planned failover of that reverse item, its commit, and a re-protect again.

Responsible for: the order (fencing checked, old VM off, base point written where the disks are,
reverse generation record, replica, resync). Not responsible for: the vault's reverse item and
group rows (``vault/jobs/failover.py``), choosing the store of the reverse direction.
"""

from __future__ import annotations

import time

from drsite.core.clock import Clock, SystemClock
from drsite.core.errors import Conflict, Fenced, InvalidInput
from drsite.core.model import Consistency, PowerState, VmInfo, VmSpec, validate_name
from drsite.core.states import FailoverState
from drsite.failover.actions import PIECE, commit, planned_failover
from drsite.failover.network import NetworkMap
from drsite.failover.records import (
    FailbackResult,
    ProtectedItem,
    ReprotectResult,
    pending_record,
)
from drsite.hypervisors.contract import DiskReader
from drsite.replication.driver import ItemReplicator, ReplicationSettings
from drsite.replication.report import ItemState
from drsite.replication.target import LocalTarget
from drsite.store.contract import ObjectStore
from drsite.store.format import PointInfo
from drsite.store.generation import GenerationStore, check_replication_direction
from drsite.store.reader import iter_pieces
from drsite.store.replica import ReplicaHydrator
from drsite.store.repository import Repository


def write_base_point(repo: Repository, cycle_id: str, readers: dict[str, DiskReader],
                      created_at: float) -> tuple[PointInfo, int]:
    """A full point holding the given disks (data extents only), written where the disks are."""
    done = repo.committed_cycle(cycle_id)
    if done is not None:
        return done, 0
    sizes = {d: r.size for d, r in readers.items()}
    written = 0
    w = repo.begin(cycle_id, base=None, disk_sizes=sizes, kind="initial")
    try:
        covered = {d: w.covered(d) for d in sizes}
        buf = bytearray(PIECE)
        for disk_id, r in sorted(readers.items()):
            todo = r.data_extents().clip(sizes[disk_id]).subtract(covered[disk_id])
            for off, n in iter_pieces(todo, PIECE):
                mv = memoryview(buf)[:n]
                r.readinto(off, mv)
                w.write(disk_id, off, mv)
                written += n
        point = w.commit(created_at=created_at, consistency=Consistency.CRASH,
                         meta={"note": "re-protect base: the old primary's disks"})
    finally:
        w.close()
    return point, written


def reprotect(item: ProtectedItem, failover_id: str, reverse_store: ObjectStore, *,
              new_item_id: str | None = None, network_map: NetworkMap | None = None,
              settings: ReplicationSettings | None = None,
              clock: Clock | None = None) -> ReprotectResult:
    """Reverse replication of a committed failover: the recovery VM replicates to
    ``reverse_store`` on the old primary's side, reusing the old primary's disks.

    Steps: the failover must be committed and the store's generation record must name the
    recovery site as primary with a generation newer than the old primary's (the old primary
    is fenced), the old primary's VM is powered off; its disks are written as a full base point
    of the new item (default ``<item>-rev``) *where they are* (on the old primary's side: no
    network); the reverse item's generation record starts at the current generation; the
    reverse replica is hydrated on the old primary's site; then a resync by checksums
    (``ItemReplicator.run_resync``) sends only the blocks that differ. Returns the reverse item
    (its ``replicator`` runs further cycles) and bytes sent vs disk size.
    """
    clock = clock or SystemClock()
    t0 = time.monotonic()
    rec, run = pending_record(item, failover_id)
    if rec.state is not FailoverState.COMMITTED:
        raise Conflict(f"failover {failover_id} is {rec.state.value}; commit it before "
                       "re-protecting", hint="Commit the failover first.")
    assert rec.vm_id is not None
    rev_id = validate_name("item", new_item_id or rec.reprotect_item_id or f"{item.item_id}-rev")
    g = check_replication_direction(item.repo.store, item.item_id, item.recovery.name,
                                    auth=item.repo.auth)
    generation = g.generation if g else 0
    if g is not None and g.generation <= rec.generation_before:
        raise Fenced(f"the old primary of {item.item_id} is not fenced (generation "
                     f"{g.generation} is not newer than {rec.generation_before})")
    old_hv = item.primary.hv
    new_hv = item.recovery.hv
    old_vm = old_hv.get_vm(item.vm_id)
    if old_vm.power is PowerState.RUNNING:
        old_hv.power_off(item.vm_id, timeout=30.0)  # no VM of the item on both sites
    rec.reprotect_item_id = rev_id
    run.mark("reprotecting")
    rev_repo = Repository(reverse_store, rev_id)
    readers = {d.disk_id: old_hv.open_live_reader(item.vm_id, d.disk_id) for d in old_vm.disks}
    try:
        base, base_bytes = write_base_point(rev_repo, f"{failover_id}-base", readers, clock.now())
    finally:
        for r in readers.values():
            r.close()
    GenerationStore(reverse_store).ensure(rev_id, item.recovery.name, now=clock.now(),
                                          at_least=generation,
                                          reason=f"re-protect of {item.item_id}")
    rev_gen = GenerationStore(reverse_store).current(rev_id)
    hydrator = ReplicaHydrator(rev_repo, item.primary.work_dir / "replicas" / rev_id)
    hydrator.catch_up()
    engine = ItemReplicator(item_id=rev_id, vm_id=rec.vm_id, driver=new_hv,
                            target=LocalTarget(rev_repo, hydrator),
                            state_dir=item.recovery.work_dir / "engine",
                            settings=settings or (item.replicator.settings if item.replicator
                                                  else None),
                            clock=clock, generation=rev_gen)
    sent0, cmp0 = engine.report.bytes_sent, engine.report.bytes_compared
    point = rev_repo.latest()
    if point is None or point.point_id == base.point_id or engine.rec.phase is not ItemState.PROTECTED:
        point = engine.run_resync(f"re-protect after failover {failover_id}: resync against the "
                                  "old primary's disks")
    new_vm = new_hv.get_vm(rec.vm_id)
    rev_item = ProtectedItem(
        item_id=rev_id, vm_id=rec.vm_id,
        spec=VmSpec(new_vm.name, new_vm.vcpus, new_vm.memory_mib, new_vm.nics, new_vm.disks),
        primary=item.recovery, recovery=item.primary, repo=rev_repo, hydrator=hydrator,
        replicator=engine, network_map=network_map or NetworkMap())
    run.mark("reprotected")
    return ReprotectResult(rev_item, point, base, engine.report.bytes_sent - sent0,
                           engine.report.bytes_compared - cmp0, sum(base.disk_sizes.values()),
                           base_bytes, rev_gen, round(time.monotonic() - t0, 6))


def failback(rev_item: ProtectedItem, forward_store: ObjectStore, *,
             to_original_vm: VmInfo | None = None, alternate_name: str | None = None,
             failover_id: str | None = None, new_item_id: str | None = None,
             clock: Clock | None = None) -> FailbackResult:
    """Planned failover of a re-protected item back to the old primary's site, commit, then
    re-protect again (the VM it leaves, now stopped, is the base of the new forward item).

    ``to_original_vm``: the original VM is re-created under its own name and configuration from
    the failed-back images (it must be stopped; re-protect stopped it). ``alternate_name``: a new
    VM with that name and the reverse item's network mapping. Exactly one of them.
    """
    clock = clock or SystemClock()
    if (to_original_vm is None) == (alternate_name is None):
        raise InvalidInput("failback needs exactly one of to_original_vm or alternate_name")
    if to_original_vm is not None:
        spec = VmSpec(to_original_vm.name, to_original_vm.vcpus, to_original_vm.memory_mib,
                      to_original_vm.nics, to_original_vm.disks)
        replace = to_original_vm.vm_id
    else:
        assert alternate_name is not None
        mapped = rev_item.network_map.apply(rev_item.spec)
        spec = VmSpec(validate_name("VM", alternate_name), mapped.vcpus, mapped.memory_mib,
                      mapped.nics, mapped.disks)
        replace = None
    fid = failover_id or f"failback-{rev_item.item_id}"
    fo = planned_failover(rev_item, failover_id=fid, vm_spec=spec, replace_vm=replace, clock=clock)
    fo = commit(rev_item, fo.failover_id)
    rp = reprotect(rev_item, fo.failover_id, forward_store,
                   new_item_id=new_item_id or f"{rev_item.item_id}-fb{fo.generation}",
                   clock=clock)
    return FailbackResult(fo, rp)


__all__ = ["failback", "reprotect", "write_base_point"]
