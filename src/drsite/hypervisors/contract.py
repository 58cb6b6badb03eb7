"""The hypervisor driver contract.

Every driver (the embedded file driver, QEMU/KVM, libvirt) implements :class:`HypervisorDriver`.
Drivers return results and raise :mod:`drsite.core.errors`; they never write the vault's
database and never decide policy (what to ship, when to resync): that is the engine's job.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from drsite.core.extents import ExtentList
from drsite.core.model import SealedCycle, TrackingStatus, VmInfo, VmSpec


@runtime_checkable
class DiskReader(Protocol):
    """Random-access reads of one disk image (a frozen view or the live disk)."""

    @property
    def size(self) -> int:
        """Disk size in bytes."""
        ...

    def readinto(self, offset: int, buf: memoryview) -> None:
        """Fill ``buf`` with the bytes at ``[offset, offset + len(buf))``.

        Holes read as zeros. Raises ``InvalidInput`` if the range passes the end of the disk.
        """
        ...

    def data_extents(self) -> ExtentList:
        """Ranges that may hold data (SEEK_DATA/SEEK_HOLE or the format's allocation map).

        May over-approximate (a range of zeros may be listed) but never omits data.
        """
        ...

    def close(self) -> None:
        ...


class HypervisorDriver(Protocol):
    """Inventory, power, disks, change tracking and VM creation for one host.

    Change tracking is a cycle: :meth:`start_tracking` opens an epoch; :meth:`seal` rotates the
    change logs of every disk of the VM at one instant and freezes a view of the disks at that
    instant; the engine reads ``cycle.changed`` from :meth:`open_cycle_reader`, commits the
    point, then calls :meth:`release`. A sealed cycle survives a crash of the engine (find it
    again with :meth:`pending_cycle`); it is forgotten only on release.
    """

    name: str

    def list_vms(self) -> list[VmInfo]:
        """Every VM this host has, with its disks and power state."""
        ...

    def get_vm(self, vm_id: str) -> VmInfo:
        """One VM by id. Raises ``VmNotFound``."""
        ...

    def power_on(self, vm_id: str) -> None:
        """Start the VM; a no-op if it runs."""
        ...

    def power_off(self, vm_id: str, *, force: bool = False, timeout: float = 30.0) -> None:
        """Stop the VM: gracefully (guest flushes, logs closed cleanly) unless ``force``; after
        ``timeout`` seconds a graceful stop becomes forced. A no-op if it is stopped."""
        ...

    def start_tracking(self, vm_id: str) -> str:
        """Begin a new change-tracking epoch for every disk; returns its id.

        The first cycle sealed in an epoch has ``changed = [0, size)`` for every disk (nothing is
        known to be replicated yet), so its frozen view protects the whole disk: initial
        replication and resync read a consistent image of the instant of that seal.

        Changes recorded under an older epoch and any unreleased cycle are dropped: the caller
        must then copy or resync. Not responsible for shipping anything.
        """
        ...

    def tracking_status(self, vm_id: str) -> TrackingStatus:
        """Whether tracking is active and trusted, and how much has changed since the last seal."""
        ...

    def seal(self, vm_id: str, *, app_consistent: bool = False) -> SealedCycle:
        """Rotate the change logs of all disks at one instant and freeze a view of the disks.

        With ``app_consistent`` the guest is quiesced first (freeze hook); if that fails the
        cycle is crash-consistent and says so in ``consistency`` and ``note``. Raises
        ``Conflict`` if an unreleased cycle exists (resume it instead), ``TrackingLost`` if no
        epoch is active.
        """
        ...

    def pending_cycle(self, vm_id: str) -> SealedCycle | None:
        """The sealed, unreleased cycle of this VM, if any (after an engine restart)."""
        ...

    def open_cycle_reader(self, cycle: SealedCycle, disk_id: str) -> DiskReader:
        """A reader of the frozen view of ``disk_id`` at ``cycle.sealed_at``."""
        ...

    def open_live_reader(self, vm_id: str, disk_id: str) -> DiskReader:
        """A reader of the live disk (fuzzy while the VM runs; used by initial copy and resync
        only together with tracking that covers the copy)."""
        ...

    def release(self, cycle: SealedCycle) -> None:
        """Drop the frozen view and the sealed logs of ``cycle``; idempotent."""
        ...

    def create_vm(self, spec: VmSpec, disk_images: dict[str, str]) -> VmInfo:
        """Create a stopped VM from existing disk image files (moved or linked into place, not
        copied when avoidable). Used at failover. Raises ``Conflict`` if the name exists."""
        ...

    def delete_vm(self, vm_id: str) -> None:
        """Power off and remove the VM and its disks; idempotent."""
        ...
