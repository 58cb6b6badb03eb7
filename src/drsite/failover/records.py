"""The failover library's model and its records: a site, a protected item, the result of each
action, and the per-failover record ``<recovery site work_dir>/failovers/<failover_id>.json``
(replaced atomically) that makes every action resumable and idempotent by its ``failover_id``.

Invariant: a record is written before the step it names is considered done (``ActionRun.mark``),
so a crash between a step and its mark repeats the step, which every step tolerates.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from drsite.core.clock import Clock
from drsite.core.errors import Conflict, InvalidInput, NotFound
from drsite.core.model import VmSpec, validate_name
from drsite.core.states import FailoverState
from drsite.failover.network import NetworkMap
from drsite.failover.synctail import OverlayTail
from drsite.fsutil import atomic_write_json, read_json
from drsite.hypervisors.contract import HypervisorDriver
from drsite.replication.driver import ItemReplicator
from drsite.store.format import PointInfo
from drsite.store.generation import GenerationStore
from drsite.store.replica import ReplicaHydrator
from drsite.store.repository import Repository
from drsite.tracking.syncjournal import SyncJournal


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
    # synchronous mode: the recovery site's journal of the item's acknowledged writes; an
    # unplanned failover to "latest" replays what follows the point's seal
    sync_journal: SyncJournal | None = None
    # synchronous QEMU VMs: the recovery site's sync overlays of the item (``failover.synctail``;
    # the overlay daemon is stopped before the failover reads them)
    sync_overlay: OverlayTail | None = None

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
    # how the images were proven equal to the point: "full", "incremental" (the replica's
    # ranges changed since it was last verified) or "pre-verified" (the replica had been
    # proven equal to this very point in the background); bytes compared per side
    verify_scope: str = ""
    verify_bytes: int = 0
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


def holds_item(rec: FailoverResult) -> bool:
    """Whether failover ``rec`` (not a test) holds its item: promoted (and maybe still
    starting), pending commit or committed — a second failover would promote again and start a
    second VM. One that stopped before its promotion (a point refused, a VM in the way) changed
    nothing in the store and holds nothing."""
    if rec.kind == "test":
        return False
    if rec.state is FailoverState.STARTING:
        return "promoted" in rec.steps
    return rec.state in (FailoverState.PENDING_COMMIT, FailoverState.COMMITTED)


def live_failovers(site: Site, item_id: str) -> list[FailoverResult]:
    """The failovers of ``item_id`` on ``site`` that hold it (:func:`holds_item`)."""
    out = []
    for path in sorted(_records_dir(site).glob("*.json")):
        try:
            rec = FailoverResult.from_dict(read_json(path))
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if rec.item_id == item_id and holds_item(rec):
            out.append(rec)
    return out


def load_failover(site: Site, failover_id: str) -> FailoverResult | None:
    """The record of a failover whose recovery side is ``site`` (None if unknown)."""
    path = _records_dir(site) / f"{validate_name('failover', failover_id)}.json"
    if not path.exists():
        return None
    return FailoverResult.from_dict(read_json(path))


def save_record(site: Site, rec: FailoverResult) -> None:
    atomic_write_json(_records_dir(site) / f"{rec.failover_id}.json", rec.to_dict())


class ActionRun:
    """One invocation of an action on a record: measures the elapsed time for the RTO."""

    def __init__(self, item: ProtectedItem, rec: FailoverResult) -> None:
        self.item = item
        self.rec = rec
        self.t0 = time.monotonic()
        self.rto_base = rec.rto_s or 0.0

    def save(self) -> None:
        save_record(self.item.recovery, self.rec)

    def done(self, step: str) -> bool:
        return step in self.rec.steps

    def mark(self, step: str) -> None:
        if step not in self.rec.steps:
            self.rec.steps.append(step)
        self.save()

    def running(self) -> None:
        """The recovery VM runs: the RTO is measured up to here."""
        self.rec.rto_s = round(self.rto_base + time.monotonic() - self.t0, 6)


def start_record(item: ProtectedItem, kind: FailoverKind, failover_id: str | None,
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
    save_record(item.recovery, rec)
    return rec, False



def pending_record(item: ProtectedItem, failover_id: str) -> tuple[FailoverResult, ActionRun]:
    rec = load_failover(item.recovery, failover_id)
    if rec is None or rec.kind == "test":
        raise NotFound(f"no failover {failover_id} of {item.item_id}")
    return rec, ActionRun(item, rec)
