"""``MemoryHypervisor``: an in-memory implementation of the driver contract for unit tests.

Disks are bytearrays; tracked writes go through :meth:`MemoryHypervisor.write`; a seal copies
the disks (the frozen view) and rotates the change log. Faults can be injected: lost or
untrusted tracking, a VM that disappears. It runs the drivers' conformance suite like the real
drivers. Not for production: no durability at all, and VM creation reads the images into
memory (``create_vm`` leaves the files where they are, ``create_vm_cow`` copies the backing
images at creation: neither is size-independent, and the backing files are never written).
"""

from __future__ import annotations

import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from drsite.core.clock import Clock, SystemClock
from drsite.core.errors import Conflict, InvalidInput, TrackingLost, VmNotFound, classify_os_error
from drsite.core.extents import ExtentList, coalesce
from drsite.core.model import (
    Consistency,
    DiskSpec,
    PowerState,
    SealedCycle,
    TrackingState,
    TrackingStatus,
    VmInfo,
    VmSpec,
    validate_name,
)

_BLOCK = 4096


class BytesReader:
    """A DiskReader over an image in memory; data extents = non-zero 4 KiB blocks.

    Over ``bytes`` it is a frozen view; over a VM's ``bytearray`` it is the live disk (fuzzy
    while writes go on, as a real live reader)."""

    def __init__(self, data: bytes | bytearray) -> None:
        self._data = data

    @property
    def size(self) -> int:
        return len(self._data)

    def readinto(self, offset: int, buf: memoryview) -> None:
        if offset < 0 or offset + len(buf) > len(self._data):
            raise InvalidInput("read past the end of the disk")
        buf[:] = self._data[offset:offset + len(buf)]

    def data_extents(self) -> ExtentList:
        n = len(self._data)
        full = n // _BLOCK * _BLOCK
        arr = np.frombuffer(memoryview(self._data)[:full], dtype=np.uint8).reshape(-1, _BLOCK)
        nz = np.nonzero(arr.any(axis=1))[0].astype(np.int64)
        ext = coalesce(nz * _BLOCK, np.full(nz.size, _BLOCK, np.int64))
        if n > full:
            ext = ext.union(ExtentList.of([(full, n - full)]))
        return ext

    def close(self) -> None:
        pass


@dataclass
class _Vm:
    info: VmInfo
    disks: dict[str, bytearray]
    epoch: str | None = None
    first_seal: bool = True
    log: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    carried: dict[str, ExtentList] = field(default_factory=dict)
    untrusted: str = ""
    cycle: SealedCycle | None = None
    frozen: dict[str, bytes] = field(default_factory=dict)


class MemoryHypervisor:
    name = "memory"

    def __init__(self, clock: Clock | None = None) -> None:
        self.clock: Clock = clock or SystemClock()
        self._vms: dict[str, _Vm] = {}
        self._lock = threading.RLock()
        self.log_limits: dict[str, int] = {}  # vm id → change-log cap set by the engine
        self.seals = 0

    # --- test helpers ----------------------------------------------------------------------

    def create_blank(self, spec: VmSpec) -> VmInfo:
        """Create a stopped VM with zeroed disks (``Conflict`` if the name exists)."""
        return self._create(spec, {})

    def write(self, vm_id: str, disk_id: str, offset: int, data: bytes) -> None:
        """A tracked guest write (the log record comes first, as in the real drivers)."""
        with self._lock:
            vm = self._vm(vm_id)
            disk = vm.disks[disk_id]
            if offset < 0 or offset + len(data) > len(disk):
                raise InvalidInput("write past the end of the disk")
            if vm.epoch is not None:
                vm.log.setdefault(disk_id, []).append((offset, len(data)))
            disk[offset:offset + len(data)] = data

    def disk_bytes(self, vm_id: str, disk_id: str) -> bytes:
        return bytes(self._vm(vm_id).disks[disk_id])

    def lose_tracking(self, vm_id: str, reason: str = "log damaged") -> None:
        self._vm(vm_id).untrusted = reason

    def remove(self, vm_id: str) -> None:
        self._vms.pop(vm_id, None)

    # --- contract --------------------------------------------------------------------------

    def _vm(self, vm_id: str) -> _Vm:
        try:
            return self._vms[vm_id]
        except KeyError:
            raise VmNotFound(f"VM {vm_id} not found") from None

    def list_vms(self) -> list[VmInfo]:
        return [v.info for v in self._vms.values()]

    def get_vm(self, vm_id: str) -> VmInfo:
        return self._vm(vm_id).info

    def power_on(self, vm_id: str) -> None:
        vm = self._vm(vm_id)
        vm.info = _replace_power(vm.info, PowerState.RUNNING)

    def power_off(self, vm_id: str, *, force: bool = False, timeout: float = 30.0) -> None:
        vm = self._vm(vm_id)
        vm.info = _replace_power(vm.info, PowerState.STOPPED)

    def guest_ready(self, vm_id: str) -> bool:
        return self._vm(vm_id).info.power is PowerState.RUNNING

    def start_tracking(self, vm_id: str) -> str:
        with self._lock:
            vm = self._vm(vm_id)
            vm.epoch = uuid.uuid4().hex
            vm.first_seal = True
            vm.log, vm.carried, vm.untrusted = {}, {}, ""
            vm.cycle, vm.frozen = None, {}
            return vm.epoch

    def tracking_status(self, vm_id: str) -> TrackingStatus:
        vm = self._vm(vm_id)
        if vm.epoch is None:
            return TrackingStatus(TrackingState.NOT_STARTED)
        if vm.untrusted:  # only a resync is safe: every byte counts as pending
            return TrackingStatus(TrackingState.UNTRUSTED, vm.epoch, vm.untrusted,
                                  {d: len(b) for d, b in vm.disks.items()})
        pending = {d: ExtentList.of(vm.log.get(d, [])).total for d in vm.disks}
        return TrackingStatus(TrackingState.ACTIVE, vm.epoch, pending_bytes=pending)

    def seal(self, vm_id: str, *, app_consistent: bool = False) -> SealedCycle:
        with self._lock:
            vm = self._vm(vm_id)
            if vm.cycle is not None:
                raise Conflict(f"VM {vm.info.name} has an unreleased cycle {vm.cycle.cycle_id}")
            if vm.epoch is None:
                raise TrackingLost(f"VM {vm.info.name}: tracking not started")
            sizes = {d: len(b) for d, b in vm.disks.items()}
            if vm.first_seal:
                changed = {d: ExtentList.of([(0, s)]) for d, s in sizes.items()}
            else:
                changed = {d: ExtentList.of(vm.log.get(d, [])) for d in sizes}
            self.seals += 1
            cycle = SealedCycle(
                cycle_id=f"c{self.seals:06d}-{uuid.uuid4().hex[:8]}", vm_id=vm_id, epoch=vm.epoch,
                sealed_at=self.clock.now(),
                consistency=Consistency.APP if app_consistent else Consistency.CRASH,
                changed=changed, disk_sizes=sizes, trusted=not vm.untrusted, note=vm.untrusted)
            vm.first_seal = False
            vm.log = {}
            vm.cycle = cycle
            vm.frozen = {d: bytes(b) for d, b in vm.disks.items()}
            return cycle

    def set_change_log_limit(self, vm_id: str, max_bytes: int) -> None:
        """In-memory tracking has no log: the cap is only recorded."""
        self._vm(vm_id)
        self.log_limits[vm_id] = int(max_bytes)

    def pending_cycle(self, vm_id: str) -> SealedCycle | None:
        return self._vm(vm_id).cycle

    def open_cycle_reader(self, cycle: SealedCycle, disk_id: str) -> BytesReader:
        vm = self._vm(cycle.vm_id)
        if vm.cycle is None or vm.cycle.cycle_id != cycle.cycle_id:
            raise Conflict(f"cycle {cycle.cycle_id} is not pending")
        return BytesReader(vm.frozen[disk_id])

    def open_live_reader(self, vm_id: str, disk_id: str) -> BytesReader:
        return BytesReader(self._vm(vm_id).disks[disk_id])

    def release(self, cycle: SealedCycle) -> None:
        vm = self._vms.get(cycle.vm_id)
        if vm is not None and vm.cycle is not None and vm.cycle.cycle_id == cycle.cycle_id:
            vm.cycle, vm.frozen = None, {}

    def _create(self, spec: VmSpec, images: dict[str, bytes]) -> VmInfo:
        """A stopped VM of ``spec`` whose disks start as ``images`` (zero-extended; a disk
        without an image is zeros). The checks and errors of the real drivers' creation."""
        validate_name("VM", spec.name)
        ids = [validate_name("disk", d.disk_id) for d in spec.disks]
        if len(set(ids)) != len(ids):
            raise InvalidInput(f"duplicate disk ids in {ids}")
        if any(d.size <= 0 for d in spec.disks):
            raise InvalidInput("disk sizes must be positive")
        for d in spec.disks:
            if len(images.get(d.disk_id, b"")) > d.size:
                raise InvalidInput(f"image of disk {d.disk_id} is {len(images[d.disk_id])} "
                                   f"bytes, larger than {d.size}")
        with self._lock:
            if any(v.info.name == spec.name for v in self._vms.values()):
                raise Conflict(f"a VM named {spec.name!r} exists")
            vm_id = str(uuid.uuid4())
            info = VmInfo(vm_id, spec.name, spec.vcpus, spec.memory_mib, spec.nics, spec.disks,
                          PowerState.STOPPED)
            disks = {d.disk_id: bytearray(images.get(d.disk_id, b"").ljust(d.size, b"\0"))
                     for d in spec.disks}
            self._vms[vm_id] = _Vm(info, disks)
            return info

    @staticmethod
    def _images(spec: VmSpec, paths: dict[str, Path]) -> tuple[VmSpec, dict[str, bytes]]:
        """Read the images; the spec with the images' sizes when it names no disks."""
        data: dict[str, bytes] = {}
        for disk_id, path in paths.items():
            validate_name("disk", disk_id)
            if not path.is_file():
                raise InvalidInput(f"disk image {path} of disk {disk_id!r} is not a file")
            try:
                data[disk_id] = path.read_bytes()
            except OSError as e:
                raise classify_os_error(e, f"disk image {path}") from e
        disks = spec.disks or tuple(DiskSpec(k, len(v)) for k, v in sorted(data.items()))
        if sorted(d.disk_id for d in disks) != sorted(data):
            raise InvalidInput(f"disk images {sorted(data)} do not match the spec's disks "
                               f"{sorted(d.disk_id for d in disks)}")
        return VmSpec(spec.name, spec.vcpus, spec.memory_mib, spec.nics, disks), data

    def find_vm(self, name: str) -> VmInfo:
        validate_name("VM", name)
        for v in list(self._vms.values()):
            if v.info.name == name:
                return v.info
        raise VmNotFound(f"no VM named {name!r}")

    def create_vm(self, spec: VmSpec, disk_images: dict[str, str]) -> VmInfo:
        spec, data = self._images(spec, {k: Path(v) for k, v in disk_images.items()})
        return self._create(spec, data)

    def create_vm_cow(self, spec: VmSpec, backing: dict[str, Path]) -> VmInfo:
        spec, data = self._images(spec, {k: Path(v) for k, v in backing.items()})
        return self._create(spec, data)

    def delete_vm(self, vm_id: str) -> None:
        self._vms.pop(vm_id, None)


def _replace_power(info: VmInfo, power: PowerState) -> VmInfo:
    return VmInfo(info.vm_id, info.name, info.vcpus, info.memory_mib, info.nics, info.disks, power)
