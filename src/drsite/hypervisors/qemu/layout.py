"""On-disk layout of a QEMU VM managed by drsite, and its persisted configuration.

A VM is a directory ``root/<name>/``::

    vm.json        the VM's configuration (:class:`QemuVmConfig`), replaced atomically
    <disk>.qcow2   one qcow2 per disk (bitmaps live here; may have a raw data file or a backing)
    <disk>.raw     the raw data file of a disk created from a raw image (data_file_raw=on)
    tracking.json  the change-tracking epoch: current bitmap name, base released, seal intent
    cycle.json     the sealed, unreleased cycle (its frozen views), if any
    runner.json    the QEMU process that holds the disks now (VM or storage daemon)
    stop.json      how the VM last stopped (clean or not), for app-consistency of stopped VMs
    fleece/        temporary fleece overlays of sealed cycles
    qemu.log       stdout/stderr of the QEMU processes

Unix sockets (QMP, NBD, guest agent) live in a short per-VM directory under the system's
temp dir (:meth:`VmDir.run_dir`): socket paths are limited to 108 bytes.

Responsible for: names and paths, the config's JSON form. Not responsible for: processes,
QMP, tracking decisions.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from drsite.core.errors import InvalidInput
from drsite.core.model import DiskSpec, Nic, PowerState, VmInfo


@dataclass(frozen=True)
class QemuDisk:
    """One disk: ``node`` is its qcow2 block node name in QEMU (``drv0``, ``drv1``, ...)."""

    disk_id: str
    size: int
    node: str
    backing: str | None = None  # copy-on-write disk: the read-only image under the overlay

    def to_dict(self) -> dict[str, Any]:
        return {"disk_id": self.disk_id, "size": self.size, "node": self.node,
                "backing": self.backing}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QemuDisk:
        return cls(str(d["disk_id"]), int(d["size"]), str(d["node"]), d.get("backing"))


@dataclass(frozen=True)
class QemuVmConfig:
    """What ``vm.json`` holds: enough to start the VM again after any restart."""

    vm_id: str
    name: str
    vcpus: int
    memory_mib: int
    nics: tuple[Nic, ...]
    disks: tuple[QemuDisk, ...]
    guest_agent: bool = True  # a virtio-serial port for qemu-guest-agent
    extra: dict[str, Any] = field(default_factory=dict)

    def disk(self, disk_id: str) -> QemuDisk:
        for d in self.disks:
            if d.disk_id == disk_id:
                return d
        raise InvalidInput(f"VM {self.name} has no disk {disk_id!r}")

    def info(self, power: PowerState) -> VmInfo:
        return VmInfo(self.vm_id, self.name, self.vcpus, self.memory_mib, self.nics,
                      tuple(DiskSpec(d.disk_id, d.size) for d in self.disks), power)

    def to_dict(self) -> dict[str, Any]:
        return {"vm_id": self.vm_id, "name": self.name, "vcpus": self.vcpus,
                "memory_mib": self.memory_mib,
                "nics": [{"network": n.network, "mac": n.mac, "ip": n.ip} for n in self.nics],
                "disks": [d.to_dict() for d in self.disks], "guest_agent": self.guest_agent,
                "extra": dict(self.extra), "kind": "qemu"}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QemuVmConfig:
        return cls(str(d["vm_id"]), str(d["name"]), int(d["vcpus"]), int(d["memory_mib"]),
                   tuple(Nic(n["network"], n["mac"], n.get("ip")) for n in d.get("nics", [])),
                   tuple(QemuDisk.from_dict(x) for x in d["disks"]),
                   bool(d.get("guest_agent", True)), dict(d.get("extra", {})))


class VmDir:
    """Paths of one VM directory (see the module docstring)."""

    def __init__(self, path: Path) -> None:
        self.dir = Path(path).absolute()

    @property
    def config(self) -> Path:
        return self.dir / "vm.json"

    @property
    def tracking(self) -> Path:
        return self.dir / "tracking.json"

    @property
    def cycle(self) -> Path:
        return self.dir / "cycle.json"

    @property
    def runner(self) -> Path:
        return self.dir / "runner.json"

    @property
    def stop(self) -> Path:
        return self.dir / "stop.json"

    @property
    def hold(self) -> Path:
        """A group barrier's write hold (``QemuHypervisor.hold``; ``holdwatch`` ends it)."""
        return self.dir / "hold.json"

    @property
    def lock(self) -> Path:
        return self.dir / ".lock"

    @property
    def sync_config(self) -> Path:
        """Synchronous mode's configuration (``set_sync``; 0600)."""
        return self.dir / "sync.json"

    @property
    def sync_run(self) -> Path:
        """The active mirror run (``syncmirror``): stream, base, nodes, watchdog."""
        return self.dir / "syncrun.json"

    @property
    def sync_watch(self) -> Path:
        """What the run's watchdog (``syncwatch``) saw when it cut the mirror loose."""
        return self.dir / "syncwatch.json"

    @property
    def sync_tls(self) -> Path:
        """QEMU's ``tls-creds-x509`` directory (CA, the host's client certificate)."""
        return self.dir / "synctls"

    @property
    def log(self) -> Path:
        return self.dir / "qemu.log"

    @property
    def fleece_dir(self) -> Path:
        return self.dir / "fleece"

    def qcow2(self, disk_id: str) -> Path:
        return self.dir / f"{disk_id}.qcow2"

    def raw(self, disk_id: str) -> Path:
        return self.dir / f"{disk_id}.raw"

    @property
    def run_dir(self) -> Path:
        """Short directory for this VM's unix sockets (created 0700 on demand)."""
        h = hashlib.sha1(str(self.dir).encode()).hexdigest()[:16]
        d = Path(tempfile.gettempdir()) / f"drsite-qemu-{os.getuid()}" / h
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        return d

    @property
    def qmp_socket(self) -> Path:
        return self.run_dir / "qmp.sock"

    @property
    def nbd_socket(self) -> Path:
        return self.run_dir / "nbd.sock"

    @property
    def qga_socket(self) -> Path:
        return self.run_dir / "qga.sock"

    @property
    def watch_socket(self) -> Path:
        """A second QMP monitor, for the sync watchdog's out-of-band ``yank`` (the first
        serves one client at a time: the driver's sessions)."""
        return self.run_dir / "qmpw.sock"
