"""Domain entities shared by drivers, stores and the replication engine (plain data, no I/O)."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

from drsite.core.errors import InvalidInput
from drsite.core.extents import ExtentList

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


def validate_name(kind: str, value: str) -> str:
    """Names of VMs, disks, sites, items: 1-63 chars of ``[A-Za-z0-9._-]``, no ``..``.

    Names become path segments and object-store keys, so anything else is refused.
    """
    if not isinstance(value, str) or not _NAME_RE.fullmatch(value) or ".." in value:
        raise InvalidInput(f"invalid {kind} name {value!r}",
                           hint="Use 1-63 characters of letters, digits, '.', '_' or '-', "
                                "starting with a letter or digit, and no '..'.")
    return value


class PowerState(StrEnum):
    RUNNING = "running"
    STOPPED = "stopped"


@dataclass(frozen=True)
class Nic:
    network: str
    mac: str
    ip: str | None = None


@dataclass(frozen=True)
class DiskSpec:
    disk_id: str
    size: int


@dataclass(frozen=True)
class VmSpec:
    """What is needed to create a VM (at failover or for the demo)."""

    name: str
    vcpus: int = 1
    memory_mib: int = 512
    nics: tuple[Nic, ...] = ()
    disks: tuple[DiskSpec, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class VmInfo:
    vm_id: str
    name: str
    vcpus: int
    memory_mib: int
    nics: tuple[Nic, ...]
    disks: tuple[DiskSpec, ...]
    power: PowerState

    def disk(self, disk_id: str) -> DiskSpec:
        for d in self.disks:
            if d.disk_id == disk_id:
                return d
        raise InvalidInput(f"VM {self.name} has no disk {disk_id!r}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["power"] = self.power.value
        return d


class TrackingState(StrEnum):
    NOT_STARTED = "not_started"
    ACTIVE = "active"
    UNTRUSTED = "untrusted"  # a log was lost or damaged: only a resync by checksums is safe


@dataclass(frozen=True)
class TrackingStatus:
    state: TrackingState
    epoch: str | None = None
    reason: str = ""
    # bytes covered by the changes recorded since the last seal, per disk (coalesced)
    pending_bytes: dict[str, int] = field(default_factory=dict)


class Consistency(StrEnum):
    CRASH = "crash"
    APP = "app"


@dataclass(frozen=True)
class SealedCycle:
    """A frozen view of every disk of a VM at one instant plus what changed before it.

    ``changed[disk_id]`` holds every extent written since the previous released cycle (or since
    tracking started), so shipping those extents from this view onto the previous point yields
    an exact image of the disks at ``sealed_at``. ``trusted`` is False when the driver could not
    prove the change logs complete: then only a resync by checksums is safe.
    """

    cycle_id: str
    vm_id: str
    epoch: str
    sealed_at: float
    consistency: Consistency
    changed: dict[str, ExtentList]
    disk_sizes: dict[str, int]
    trusted: bool = True
    note: str = ""
    # synchronous mode: the seal's instant in the sync journal's numbering ({stream, seq});
    # carried into the point's meta so a failover knows which journal entries follow it
    sync_mark: dict[str, Any] | None = None
