"""Failover actions for one protected item, in-process: test failover and its cleanup, planned
and unplanned failover, commit, cancel, change of recovery point, re-protect and failback.

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
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

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
from drsite.core.model import Consistency, DiskSpec, PowerState, VmInfo, VmSpec, validate_name
from drsite.core.states import FailoverState
from drsite.failover.images import (
    digests_differ,
    disk_fingerprint,
    frozen_replica_copy,
    restore_point,
    timed,
    verify_image_against_point,
)
from drsite.failover.network import NetworkMap
from drsite.fsutil import atomic_write_json, read_json
from drsite.hypervisors.contract import DiskReader, HypervisorDriver
from drsite.imagefile import RawImageReader
from drsite.replication.driver import ItemReplicator, ReplicationSettings
from drsite.replication.report import ItemState
from drsite.replication.target import LocalTarget
from drsite.store.contract import ObjectStore
from drsite.store.format import PointInfo
from drsite.store.generation import GenerationStore, check_replication_direction
from drsite.store.reader import iter_pieces
from drsite.store.replica import ReplicaHydrator
from drsite.store.repository import Repository

PointChoice = str  # "latest" | "latest_app" | a point id
PIECE = 4 << 20


@dataclass
class Site:
    """One site as the failover library sees it: a name (as in generation records), a
    hypervisor, and a work directory for restored images, frozen copies, records and the
    engine state of reverse replication."""

    name: str
    hypervisor: HypervisorDriver | None
    work_dir: Path

    def __post_init__(self) -> None:
        validate_name("site", self.name)
        self.work_dir = Path(self.work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)

    @property
    def hv(self) -> HypervisorDriver:
        """The site's hypervisor; ``None`` means it is another host's (an agent acting for the
        recovery side of a failover does not reach the primary's hypervisor)."""
        if self.hypervisor is None:
            raise InvalidInput(f"the hypervisor of site {self.name} is not reachable from here",
                               hint="This step runs on that site's agent.")
        return self.hypervisor


@dataclass
class ProtectedItem:
    """One replicated VM, as failover needs it.

    ``spec`` is the protected VM's configuration as the vault knows it (name, CPUs, memory,
    NICs, disks): an unplanned failover must not need the source. ``replicator`` is the primary
    side's engine (needed by a planned failover for its final cycle). ``hydrator`` is the
    recovery site's replica of the latest point (optional: without it every failover restores
    from the store).
    """

    item_id: str
    vm_id: str
    spec: VmSpec
    primary: Site
    recovery: Site
    repo: Repository
    hydrator: ReplicaHydrator | None = None
    replicator: ItemReplicator | None = None
    network_map: NetworkMap = field(default_factory=NetworkMap)

    @property
    def generations(self) -> GenerationStore:
        return GenerationStore(self.repo.store, self.repo.auth)


FailoverKind = Literal["test", "planned", "unplanned"]


@dataclass
class FailoverResult:
    """The persisted record of one failover, and what every action returns.

    ``timings`` holds seconds per step; ``rto_s`` is request → recovery VM running (summed over
    resumptions). ``bytes_restored`` counts point data read from the store into images.
    """

    failover_id: str
    kind: str
    item_id: str
    state: FailoverState
    requested_at: float
    point_id: str | None = None
    point_created_at: float | None = None
    vm_id: str | None = None
    vm_name: str | None = None
    source_site: str = ""
    recovery_site: str = ""
    generation_before: int = 0
    generation: int = 0
    rto_s: float | None = None
    timings: dict[str, float] = field(default_factory=dict)
    steps: list[str] = field(default_factory=list)
    image_source: str = ""          # "replica" | "replica-copy" | "restore"
    bytes_restored: int = 0
    verified: bool = False
    backing_dir: str | None = None  # test failover: the frozen images under the CoW VM
    notes: list[str] = field(default_factory=list)
    reprotect_item_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["state"] = self.state.value
        return d

    @staticmethod
    def from_dict(d: dict[str, Any]) -> FailoverResult:
        d = dict(d)
        d["state"] = FailoverState(d["state"])
        known = set(FailoverResult.__dataclass_fields__)
        return FailoverResult(**{k: v for k, v in d.items() if k in known})


@dataclass
class ReprotectResult:
    """Reverse replication set up: the reverse item, its engine, and what travelled."""

    item: ProtectedItem
    point: PointInfo
    base_point: PointInfo
    bytes_sent: int
    bytes_compared: int
    disk_bytes: int
    base_bytes_local: int
    generation: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"item_id": self.item.item_id, "point_id": self.point.point_id,
                "base_point_id": self.base_point.point_id, "bytes_sent": self.bytes_sent,
                "bytes_compared": self.bytes_compared, "disk_bytes": self.disk_bytes,
                "base_bytes_local": self.base_bytes_local, "generation": self.generation,
                "seconds": self.seconds}


@dataclass
class FailbackResult:
    failover: FailoverResult
    reprotect: ReprotectResult


# --- records --------------------------------------------------------------------------------

def _records_dir(site: Site) -> Path:
    d = site.work_dir / "failovers"
    d.mkdir(parents=True, exist_ok=True)
    return d


def load_failover(site: Site, failover_id: str) -> FailoverResult | None:
    """The record of a failover whose recovery side is ``site`` (None if unknown)."""
    path = _records_dir(site) / f"{validate_name('failover', failover_id)}.json"
    if not path.exists():
        return None
    return FailoverResult.from_dict(read_json(path))


def _save(site: Site, rec: FailoverResult) -> None:
    atomic_write_json(_records_dir(site) / f"{rec.failover_id}.json", rec.to_dict())


class _Run:
    """One invocation of an action on a record: measures the elapsed time for the RTO."""

    def __init__(self, item: ProtectedItem, rec: FailoverResult) -> None:
        self.item = item
        self.rec = rec
        self.t0 = time.monotonic()
        self.rto_base = rec.rto_s or 0.0

    def save(self) -> None:
        _save(self.item.recovery, self.rec)

    def done(self, step: str) -> bool:
        return step in self.rec.steps

    def mark(self, step: str) -> None:
        if step not in self.rec.steps:
            self.rec.steps.append(step)
        self.save()

    def running(self) -> None:
        """The recovery VM runs: the RTO is measured up to here."""
        self.rec.rto_s = round(self.rto_base + time.monotonic() - self.t0, 6)


def _start(item: ProtectedItem, kind: FailoverKind, failover_id: str | None,
           clock: Clock) -> tuple[FailoverResult, bool]:
    fid = failover_id or f"{kind}-{item.item_id}-{uuid.uuid4().hex[:8]}"
    validate_name("failover", fid)
    rec = load_failover(item.recovery, fid)
    if rec is not None:
        if rec.kind != kind or rec.item_id != item.item_id:
            raise Conflict(f"failover id {fid} is a {rec.kind} failover of {rec.item_id}")
        return rec, True
    rec = FailoverResult(fid, kind, item.item_id, FailoverState.STARTING, clock.now(),
                         source_site=item.primary.name, recovery_site=item.recovery.name,
                         generation_before=item.generations.current(item.item_id))
    _save(item.recovery, rec)
    return rec, False


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


def _start_vm(run: _Run, hv: HypervisorDriver, vm: VmInfo, state: FailoverState) -> None:
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
                       run: _Run) -> dict[str, Path]:
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


def _verify(item: ProtectedItem, point: PointInfo, images: dict[str, Path], run: _Run) -> None:
    stop = timed(run.rec.timings, "verify")
    for disk_id, path in images.items():
        verify_image_against_point(item.repo, point.point_id, disk_id, path,
                                   point.disk_sizes[disk_id])
    stop()
    run.rec.verified = True


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
    rec, resumed = _start(item, "test", failover_id, clock)
    run = _Run(item, rec)
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
    run = _Run(item, rec)
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

def _create_and_start(item: ProtectedItem, run: _Run, p: PointInfo, spec: VmSpec,
                      images: dict[str, Path], *, from_replica: bool,
                      replace_vm: str | None, clock: Clock) -> None:
    """Promote, create the recovery VM from ``images`` (moved into it), start it."""
    rec = run.rec
    hv = item.recovery.hv
    if not run.done("promoted"):
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
    if vm is not None and not run.done("creating_vm"):
        # a VM of that name that this failover did not create (e.g. a stale one left by an
        # earlier failback): never start its old disks in place of the chosen point
        raise Conflict(f"a VM named {spec.name} already exists on the recovery site "
                       f"({vm.vm_id}); it was not created by failover {rec.failover_id}",
                       hint="Delete or rename that VM on the recovery site, then fail over again.")
    if vm is None:
        run.mark("creating_vm")
        stop = timed(rec.timings, "create_vm")
        vm = hv.create_vm(spec, {d: str(p_) for d, p_ in images.items()})
        stop()
        if from_replica:
            _consume_replica(item)
    _start_vm(run, hv, vm, FailoverState.PENDING_COMMIT)


def _images_for(item: ProtectedItem, p: PointInfo, run: _Run, *,
                verify: bool) -> tuple[dict[str, Path], bool]:
    """Images of point ``p`` to move into the recovery VM: the replica's own images when it
    holds ``p`` (fastest: a rename), else a restore from the store. Returns (images,
    from_replica)."""
    rec = run.rec
    restore_dir = item.recovery.work_dir / "restores" / rec.failover_id
    if item.hydrator is not None and run.done("images") and rec.image_source == "replica":
        return {d: item.hydrator.disk_path(d) for d in p.disk_sizes}, True
    if run.done("images") and rec.image_source == "restore":
        return {d: restore_dir / f"{d}.img" for d in p.disk_sizes}, False
    if _replica_holds(item, p):
        assert item.hydrator is not None
        images = {d: item.hydrator.disk_path(d) for d in p.disk_sizes}
        rec.image_source = "replica"
        from_replica = True
    else:
        images = _images_from_store(item, p, restore_dir, run)
        from_replica = False
    if verify:
        _verify(item, p, images, run)
    run.mark("images")
    return images, from_replica


def _replica_proven_equal(item: ProtectedItem, run: _Run, p: PointInfo,
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
    rec, resumed = _start(item, "planned", failover_id, clock)
    run = _Run(item, rec)
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
        stop()
        rec.point_id, rec.point_created_at = p.point_id, p.created_at
        run.mark("final_cycle")
    assert rec.point_id is not None
    p = item.repo.point(rec.point_id)

    def differs(disk_id: str, path: Path) -> str | None:
        src = src_hv.open_live_reader(item.vm_id, disk_id)
        try:
            with RawImageReader(path, p.disk_sizes[disk_id]) as img:
                bad = digests_differ(src, img)
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
    rec, resumed = _start(item, "planned", failover_id, clock)
    run = _Run(item, rec)
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
    rec, resumed = _start(item, "unplanned", failover_id, clock)
    run = _Run(item, rec)
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
    spec = _recovery_spec(item, p, test=False, name=None)
    _create_and_start(item, run, p, spec, images, from_replica=from_replica,
                      replace_vm=replace_vm, clock=clock)
    return rec


def _pending(item: ProtectedItem, failover_id: str) -> tuple[FailoverResult, _Run]:
    rec = load_failover(item.recovery, failover_id)
    if rec is None or rec.kind == "test":
        raise NotFound(f"no failover {failover_id} of {item.item_id}")
    return rec, _Run(item, rec)


def commit(item: ProtectedItem, failover_id: str) -> FailoverResult:
    """End the failover: the recovery VM is the item's primary for good. The other recovery
    points of the item are discarded (deleted, then GC) and the point cannot change any more.
    Idempotent."""
    rec, run = _pending(item, failover_id)
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
    rec, run = _pending(item, failover_id)
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
    rec, run = _pending(item, failover_id)
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


# --- re-protect and failback ----------------------------------------------------------------

def _write_base_point(repo: Repository, cycle_id: str, readers: dict[str, DiskReader],
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
    rec, run = _pending(item, failover_id)
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
        base, base_bytes = _write_base_point(rev_repo, f"{failover_id}-base", readers, clock.now())
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


__all__ = ["FailbackResult", "FailoverResult", "FailoverState", "ProtectedItem",
           "ReprotectResult", "Site", "cancel", "change_point", "cleanup_test_failover",
           "commit", "failback", "load_failover", "planned_failover",
           "planned_failover_recovery_side", "reprotect", "source_fingerprints",
           "test_failover", "unplanned_failover"]
