"""Failover actions for one protected item, in-process: test failover and its cleanup, planned
and unplanned failover, commit, cancel, change of recovery point (re-protect and failback:
``reprotect.py``; the model and the records: ``records.py``).

Every action keeps a record in ``<recovery site work_dir>/failovers/<failover_id>.json``
(replaced atomically) naming the steps already done, so running an action again with the same
``failover_id`` after a crash resumes it, and running it again after it finished returns the
same result. States and invariants: ``design.md`` next to this file.

Responsible for: the order of the steps (power, final cycle, images, VM creation, generation,
power on), the proofs (images verified against the point, or against the source for a planned
failover) and the timings (RTO = request → recovery VM running). Not responsible for: the vault's
jobs or database (``vault/jobs/failover.py`` runs these actions as agent commands, through the
agent's ``FailoverHost``), creating networks, serialising two actions on the same item (the
caller — the vault's job, one per item — runs one at a time).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from drsite.core.clock import Clock, SystemClock
from drsite.core.errors import (
    Conflict,
    Fenced,
    InvalidInput,
    InvalidReplicaState,
    NotFound,
    ObjectNotFound,
    VmNotFound,
)
from drsite.core.model import Consistency, DiskSpec, VmInfo, VmSpec, validate_name
from drsite.core.states import FailoverState
from drsite.failover.images import (
    disk_fingerprint,
    frozen_replica_copy,
    restore_point,
    timed,
    verify_image_against_point,
)
from drsite.failover.records import (
    ActionRun,
    FailbackResult,
    FailoverResult,
    ProtectedItem,
    ReprotectResult,
    Site,
    load_failover,
    pending_record,
    start_record,
)
from drsite.failover.synctail import JournalTail, SyncTail
from drsite.fsutil import fsync_dir
from drsite.hypervisors.contract import HypervisorDriver
from drsite.imagefile import RawImageReader
from drsite.replication.report import ItemState
from drsite.store.compare import blocks_differ
from drsite.store.format import PointInfo
from drsite.store.generation import check_replication_direction
from drsite.store.repository import Repository

log = logging.getLogger(__name__)

PointChoice = str  # "latest" | "latest_app" | a point id
PIECE = 4 << 20


def _resolve_point(repo: Repository, choice: PointChoice) -> PointInfo:
    if choice == "latest":
        p = repo.latest()
        if p is None:
            raise NotFound(f"item {repo.item_id} has no recovery point",
                           hint="Wait for initial replication to finish.")
        return p
    if choice == "latest_app":
        apps = [p for p in repo.points() if p.consistency is Consistency.APP]
        if not apps:
            raise NotFound(f"item {repo.item_id} has no app-consistent recovery point",
                           hint="Choose 'latest' or a point id.")
        return apps[-1]
    try:
        return repo.point(validate_name("point", choice))
    except ObjectNotFound as exc:
        raise NotFound(f"recovery point {choice} of {repo.item_id} does not exist",
                       hint="List the item's points and choose one of them.") from exc


def _find_vm(hv: HypervisorDriver, name: str) -> VmInfo | None:
    try:
        return hv.find_vm(name)
    except VmNotFound:
        return None


def _start_vm(run: ActionRun, hv: HypervisorDriver, vm: VmInfo, state: FailoverState) -> None:
    """Record the recovery VM (``vm_created``), power it on (the RTO ends here) and enter
    ``state`` (``vm_running``). Idempotent: powering on a running VM is a no-op."""
    rec = run.rec
    rec.vm_id, rec.vm_name = vm.vm_id, vm.name
    run.mark("vm_created")
    stop = timed(rec.timings, "power_on")
    hv.power_on(vm.vm_id)
    stop()
    run.running()
    rec.state = state
    run.mark("vm_running")


def _images_from_store(item: ProtectedItem, point: PointInfo, dest: Path,
                       run: ActionRun) -> dict[str, Path]:
    """Restore every disk of ``point`` into ``dest`` (verified reads)."""
    dest.mkdir(parents=True, exist_ok=True)
    stop = timed(run.rec.timings, "restore")
    out: dict[str, Path] = {}
    for disk_id in sorted(point.disk_sizes):
        path = dest / f"{disk_id}.img"
        st = restore_point(item.repo, point.point_id, disk_id, path)
        run.rec.bytes_restored += st.bytes_read
        out[disk_id] = path
    stop()
    run.rec.image_source = "restore"
    return out


def _verify(item: ProtectedItem, point: PointInfo, images: dict[str, Path], run: ActionRun) -> None:
    stop = timed(run.rec.timings, "verify")
    for disk_id, path in images.items():
        verify_image_against_point(item.repo, point.point_id, disk_id, path,
                                   point.disk_sizes[disk_id])
    stop()
    run.rec.verified = True
    run.rec.verify_scope = "full"


def _replica_holds(item: ProtectedItem, point: PointInfo) -> bool:
    h = item.hydrator
    if h is None:
        return False
    return h.state() == (point.point_id, None) and all(
        h.disk_path(d).exists() for d in point.disk_sizes)


def _consume_replica(item: ProtectedItem) -> None:
    """The replica's images were moved into a VM: forget its state so that the next
    ``catch_up`` rebuilds it from the store in full (a new hydrator on an empty directory)."""
    h = item.hydrator
    if h is None:
        return
    shutil.rmtree(h.dir, ignore_errors=True)
    h.dir.mkdir(parents=True, exist_ok=True)


def _recovery_spec(item: ProtectedItem, point: PointInfo, *, test: bool,
                   name: str | None) -> VmSpec:
    spec = item.network_map.apply(item.spec, test=test)
    disks = tuple(d for d in spec.disks if d.disk_id in point.disk_sizes)
    if sorted(d.disk_id for d in disks) != sorted(point.disk_sizes):
        disks = tuple(DiskSpec(k, v) for k, v in sorted(point.disk_sizes.items()))
    return VmSpec(name or spec.name, spec.vcpus, spec.memory_mib, spec.nics, disks)


# --- test failover --------------------------------------------------------------------------

def test_failover(item: ProtectedItem, point: PointChoice = "latest", *,
                  failover_id: str | None = None, vm_name: str | None = None,
                  verify: bool = True, clock: Clock | None = None) -> FailoverResult:
    """Start the VM from ``point`` in the test network, from a copy-on-write view.

    The backing images are frozen and private to this test failover, so replication and
    hydration go on untouched: for the point the hydrated replica holds, a copy of the replica
    taken while it provably held that point (:func:`frozen_replica_copy`; the replica itself is
    only read); for any other point (or if the replica kept moving), the point restored from the
    store into sparse images. The VM (default name ``<vm>-test``) is created with
    ``create_vm_cow`` (size-independent) and started; generations are not touched (a test VM
    never writes the item's data). ``verify`` checks the backing images against the point.
    """
    clock = clock or SystemClock()
    rec, resumed = start_record(item, "test", failover_id, clock)
    run = ActionRun(item, rec)
    if resumed and rec.state is not FailoverState.STARTING:
        return rec
    hv = item.recovery.hv
    p = _resolve_point(item.repo, rec.point_id or point)
    rec.point_id, rec.point_created_at = p.point_id, p.created_at
    spec = _recovery_spec(item, p, test=True, name=vm_name or rec.vm_name
                          or f"{item.spec.name}-test")
    rec.vm_name = spec.name
    backing_dir = item.recovery.work_dir / "testfailover" / rec.failover_id
    # recorded before any image is written, so a cleanup after a crash or a failure finds them
    rec.backing_dir = str(backing_dir)
    run.save()
    if not run.done("images"):
        try:
            images: dict[str, Path] | None = None
            if item.hydrator is not None:
                stop = timed(rec.timings, "frozen_copy")
                images = frozen_replica_copy(item.hydrator, p.point_id, p.disk_sizes, backing_dir)
                stop()
                if images is not None:
                    rec.image_source = "replica-copy"
            if images is None:
                images = _images_from_store(item, p, backing_dir, run)
            for path in images.values():
                path.chmod(0o444)  # the backing of a CoW VM is read-only
            if verify:
                _verify(item, p, images, run)
        except BaseException:
            # a failed test failover leaves no images behind (nothing runs from them yet)
            shutil.rmtree(backing_dir, ignore_errors=True)
            raise
        run.mark("images")
    images = {d: backing_dir / f"{d}.img" for d in p.disk_sizes}
    vm = _find_vm(hv, spec.name)
    if vm is None:
        stop = timed(rec.timings, "create_vm")
        vm = hv.create_vm_cow(spec, images)
        stop()
    _start_vm(run, hv, vm, FailoverState.TEST_RUNNING)
    return rec


test_failover.__test__ = False  # type: ignore[attr-defined]  # not a pytest test


def cleanup_test_failover(item: ProtectedItem, failover_id: str, notes: str = "") -> FailoverResult:
    """Remove the test VM (power off, delete: its overlays go with it) and its frozen backing
    images, and record ``notes`` (what the operator observed). Idempotent."""
    rec = load_failover(item.recovery, failover_id)
    if rec is None or rec.kind != "test":
        raise NotFound(f"no test failover {failover_id} of {item.item_id}")
    run = ActionRun(item, rec)
    hv = item.recovery.hv
    if rec.state is not FailoverState.CLEANED_UP:
        stop = timed(rec.timings, "cleanup")
        vm = _find_vm(hv, rec.vm_name) if rec.vm_name else None
        if vm is not None:
            hv.power_off(vm.vm_id, timeout=10.0)
            hv.delete_vm(vm.vm_id)
        if rec.backing_dir:
            shutil.rmtree(rec.backing_dir, ignore_errors=True)
        stop()
        rec.state = FailoverState.CLEANED_UP
    if notes and notes not in rec.notes:
        rec.notes.append(notes)
    run.mark("cleaned_up")
    return rec


# --- planned / unplanned failover -----------------------------------------------------------

def _refuse_vm_in_the_way(rec: FailoverResult, spec: VmSpec, vm: VmInfo | None,
                          replace_vm: str | None) -> None:
    """A VM of that name that this failover did not create (e.g. a stale one left by an
    earlier failback; ``replace_vm``: the failback's own, re-created): never start its old
    disks in place of the chosen point."""
    if vm is not None and vm.vm_id != replace_vm:
        raise Conflict(f"a VM named {spec.name} already exists on the recovery site "
                       f"({vm.vm_id}); it was not created by failover {rec.failover_id}",
                       hint="Delete or rename that VM on the recovery site, then fail over again.")


def _create_and_start(item: ProtectedItem, run: ActionRun, p: PointInfo, spec: VmSpec,
                      images: dict[str, Path], *, from_replica: bool,
                      replace_vm: str | None, clock: Clock) -> None:
    """Promote, create the recovery VM from ``images`` (moved into it), start it."""
    rec = run.rec
    hv = item.recovery.hv
    if not run.done("promoted"):
        # a VM in the way is refused before the promotion, which would fence the old primary's
        # engine for a failover that starts no VM
        _refuse_vm_in_the_way(rec, spec, _find_vm(hv, spec.name), replace_vm)
        # promote BEFORE the recovery VM runs: from here on the old primary's engine is fenced
        g = item.generations.advance(item.item_id, item.recovery.name, now=clock.now(),
                                     failover_id=rec.failover_id, reason=f"{rec.kind} failover")
        rec.generation = g.generation
        run.mark("promoted")
    vm = _find_vm(hv, spec.name)
    if vm is not None and not run.done("vm_created") and vm.vm_id == replace_vm:
        hv.power_off(vm.vm_id, timeout=10.0)
        hv.delete_vm(vm.vm_id)  # failback to the original VM: it is re-created with its name
        vm = None
    if not run.done("creating_vm"):
        _refuse_vm_in_the_way(rec, spec, vm, None)
    if vm is None:
        run.mark("creating_vm")
        stop = timed(rec.timings, "create_vm")
        vm = hv.create_vm(spec, {d: str(p_) for d, p_ in images.items()})
        stop()
        if from_replica:
            _consume_replica(item)
    _start_vm(run, hv, vm, FailoverState.PENDING_COMMIT)


def _images_for(item: ProtectedItem, p: PointInfo, run: ActionRun, *,
                verify: bool) -> tuple[dict[str, Path], bool]:
    """Images of point ``p`` to move into the recovery VM: the replica's own images when it
    holds ``p`` (fastest: a rename), else a restore from the store. Returns (images,
    from_replica)."""
    rec = run.rec
    restore_dir = item.recovery.work_dir / "restores" / rec.failover_id
    if item.hydrator is not None and run.done("images") and rec.image_source == "replica":
        images = {d: item.hydrator.disk_path(d) for d in p.disk_sizes}
        if all(path.exists() for path in images.values()):
            return images, True
        # resumed after a crash inside create_vm: some images were moved out of the replica
        # (and lost with the VM's staging directory): the replica is rebuilt later, this
        # failover restores the point from the store
        log.warning("failover %s: the replica's images of %s are gone (an interrupted VM "
                    "creation); restoring point %s from the store", rec.failover_id,
                    item.item_id, p.point_id)
        _consume_replica(item)
        rec.image_source = "restore"
        images = _images_from_store(item, p, restore_dir, run)
        if verify:
            _verify(item, p, images, run)
        return images, False
    if run.done("images") and rec.image_source == "restore":
        return {d: restore_dir / f"{d}.img" for d in p.disk_sizes}, False
    if _replica_holds(item, p):
        assert item.hydrator is not None
        images = {d: item.hydrator.disk_path(d) for d in p.disk_sizes}
        rec.image_source = "replica"
        from_replica = True
        if verify:
            try:
                _check_replica(item, p, run)
            except InvalidReplicaState as e:
                # the replica was forgotten (rebuilt later): the point's own data, verified
                log.warning("failover %s: %s; restoring point %s from the store instead",
                            rec.failover_id, e, p.point_id)
                rec.notes.append(f"the replica was not the point ({e.message}); restored from "
                                 "the store instead")
                rec.image_source = "restore"
                images = _images_from_store(item, p, restore_dir, run)
                from_replica = False
                _verify(item, p, images, run)
    else:
        images = _images_from_store(item, p, restore_dir, run)
        from_replica = False
        if verify:
            _verify(item, p, images, run)
    run.mark("images")
    return images, from_replica


def _check_replica(item: ProtectedItem, p: PointInfo, run: ActionRun) -> None:
    """Prove the replica's images equal ``p`` before they boot: only what the background
    verification has not proven yet is compared (``ReplicaHydrator.check``; nothing when it
    proved ``p`` already). ``InvalidReplicaState`` when they differ."""
    assert item.hydrator is not None
    stop = timed(run.rec.timings, "verify")
    scope = item.hydrator.check(p)
    stop()
    run.rec.verified = True
    run.rec.verify_scope = scope.how
    run.rec.verify_bytes = scope.bytes


def _replica_proven_equal(item: ProtectedItem, run: ActionRun, p: PointInfo,
                          differs: Callable[[str, Path], str | None]
                          ) -> tuple[dict[str, Path], bool]:
    """Planned failover: the replica brought to the final point ``p`` and its images, each
    proven equal to the stopped source (``differs(disk_id, image)`` says how it differs, or
    None) — else ``InvalidReplicaState`` and nothing starts. Returns (images, from_replica)."""
    rec = run.rec
    if item.hydrator is not None and not run.done("images"):
        stop = timed(rec.timings, "hydrate")
        item.hydrator.catch_up()
        stop()
    images, from_replica = _images_for(item, p, run, verify=False)
    if not run.done("no_data_lost"):
        stop = timed(rec.timings, "compare_source")
        for disk_id, path in images.items():
            how = differs(disk_id, path)
            if how is not None:
                raise InvalidReplicaState(
                    f"planned failover of {item.item_id}: disk {disk_id} of the replica differs "
                    f"from the stopped source{how}; nothing was started",
                    hint="Cancel the failover (the source restarts) and resync the item.")
        stop()
        rec.verified = True
        run.mark("no_data_lost")
    return images, from_replica


def planned_failover(item: ProtectedItem, *, failover_id: str | None = None,
                     vm_spec: VmSpec | None = None, replace_vm: str | None = None,
                     shutdown_timeout: float = 60.0, clock: Clock | None = None) -> FailoverResult:
    """Shut the source down, ship the last changes, start the replica: no data lost.

    Steps: prerequisites (network mapping, this side is the primary), graceful power-off of the
    source, a final cycle (``ItemReplicator.run_cycle``), the replica brought to that point, the
    proof (every source disk equals the replica image, by 64 KiB block digests: else
    ``InvalidReplicaState`` and nothing is started), promotion (generation + 1), the recovery
    VM created from the replica's images (moved, no copy) with the network mapping applied, and
    started. ``vm_spec`` overrides the recovery VM's spec (used as is, e.g. failback to the
    original VM's configuration); ``replace_vm`` names a stopped VM on the recovery site that
    is deleted and re-created under its own name (failback to the original VM).
    """
    clock = clock or SystemClock()
    rec, resumed = start_record(item, "planned", failover_id, clock)
    run = ActionRun(item, rec)
    if resumed and rec.state is not FailoverState.STARTING:
        return rec
    if item.replicator is None:
        raise InvalidInput(f"planned failover of {item.item_id} needs the primary's replication "
                           "engine for the final cycle", hint="Use an unplanned failover.")
    if not run.done("checked"):
        check_replication_direction(item.repo.store, item.item_id, item.primary.name,
                                    item.replicator.generation, auth=item.repo.auth)
        if vm_spec is None:  # an explicit spec is used as it is
            item.network_map.check(item.spec)
        run.mark("checked")
    src_hv = item.primary.hv
    if not run.done("source_off"):
        stop = timed(rec.timings, "source_shutdown")
        src_hv.power_off(item.vm_id, timeout=shutdown_timeout)
        stop()
        run.mark("source_off")
    if not run.done("final_cycle"):
        stop = timed(rec.timings, "final_cycle")
        p = item.replicator.run_cycle()
        item.replicator.settle_replica()   # the replica is needed now, not at the next cycle
        stop()
        rec.point_id, rec.point_created_at = p.point_id, p.created_at
        run.mark("final_cycle")
    assert rec.point_id is not None
    p = item.repo.point(rec.point_id)

    def differs(disk_id: str, path: Path) -> str | None:
        src = src_hv.open_live_reader(item.vm_id, disk_id)
        try:
            with RawImageReader(path, p.disk_sizes[disk_id]) as img:
                bad = blocks_differ(src, img)
        finally:
            src.close()
        return f" in {bad} block(s)" if bad else None

    images, from_replica = _replica_proven_equal(item, run, p, differs)
    spec = vm_spec or _recovery_spec(item, p, test=False, name=None)
    _create_and_start(item, run, p, spec, images, from_replica=from_replica,
                      replace_vm=replace_vm, clock=clock)
    return rec


def source_fingerprints(hv: HypervisorDriver, vm_id: str) -> dict[str, str]:
    """Fingerprints of every disk of a (stopped) VM: the primary's half of the proof that a
    planned failover lost nothing (see :func:`planned_failover_recovery_side`)."""
    out: dict[str, str] = {}
    for d in hv.get_vm(vm_id).disks:
        r = hv.open_live_reader(vm_id, d.disk_id)
        try:
            out[d.disk_id] = disk_fingerprint(r)
        finally:
            r.close()
    return out


def planned_failover_recovery_side(item: ProtectedItem, *, failover_id: str, point_id: str,
                                   fingerprints: dict[str, str], vm_name: str | None = None,
                                   replace_vm: str | None = None,
                                   clock: Clock | None = None) -> FailoverResult:
    """The recovery site's half of a planned failover whose primary half ran on another host:
    the primary powered its VM off, ran the final cycle (``point_id``) and sent the
    fingerprints of its stopped disks (:func:`source_fingerprints`). Here: the replica is
    brought to that point, every image's fingerprint must equal the source's (else
    ``InvalidReplicaState`` and nothing starts: no data lost is proven, not assumed), then
    promotion, VM creation from the replica's images and power-on, as :func:`planned_failover`.
    ``vm_name`` names the recovery VM (failback to an alternate location); ``replace_vm`` is a
    stopped VM of that name on this site that is deleted and re-created (failback to the
    original VM).
    """
    clock = clock or SystemClock()
    rec, resumed = start_record(item, "planned", failover_id, clock)
    run = ActionRun(item, rec)
    if resumed and rec.state is not FailoverState.STARTING:
        return rec
    if not run.done("checked"):
        check_replication_direction(item.repo.store, item.item_id, item.primary.name,
                                    auth=item.repo.auth)
        item.network_map.check(item.spec)
        rec.point_id = point_id
        rec.steps.extend(s for s in ("source_off", "final_cycle") if s not in rec.steps)
        run.mark("checked")
    p = item.repo.point(point_id)
    rec.point_created_at = p.created_at
    if sorted(fingerprints) != sorted(p.disk_sizes):
        raise InvalidReplicaState(f"planned failover of {item.item_id}: the source reported disks "
                                  f"{sorted(fingerprints)}, the final point has {sorted(p.disk_sizes)}")

    def differs(disk_id: str, path: Path) -> str | None:
        with RawImageReader(path, p.disk_sizes[disk_id]) as img:
            return None if disk_fingerprint(img) == fingerprints[disk_id] else ""

    images, from_replica = _replica_proven_equal(item, run, p, differs)
    spec = _recovery_spec(item, p, test=False, name=vm_name)
    _create_and_start(item, run, p, spec, images, from_replica=from_replica,
                      replace_vm=replace_vm, clock=clock)
    return rec


def unplanned_failover(item: ProtectedItem, choice: PointChoice = "latest", *,
                       failover_id: str | None = None, verify: bool = True,
                       replace_vm: str | None = None,
                       clock: Clock | None = None) -> FailoverResult:
    """The source is unreachable (it is not touched): start the recovery VM from ``choice``
    ("latest", "latest_app" or a point id) and promote. ``replace_vm`` names a stopped VM of
    the recovery VM's name on the recovery site that is an older incarnation of this one (left
    by a failback): it is deleted and re-created, as in a failback.

    For the point the replica holds (after letting it catch up), the replica's images are
    moved into the VM; for any other point the point is restored from the store (parallel
    verified reads). ``verify`` checks the images against the point first. The promotion fences
    the old primary's engine before the recovery VM runs.
    """
    clock = clock or SystemClock()
    rec, resumed = start_record(item, "unplanned", failover_id, clock)
    run = ActionRun(item, rec)
    if resumed and rec.state is not FailoverState.STARTING:
        return rec
    if not run.done("checked"):
        item.network_map.check(item.spec)
        run.mark("checked")
    if rec.point_id is None:
        if item.hydrator is not None and choice == "latest":
            stop = timed(rec.timings, "hydrate")
            item.hydrator.catch_up()
            stop()
        p = _resolve_point(item.repo, choice)
        rec.point_id, rec.point_created_at = p.point_id, p.created_at
        run.save()
    p = item.repo.point(rec.point_id)
    images, from_replica = _images_for(item, p, run, verify=verify)
    if choice == "latest":
        images, from_replica = _replay_sync_journal(item, p, images, run,
                                                    from_replica=from_replica)
    spec = _recovery_spec(item, p, test=False, name=None)
    _create_and_start(item, run, p, spec, images, from_replica=from_replica,
                      replace_vm=replace_vm, clock=clock)
    return rec


def _replay_sync_journal(item: ProtectedItem, p: PointInfo, images: dict[str, Path],
                         run: ActionRun, *, from_replica: bool) -> tuple[dict[str, Path], bool]:
    """A synchronous item: add to point ``p``'s images every write the guest had
    acknowledged after its seal (the sync journal's entries after the point's mark, or the
    sync overlay of the run the mark names: ``failover.synctail``), when the tail covers that
    seal; otherwise say in the record's notes that the RPO is the point's, and why. Replica
    images are first moved to the failover's own directory (a rename) and the replica
    forgotten, so a replica never holds more than the point its state names. Idempotent:
    applying again writes the same bytes in order."""
    j = item.sync_journal
    tail: SyncTail | None = JournalTail(j) if j is not None else item.sync_overlay
    rec = run.rec
    if run.done("journal"):
        return images, from_replica
    mark = p.meta.get("sync") or {}
    stream, seq = mark.get("stream"), mark.get("seq")
    if tail is None:
        if stream:  # sealed in synchronous mode, yet this host holds no journal or overlay
            rec.notes.append(f"sync journal not replayed (this host holds no sync journal or "
                             f"overlay of {item.item_id}): the VM holds point {p.point_id}; "
                             "writes acknowledged after its seal are lost")
            run.mark("journal")
        return images, from_replica
    cov = tail.coverage(str(stream) if stream else None, int(seq) if seq is not None else None)
    if not cov.ok:
        what = "sync journal not replayed" if j is not None else "sync overlay not applied"
        rec.notes.append(f"{what} ({cov.reason}): the VM holds point "
                         f"{p.point_id}; writes acknowledged after its seal are lost")
        run.mark("journal")
        return images, from_replica
    if from_replica:
        own = item.recovery.work_dir / "restores" / rec.failover_id
        own.mkdir(parents=True, exist_ok=True)
        moved = {d: own / f"{d}.img" for d in images}
        for d, src in images.items():
            os.replace(src, moved[d])
        fsync_dir(own)
        _consume_replica(item)
        rec.image_source = "restore"  # the failover's own images from here on (resume)
        run.save()
        images, from_replica = moved, False
    assert seq is not None and stream is not None
    applied = tail.apply(str(stream), int(seq), images)
    rec.notes.append(tail.describe(applied, p.point_id, cov))
    log.info("failover %s: %s", rec.failover_id, rec.notes[-1])
    run.mark("journal")
    return images, from_replica


def commit(item: ProtectedItem, failover_id: str) -> FailoverResult:
    """End the failover: the recovery VM is the item's primary for good. The other recovery
    points of the item are discarded (deleted, then GC) and the point cannot change any more.
    Idempotent."""
    rec, run = pending_record(item, failover_id)
    if rec.state is FailoverState.COMMITTED:
        return rec
    if rec.state is not FailoverState.PENDING_COMMIT:
        raise Conflict(f"failover {failover_id} is {rec.state.value}; only a failover pending "
                       "commit can be committed")
    stop = timed(rec.timings, "commit")
    for pt in item.repo.points():
        if pt.point_id != rec.point_id:
            item.repo.delete_point(pt.point_id)
    item.repo.gc()
    stop()
    rec.state = FailoverState.COMMITTED
    run.mark("committed")
    return rec


def cancel(item: ProtectedItem, failover_id: str, *, restart_source: bool = True,
           clock: Clock | None = None) -> FailoverResult:
    """Undo a failover pending commit: power off and delete the recovery VM, then record a NEW
    generation (+1, never an old number) naming the original primary, rebuild the replica the
    failover consumed, and (planned failover, ``restart_source``) power the source on again.

    The primary's engine must be given the new generation (``rec.generation``) to write again;
    when ``item.replicator`` is set this is done here (a fenced, Critical engine is also asked
    to resync, which clears Critical). Idempotent.
    """
    clock = clock or SystemClock()
    rec, run = pending_record(item, failover_id)
    if rec.state is FailoverState.CANCELLED:
        return rec
    if rec.state not in (FailoverState.PENDING_COMMIT, FailoverState.STARTING):
        raise Conflict(f"failover {failover_id} is {rec.state.value}; it cannot be cancelled",
                       hint="A committed failover is undone by re-protect and failback.")
    hv = item.recovery.hv
    stop = timed(rec.timings, "cancel")
    vm = _find_vm(hv, rec.vm_name) if rec.vm_name else None
    if vm is not None and rec.vm_id == vm.vm_id:
        hv.power_off(vm.vm_id, timeout=10.0)
        hv.delete_vm(vm.vm_id)  # no VM of the item runs on the recovery site any more
    if "promoted" in rec.steps:
        g = item.generations.advance(item.item_id, item.primary.name, now=clock.now(),
                                     failover_id=rec.failover_id, reason="failover cancelled")
        rec.generation = g.generation
    else:
        rec.generation = item.generations.current(item.item_id)
    run.mark("demoted")
    if item.hydrator is not None:
        item.hydrator.catch_up()
    shutil.rmtree(item.recovery.work_dir / "restores" / rec.failover_id, ignore_errors=True)
    if item.replicator is not None:
        item.replicator.generation = rec.generation
        err = item.replicator.report.last_error
        if item.replicator.rec.phase is ItemState.CRITICAL and err and err.get("code") == Fenced.code:
            item.replicator.request_resync(f"failover {failover_id} cancelled")
    if rec.kind == "planned" and restart_source and "source_off" in rec.steps:
        item.primary.hv.power_on(item.vm_id)
    stop()
    rec.state = FailoverState.CANCELLED
    run.mark("cancelled")
    return rec


def change_point(item: ProtectedItem, failover_id: str, point: PointChoice, *,
                 verify: bool = True, clock: Clock | None = None) -> FailoverResult:
    """Before commit: replace the recovery VM by one started from another point. The current
    recovery VM is powered off and deleted first (never two at once); the new one gets the
    same name and network settings; the generation does not change (same promotion)."""
    clock = clock or SystemClock()
    rec, run = pending_record(item, failover_id)
    hv = item.recovery.hv
    if rec.state is FailoverState.STARTING and "changing_point" in rec.steps \
            and rec.point_id is not None:
        p = item.repo.point(rec.point_id)  # a change interrupted after the old VM went: resume
    else:
        if rec.state is not FailoverState.PENDING_COMMIT:
            raise Conflict(f"failover {failover_id} is {rec.state.value}; the point can change "
                           "only before commit")
        p = _resolve_point(item.repo, point)
        if p.point_id == rec.point_id:
            return rec
        run.t0 = time.monotonic()
        run.rto_base = 0.0
        if rec.vm_id is not None:
            with contextlib.suppress(VmNotFound):
                hv.power_off(rec.vm_id, timeout=10.0)
                hv.delete_vm(rec.vm_id)
        old = rec.point_id
        rec.point_id, rec.point_created_at = p.point_id, p.created_at
        rec.steps = [s for s in rec.steps
                     if s not in ("images", "creating_vm", "vm_created", "vm_running")]
        rec.steps.append("changing_point")
        rec.state = FailoverState.STARTING
        rec.notes.append(f"point changed from {old} to {p.point_id}")
        shutil.rmtree(item.recovery.work_dir / "restores" / rec.failover_id, ignore_errors=True)
        run.save()
    images, from_replica = _images_for(item, p, run, verify=verify)
    spec = _recovery_spec(item, p, test=False, name=rec.vm_name)
    _create_and_start(item, run, p, spec, images, from_replica=from_replica, replace_vm=None,
                      clock=clock)
    rec.steps = [s for s in rec.steps if s != "changing_point"]
    run.save()
    return rec


__all__ = ["FailbackResult", "FailoverResult", "FailoverState", "ProtectedItem",
           "ReprotectResult", "Site", "cancel", "change_point", "cleanup_test_failover",
           "commit", "load_failover", "planned_failover",
           "planned_failover_recovery_side", "source_fingerprints",
           "test_failover", "unplanned_failover"]
