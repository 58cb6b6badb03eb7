"""Where things live in a file VM's directory, and the small persisted records.

```
VMDIR/vm.json                      config (VmConfig)
VMDIR/<disk_id>.img                sparse raw image (for a copy-on-write disk: its overlay)
VMDIR/<disk_id>.alloc              copy-on-write disks only: allocation bitmap (see cow.py)
VMDIR/lock                         fcntl.flock: held by the guest for its life, or by the driver
VMDIR/guest.pid, guest.log         the guest process
VMDIR/session.json                 exists while someone has the disks open (stale = unclean stop)
VMDIR/unclean                      the disks were last left by a crash (not quiesced at rest)
VMDIR/hooks/freeze, hooks/thaw     optional app-consistency hooks
VMDIR/tracking/current             id of the active epoch (atomic replace)
VMDIR/tracking/<epoch>/<disk>.active.hrl              the log being written
VMDIR/tracking/<epoch>/<disk>.next.hrl                the next log, during a seal only
VMDIR/tracking/<epoch>/<cycle>.<disk>.sealed.hrl      sealed logs
VMDIR/tracking/<epoch>/epoch.json                     {"base_released": bool}
VMDIR/tracking/<epoch>/cycle.json                     the unreleased sealed cycle
VMDIR/tracking/<epoch>/<cycle>.<disk>.pfleece / .cbw / .slots
                                                copy-before-write data (packed; `.fleece`: at
                                                the blocks' offsets), bitmap, slot index
```
Sealed logs not named by ``cycle.json`` are *carried*: the next seal includes them (a seal or a
release interrupted by a crash leaves them; carrying over-approximates and never loses a write).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from drsite.core.errors import VmNotFound, classify_os_error
from drsite.core.model import DiskSpec, Nic, PowerState, VmInfo, validate_name
from drsite.fsutil import read_record
from drsite.hypervisors.file.workload import WorkloadSpec

GRANULE = 64 * 1024   # dirty-map granule: a cycle's copy-before-write mask is kept per granule
CBW_BLOCK = 4 * 1024  # copy-before-write block: what a first write after a seal preserves
SEALED_SUFFIX = ".sealed.hrl"
MAX_SUN_PATH = 107


@dataclass(frozen=True)
class VmConfig:
    """The content of ``vm.json``."""

    vm_id: str
    name: str
    vcpus: int
    memory_mib: int
    nics: tuple[Nic, ...]
    disks: tuple[DiskSpec, ...]
    workload: WorkloadSpec | None = None
    # copy-on-write disks: disk id → absolute path of the read-only backing raw image
    backing: dict[str, str] = field(default_factory=dict)
    # change-log cap set by whoever protects the VM (from its policy); None = the host default
    change_log_max_bytes: int | None = None

    def to_dict(self) -> dict[str, Any]:
        disks: list[dict[str, Any]] = []
        for d in self.disks:
            entry: dict[str, Any] = {"disk_id": d.disk_id, "size": d.size}
            if d.disk_id in self.backing:
                entry["backing"] = self.backing[d.disk_id]
            disks.append(entry)
        return {"vm_id": self.vm_id, "name": self.name, "vcpus": self.vcpus,
                "memory_mib": self.memory_mib,
                "nics": [{"network": n.network, "mac": n.mac, "ip": n.ip} for n in self.nics],
                "disks": disks,
                "workload": self.workload.to_dict() if self.workload else None,
                "change_log_max_bytes": self.change_log_max_bytes}

    @staticmethod
    def from_dict(d: dict[str, Any]) -> VmConfig:
        wl = d.get("workload")
        return VmConfig(str(d["vm_id"]), validate_name("VM", d["name"]), int(d["vcpus"]),
                        int(d["memory_mib"]),
                        tuple(Nic(n["network"], n["mac"], n.get("ip")) for n in d.get("nics", [])),
                        tuple(DiskSpec(validate_name("disk", x["disk_id"]), int(x["size"]))
                              for x in d["disks"]),
                        WorkloadSpec.from_dict(wl) if wl else None,
                        {str(x["disk_id"]): str(x["backing"]) for x in d["disks"]
                         if x.get("backing")},
                        int(d["change_log_max_bytes"]) if d.get("change_log_max_bytes") else None)

    def info(self, power: PowerState) -> VmInfo:
        return VmInfo(self.vm_id, self.name, self.vcpus, self.memory_mib, self.nics, self.disks,
                      power)

    def disk_size(self, disk_id: str) -> int:
        for d in self.disks:
            if d.disk_id == disk_id:
                return d.size
        raise VmNotFound(f"VM {self.name} has no disk {disk_id!r}")


class VmPaths:
    """Path arithmetic for one VM directory (no I/O except :meth:`current_epoch`/records)."""

    def __init__(self, vm_dir: Path) -> None:
        self.dir = vm_dir

    @property
    def config(self) -> Path:
        return self.dir / "vm.json"

    @property
    def lock(self) -> Path:
        return self.dir / "lock"

    @property
    def pid(self) -> Path:
        return self.dir / "guest.pid"

    @property
    def log(self) -> Path:
        return self.dir / "guest.log"

    @property
    def session(self) -> Path:
        return self.dir / "session.json"

    @property
    def sync_config(self) -> Path:
        """``sync.json``: synchronous mode's configuration (``syncmirror.SyncConfig``), 0600."""
        return self.dir / "sync.json"

    @property
    def unclean(self) -> Path:
        return self.dir / "unclean"

    @property
    def hooks(self) -> Path:
        return self.dir / "hooks"

    @property
    def tracking(self) -> Path:
        return self.dir / "tracking"

    @property
    def current(self) -> Path:
        return self.dir / "tracking" / "current"

    def disk(self, disk_id: str) -> Path:
        return self.dir / f"{validate_name('disk', disk_id)}.img"

    def alloc(self, disk_id: str) -> Path:
        """Allocation bitmap of a copy-on-write disk."""
        return self.dir / f"{validate_name('disk', disk_id)}.alloc"

    def epoch_dir(self, epoch: str) -> Path:
        return self.tracking / validate_name("epoch", epoch)

    def active_log(self, epoch: str, disk_id: str) -> Path:
        return self.epoch_dir(epoch) / f"{disk_id}.active.hrl"

    def next_log(self, epoch: str, disk_id: str) -> Path:
        return self.epoch_dir(epoch) / f"{disk_id}.next.hrl"

    def sealed_log(self, epoch: str, cycle_id: str, disk_id: str) -> Path:
        return self.epoch_dir(epoch) / f"{cycle_id}.{disk_id}{SEALED_SUFFIX}"

    def fleece(self, epoch: str, cycle_id: str, disk_id: str, *, packed: bool = False) -> Path:
        """A cycle's fleece; ``packed`` (records with ``cbw_slots``) has a name of its own, so
        that code that knows only blocks at their own offsets finds no fleece instead of
        reading slots as offsets."""
        return self.epoch_dir(epoch) / f"{cycle_id}.{disk_id}.{'pfleece' if packed else 'fleece'}"

    def cbw_bitmap(self, epoch: str, cycle_id: str, disk_id: str) -> Path:
        return self.epoch_dir(epoch) / f"{cycle_id}.{disk_id}.cbw"

    def cbw_slots(self, epoch: str, cycle_id: str, disk_id: str) -> Path:
        """The slot index of a packed fleece (the cycle record's ``cbw_slots``)."""
        return self.epoch_dir(epoch) / f"{cycle_id}.{disk_id}.slots"

    def epoch_state(self, epoch: str) -> Path:
        return self.epoch_dir(epoch) / "epoch.json"

    def cycle_file(self, epoch: str) -> Path:
        return self.epoch_dir(epoch) / "cycle.json"

    def socket_address(self) -> str:
        """The control socket: ``VMDIR/guest.sock`` when it fits in ``sun_path``, else an
        abstract-namespace name derived from the VM dir (no file to clean up)."""
        p = str(self.dir.absolute() / "guest.sock")
        if len(p.encode()) < MAX_SUN_PATH - 1:
            return p
        h = hashlib.sha256(str(self.dir.absolute()).encode()).hexdigest()[:32]
        return f"\0drsite-guest-{h}"

    # -- persisted tracking state -------------------------------------------------------------
    def current_epoch(self) -> str | None:
        try:
            e = self.current.read_text().strip()
        except FileNotFoundError:
            return None
        except OSError as ex:
            raise classify_os_error(ex, f"reading {self.current}") from ex
        return e or None

    def cycle_record(self, epoch: str) -> dict[str, Any] | None:
        return read_record(self.cycle_file(epoch))

    def sealed_logs(self, epoch: str) -> dict[str, list[Path]]:
        """Every sealed log of the epoch, by disk id (sorted by name)."""
        out: dict[str, list[Path]] = {}
        try:
            names = sorted(os.listdir(self.epoch_dir(epoch)))
        except FileNotFoundError:
            return out
        for n in names:
            if n.endswith(SEALED_SUFFIX):
                _cycle, _, disk = n[: -len(SEALED_SUFFIX)].partition(".")
                out.setdefault(disk, []).append(self.epoch_dir(epoch) / n)
        return out

    def carried_logs(self, epoch: str, record: dict[str, Any] | None) -> dict[str, list[Path]]:
        """Sealed logs that belong to no unreleased cycle (they go into the next seal)."""
        owned = set()
        if record:
            for names in record["logs"].values():
                owned.update(names)
        return {d: [p for p in ps if p.name not in owned]
                for d, ps in self.sealed_logs(epoch).items()}
