"""The embedded file-backed hypervisor driver.

A VM is a directory ``root/<name>/`` (see :mod:`.layout`); a running VM is a guest process
(:mod:`.guest`) that owns the VM lock and serves a control socket. Operations that change
tracking state (start_tracking, seal, release, tracked writes) go to the guest over the socket
when it runs, or are done here on the files under the VM lock when it is stopped. Reads of
cycles, status and inventory only read files (no lock needed: everything they read is either
immutable once written or replaced atomically).

Responsible for: the :class:`HypervisorDriver` contract for file VMs, guest processes. Not
responsible for: policy (when to seal, what to ship, when to resync), the vault's database.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import suppress
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import drsite
from drsite.core.errors import (
    Busy,
    Conflict,
    DrsiteError,
    InvalidInput,
    NetworkError,
    NotFound,
    PermanentError,
    TransientError,
    VmNotFound,
    classify_os_error,
)
from drsite.core.extents import ExtentList
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
from drsite.fsutil import flock_exclusive, monotonic_clock_id, read_record, write_record
from drsite.hypervisors.contract import DiskReader
from drsite.hypervisors.file.control import call as guest_call
from drsite.hypervisors.file.control import encode_data
from drsite.hypervisors.file.cow import CowDiskReader, create_cow_files
from drsite.hypervisors.file.layout import GRANULE, VmConfig, VmPaths
from drsite.hypervisors.file.readers import CycleDiskReader
from drsite.hypervisors.file.runtime import GuestRuntime
from drsite.hypervisors.file.syncmirror import SyncConfig
from drsite.hypervisors.file.vm import FileVm
from drsite.hypervisors.file.workload import WorkloadSpec
from drsite.imagefile import RawImageReader, move_sparse
from drsite.tracking.changelog import load_log

T = TypeVar("T")
GUEST_MODULE = "drsite.hypervisors.file.guest"
START_TIMEOUT = 20.0


class FileHypervisor:
    """:class:`~drsite.hypervisors.contract.HypervisorDriver` for file-backed VMs under ``root``."""

    name = "file"

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._procs: dict[Path, subprocess.Popen[bytes]] = {}
        self._inproc: dict[Path, GuestRuntime] = {}
        self._mutex = threading.RLock()

    # -- locating VMs -------------------------------------------------------------------------
    def _configs(self) -> list[tuple[Path, VmConfig]]:
        out = []
        for d in sorted(self.root.iterdir()):
            if d.name.startswith(".") or not d.is_dir():
                continue
            raw = read_record(d / "vm.json")
            if raw is not None:
                out.append((d, VmConfig.from_dict(raw)))
        return out

    def _locate(self, vm_id: str) -> tuple[VmPaths, VmConfig]:
        for d, cfg in self._configs():
            if cfg.vm_id == vm_id:
                return VmPaths(d), cfg
        raise VmNotFound(f"no file VM with id {vm_id!r} under {self.root}")

    def vm_dir(self, vm_id: str) -> Path:
        """The directory of a VM (``VmNotFound``)."""
        return self._locate(vm_id)[0].dir

    def disk_path(self, vm_id: str, disk_id: str) -> Path:
        """The raw image file of one disk (``VmNotFound``). For a copy-on-write disk this is
        its overlay, not its content: read such a disk with :meth:`open_live_reader`."""
        paths, cfg = self._locate(vm_id)
        cfg.disk_size(disk_id)
        return paths.disk(disk_id)

    def disk_backing(self, vm_id: str) -> dict[str, Path]:
        """Backing images of the VM's copy-on-write disks (empty for an ordinary VM)."""
        _, cfg = self._locate(vm_id)
        return {d: Path(p) for d, p in cfg.backing.items()}

    def find_vm(self, name: str) -> VmInfo:
        """A VM by name (``VmNotFound``)."""
        validate_name("VM", name)
        for d, cfg in self._configs():
            if cfg.name == name:
                return cfg.info(self._power(VmPaths(d)))
        raise VmNotFound(f"no file VM named {name!r}")

    # -- inventory ----------------------------------------------------------------------------
    def list_vms(self) -> list[VmInfo]:
        return [cfg.info(self._power(VmPaths(d))) for d, cfg in self._configs()]

    def get_vm(self, vm_id: str) -> VmInfo:
        paths, cfg = self._locate(vm_id)
        return cfg.info(self._power(paths))

    # -- power --------------------------------------------------------------------------------
    def _locked(self, paths: VmPaths) -> bool:
        try:
            fd = os.open(paths.lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise classify_os_error(e, f"lock of {paths.dir}") from e
        try:
            return not flock_exclusive(fd, 0)
        finally:
            os.close(fd)  # also drops our probe lock if we got it

    def _guest_pid(self, paths: VmPaths) -> int | None:
        try:
            return int(paths.pid.read_text().strip())
        except (OSError, ValueError):
            return None

    def _power(self, paths: VmPaths) -> PowerState:
        proc = self._procs.get(paths.dir)
        if proc is not None and proc.poll() is not None:
            self._procs.pop(paths.dir, None)  # reaped
        pid = self._guest_pid(paths)
        if pid is None or not self._locked(paths) or not self._is_guest(pid):
            return PowerState.STOPPED
        return PowerState.RUNNING

    @staticmethod
    def _is_guest(pid: int) -> bool:
        """Whether ``pid`` is a live drsite guest process, or this process (which may run
        in-process guests). A pid file outlives its guest, and after the guest is gone its pid
        may name any process: that one is never signalled, and the VM counts as stopped."""
        if pid == os.getpid():
            return True
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return False
        return GUEST_MODULE.encode() in cmdline  # empty for a zombie: gone

    def power_on(self, vm_id: str) -> None:
        paths, cfg = self._locate(vm_id)
        with self._mutex:
            if self._power(paths) is PowerState.RUNNING:
                return
            paths.pid.unlink(missing_ok=True)
            env = dict(os.environ)
            src = str(Path(drsite.__file__).resolve().parent.parent)
            env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
            with open(paths.log, "ab") as logf:
                proc = subprocess.Popen([sys.executable, "-m", GUEST_MODULE, str(paths.dir.absolute())],
                                        stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                        start_new_session=True, close_fds=True, env=env,
                                        cwd=paths.dir)
            self._procs[paths.dir] = proc
            deadline = time.monotonic() + START_TIMEOUT
            while True:
                if proc.poll() is not None:
                    self._procs.pop(paths.dir, None)
                    raise PermanentError(f"guest of VM {cfg.name} exited with {proc.returncode}: "
                                         f"{self._log_tail(paths)}")
                try:
                    r = guest_call(paths.socket_address(), "ping", timeout=2.0)
                    if int(r["pid"]) == proc.pid:
                        return
                except NetworkError:
                    pass
                if time.monotonic() > deadline:
                    proc.kill()
                    proc.wait()
                    raise TransientError(f"guest of VM {cfg.name} did not start within "
                                         f"{START_TIMEOUT:.0f}s: {self._log_tail(paths)}")
                time.sleep(0.02)

    def _log_tail(self, paths: VmPaths) -> str:
        try:
            return paths.log.read_text(errors="replace")[-600:].strip()
        except OSError:
            return "(no guest log)"

    def _wait_stopped(self, paths: VmPaths, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            proc = self._procs.get(paths.dir)
            if proc is not None:
                proc.poll()
            if not self._locked(paths):
                if proc is not None:
                    with suppress(subprocess.TimeoutExpired):
                        proc.wait(5.0)  # it is exiting: reap it (no zombie)
                    self._procs.pop(paths.dir, None)
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)

    def _pid_gone(self, pid: int, timeout: float) -> bool:
        """True once ``pid`` is no longer a live guest (exited, a zombie waiting for its parent,
        or its pid taken by another process)."""
        if pid == os.getpid():
            return True
        deadline = time.monotonic() + timeout
        while self._is_guest(pid):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    def _kill(self, paths: VmPaths, pid: int) -> None:
        if pid == os.getpid():
            raise Conflict("refusing to SIGKILL this process (an in-process guest of another driver)")
        if not self._is_guest(pid):
            return  # gone already (its pid may name another process by now: never signalled)
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)

    def power_off(self, vm_id: str, *, force: bool = False, timeout: float = 30.0) -> None:
        paths, cfg = self._locate(vm_id)
        with self._mutex:
            rt = self._inproc.get(paths.dir)
            if rt is not None:
                self._inproc.pop(paths.dir, None)
                if not rt.stopped.is_set():
                    rt.crash() if force else rt.stop()
                return
            if self._power(paths) is PowerState.STOPPED:
                return
            pid = self._guest_pid(paths)
            assert pid is not None
            if not force:
                try:
                    guest_call(paths.socket_address(), "shutdown", timeout=min(timeout, 5.0))
                except DrsiteError:
                    with suppress(ProcessLookupError):
                        if pid != os.getpid() and self._is_guest(pid):
                            os.kill(pid, signal.SIGTERM)
                if self._wait_stopped(paths, timeout):
                    # the lock goes first, the process right after: return once it is gone
                    # (a caller that stops the host next must not find it still exiting)
                    if not self._pid_gone(pid, 10.0):
                        self._kill(paths, pid)
                    return
            self._kill(paths, pid)
            if not self._wait_stopped(paths, 10.0):
                raise TransientError(f"guest of VM {cfg.name} (pid {pid}) did not stop")
            paths.pid.unlink(missing_ok=True)

    def guest(self, vm_id: str) -> GuestRuntime:
        """Run the VM's guest inside this process (tests, demos): same lock, socket and workload
        as the process form, so the driver sees it RUNNING. ``runtime.vm`` gives deterministic
        tracked writes; ``power_off`` stops it (``force`` = :meth:`GuestRuntime.crash`)."""
        paths, _ = self._locate(vm_id)
        with self._mutex:
            if self._power(paths) is PowerState.RUNNING:
                raise Conflict(f"VM {vm_id} is already running")
            rt = GuestRuntime(FileVm.open(paths.dir, role="guest", lock_timeout=5.0))
            rt.start()
            self._inproc[paths.dir] = rt
            return rt

    # -- running or stopped: one way to act on the VM's tracking state ------------------------
    def _act(self, paths: VmPaths, cmd: str, local: Callable[[FileVm], T], *,
             timeout: float = 120.0, **args: Any) -> T:
        """Send ``cmd`` to the running guest, or run ``local`` on the files under the VM lock."""
        deadline = time.monotonic() + 30.0
        while True:
            try:
                vm = FileVm.open(paths.dir, role="driver", lock_timeout=0)
            except Busy:
                try:
                    return guest_call(paths.socket_address(), cmd, timeout=timeout,  # type: ignore[no-any-return]
                                        **args)
                except NetworkError:
                    if time.monotonic() > deadline:
                        raise Busy(f"VM in {paths.dir} is locked but its guest does not answer") \
                            from None
                    time.sleep(0.05)
                    continue
            try:
                return local(vm)
            finally:
                vm.close()

    def write(self, vm_id: str, disk_id: str, offset: int, data: bytes) -> None:
        """A tracked write, as the guest OS would do it (through the running guest, or directly
        under the VM lock when stopped). For tests and the demo, not a data path."""
        paths, _ = self._locate(vm_id)
        self._act(paths, "write", lambda vm: vm.write(disk_id, offset, data),
                  disk_id=disk_id, offset=offset, data=encode_data(data))

    def flush(self, vm_id: str) -> None:
        """Make the guest's completed writes durable (logs, then disks)."""
        paths, _ = self._locate(vm_id)
        self._act(paths, "flush", lambda vm: vm.flush())

    def guest_ready(self, vm_id: str) -> bool:
        """The guest process runs and answers its control socket."""
        return self.guest_status(vm_id) is not None

    def guest_status(self, vm_id: str) -> dict[str, Any] | None:
        """The running guest's status (epoch, cycle, workload stats), or None when stopped."""
        paths, _ = self._locate(vm_id)
        if self._power(paths) is PowerState.STOPPED:
            return None
        try:
            return guest_call(paths.socket_address(), "status", timeout=10.0)  # type: ignore[no-any-return]
        except NetworkError:
            return None

    def set_workload(self, vm_id: str, spec: WorkloadSpec | None) -> None:
        """Store the workload in ``vm.json`` and apply it now if the VM runs."""
        paths, cfg = self._locate(vm_id)
        new = replace(cfg, workload=spec)
        write_record(paths.config, new.to_dict())
        if self._power(paths) is PowerState.RUNNING:
            with suppress(NetworkError):
                guest_call(paths.socket_address(), "workload",
                             spec=spec.to_dict() if spec else None)

    # -- synchronous mode (contract.SyncMirrorHost) --------------------------------------------
    def set_sync(self, vm_id: str, config: dict[str, Any] | None) -> None:
        """Enter (``config``: ``syncmirror.SyncConfig`` fields) or leave (None) synchronous
        mode: stored in ``sync.json`` (0600; a guest started later reads it) and applied now if
        the VM runs. The mirror begins its journal at the VM's next seal."""
        paths, _ = self._locate(vm_id)
        if config is None:
            paths.sync_config.unlink(missing_ok=True)
        else:
            SyncConfig.from_dict(config)  # validated before it is stored
            write_record(paths.sync_config, dict(config))
            os.chmod(paths.sync_config, 0o600)
        if self._power(paths) is PowerState.RUNNING:
            guest_call(paths.socket_address(), "sync_config", timeout=10.0, config=config)

    def sync_status(self, vm_id: str) -> dict[str, Any] | None:
        """The running guest's mirror status (``SyncMirror.status``), or None (stopped, or
        not in synchronous mode)."""
        st = self.guest_status(vm_id)
        sync = (st or {}).get("sync")
        return dict(sync) if isinstance(sync, dict) else None

    # -- tracking -----------------------------------------------------------------------------
    def set_change_log_limit(self, vm_id: str, max_bytes: int) -> None:
        """Cap the VM's change logs (stored in ``vm.json``; from the next seal on)."""
        paths, cfg = self._locate(vm_id)
        if cfg.change_log_max_bytes != max_bytes:
            write_record(paths.config, replace(cfg, change_log_max_bytes=int(max_bytes)).to_dict())

    def start_tracking(self, vm_id: str) -> str:
        paths, _ = self._locate(vm_id)
        epoch = uuid.uuid4().hex
        return self._act(paths, "start_tracking", lambda vm: vm.start_tracking(epoch), epoch=epoch)

    def tracking_status(self, vm_id: str) -> TrackingStatus:
        paths, cfg = self._locate(vm_id)
        epoch = paths.current_epoch()
        if epoch is None:
            return TrackingStatus(TrackingState.NOT_STARTED)
        for attempt in range(5):  # a seal may rename logs under us: retry on a vanished file
            try:
                return self._tracking_status(paths, cfg, epoch)
            except NotFound:
                if attempt == 4:
                    raise
                time.sleep(0.05)
        raise AssertionError("unreachable")

    def _tracking_status(self, paths: VmPaths, cfg: VmConfig, epoch: str) -> TrackingStatus:
        carried = paths.carried_logs(epoch, paths.cycle_record(epoch))
        reasons: list[str] = []
        pending: dict[str, int] = {}
        for d in cfg.disks:
            active = paths.active_log(epoch, d.disk_id)
            logs = [*carried.get(d.disk_id, [])]
            if active.exists():
                logs.append(active)
            elif paths.next_log(epoch, d.disk_id).exists():
                logs.append(paths.next_log(epoch, d.disk_id))
            else:
                raise NotFound(f"change log of disk {d.disk_id} missing")
            ext, ok = ExtentList.empty(), True
            for p in logs:
                c = load_log(p, live=True)
                if not c.trusted:
                    ok = False
                    reasons.append(f"disk {d.disk_id}: {c.reason}")
                ext = ext.union(c.extents)
            pending[d.disk_id] = ext.clip(d.size).total if ok else d.size
        state = TrackingState.UNTRUSTED if reasons else TrackingState.ACTIVE
        return TrackingStatus(state, epoch, "; ".join(reasons), pending)

    def _cycle(self, paths: VmPaths, record: dict[str, Any]) -> SealedCycle:
        epoch = record["epoch"]
        sizes = {str(k): int(v) for k, v in record["disk_sizes"].items()}
        if record.get("full"):  # the epoch's base: whole disks, complete by definition
            return SealedCycle(record["cycle_id"], record["vm_id"], epoch,
                               float(record["sealed_at"]), Consistency(record["consistency"]),
                               {d: ExtentList.of([(0, n)]) for d, n in sizes.items()}, sizes, True,
                               "; ".join(["first cycle of the epoch: whole disks",
                                          *record.get("notes", [])]), record.get("sync"))
        notes = list(record.get("notes", []))
        trusted = bool(record.get("trusted", True))
        changed: dict[str, ExtentList] = {}
        for disk_id, names in record["logs"].items():
            ext = ExtentList.empty()
            for n in names:
                c = load_log(paths.epoch_dir(epoch) / n)
                if not c.trusted:
                    trusted = False
                    if f"disk {disk_id}: {c.reason}" not in notes:
                        notes.append(f"disk {disk_id}: {c.reason}")
                ext = ext.union(c.extents)
            changed[disk_id] = ext.clip(sizes[disk_id])
        return SealedCycle(record["cycle_id"], record["vm_id"], epoch, float(record["sealed_at"]),
                           Consistency(record["consistency"]), changed, sizes, trusted,
                           "; ".join(notes), record.get("sync"))

    def seal(self, vm_id: str, *, app_consistent: bool = False) -> SealedCycle:
        paths, _ = self._locate(vm_id)
        record = self._act(paths, "seal", lambda vm: vm.seal(app_consistent=app_consistent),
                           app_consistent=app_consistent)
        return self._cycle(paths, record)

    # -- group barrier (contract.WriteHolder) --------------------------------------------------
    def hold(self, vm_id: str, barrier_id: str, *, timeout_s: float,
             app_consistent: bool = False) -> dict[str, object]:
        paths, _ = self._locate(vm_id)
        return self._act(paths, "hold", lambda vm: vm.hold(barrier_id, timeout_s,
                                                          app_consistent=app_consistent),
                         timeout=10.0, barrier_id=barrier_id, timeout_s=timeout_s,
                         app_consistent=app_consistent)

    def seal_held(self, vm_id: str, barrier_id: str, *, app_consistent: bool = False
                  ) -> tuple[SealedCycle, dict[str, object]]:
        paths, _ = self._locate(vm_id)
        record = self._act(paths, "seal_held",
                           lambda vm: vm.seal_held(barrier_id, app_consistent=app_consistent),
                           barrier_id=barrier_id, app_consistent=app_consistent)
        return self._cycle(paths, record), dict(record["barrier"])

    def cut_seal(self, vm_id: str, barrier_id: str, *, hold_at: float, hold_by: float,
                 seal_at: float, timeout_s: float) -> tuple[SealedCycle | None, dict[str, object]]:
        """(``contract.ScheduledCut``) The guest process times the hold and the seal itself
        (``FileVm.cut``; it shares this process's monotonic clock, checked by clock id). A
        stopped VM cannot be held: it seals with ``held: false``."""
        paths, _ = self._locate(vm_id)
        record = self._act(paths, "cut", lambda vm: vm.seal_held(barrier_id),
                           timeout=max(0.0, seal_at - time.monotonic()) + 30.0,
                           barrier_id=barrier_id, hold_at=hold_at, hold_by=hold_by,
                           seal_at=seal_at, timeout_s=timeout_s, clock_id=monotonic_clock_id())
        if "missed" in record:
            return None, {"missed": str(record["missed"])}
        return self._cycle(paths, record), dict(record["barrier"])

    def unhold(self, vm_id: str, barrier_id: str) -> bool:
        paths, _ = self._locate(vm_id)
        return bool(self._act(paths, "unhold", lambda vm: vm.unhold(barrier_id), timeout=10.0,
                              barrier_id=barrier_id))

    def pending_cycle(self, vm_id: str) -> SealedCycle | None:
        paths, _ = self._locate(vm_id)
        epoch = paths.current_epoch()
        record = paths.cycle_record(epoch) if epoch else None
        return self._cycle(paths, record) if record else None

    def cycle_record(self, cycle: SealedCycle) -> dict[str, Any]:
        """The persisted record of an unreleased cycle (``last_tag``: the tag of the last write
        before the seal, e.g. the workload's sequence number). ``NotFound`` once released."""
        paths, _ = self._locate(cycle.vm_id)
        record = paths.cycle_record(cycle.epoch)
        if record is None or record["cycle_id"] != cycle.cycle_id:
            raise NotFound(f"cycle {cycle.cycle_id} was released or superseded")
        return record

    def open_cycle_reader(self, cycle: SealedCycle, disk_id: str) -> DiskReader:
        paths, cfg = self._locate(cycle.vm_id)
        record = self.cycle_record(cycle)
        packed = bool(record.get("cbw_slots"))
        return CycleDiskReader(paths.disk(disk_id),
                               paths.fleece(cycle.epoch, cycle.cycle_id, disk_id, packed=packed),
                               paths.cbw_bitmap(cycle.epoch, cycle.cycle_id, disk_id),
                               cfg.disk_size(disk_id), int(record.get("cbw_block", GRANULE)),
                               whole=bool(record.get("cbw_all")),
                               slots=paths.cbw_slots(cycle.epoch, cycle.cycle_id, disk_id)
                               if packed else None)

    def open_live_reader(self, vm_id: str, disk_id: str) -> DiskReader:
        paths, cfg = self._locate(vm_id)
        size = cfg.disk_size(disk_id)
        backing = cfg.backing.get(disk_id)
        if backing is not None:
            return CowDiskReader(paths.disk(disk_id), paths.alloc(disk_id), Path(backing), size)
        return RawImageReader(paths.disk(disk_id), size)

    def release(self, cycle: SealedCycle) -> None:
        try:
            paths, _ = self._locate(cycle.vm_id)
        except VmNotFound:
            return
        record = paths.cycle_record(cycle.epoch)
        if record is None or record["cycle_id"] != cycle.cycle_id:
            return
        self._act(paths, "release", lambda vm: vm.release(cycle.cycle_id), cycle_id=cycle.cycle_id)

    # -- creation -----------------------------------------------------------------------------
    def _prepare(self, spec: VmSpec) -> tuple[Path, Path]:
        validate_name("VM", spec.name)
        ids = [validate_name("disk", d.disk_id) for d in spec.disks]
        if len(set(ids)) != len(ids):
            raise InvalidInput(f"duplicate disk ids in {ids}")
        if any(d.size <= 0 for d in spec.disks):
            raise InvalidInput("disk sizes must be positive")
        final = self.root / spec.name
        if final.exists() or any(c.name == spec.name for _, c in self._configs()):
            raise Conflict(f"a VM named {spec.name!r} exists")
        tmp = self.root / f".creating-{spec.name}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        return tmp, final

    def _commit(self, spec: VmSpec, tmp: Path, final: Path, disks: tuple[DiskSpec, ...],
                workload: WorkloadSpec | None, backing: dict[str, str] | None = None) -> VmInfo:
        cfg = VmConfig(str(uuid.uuid4()), spec.name, spec.vcpus, spec.memory_mib, spec.nics, disks,
                       workload, dict(backing or {}))
        write_record(tmp / "vm.json", cfg.to_dict())
        try:
            os.rename(tmp, final)  # atomic; fails if the name appeared meanwhile
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise Conflict(f"a VM named {spec.name!r} exists") from e
        return cfg.info(PowerState.STOPPED)

    def create_blank(self, spec: VmSpec, *, workload: WorkloadSpec | None = None) -> VmInfo:
        """Create a stopped VM with empty sparse disks (``Conflict`` if the name exists)."""
        tmp, final = self._prepare(spec)
        try:
            for d in spec.disks:
                with open(tmp / f"{d.disk_id}.img", "wb") as f:
                    f.truncate(d.size)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise classify_os_error(e, f"creating disks of {spec.name}") from e
        return self._commit(spec, tmp, final, spec.disks, workload)

    def create_vm(self, spec: VmSpec, disk_images: dict[str, str]) -> VmInfo:
        """Create a stopped VM from image files, which are MOVED into the VM directory (rename;
        across filesystems a sparse copy, the source then removed). A smaller image is extended
        to the spec's size; a larger one is refused. With no ``spec.disks``, the images' own
        sizes are used."""
        disks = spec.disks or tuple(DiskSpec(validate_name("disk", k), os.path.getsize(v))
                                    for k, v in sorted(disk_images.items()))
        if sorted(d.disk_id for d in disks) != sorted(disk_images):
            raise InvalidInput(f"disk images {sorted(disk_images)} do not match the spec's disks")
        for d in disks:
            try:
                size = os.path.getsize(disk_images[d.disk_id])
            except OSError as e:
                raise classify_os_error(e, f"disk image {disk_images[d.disk_id]}") from e
            if size > d.size:
                raise InvalidInput(f"image of disk {d.disk_id} is {size} bytes, larger than {d.size}")
        spec = VmSpec(spec.name, spec.vcpus, spec.memory_mib, spec.nics, disks)
        tmp, final = self._prepare(spec)
        try:
            for d in disks:
                dst = tmp / f"{d.disk_id}.img"
                move_sparse(Path(disk_images[d.disk_id]), dst)
                with open(dst, "r+b") as f:
                    if os.fstat(f.fileno()).st_size < d.size:
                        f.truncate(d.size)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise classify_os_error(e, f"creating VM {spec.name}") from e
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return self._commit(spec, tmp, final, disks, None)

    def create_vm_cow(self, spec: VmSpec, backing: dict[str, Path]) -> VmInfo:
        """Create a stopped VM whose disks are copy-on-write views of read-only raw images.

        Size-independent: each disk gets an empty sparse overlay and allocation bitmap; no data
        is copied and ``backing`` files are never written (the guest's writes go to the
        overlays, see :mod:`.cow`). A backing image smaller than the spec's disk reads as
        zero-extended; a larger one is refused. With no ``spec.disks`` the images' sizes are
        used. Such a VM cannot be change-tracked (``start_tracking`` raises ``InvalidInput``).

        Not responsible for keeping the backing images unchanged while the VM exists (the
        caller owns them) or for removing them: :meth:`delete_vm` removes only the VM's own
        directory (overlays and bitmaps).
        """
        paths_by_disk: dict[str, Path] = {}
        for k, v in backing.items():
            p = Path(v).absolute()
            if not p.is_file():
                raise InvalidInput(f"backing image {p} of disk {k!r} is not a file")
            paths_by_disk[validate_name("disk", k)] = p
        disks = spec.disks or tuple(DiskSpec(k, p.stat().st_size)
                                    for k, p in sorted(paths_by_disk.items()))
        if sorted(d.disk_id for d in disks) != sorted(paths_by_disk):
            raise InvalidInput(f"backing images {sorted(paths_by_disk)} do not match the spec's "
                               f"disks {sorted(d.disk_id for d in disks)}")
        for d in disks:
            size = paths_by_disk[d.disk_id].stat().st_size
            if size > d.size:
                raise InvalidInput(f"backing image of disk {d.disk_id} is {size} bytes, larger "
                                   f"than {d.size}")
        spec = VmSpec(spec.name, spec.vcpus, spec.memory_mib, spec.nics, disks)
        tmp, final = self._prepare(spec)
        if any(p.is_relative_to(final.absolute()) for p in paths_by_disk.values()):
            shutil.rmtree(tmp, ignore_errors=True)
            raise InvalidInput("a backing image cannot live inside the VM's own directory")
        try:
            tmp_paths = VmPaths(tmp)
            for d in disks:
                create_cow_files(tmp_paths.disk(d.disk_id), tmp_paths.alloc(d.disk_id), d.size)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise classify_os_error(e, f"creating copy-on-write disks of {spec.name}") from e
        return self._commit(spec, tmp, final, disks, None,
                            {d: str(p) for d, p in paths_by_disk.items()})

    def delete_vm(self, vm_id: str) -> None:
        try:
            paths, _ = self._locate(vm_id)
        except VmNotFound:
            return
        self.power_off(vm_id, force=True)
        gone = self.root / f".deleting-{uuid.uuid4().hex[:8]}"
        with suppress(FileNotFoundError):
            os.rename(paths.dir, gone)  # atomic: the VM disappears from listings at once
        shutil.rmtree(gone, ignore_errors=True)
