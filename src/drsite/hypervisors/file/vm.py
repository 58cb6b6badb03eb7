"""The block layer of a file VM: disks, change logs and copy-before-write, in one process.

:class:`FileVm` is what a guest process (or the driver, while the VM is stopped) holds while it
owns a VM directory: it takes the VM lock, opens the disk images, reopens the change logs with
their trust rules and resumes copy-before-write for an unreleased cycle.

Invariants (see ``design.md``):
- one owner at a time: the ``flock`` on ``VMDIR/lock`` is held for the life of a FileVm;
- every write, seal, release and epoch change runs under ``_io_lock``, so no write is split
  across two logs and a seal is one instant for all disks;
- per write: change-log record → (copy-before-write: fleece granule → bitmap byte) → disk;
  in synchronous mode the batch is numbered (and, the wire idle, sent) before all three;
- flush: logs, then fleece and bitmaps, then disks.

Responsible for: write ordering, rotation, CBW, crash recovery of its own files. Not responsible
for: scheduling cycles, reading frozen views (see :mod:`.readers`), processes or sockets.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from contextlib import suppress
from pathlib import Path
from typing import Any

import numpy as np

from drsite.core.errors import (
    Busy,
    Conflict,
    DrsiteError,
    InvalidInput,
    PermanentError,
    TrackingLost,
    classify_os_error,
)
from drsite.core.extents import ExtentList
from drsite.core.model import Consistency
from drsite.fsutil import (
    flock_exclusive,
    fsync_dir,
    monotonic_clock_id,
    read_record,
    write_record,
)
from drsite.hypervisors.file.cbw import CopyBeforeWrite, granule_count, granule_mask
from drsite.hypervisors.file.cow import CowOverlay
from drsite.hypervisors.file.layout import CBW_BLOCK, GRANULE, VmConfig, VmPaths
from drsite.hypervisors.file.syncmirror import SyncMirror
from drsite.imagefile import pwrite_all
from drsite.tracking.changelog import (
    DEFAULT_MAX_BYTES,
    ChangeLog,
    current_boot_id,
    load_log,
)

log = logging.getLogger(__name__)
HOOK_TIMEOUT = 60.0


class _Disk:
    def __init__(self, disk_id: str, fd: int, size: int) -> None:
        self.disk_id = disk_id
        self.fd = fd
        self.size = size
        self.log: ChangeLog | None = None
        self.dirty = bytearray(granule_count(size))  # granules touched by the active log
        self.cbw: CopyBeforeWrite | None = None
        self.cow: CowOverlay | None = None  # a copy-on-write disk (``fd`` is its overlay)

    def note_write(self, offset: int, length: int) -> None:
        g0, g1 = offset // GRANULE, (offset + length - 1) // GRANULE
        if g0 == g1:
            self.dirty[g0] = 1
        else:
            self.dirty[g0:g1 + 1] = b"\x01" * (g1 - g0 + 1)


class _Hold:
    """A group barrier's hold on new writes: ends at :meth:`FileVm.seal_held`,
    :meth:`FileVm.unhold` or, whatever the agent does, when its timer fires."""

    def __init__(self, barrier_id: str, timeout_s: float, app: bool,
                 at: float | None = None) -> None:
        self.barrier_id = barrier_id
        self.started = time.monotonic() if at is None else at
        self.in_place = self.started  # from then on no write completes (hold(), _activate)
        self.deadline = self.started + timeout_s
        self.app = app
        self.hook_error: str | None = None
        self.timer: threading.Timer | None = None
        # a cut's hold is armed ahead and takes effect at ``at`` (FileVm.cut): until it is
        # active writes flow; the first write at or after ``at`` (or the cut's thread)
        # activates it under the I/O lock
        self.at = at
        self.active = at is None


def _sleep_until(t: float) -> None:
    """Sleep until ``time.monotonic()`` reaches ``t`` (no wait when it has)."""
    while (left := t - time.monotonic()) > 0:
        time.sleep(left)


class FileVm:
    """An open file VM (see module doc). Thread-safe; create with :meth:`open`."""

    def __init__(self, paths: VmPaths, config: VmConfig, lock_fd: int, boot_id: str,
                 role: str, max_log_bytes: int) -> None:
        self.paths = paths
        self.config = config
        self.boot_id = boot_id
        self.role = role
        self.max_log_bytes = max_log_bytes
        self._lock_fd = lock_fd
        self._io_lock = threading.RLock()
        self._writers = 0                 # threads in write_many (the guest's queue depth)
        self._writers_lock = threading.Lock()
        self._gate = threading.Event()  # cleared while frozen: writers wait before the I/O lock
        self._gate.set()
        self._freezes = 0
        self._hold: _Hold | None = None  # a group barrier's write hold (see hold())
        self._last_write_end = 0.0  # when the last write ended (kept while a hold is armed)
        self.hold_pauses: list[float] = []  # seconds each ended hold kept writes waiting (last 1000)
        self.disks: dict[str, _Disk] = {}
        self.epoch: str | None = None
        self.cycle: dict[str, Any] | None = None
        self.last_tag: int | None = None
        self.mirror: SyncMirror | None = None  # synchronous mode (syncmirror.py), set_mirror()
        self.closed = False
        self.recovery_notes: list[str] = []
        self.unclean_previous = False
        self.host_crashed = False
        # the next seal's logs, made ahead outside the I/O lock (``_prepare_next_logs``), so
        # a seal's window (writes wait; a barrier's hold) has no log creation in it
        self._next_lock = threading.Lock()
        self._next_ready: tuple[str, dict[str, ChangeLog]] | None = None
        self._sealing: list[ChangeLog] = []  # the logs a seal sealed, closed at its commit
        # taken before the I/O lock by whatever makes or ends a cycle (seal, release): a
        # release removes its files after the I/O lock, and no seal may start in between
        self._cycle_lock = threading.RLock()

    # -- opening ------------------------------------------------------------------------------
    @classmethod
    def open(cls, vm_dir: Path, *, role: str = "guest", lock_timeout: float = 30.0,
             boot_id: str | None = None, max_log_bytes: int = DEFAULT_MAX_BYTES) -> FileVm:
        """Take the VM lock (``Busy`` after ``lock_timeout``; 0 = don't wait) and open everything.

        ``role`` is "guest" (a running VM) or "driver" (maintenance on a stopped VM): only a guest's
        clean close marks the disks quiesced at rest.
        """
        paths = VmPaths(vm_dir)
        cfg_raw = read_record(paths.config)
        if cfg_raw is None:
            raise PermanentError(f"{vm_dir} is not a file VM (no vm.json)")
        config = VmConfig.from_dict(cfg_raw)
        lock_fd = os.open(paths.lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        if not flock_exclusive(lock_fd, lock_timeout):
            os.close(lock_fd)
            raise Busy(f"VM {config.name} is in use (locked)")
        vm = cls(paths, config, lock_fd, boot_id or current_boot_id(), role, max_log_bytes)
        try:
            vm._recover_and_open()
        except BaseException:
            vm._release_fds()
            raise
        vm._prepare_next_logs()
        return vm

    def _recover_and_open(self) -> None:
        p = self.paths
        prev = read_record(p.session)
        if prev is not None:
            self.unclean_previous = True
            self.host_crashed = prev.get("boot_id") != self.boot_id
            p.unclean.touch()
            self.recovery_notes.append(
                "previous session ended uncleanly" + (" (host restart)" if self.host_crashed else ""))
        write_record(p.session, {"boot_id": self.boot_id, "pid": os.getpid(), "role": self.role,
                                      "opened_at": time.time()})
        for d in self.config.disks:
            path = p.disk(d.disk_id)
            try:
                fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
                if os.fstat(fd).st_size < d.size:
                    os.ftruncate(fd, d.size)
            except OSError as e:
                raise classify_os_error(e, f"disk {path}") from e
            disk = _Disk(d.disk_id, fd, d.size)
            self.disks[d.disk_id] = disk
            backing = self.config.backing.get(d.disk_id)
            if backing is not None:
                disk.cow = CowOverlay(fd, p.alloc(d.disk_id), Path(backing), d.size)
        self.epoch = p.current_epoch()
        if self.epoch is None:
            return
        self._drop_other_epochs(self.epoch)
        for disk in self.disks.values():
            self._open_active_log(disk)
        record = p.cycle_record(self.epoch)
        if record is not None and self.host_crashed:
            # The fleece, bitmap and disk writes were ordered only in the page cache, which the
            # host crash lost: the frozen view may hold post-seal data. Drop the cycle; its logs
            # become carried and the next seal (untrusted: the active logs were open) covers them.
            self._delete_cycle(record, keep_logs=True)
            self.recovery_notes.append(f"dropped cycle {record['cycle_id']}: host restarted "
                                       "while its frozen view was held")
            record = None
        self._cleanup_cbw_files(record)
        if record is not None:
            self.cycle = record
            self._start_cbw(record)

    def _drop_other_epochs(self, epoch: str) -> None:
        for child in self.paths.tracking.iterdir():
            if child.is_dir() and child.name != epoch:
                shutil.rmtree(child, ignore_errors=True)

    def _open_active_log(self, disk: _Disk) -> None:
        assert self.epoch is not None
        p = self.paths
        active, nxt = p.active_log(self.epoch, disk.disk_id), p.next_log(self.epoch, disk.disk_id)
        if not active.exists() and nxt.exists():
            os.replace(nxt, active)  # a seal died after sealing the old log: promote the next
        elif nxt.exists():
            nxt.unlink()  # a seal died before sealing: the active log still records everything
        if active.exists():
            disk.log, contents = ChangeLog.reopen(active, epoch=self.epoch, disk_id=disk.disk_id,
                                                  max_bytes=self._log_cap(), boot_id=self.boot_id)
            if contents.trusted:
                disk.dirty = granule_mask(contents.extents, disk.size)
            else:
                self.recovery_notes.append(f"disk {disk.disk_id}: {contents.reason}")
        else:
            disk.log = ChangeLog.create(active, epoch=self.epoch, disk_id=disk.disk_id,
                                        max_bytes=self._log_cap(), boot_id=self.boot_id,
                                        untrusted_reason="change log missing")
            self.recovery_notes.append(f"disk {disk.disk_id}: change log missing")

    def _cleanup_cbw_files(self, record: dict[str, Any] | None) -> None:
        assert self.epoch is not None
        keep = record["cycle_id"] if record else None
        for f in self.paths.epoch_dir(self.epoch).iterdir():
            stale_cbw = f.suffix in (".fleece", ".pfleece", ".cbw", ".slots") \
                and f.name.split(".", 1)[0] != keep
            if stale_cbw or f.name.endswith(".tmp"):
                f.unlink(missing_ok=True)

    def _start_cbw(self, record: dict[str, Any]) -> None:
        """Resume copy-before-write for an unreleased cycle (after a guest restart)."""
        assert self.epoch is not None
        cid = record["cycle_id"]
        for disk in self.disks.values():
            ext = ExtentList.empty()
            if record["cbw_all"]:
                mask = None
            else:
                for name in record["logs"].get(disk.disk_id, []):
                    c = load_log(self.paths.epoch_dir(self.epoch) / name, boot_id=self.boot_id)
                    ext = ext.union(c.extents)
                mask = granule_mask(ext, disk.size)
            block = int(record.get("cbw_block", GRANULE))
            packed = bool(record.get("cbw_slots"))
            disk.cbw = CopyBeforeWrite(disk.fd, disk.size,
                            self.paths.fleece(self.epoch, cid, disk.disk_id, packed=packed),
                            self.paths.cbw_bitmap(self.epoch, cid, disk.disk_id), mask, block,
                            ext if mask is not None and block < GRANULE else None,
                            self.paths.cbw_slots(self.epoch, cid, disk.disk_id) if packed else None)

    # -- I/O ----------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self.closed:
            raise Busy(f"VM {self.config.name} is closed")

    def _disk(self, disk_id: str) -> _Disk:
        try:
            return self.disks[disk_id]
        except KeyError:
            raise InvalidInput(f"VM {self.config.name} has no disk {disk_id!r}") from None

    def _acquire_unfrozen(self, timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not self._gate.wait(left):
                raise Busy(f"VM {self.config.name} is frozen")
            self._io_lock.acquire()
            if self._gate.is_set():
                h = self._hold
                if h is None or h.active or time.monotonic() < (h.at or 0.0):
                    return
                self._activate_locked(h)  # an armed cut's instant passed: this write waits
            self._io_lock.release()

    def write(self, disk_id: str, offset: int, data: bytes | bytearray | memoryview, *,
              tag: int | None = None, frozen_timeout: float | None = None) -> None:
        """Write ``data`` at ``offset`` (log record first, then copy-before-write, then the data).

        Waits while the VM is frozen (``Busy`` after ``frozen_timeout``). ``tag`` is remembered
        as ``last_tag`` and stored in the next sealed cycle (the workload passes its sequence).
        """
        self.write_many([(disk_id, offset, data)], tag=tag, frozen_timeout=frozen_timeout)

    def write_many(self, writes: Sequence[tuple[str, int, bytes | bytearray | memoryview]], *,
                   tag: int | None = None, frozen_timeout: float | None = None) -> None:
        """Several writes as one batch (a guest's queue of requests): every log record of the
        batch first (one ``os.write`` per disk), then, in order, each write's copy-before-write
        and its data. One instant for the seal: a batch is never split across two logs.
        ``tag`` (the batch's last sequence number) and ``frozen_timeout`` as in :meth:`write`.
        """
        by_disk: dict[str, tuple[list[int], list[int]]] = {}
        for disk_id, offset, data in writes:
            disk = self._disk(disk_id)
            n = len(data)
            if offset < 0 or n == 0 or offset + n > disk.size:
                raise InvalidInput(f"write [{offset}, {offset + n}) outside disk {disk_id} "
                                   f"of {disk.size} bytes")
            offs, lens = by_disk.setdefault(disk_id, ([], []))
            offs.append(offset)
            lens.append(n)
        if not by_disk:
            return
        with self._writers_lock:
            self._writers += 1
        try:
            self._write_many(by_disk, writes, tag, frozen_timeout)
        finally:
            with self._writers_lock:
                self._writers -= 1

    def _write_many(self, by_disk: dict[str, tuple[list[int], list[int]]],
                    writes: Sequence[tuple[str, int, bytes | bytearray | memoryview]],
                    tag: int | None, frozen_timeout: float | None) -> None:
        self._acquire_unfrozen(frozen_timeout)
        wait_for: int | None = None
        mirror = self.mirror
        try:
            self._check_open()
            if mirror is not None:
                # numbered in the write order and, alone (queue depth 1) with the wire idle,
                # sent now: the recovery site's append and fdatasync overlap the local writes
                # below; the write returns once both are done (wait, after the lock)
                wait_for = mirror.submit(writes, alone=self._writers == 1)
            try:
                self._write_locked(by_disk, writes)
            except BaseException as e:
                if mirror is not None and wait_for is not None:
                    mirror.abandon(wait_for, str(e))   # the journal may hold it: run ends
                    wait_for = None
                raise
            if tag is not None:
                self.last_tag = tag
        finally:
            if self._hold is not None:  # an armed cut's hold dates itself after this write
                self._last_write_end = time.monotonic()
            self._io_lock.release()
        if mirror is not None and wait_for is not None:
            mirror.wait(wait_for)  # at most the budget; outside the lock (QD > 1 overlaps)

    def _write_locked(self, by_disk: dict[str, tuple[list[int], list[int]]],
                      writes: Sequence[tuple[str, int, bytes | bytearray | memoryview]]) -> None:
        """A batch's local writes (under the I/O lock): every log record, then each write's
        copy-before-write and its data."""
        for disk_id, (offs, lens) in by_disk.items():
            disk = self.disks[disk_id]
            if disk.log is not None:
                disk.log.append_many(offs, lens)
                for offset, n in zip(offs, lens, strict=True):
                    disk.note_write(offset, n)
        for disk_id, offset, data in writes:
            disk = self.disks[disk_id]
            try:
                if disk.cbw is not None:
                    disk.cbw.before_write(offset, len(data))
                if disk.cow is not None:
                    disk.cow.write(offset, data)
                else:
                    pwrite_all(disk.fd, data, offset)
            except OSError as e:
                raise classify_os_error(e, f"write to disk {disk_id}") from e

    def set_mirror(self, mirror: SyncMirror | None) -> None:
        """Enter (a mirror) or leave (None) synchronous mode; the old mirror is closed. Under
        the I/O lock: no batch is numbered by one mirror and waited on by another."""
        with self._io_lock:
            old, self.mirror = self.mirror, mirror
        if old is not None and old is not mirror:
            old.close()

    def read(self, disk_id: str, offset: int, length: int) -> bytes:
        """Read the live disk (what the guest sees)."""
        disk = self._disk(disk_id)
        if offset < 0 or length < 0 or offset + length > disk.size:
            raise InvalidInput(f"read outside disk {disk_id}")
        self._check_open()
        if disk.cow is not None:
            return disk.cow.read(offset, length)
        out = os.pread(disk.fd, length, offset)
        return out + bytes(length - len(out))

    def flush(self) -> None:
        """Make every completed write durable: logs, then fleece/bitmaps, then disks."""
        with self._io_lock:
            self._check_open()
            self._flush_locked()

    def _flush_locked(self) -> None:
        try:
            for disk in self.disks.values():
                if disk.log is not None:
                    disk.log.flush()
            for disk in self.disks.values():
                if disk.cbw is not None:
                    disk.cbw.flush()
            for disk in self.disks.values():
                os.fsync(disk.fd)
            for disk in self.disks.values():  # a set allocation byte names a durable granule
                if disk.cow is not None:
                    disk.cow.flush()
        except OSError as e:
            raise classify_os_error(e, f"flushing VM {self.config.name}") from e

    # -- freeze -------------------------------------------------------------------------------
    def freeze(self) -> None:
        """Quiesce: new writes wait, in-flight writes finish, everything is flushed. Nests."""
        with self._io_lock:
            self._freezes += 1
            self._gate.clear()
            self._flush_locked()

    def thaw(self) -> None:
        with self._io_lock:
            if self._freezes > 0:
                self._freezes -= 1
            if self._freezes == 0:
                self._gate.set()

    @property
    def frozen(self) -> bool:
        return self._freezes > 0

    # -- group barrier: hold writes, seal under the hold, release ------------------------------
    def hold(self, barrier_id: str, timeout_s: float, *, app_consistent: bool = False
             ) -> dict[str, Any]:
        """Hold new writes for a group barrier: they wait (they do not fail) until
        :meth:`seal_held` or :meth:`unhold` for ``barrier_id``, and never longer than
        ``timeout_s`` — a timer in this process ends the hold, so a stopped or dead caller never
        blocks the guest past the bound. In-flight writes finish first (the I/O lock). With
        ``app_consistent`` the disks are flushed and the freeze hook runs (its failure makes the
        point crash-consistent, with a note). Idempotent per ``barrier_id``; ``Conflict`` while
        another barrier holds the VM."""
        if not 0 < timeout_s <= 60:
            raise InvalidInput("a write hold lasts more than 0 and at most 60 seconds")
        with self._io_lock:
            self._check_open()
            if self._hold is not None:
                if self._hold.barrier_id == barrier_id:
                    return self._hold_info(self._hold)
                raise Conflict(f"VM {self.config.name} is held by barrier {self._hold.barrier_id}")
            h = _Hold(barrier_id, timeout_s, app_consistent)
            self._freezes += 1
            self._gate.clear()
            # from now no write completes until the hold ends: writes finish under the I/O
            # lock, and a new one re-checks the gate once it has the lock
            h.in_place = time.monotonic()
            self._hold = h
            h.timer = threading.Timer(timeout_s, self._expire_hold, args=(h,))
            h.timer.daemon = True
            h.timer.start()
            if app_consistent:
                self._flush_locked()
        if app_consistent:  # outside the I/O lock: the hook may read the disks
            h.hook_error = self._run_hook("freeze")
        return self._hold_info(h)

    @staticmethod
    def _hold_info(h: _Hold) -> dict[str, Any]:
        return {"barrier_id": h.barrier_id, "held_at": time.time() - (time.monotonic() - h.started),
                "timeout_s": h.deadline - h.started}

    def _activate_locked(self, h: _Hold) -> None:
        """An armed hold takes effect (caller holds the I/O lock): the gate closes, so no
        write completes from now until it ends. Every write that completed after ``h.at``
        had passed the gate before ``h.at`` (a write re-checks the time under the lock) and
        ended before this lock was taken, so the hold is in effect from the later of ``h.at``
        and the last write's end — not from when this thread got to run."""
        h.active = True
        h.in_place = h.started = max(h.at or 0.0, self._last_write_end)
        self._freezes += 1
        self._gate.clear()

    def _end_hold_locked(self, h: _Hold) -> float:
        """End hold ``h`` (caller holds the I/O lock); returns how long writes waited."""
        if self._hold is not h:
            return 0.0
        self._hold = None
        if h.timer is not None:
            h.timer.cancel()
        if not h.active:   # armed, never in effect: nothing waited
            return 0.0
        paused = time.monotonic() - h.started
        self.hold_pauses = [*self.hold_pauses[-999:], paused]
        if self._freezes > 0:
            self._freezes -= 1
        if self._freezes == 0:
            self._gate.set()
        return paused

    def _after_hold(self, h: _Hold) -> None:
        if h.app and h.hook_error is None:
            err = self._run_hook("thaw")
            if err:
                log.warning("VM %s: %s", self.config.name, err)

    def _expire_hold(self, h: _Hold) -> None:
        with self._io_lock:
            if self._hold is not h:
                return
            paused = self._end_hold_locked(h)
        log.warning("VM %s: write hold of barrier %s ended at its bound (%.3f s)",
                    self.config.name, h.barrier_id, paused)
        self._after_hold(h)

    def unhold(self, barrier_id: str) -> bool:
        """End the hold of ``barrier_id`` without sealing; False if it is not held."""
        with self._io_lock:
            h = self._hold
            if h is None or h.barrier_id != barrier_id:
                return False
            self._end_hold_locked(h)
        self._after_hold(h)
        return True

    def seal_held(self, barrier_id: str, *, app_consistent: bool = False) -> dict[str, Any]:
        """Seal for barrier ``barrier_id`` and end its hold, in one step under the I/O lock.

        The record's ``barrier`` says whether writes were held without a break from the hold
        to this seal (``held``: only then may the point join a group point) and how long they
        waited (``paused_s``). Without the hold (it expired, or the guest restarted) this is an
        ordinary crash-consistent seal with ``held: false``. ``held_local``/``sealed_local``
        (this host's ``time.monotonic()``): when the hold was in place, and a time at or before
        the seal's instant (taken under the I/O lock, before the logs rotate)."""
        with self._cycle_lock:
            with self._io_lock:
                sealed_local = time.monotonic()
                h = self._hold if self._hold is not None and self._hold.barrier_id == barrier_id \
                    else None
                if h is not None and not h.active:  # armed, its instant not come: not held
                    self._end_hold_locked(h)
                    h = None
                notes: list[str] = []
                consistency = Consistency.CRASH
                if h is None:
                    notes.append(f"group barrier {barrier_id}: the write hold had ended; "
                                 "a per-VM point")
                elif h.app:
                    if h.hook_error:
                        notes.append(h.hook_error + "; crash-consistent")
                    else:
                        consistency = Consistency.APP
                elif app_consistent:
                    notes.append("held without the freeze hook: crash-consistent")
                try:
                    record = self._seal_locked(consistency, notes,
                                               barrier={"id": barrier_id, "held": h is not None})
                finally:
                    paused = self._end_hold_locked(h) if h is not None else 0.0
            self._commit_seal(record)   # writes flow again meanwhile
        if h is not None:
            self._after_hold(h)
        return {**record, "barrier": {"id": barrier_id, "held": h is not None,
                                      "paused_s": paused, "sealed_local": sealed_local,
                                      "held_local": h.in_place if h is not None else None}}

    def cut(self, barrier_id: str, *, hold_at: float, hold_by: float, seal_at: float,
            timeout_s: float, clock_id: str) -> dict[str, Any]:
        """A clock cut's hold and seal, timed here (``vault/barrier_design.md``, "The clock
        cut"): hold new writes at ``hold_at``, seal under the hold at ``seal_at`` and end it,
        all instants of this host's ``time.monotonic()`` — the caller's clock, which
        ``clock_id`` (:func:`~drsite.fsutil.monotonic_clock_id` of the caller) must name. The
        caller's round trip to this process is then outside the pause, and so is this
        thread's wake-up at ``hold_at``: the hold is armed ahead and the first write at or
        after ``hold_at`` puts it in effect (:meth:`_activate_locked`), so writes wait from
        ``hold_at`` (or the end of the write in flight then) to the end of the seal's
        instant.

        Returns :meth:`seal_held`'s record (``barrier.held_local``/``sealed_local`` are what
        the caller checks its claim with), or ``{"missed": why}`` with nothing sealed and no
        hold left when the hold was not in place by ``hold_by``. ``InvalidInput`` for another
        clock or instants out of order."""
        if clock_id != monotonic_clock_id():
            raise InvalidInput(f"VM {self.config.name}: the cut is timed in another clock "
                               f"({clock_id}) than this guest's")
        now = time.monotonic()
        if not (hold_at <= hold_by < seal_at and seal_at - now <= timeout_s
                and seal_at - hold_at < timeout_s):
            raise InvalidInput("a cut holds at or before its hold_by, seals after it, within "
                               "the hold's bound")
        with self._cycle_lock:   # no release's clean-up in the held window
            with self._io_lock:
                self._check_open()
                if self._hold is not None:
                    raise Conflict(f"VM {self.config.name} is held by barrier "
                                   f"{self._hold.barrier_id}")
                h = _Hold(barrier_id, timeout_s, False, at=max(hold_at, now))
                self._hold = h
                self._last_write_end = 0.0  # writes from now on date themselves
                h.timer = threading.Timer(h.deadline - now, self._expire_hold, args=(h,))
                h.timer.daemon = True
                h.timer.start()
            _sleep_until(h.started)
            with self._io_lock:
                if self._hold is h and not h.active:
                    self._activate_locked(h)
                live = self._hold is h
            if not live or h.in_place > hold_by:
                self.unhold(barrier_id)
                late = (h.in_place - hold_at) * 1000
                return {"missed": f"the hold was in place {late:.1f} ms after its planned "
                                  "start, not surely before the cut"}
            _sleep_until(seal_at)
            return self.seal_held(barrier_id)

    def _run_hook(self, name: str) -> str | None:
        """Run ``hooks/<name>`` if present; returns an error text, or None on success/absence."""
        hook = self.paths.hooks / name
        if not hook.exists():
            return None
        try:
            r = subprocess.run([str(hook)], cwd=self.paths.dir, capture_output=True,
                               timeout=HOOK_TIMEOUT, stdin=subprocess.DEVNULL,
                               env={**os.environ, "DRSITE_VM_DIR": str(self.paths.dir),
                                    "DRSITE_VM_NAME": self.config.name})
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"{name} hook failed: {e}"
        if r.returncode != 0:
            err = r.stderr.decode(errors="replace").strip()[-200:]
            return f"{name} hook exited {r.returncode}: {err}"
        return None

    # -- tracking -----------------------------------------------------------------------------
    def _log_cap(self) -> int:
        """The cap of the change logs created now: the VM's own (``vm.json``, set by the driver
        from the protecting policy; read again here, so a change applies from the next
        seal), else the host default."""
        raw = read_record(self.paths.config) or {}
        cap = raw.get("change_log_max_bytes")
        return int(cap) if cap else self.max_log_bytes

    def start_tracking(self, epoch: str | None = None) -> str:
        """Begin a new epoch: fresh logs, previous logs and any unreleased cycle dropped.

        Refused (``InvalidInput``) on a VM with copy-on-write disks: those are test-failover
        VMs, which are never replicated (see ``design.md``)."""
        new = epoch or uuid.uuid4().hex
        with self._cycle_lock, self._io_lock:
            self._check_open()
            cow = sorted(d.disk_id for d in self.disks.values() if d.cow is not None)
            if cow:
                raise InvalidInput(
                    f"VM {self.config.name} has copy-on-write disks {cow}: change tracking is "
                    "not supported on them",
                    hint="Copy-on-write VMs are test-failover VMs and are not replicated; "
                         "protect a VM with ordinary disks.")
            p = self.paths
            edir = p.epoch_dir(new)
            edir.mkdir(parents=True, exist_ok=True)
            write_record(p.epoch_state(new), {"base_released": False})
            logs = {d.disk_id: ChangeLog.create(p.active_log(new, d.disk_id), epoch=new,
                                                disk_id=d.disk_id, max_bytes=self._log_cap(),
                                                boot_id=self.boot_id)
                    for d in self.disks.values()}
            tmp = p.tracking / "current.tmp"
            tmp.write_text(new)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, p.current)  # the commit point of the new epoch
            fsync_dir(p.tracking)
            for disk in self.disks.values():
                if disk.log is not None:
                    disk.log.abandon()
                if disk.cbw is not None:
                    disk.cbw.close(sync=False)
                    disk.cbw = None
                disk.log = logs[disk.disk_id]
                disk.dirty = bytearray(len(disk.dirty))
            self.epoch, self.cycle = new, None
            self._drop_other_epochs(new)
        self._prepare_next_logs()
        return new

    def seal(self, *, app_consistent: bool = False, run_hooks: bool = True) -> dict[str, Any]:
        """Rotate every disk's log at one instant and start copy-before-write for the view.

        Returns the persisted cycle record. With ``app_consistent``: freeze (writers wait,
        flush), run the freeze hook, seal, run the thaw hook, thaw. A failing freeze hook
        gives a crash-consistent cycle with a note. Raises ``TrackingLost`` without an epoch,
        ``Conflict`` while a cycle is unreleased.
        """
        notes: list[str] = []
        consistency = Consistency.CRASH
        if app_consistent:
            if self.role == "driver":  # a stopped VM: quiesced iff it was left cleanly
                if self.paths.unclean.exists():
                    notes.append("VM was stopped uncleanly: crash-consistent")
                else:
                    consistency = Consistency.APP
                return self._seal(consistency, notes)
            self.freeze()
            try:
                err = self._run_hook("freeze") if run_hooks else None
                if err:
                    notes.append(err + "; crash-consistent")
                else:
                    consistency = Consistency.APP
                try:
                    return self._seal(consistency, notes, on_sealed=(
                        (lambda: self._run_hook("thaw")) if run_hooks and not err else None))
                except BaseException:
                    if run_hooks and not err:
                        self._run_hook("thaw")
                    raise
            finally:
                self.thaw()
        return self._seal(consistency, notes)

    def _seal(self, consistency: Consistency, notes: list[str],
              on_sealed: Callable[[], str | None] | None = None) -> dict[str, Any]:
        """Seal (:meth:`_seal_locked` under the I/O lock), then commit it (:meth:`_commit_seal`,
        after the lock: writes flow again)."""
        with self._cycle_lock:
            with self._io_lock:
                record = self._seal_locked(consistency, notes, on_sealed)
            self._commit_seal(record)
        return record

    def _seal_locked(self, consistency: Consistency, notes: list[str],
                     on_sealed: Callable[[], str | None] | None = None,
                     barrier: dict[str, Any] | None = None) -> dict[str, Any]:
        """The seal's instant (the caller holds the I/O lock): every disk's log rotated, the
        frozen view started, ``self.cycle`` set; not yet durable (:meth:`_commit_seal`)."""
        with self._io_lock:
            self._check_open()
            if self.epoch is None:
                raise TrackingLost(f"VM {self.config.name}: change tracking was not started")
            if self.cycle is not None:
                raise Conflict(f"VM {self.config.name} has unreleased cycle {self.cycle['cycle_id']}",
                               hint="Finish the pending cycle (ship and release it) first.")
            p, epoch = self.paths, self.epoch
            cid = uuid.uuid4().hex
            sealed_at = time.time()
            carried = p.carried_logs(epoch, None)
            # Until a cycle of this epoch is released, the target has no base from this epoch:
            # the cycle is "full" (changed = whole disks, frozen view over whole disks).
            full = not bool((read_record(p.epoch_state(epoch)) or {}).get("base_released"))
            # 1. the next logs exist (durably) before the old ones are sealed: a crash in between
            #    never leaves a disk without an active log (see _open_active_log); made ahead
            #    of the seal when they could be
            nxt = self._take_next_logs(epoch)
            trusted = True
            masks: dict[str, bytearray | None] = {}
            exact: dict[str, ExtentList] = {}
            logs: dict[str, list[str]] = {}
            moved: list[tuple[_Disk, Path]] = []   # (disk, its active log's path) moved
            try:
                for disk in self.disks.values():
                    assert disk.log is not None
                    trusted &= disk.log.trusted
                    if not disk.log.trusted:
                        notes.append(f"disk {disk.disk_id}: {disk.log.reason}")
                    mask = disk.dirty
                    names = []
                    for old in carried.get(disk.disk_id, []):
                        c = load_log(old, boot_id=self.boot_id)
                        if not c.trusted:
                            trusted = False
                            notes.append(f"disk {disk.disk_id}: {c.reason}")
                        else:
                            mask = bytearray(np.bitwise_or(np.frombuffer(mask, np.uint8),
                                                           np.frombuffer(granule_mask(c.extents, disk.size),
                                                                         np.uint8)).tobytes())
                        names.append(old.name)
                    sealed = p.sealed_log(epoch, cid, disk.disk_id)
                    # 2. renamed, still open: made durable and marked clean after the instant,
                    #    before the commit point (_commit_seal)
                    moved.append((disk, disk.log.path))
                    disk.log.move(sealed)
                    self._sealing.append(disk.log)
                    names.append(sealed.name)
                    logs[disk.disk_id] = names
                    masks[disk.disk_id] = mask
                    if not full and trusted:  # the blocks the view will be read over, exactly
                        ext = load_log(sealed, boot_id=self.boot_id).extents
                        for old in carried.get(disk.disk_id, []):
                            ext = ext.union(load_log(old, boot_id=self.boot_id).extents)
                        exact[disk.disk_id] = ext
                for disk in self.disks.values():  # 3. promote the next logs (their directory's
                    log_ = nxt[disk.disk_id]        #    fsync is the commit's)
                    os.replace(log_.path, p.active_log(epoch, disk.disk_id))
                    log_.path = p.active_log(epoch, disk.disk_id)
                    disk.log = log_
                    disk.dirty = bytearray(len(disk.dirty))
            except BaseException:
                # a failed seal: a log moved and not replaced goes back to where the disk's
                # writes are logged; one replaced stays sealed, carried into the next seal
                for disk, path in moved:
                    if disk.log is not None and disk.log.path != path:
                        with suppress(DrsiteError):
                            disk.log.move(path)
                for unused in [*self._sealing, *nxt.values()]:
                    if all(d.log is not unused for d in self.disks.values()):
                        unused.abandon()
                self._sealing = []
                raise
            record: dict[str, Any] = {
                "cycle_id": cid, "vm_id": self.config.vm_id, "epoch": epoch,
                "sealed_at": sealed_at, "consistency": consistency.value, "notes": notes,
                "logs": logs, "disk_sizes": {d.disk_id: d.size for d in self.disks.values()},
                "full": full, "trusted": trusted, "cbw_all": full or not trusted,
                "last_tag": self.last_tag, "boot_id": self.boot_id, "cbw_block": CBW_BLOCK,
                "cbw_slots": True,   # a packed fleece (cbw.py); absent in older records
            }
            if self.mirror is not None:  # the seal's instant in the sync journal's numbering
                record["sync"] = self.mirror.mark()
            if barrier is not None:
                record["barrier"] = barrier
            for disk in self.disks.values():  # 4. the frozen view starts now (before any write)
                disk.cbw = CopyBeforeWrite(disk.fd, disk.size,
                                p.fleece(epoch, cid, disk.disk_id, packed=True),
                                p.cbw_bitmap(epoch, cid, disk.disk_id),
                                None if full or not trusted else masks[disk.disk_id], CBW_BLOCK,
                                exact.get(disk.disk_id), p.cbw_slots(epoch, cid, disk.disk_id))
            if on_sealed is not None:
                err = on_sealed()
                if err:
                    notes.append(err)
            self.cycle = record
            return record

    def _commit_seal(self, record: dict[str, Any]) -> None:
        """5. The commit point of a seal, once writes flow again (called without the I/O
        lock, so after a barrier's hold): until it is durable a crash leaves what a crash
        before it always did — sealed logs no record owns (carried into the next seal) and
        stale copy-before-write files (removed at the next open). Nothing else touches the
        cycle before the seal returns: release() needs its id, a second seal is refused. A
        failed write forgets the cycle (its logs are carried)."""
        sealing, self._sealing = self._sealing, []
        try:
            for old in sealing:     # records fsynced, then the CLEAN header (fsynced)
                old.close()
            fsync_dir(self.paths.epoch_dir(record["epoch"]))   # the seal's renames
            write_record(self.paths.cycle_file(record["epoch"]), record)
        except BaseException:
            for old in sealing:
                old.abandon()
            with self._io_lock:
                if self.cycle is record:
                    self.cycle = None
                    for disk in self.disks.values():
                        if disk.cbw is not None:
                            disk.cbw.close(sync=False)
                            disk.cbw = None
            raise

    def _take_next_logs(self, epoch: str) -> dict[str, ChangeLog]:
        """The next seal's logs (caller holds the I/O lock): those made ahead for this epoch
        and these disks, else new ones; durable either way. A log made ahead takes the cap in
        force now."""
        with self._next_lock:
            ready, self._next_ready = self._next_ready, None
            if ready is not None and ready[0] == epoch and set(ready[1]) == set(self.disks) \
                    and all(log_.path.exists() for log_ in ready[1].values()):
                cap = self._log_cap()
                for log_ in ready[1].values():
                    log_.set_max_bytes(cap)
                return ready[1]
            for log_ in (ready[1].values() if ready is not None else ()):
                log_.abandon()   # its file is replaced below
            return {d.disk_id: ChangeLog.create(self.paths.next_log(epoch, d.disk_id),
                                                epoch=epoch, disk_id=d.disk_id,
                                                max_bytes=self._log_cap(), boot_id=self.boot_id)
                    for d in self.disks.values()}

    def _prepare_next_logs(self) -> None:
        """Make the next seal's logs now (a running guest, between cycles), outside the I/O
        lock: writes go on meanwhile. A crash leaves an active log and a next one, which the
        next open removes (``_open_active_log``). Best effort: a failure only means the seal
        makes them itself."""
        if self.role != "guest" or self.closed:
            return
        with self._next_lock:
            epoch, disks = self.epoch, list(self.disks)
            if epoch is None or self._next_ready is not None:
                return
            try:
                logs = {d: ChangeLog.create(self.paths.next_log(epoch, d), epoch=epoch,
                                            disk_id=d, max_bytes=self._log_cap(),
                                            boot_id=self.boot_id) for d in disks}
            except DrsiteError as e:
                log.info("VM %s: next change logs not made ahead: %s", self.config.name, e)
                return
            self._next_ready = (epoch, logs)

    def release(self, cycle_id: str) -> bool:
        """Drop the frozen view and sealed logs of ``cycle_id``; False if it is not pending.

        Under the I/O lock only what writes depend on: copy-before-write stops and
        ``cycle.json`` is unlinked (the commit point; a guest crash after it sees no cycle, and
        after a host crash an unreleased cycle is dropped anyway). The directory's fsync and
        the files' removal follow with writes flowing, under ``_cycle_lock`` (no seal
        meanwhile, which would carry the logs being removed)."""
        with self._cycle_lock:
            with self._io_lock:
                self._check_open()
                record = self.cycle
                if record is None or record["cycle_id"] != cycle_id:
                    return False
                for disk in self.disks.values():
                    if disk.cbw is not None:
                        disk.cbw.close(sync=False)
                        disk.cbw = None
                self.paths.cycle_file(record["epoch"]).unlink(missing_ok=True)
                self.cycle = None
            self._delete_cycle(record, committed=True)
            if record.get("full"):  # after the commit point: a crash in between over-approximates
                write_record(self.paths.epoch_state(record["epoch"]), {"base_released": True})
        self._prepare_next_logs()   # the next seal's, while writes go on
        return True

    def _delete_cycle(self, record: dict[str, Any], *, keep_logs: bool = False,
                      committed: bool = False) -> None:
        """Forget a cycle; with ``keep_logs`` its sealed logs stay and are carried.
        ``committed``: its ``cycle.json`` is already unlinked."""
        p, epoch = self.paths, record["epoch"]
        if not committed:
            p.cycle_file(epoch).unlink(missing_ok=True)  # the commit point of the release
        fsync_dir(p.epoch_dir(epoch))
        for disk_id, names in record["logs"].items():
            for n in names:
                if not keep_logs:
                    (p.epoch_dir(epoch) / n).unlink(missing_ok=True)
            p.fleece(epoch, record["cycle_id"], disk_id).unlink(missing_ok=True)
            p.fleece(epoch, record["cycle_id"], disk_id, packed=True).unlink(missing_ok=True)
            p.cbw_bitmap(epoch, record["cycle_id"], disk_id).unlink(missing_ok=True)
            p.cbw_slots(epoch, record["cycle_id"], disk_id).unlink(missing_ok=True)

    # -- status / closing ---------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        with self._io_lock:
            return {
                "vm_id": self.config.vm_id, "name": self.config.name, "pid": os.getpid(),
                "role": self.role, "epoch": self.epoch, "frozen": self.frozen,
                "held_by": self._hold.barrier_id if self._hold else None,
                "hold_pauses": list(self.hold_pauses[-100:]),
                "cycle_id": self.cycle["cycle_id"] if self.cycle else None,
                "last_tag": self.last_tag, "recovery_notes": list(self.recovery_notes),
                "sync": self.mirror.status() if self.mirror is not None else None,
                "logs": {d.disk_id: {"records": d.log.records, "trusted": d.log.trusted,
                                     "reason": d.log.reason} if d.log else None
                         for d in self.disks.values()},
                "cbw_copied": {d.disk_id: d.cbw.copied if d.cbw else 0 for d in self.disks.values()},
            }

    def _drop_hold(self) -> None:
        h = self._hold
        if h is not None and h.timer is not None:
            h.timer.cancel()
        self._hold = None

    def close(self) -> None:
        """Clean stop: flush, mark the logs clean, drop the session (quiesced at rest if guest)."""
        self.set_mirror(None)
        self._drop_hold()
        self._gate.set()
        with self._io_lock:
            if self.closed:
                return
            try:
                self._flush_locked()
                for disk in self.disks.values():
                    if disk.log is not None:
                        disk.log.close()
                    if disk.cbw is not None:
                        disk.cbw.close(sync=True)
                if self.role == "guest":
                    self.paths.unclean.unlink(missing_ok=True)
                self.paths.session.unlink(missing_ok=True)
                fsync_dir(self.paths.dir)
            finally:
                self._release_fds()

    def crash(self) -> None:
        """Drop everything without flushing or marking clean: what SIGKILL leaves (tests)."""
        self.set_mirror(None)
        self._drop_hold()
        self._gate.set()
        with self._io_lock:
            if self.closed:
                return
            for disk in self.disks.values():
                if disk.log is not None:
                    disk.log.abandon()
            self._release_fds()

    def _release_fds(self) -> None:
        self.closed = True
        with self._next_lock:
            ready, self._next_ready = self._next_ready, None
        for log_ in (ready[1].values() if ready is not None else ()):
            log_.abandon()  # a stale next log is removed at the next open (_open_active_log)
        for disk in self.disks.values():
            if disk.cbw is not None:
                disk.cbw.close(sync=False)
            if disk.cow is not None:
                disk.cow.close()
            if disk.log is not None:
                disk.log.abandon()
            with suppress(OSError):
                os.close(disk.fd)
        with suppress(OSError):
            os.close(self._lock_fd)  # releases the flock

    def __enter__(self) -> FileVm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
