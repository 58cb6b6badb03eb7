"""The hypervisor driver contract.

Every driver (the embedded file driver, QEMU/KVM, the in-memory test driver, libvirt later)
implements :class:`HypervisorDriver`: the replication engine uses its inventory, power and
change-tracking methods, failover uses its inventory, power and VM-creation methods, and the
host's agent runs the operators' VM lifecycle (create, import, start, stop, delete) through
them. Every driver runs the same conformance suite (``tests/contract/test_driver_conformance.py``).
Drivers return results and raise :mod:`drsite.core.errors`; they never write the vault's
database and never decide policy (what to ship, when to resync, which point to fail over to):
that is the engine's and failover's job.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

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


@runtime_checkable
class VectorDiskReader(DiskReader, Protocol):
    """A :class:`DiskReader` that also reads many extents in one call (the engine's batches of
    scattered small extents cost a syscall or a request each, not a Python call each)."""

    def readv(self, offsets: npt.NDArray[np.int64], lengths: npt.NDArray[np.int64],
              buf: memoryview) -> None:
        """Fill ``buf`` with the extents ``(offsets[i], lengths[i])``, concatenated in order.

        Same guarantees per extent as :meth:`DiskReader.readinto` (holes read as zeros;
        ``InvalidInput`` if an extent passes the end of the disk)."""
        ...


@runtime_checkable
class HypervisorDriver(Protocol):
    """Inventory, power, disks, change tracking and VM creation for one host.

    Change tracking is a cycle: :meth:`start_tracking` opens an epoch; :meth:`seal` rotates the
    change logs of every disk of the VM at one instant and freezes a view of the disks at that
    instant; the engine reads ``cycle.changed`` from :meth:`open_cycle_reader`, commits the
    point, then calls :meth:`release`. A sealed cycle survives a crash of the engine (find it
    again with :meth:`pending_cycle`); it is forgotten only on release.

    Failover creates VMs from images on the recovery site: :meth:`create_vm` (planned and
    unplanned failover: the images become the VM's disks), :meth:`create_vm_cow` (test
    failover: copy-on-write views of read-only images), finds them again by name after a crash
    (:meth:`find_vm`) and removes them (:meth:`delete_vm`).

    Every method taking a ``vm_id`` raises ``VmNotFound`` for an unknown VM unless it says
    otherwise.
    """

    name: str

    # -- inventory ------------------------------------------------------------------------------
    def list_vms(self) -> list[VmInfo]:
        """Every VM this host has, with its disks and power state."""
        ...

    def get_vm(self, vm_id: str) -> VmInfo:
        """One VM by id. Raises ``VmNotFound``."""
        ...

    def find_vm(self, name: str) -> VmInfo:
        """One VM by name (names are unique on a host). Raises ``VmNotFound`` when no VM has
        that name, ``InvalidInput`` when ``name`` is not a valid VM name.

        Failover uses it to find the VM it created after a crash or a re-delivered command
        (ids are the driver's, names are the caller's). Not responsible for telling who
        created the VM: the caller compares ids with its own records.
        """
        ...

    # -- power ----------------------------------------------------------------------------------
    def power_on(self, vm_id: str) -> None:
        """Start the VM; a no-op if it runs."""
        ...

    def power_off(self, vm_id: str, *, force: bool = False, timeout: float = 30.0) -> None:
        """Stop the VM: gracefully (guest flushes, logs closed cleanly) unless ``force``; after
        ``timeout`` seconds a graceful stop becomes forced. A no-op if it is stopped."""
        ...

    def guest_ready(self, vm_id: str) -> bool:
        """True once the running VM's guest answers (QEMU: qemu-guest-agent replies to a sync;
        file VMs: the guest process answers its control socket). False while it boots, when it
        is stopped, or when it has no way to answer. Never waits long (a second or two)."""
        ...

    # -- change tracking ------------------------------------------------------------------------
    def start_tracking(self, vm_id: str) -> str:
        """Begin a new change-tracking epoch for every disk; returns its id.

        The first cycle sealed in an epoch has ``changed = [0, size)`` for every disk (nothing is
        known to be replicated yet), so its frozen view protects the whole disk: initial
        replication and resync read a consistent image of the instant of that seal.

        Changes recorded under an older epoch and any unreleased cycle are dropped: the caller
        must then copy or resync. Not responsible for shipping anything. A driver may refuse
        tracking on a copy-on-write VM (:meth:`create_vm_cow`) with ``InvalidInput``.
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

    def set_change_log_limit(self, vm_id: str, max_bytes: int) -> None:
        """Cap the VM's change tracking at ``max_bytes`` of log (the protecting policy sets it
        so that a cycle a couple of intervals late still finds a trusted log); applies from
        the next seal. Drivers whose tracking is not a growing log (dirty bitmaps) ignore it."""
        ...

    def open_cycle_reader(self, cycle: SealedCycle, disk_id: str) -> DiskReader:
        """A reader of the frozen view of ``disk_id`` at ``cycle.sealed_at``."""
        ...

    def open_live_reader(self, vm_id: str, disk_id: str) -> DiskReader:
        """A reader of the live disk as the guest sees it (fuzzy while the VM runs; used by
        initial copy and resync only together with tracking that covers the copy, and by
        failover on stopped VMs: proofs and re-protect bases). For a copy-on-write disk this
        is the backing image with the VM's writes over it."""
        ...

    def release(self, cycle: SealedCycle) -> None:
        """Drop the frozen view and the sealed logs of ``cycle``; idempotent (also for a VM
        that is gone)."""
        ...

    # -- creation and removal (operators, failover) ----------------------------------------------
    def create_blank(self, spec: VmSpec) -> VmInfo:
        """Create a stopped VM named ``spec.name`` with the vCPUs, memory and NICs of ``spec``
        and an empty (all zeros, sparse: nothing allocated) disk of each size in
        ``spec.disks``. Used by ``drsite vms create`` through the host's agent.

        Raises ``Conflict`` if a VM of that name exists, ``InvalidInput`` for an invalid name,
        duplicate disk ids or a disk size that is not positive; nothing is left behind on
        failure. Not responsible for installing an OS or starting the VM.
        """
        ...

    def create_vm(self, spec: VmSpec, disk_images: dict[str, str]) -> VmInfo:
        """Create a stopped VM named ``spec.name`` whose disks are the raw image files
        ``disk_images`` (disk id → path). Used by planned and unplanned failover.

        The images become the VM's: moved into place (a rename; across file systems a sparse
        copy, then the source is removed), not copied when avoidable, so the caller must not
        use those paths afterwards. An image smaller than its disk in ``spec.disks`` reads as
        zero-extended; with no ``spec.disks`` the images' own sizes are used.

        Raises ``Conflict`` if a VM of that name exists, ``InvalidInput`` if the image ids do
        not match ``spec.disks``, an image is larger than its disk or the name is invalid;
        these are checked before any image is touched. Not responsible for checking what the
        images hold (failover verifies them first) or for starting the VM.
        """
        ...

    def create_vm_cow(self, spec: VmSpec, backing: dict[str, Path]) -> VmInfo:
        """Create a stopped VM whose disks are copy-on-write views of read-only raw images
        ``backing`` (disk id → path). Used by test failover.

        The backing files are never written: the VM's writes go to storage of its own, and
        :meth:`delete_vm` removes that storage only. A backing image smaller than its disk
        reads as zero-extended; with no ``spec.disks`` the images' sizes are used. Real
        drivers create the VM in time independent of the disk size (nothing is copied).

        Raises ``Conflict`` if a VM of that name exists, ``InvalidInput`` if a backing path is
        not a file, the ids do not match ``spec.disks``, an image is larger than its disk or
        lives inside the VM's own storage. Not responsible for keeping the backing images
        unchanged while the VM exists, nor for removing them: the caller owns them.
        """
        ...

    def delete_vm(self, vm_id: str) -> None:
        """Power the VM off (forced) and remove it and its own disks; idempotent (an unknown
        ``vm_id`` is a no-op). Backing images of a copy-on-write VM are left alone."""
        ...


@runtime_checkable
class WriteHolder(Protocol):
    """Optional driver capability: a group barrier's write hold (multi-VM consistency groups,
    ``vault/barrier_design.md``). A driver without it cannot take part in group points (its
    members get per-VM points)."""

    def hold(self, vm_id: str, barrier_id: str, *, timeout_s: float,
             app_consistent: bool = False) -> dict[str, object]:
        """Make the running guest's new writes wait (not fail) until :meth:`seal_held` or
        :meth:`unhold` of ``barrier_id``, and never longer than ``timeout_s``: the bound is kept
        by the guest side itself, so a caller that stops or dies never blocks the guest past
        it. Returns ``{"barrier_id", "held_at", "timeout_s"}``. Idempotent per barrier;
        ``Conflict`` while another barrier holds the VM. A stopped VM has nothing to hold:
        its later :meth:`seal_held` reports ``held: false``."""
        ...

    def seal_held(self, vm_id: str, barrier_id: str, *, app_consistent: bool = False
                  ) -> tuple[SealedCycle, dict[str, object]]:
        """Seal (as :meth:`HypervisorDriver.seal`) and end the hold of ``barrier_id`` in one
        step. The second value is ``{"id", "held", "paused_s"}``: ``held`` is True only when the
        guest's writes were held without a break from :meth:`hold` to this seal."""
        ...

    def unhold(self, vm_id: str, barrier_id: str) -> bool:
        """End the hold without sealing (the barrier was abandoned); False if not held."""
        ...


@runtime_checkable
class ScheduledCut(Protocol):
    """Optional driver capability, beside :class:`WriteHolder`: a group barrier's clock cut
    timed by the guest side itself, so the caller's round trip to the guest is not in the
    guest's pause (``vault/barrier_design.md``, "The clock cut")."""

    def cut_seal(self, vm_id: str, barrier_id: str, *, hold_at: float, hold_by: float,
                 seal_at: float, timeout_s: float) -> tuple[SealedCycle | None, dict[str, object]]:
        """Hold the guest's new writes at ``hold_at``, seal under the hold at ``seal_at`` and
        end the hold — instants of the caller's ``time.monotonic()``; the hold never lasts
        more than ``timeout_s``. Returns the cycle and ``{"id", "held", "paused_s",
        "held_local", "sealed_local"}`` (when the hold was in place; a time at or before the
        seal's instant: what the caller proves its cut with), or ``(None, {"missed": why})``
        with nothing sealed and nothing held when the hold was not in place by ``hold_by``.
        Raises (nothing sealed) when the guest cannot take the cut (another clock, another
        barrier's hold)."""
        ...


@runtime_checkable
class SyncMirrorHost(Protocol):
    """Optional driver capability: synchronous mode (``mode: sync`` policies). A guest write
    is acknowledged only once the recovery site's sync journal holds it, or after at most the
    configuration's ``budget_ms`` (then the guest goes on asynchronously until its next seal).
    Each seal's :attr:`SealedCycle.sync_mark` names its instant in the journal's numbering."""

    def set_sync(self, vm_id: str, config: dict[str, Any] | None) -> None:
        """Enter (``config``: item_id, host, port, budget_ms, ca_file, cert_file, key_file) or
        leave (None) synchronous mode; kept across guest restarts."""
        ...

    def sync_status(self, vm_id: str) -> dict[str, Any] | None:
        """The running guest's mirror (``state``: starting | connecting | in_sync |
        suspended, ``reason``, ``stream``, ``base``, ``seq``, ``acked``), or None."""
        ...


@runtime_checkable
class SyncOverlayHost(SyncMirrorHost, Protocol):
    """A :class:`SyncMirrorHost` whose mirror writes into an overlay the recovery site
    provisions per run (QEMU's active mirror into an NBD export): ``set_sync``'s
    configuration also names that run (``stream``, ``exports``: disk id → NBD export), and a
    new one is needed each time a run ends (``sync_status`` says ``suspended``)."""

    def sync_disks(self, vm_id: str) -> dict[str, int]:
        """Disk id → size in bytes: what the overlay of a run must hold."""
        ...
