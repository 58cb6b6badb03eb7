"""``MemoryHypervisor``: an in-memory implementation of the driver contract for unit tests.

Disks are bytearrays; tracked writes go through :meth:`MemoryHypervisor.write`; a seal copies
the disks (the frozen view) and rotates the change log. Faults can be injected: lost or
untrusted tracking, a VM that disappears. Not for production: no durability at all.
"""

from __future__ import annotations

import threading
import uuid
from dataclasses import dataclass, field

import numpy as np

from drsite.core.clock import Clock, SystemClock
from drsite.core.errors import Conflict, InvalidInput, TrackingLost, VmNotFound
from drsite.core.extents import ExtentList, coalesce
from drsite.core.model import (
    Consistency,
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
    """A DiskReader over an immutable bytes-like image; data extents = non-zero 4 KiB blocks."""

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
        self.seals = 0

    # --- test helpers ----------------------------------------------------------------------

    def create_blank(self, spec: VmSpec) -> VmInfo:
        validate_name("VM", spec.name)
        vm_id = str(uuid.uuid4())
        info = VmInfo(vm_id, spec.name, spec.vcpus, spec.memory_mib, spec.nics, spec.disks,
                      PowerState.STOPPED)
        self._vms[vm_id] = _Vm(info, {d.disk_id: bytearray(d.size) for d in spec.disks})
        return info

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
        if vm.untrusted:
            return TrackingStatus(TrackingState.UNTRUSTED, vm.epoch, vm.untrusted)
        pending = {d: ExtentList.of(v).total for d, v in vm.log.items()}
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

    def pending_cycle(self, vm_id: str) -> SealedCycle | None:
        return self._vm(vm_id).cycle

    def open_cycle_reader(self, cycle: SealedCycle, disk_id: str) -> BytesReader:
        vm = self._vm(cycle.vm_id)
        if vm.cycle is None or vm.cycle.cycle_id != cycle.cycle_id:
            raise Conflict(f"cycle {cycle.cycle_id} is not pending")
        return BytesReader(vm.frozen[disk_id])

    def open_live_reader(self, vm_id: str, disk_id: str) -> BytesReader:
        return BytesReader(bytes(self._vm(vm_id).disks[disk_id]))

    def release(self, cycle: SealedCycle) -> None:
        vm = self._vms.get(cycle.vm_id)
        if vm is not None and vm.cycle is not None and vm.cycle.cycle_id == cycle.cycle_id:
            vm.cycle, vm.frozen = None, {}

    def create_vm(self, spec: VmSpec, disk_images: dict[str, str]) -> VmInfo:
        for v in self._vms.values():
            if v.info.name == spec.name:
                raise Conflict(f"a VM named {spec.name} exists")
        info = self.create_blank(spec)
        for disk_id, path in disk_images.items():
            with open(path, "rb") as f:
                self._vms[info.vm_id].disks[disk_id][:] = f.read()
        return info

    def delete_vm(self, vm_id: str) -> None:
        self._vms.pop(vm_id, None)


def _replace_power(info: VmInfo, power: PowerState) -> VmInfo:
    return VmInfo(info.vm_id, info.name, info.vcpus, info.memory_mib, info.nics, info.disks, power)
