"""The QEMU/KVM hypervisor driver: VMs as QEMU processes, change tracking with persistent
dirty bitmaps, frozen views by fleecing, reads over NBD.

A VM is a directory ``root/<name>/`` (:mod:`.layout`) with a JSON config and one qcow2 per
disk. Its disks are held by one *runner* (:mod:`.runner`): the VM's own
``qemu-system-x86_64`` when it runs, or a ``qemu-storage-daemon`` started on demand when the
VM is stopped but its disks are needed (seal, read, bitmaps). Every tracking operation is QMP
on the runner, under a per-VM lock (threads and processes), on a short-lived QMP connection
(QEMU's monitor serves one client at a time, and a restarted driver must get in).

Tracking state is persisted in the VM directory so an engine or agent restart finds it again:
``tracking.json`` (epoch, the recording bitmap, whether the epoch's base cycle was released, a
seal in progress) and ``cycle.json`` (the sealed cycle: its frozen views and changed extents,
and the runner token that holds the views). See ``design.md`` for the invariants.

Responsible for: the :class:`~drsite.hypervisors.contract.HypervisorDriver` contract (with
``find_vm``/``create_vm_cow`` for failover). Not responsible for: policy (when to seal, what to
ship, when to resync), the vault's database, networking of VMs (NICs are recorded in the
config, not wired), or libvirt.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict
from pathlib import Path
from typing import Any

from drsite.core.errors import (
    Busy,
    Conflict,
    DrsiteError,
    InvalidInput,
    NotFound,
    PermanentError,
    TrackingLost,
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
from drsite.fsutil import flock_exclusive, read_record, write_record
from drsite.hypervisors.contract import DiskReader
from drsite.hypervisors.qemu import hold as holds
from drsite.hypervisors.qemu import syncmirror
from drsite.hypervisors.qemu.guest_agent import GuestAgent
from drsite.hypervisors.qemu.layout import QemuDisk, QemuVmConfig, VmDir
from drsite.hypervisors.qemu.nbd import NbdClient
from drsite.hypervisors.qemu.qmp import QmpClient
from drsite.hypervisors.qemu.readers import NbdDiskReader
from drsite.hypervisors.qemu.runner import (
    Runner,
    connect_runner,
    current_runner,
    kill_runner,
    quit_runner,
    start_runner,
    wait_gone,
)
from drsite.hypervisors.qemu.tools import run_tool
from drsite.hypervisors.qemu.tracking import BitmapCycle, FrozenView
from drsite.imagefile import move_sparse

log = logging.getLogger(__name__)

BITMAP_PREFIX = "drsite-"
LOCK_TIMEOUT = 120.0

# one lock per VM directory for every driver object of this process (a fresh driver after an
# "engine restart" in tests shares it), plus an flock on the directory's .lock for other
# processes; the depth counter makes the pair re-entrant for the owning thread
_registry = threading.Lock()
_vm_locks: dict[Path, threading.RLock] = {}
_lock_fds: dict[Path, tuple[int, int]] = {}


@contextmanager
def _vm_lock(paths: VmDir) -> Iterator[None]:
    with _registry:
        lk = _vm_locks.setdefault(paths.dir, threading.RLock())
    with lk:
        fd, depth = _lock_fds.get(paths.dir, (-1, 0))
        if depth == 0:
            try:
                fd = os.open(paths.lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except FileNotFoundError:
                raise VmNotFound(f"VM directory {paths.dir} is gone") from None
            if not flock_exclusive(fd, LOCK_TIMEOUT):
                os.close(fd)
                raise Busy(f"VM in {paths.dir} is locked by another process")
        _lock_fds[paths.dir] = (fd, depth + 1)
        try:
            yield
        finally:
            fd, depth = _lock_fds[paths.dir]
            if depth == 1:
                del _lock_fds[paths.dir]
                os.close(fd)
            else:
                _lock_fds[paths.dir] = (fd, depth - 1)


def _view_to_dict(disk_id: str, v: FrozenView) -> dict[str, Any]:
    return {"disk_id": disk_id, **asdict(v)}


def _view_from_dict(d: dict[str, Any]) -> FrozenView:
    return FrozenView(**{k: v for k, v in d.items() if k != "disk_id"})


class QemuHypervisor:
    """:class:`~drsite.hypervisors.contract.HypervisorDriver` for QEMU VMs under ``root``.

    ``start_cpus``: start guests running (real OS images); off by default, the VM then sits in
    ``prelaunch`` with its block layer live (tests, disk-only hosts). ``agent_timeout``: how
    long to wait for qemu-guest-agent before a crash-consistent fallback.
    """

    name = "qemu"

    def __init__(self, root: Path, *, start_cpus: bool = False, agent_timeout: float = 2.0,
                 start_timeout: float = 15.0) -> None:
        self.root = Path(root).absolute()
        self.root.mkdir(parents=True, exist_ok=True)
        self.start_cpus = start_cpus
        self.agent_timeout = agent_timeout
        self.start_timeout = start_timeout
        self._writers: dict[tuple[Path, str], tuple[str, NbdClient]] = {}
        self._writers_lock = threading.RLock()
        self._watchdogs: holds.Watchdogs = {}  # holdwatch process per held VM
        self._sync_watchers: syncmirror.Watchers = {}  # syncwatch process per mirrored VM

    # -- locating VMs -------------------------------------------------------------------------
    def _configs(self) -> list[tuple[VmDir, QemuVmConfig]]:
        out = []
        for d in sorted(self.root.iterdir()):
            if d.name.startswith(".") or not d.is_dir():
                continue
            try:
                raw = read_record(d / "vm.json")
            except PermanentError:
                continue
            if raw is not None and raw.get("kind") == "qemu":
                out.append((VmDir(d), QemuVmConfig.from_dict(raw)))
        return out

    def _locate(self, vm_id: str) -> tuple[VmDir, QemuVmConfig]:
        for paths, cfg in self._configs():
            if cfg.vm_id == vm_id:
                return paths, cfg
        raise VmNotFound(f"no QEMU VM with id {vm_id!r} under {self.root}")

    def vm_dir(self, vm_id: str) -> Path:
        """The directory of a VM (``VmNotFound``)."""
        return self._locate(vm_id)[0].dir

    def find_vm(self, name: str) -> VmInfo:
        """A VM by name (``VmNotFound``)."""
        validate_name("VM", name)
        for paths, cfg in self._configs():
            if cfg.name == name:
                return cfg.info(self._power(paths))
        raise VmNotFound(f"no QEMU VM named {name!r}")

    # -- inventory ----------------------------------------------------------------------------
    def list_vms(self) -> list[VmInfo]:
        return [cfg.info(self._power(p)) for p, cfg in self._configs()]

    def get_vm(self, vm_id: str) -> VmInfo:
        paths, cfg = self._locate(vm_id)
        return cfg.info(self._power(paths))

    def runner(self, vm_id: str) -> Runner | None:
        """The QEMU process holding the VM's disks now, if any (tests, diagnostics)."""
        return current_runner(self._locate(vm_id)[0])

    @staticmethod
    def _power(paths: VmDir) -> PowerState:
        r = current_runner(paths)
        return PowerState.RUNNING if r is not None and r.kind == "vm" else PowerState.STOPPED

    # -- power --------------------------------------------------------------------------------
    def power_on(self, vm_id: str) -> None:
        """Start the VM's QEMU (a no-op if it runs). A storage daemon holding the disks is
        stopped first: frozen views it held are gone (their cycles are carried, see
        ``design.md``)."""
        paths, cfg = self._locate(vm_id)
        with _vm_lock(paths):
            r = current_runner(paths)
            if r is not None and r.kind == "vm":
                return
            if r is not None:
                quit_runner(paths, r)
            self._forget_writers(paths)
            start_runner(paths, cfg, "vm", start_cpus=self.start_cpus,
                         timeout=self.start_timeout)
            paths.stop.unlink(missing_ok=True)

    def power_off(self, vm_id: str, *, force: bool = False, timeout: float = 30.0) -> None:
        """Stop the VM. Graceful: qemu-guest-agent ``guest-shutdown`` or ACPI
        ``system_powerdown`` and wait up to ``timeout`` s for the guest to power off; a VM
        whose CPUs never started (``prelaunch``) has no guest to ask and just quits. Then (or
        with ``force``) QMP ``quit`` — QEMU flushes its disks and stores the bitmaps, so
        tracking stays trusted — and SIGKILL if QEMU does not answer. ``stop.json`` records
        whether the guest stopped cleanly (app-consistency of a stopped VM)."""
        paths, _ = self._locate(vm_id)
        with _vm_lock(paths):
            r = current_runner(paths)
            if r is None or r.kind != "vm":
                return
            self._forget_writers(paths)
            clean = False
            status = ""
            try:
                with QmpClient.connect(str(paths.qmp_socket), timeout=5.0) as q:
                    status = str(q.execute("query-status").get("status", ""))
                    if status == "prelaunch":
                        clean = True
                    elif not force and status == "running" and not self._agent_shutdown(paths):
                        q.execute("system_powerdown")
            except DrsiteError:
                pass
            if not force and status == "running":
                clean = wait_gone(r, timeout)
            quit_runner(paths, r, timeout=10.0)
            write_record(paths.stop, {"clean": clean, "at": time.time()})

    def guest_ready(self, vm_id: str) -> bool:
        """qemu-guest-agent answers a ``guest-sync`` (a VM without an OS never does)."""
        paths, _cfg = self._locate(vm_id)
        if not paths.qga_socket.exists():
            return False
        try:
            with GuestAgent.connect(str(paths.qga_socket), timeout=min(self.agent_timeout, 2.0)) \
                    as ga:
                ga.sync()
            return True
        except DrsiteError:
            return False

    def _agent_shutdown(self, paths: VmDir) -> bool:
        if not paths.qga_socket.exists():
            return False
        try:
            with GuestAgent.connect(str(paths.qga_socket), timeout=self.agent_timeout) as ga:
                ga.shutdown()
            return True
        except DrsiteError:
            return False

    def stop_processes(self, vm_id: str, *, timeout: float = 30.0) -> None:
        """Leave no QEMU process of the VM running (``drsite down``): a graceful power-off of a
        running VM, then any storage daemon holding its disks is quit. Tracking state stays in
        the VM directory (bitmaps in the qcow2s; a sealed cycle whose frozen view goes with
        the daemon is carried into the next one, as after :meth:`power_on`)."""
        paths, _ = self._locate(vm_id)
        self.power_off(vm_id, timeout=timeout)
        with _vm_lock(paths):
            r = current_runner(paths)
            if r is not None:
                self._forget_writers(paths)
                quit_runner(paths, r)

    def kill(self, vm_id: str) -> None:
        """SIGKILL the VM's QEMU (or storage daemon): an unclean stop, as a host crash of the
        process would be. For tests and drills."""
        paths, _ = self._locate(vm_id)
        with _vm_lock(paths):
            r = current_runner(paths)
            if r is not None:
                self._forget_writers(paths)
                kill_runner(r)

    # -- the QMP session ----------------------------------------------------------------------
    @contextmanager
    def _session(self, paths: VmDir, cfg: QemuVmConfig, *, reconcile: bool = True
                 ) -> Iterator[tuple[BitmapCycle, Runner]]:
        """Under the VM lock: the runner (a storage daemon is started if nothing holds the
        disks), a fresh QMP connection, and persisted state made to agree with QEMU's."""
        with _vm_lock(paths):
            r = current_runner(paths)
            if r is None:
                self._forget_writers(paths)
                r = start_runner(paths, cfg, "daemon", timeout=self.start_timeout)
            with connect_runner(paths, r, timeout=self.start_timeout) as q:
                cyc = BitmapCycle(q, paths.fleece_dir, paths.nbd_socket)
                if reconcile:
                    self._reconcile(paths, cfg, cyc, r)
                yield cyc, r

    def _reconcile(self, paths: VmDir, cfg: QemuVmConfig, cyc: BitmapCycle, r: Runner) -> None:
        """Finish or undo what a crash interrupted: a seal without its record is undone (its
        changes folded back), a recorded seal finishes; a cycle whose runner is gone has lost
        its frozen view and is carried into the next (its bitmap merged into the recording
        one), so no change is lost."""
        tr = read_record(paths.tracking)
        if tr is None:
            return
        rec = read_record(paths.cycle)
        sealing = tr.get("sealing")
        if sealing is not None:
            if rec is not None and rec["cycle_id"] == sealing["cycle_id"]:
                tr["bitmap"] = sealing["next"]
            else:
                for i, d in enumerate(cfg.disks):
                    cyc.undo_seal(cyc.view(d.node, tr["bitmap"], sealing["next"],
                                           f"{sealing['cycle_id']}-{i}", 0))
            tr["sealing"] = None
            write_record(paths.tracking, tr)
        if rec is not None and rec.get("runner") != r.token:
            for vd in rec["views"]:
                cyc.carry(_view_from_dict(vd))
            paths.cycle.unlink(missing_ok=True)
            tr.setdefault("notes", []).append(
                f"cycle {rec['cycle_id']} dropped: the QEMU process holding its frozen view "
                "stopped; its changes go with the next cycle")
            write_record(paths.tracking, tr)

    # -- tracking -----------------------------------------------------------------------------
    def start_tracking(self, vm_id: str) -> str:
        """New epoch: drop any sealed cycle, remove every drsite bitmap (consistent or not),
        add a fresh persistent bitmap on every disk. The epoch's first seal is whole disks."""
        paths, cfg = self._locate(vm_id)
        with self._session(paths, cfg) as (cyc, _):
            rec = read_record(paths.cycle)
            if rec is not None:
                for vd in rec["views"]:
                    cyc.discard(_view_from_dict(vd))
                paths.cycle.unlink(missing_ok=True)
            for d in cfg.disks:
                for name in cyc.bitmaps(d.node):
                    if name.startswith(BITMAP_PREFIX):
                        cyc.qmp.execute("block-dirty-bitmap-remove", {"node": d.node,
                                                                      "name": name})
            epoch = uuid.uuid4().hex
            bitmap = f"{BITMAP_PREFIX}{epoch[:12]}-0"
            for d in cfg.disks:
                cyc.start(d.node, bitmap)
            write_record(paths.tracking, {"epoch": epoch, "bitmap": bitmap, "gen": 0,
                                               "base_released": False, "sealing": None,
                                               "notes": []})
            return epoch

    def _bitmap_problems(self, cfg: QemuVmConfig, cyc: BitmapCycle, bitmap: str
                         ) -> tuple[list[str], dict[str, int]]:
        reasons: list[str] = []
        counts: dict[str, int] = {}
        for d in cfg.disks:
            b = cyc.bitmaps(d.node).get(bitmap)
            state = cyc.bitmap_state(d.node, bitmap) if b is not None else "missing"
            if state != "active":
                why = {"inconsistent": "came back inconsistent (QEMU stopped uncleanly)",
                       "missing": "is missing", "disabled": "is not recording"}.get(state, state)
                reasons.append(f"disk {d.disk_id}: dirty bitmap {bitmap} {why}")
            else:
                assert b is not None
                counts[d.disk_id] = int(b.get("count", 0))
        return reasons, counts

    def tracking_status(self, vm_id: str) -> TrackingStatus:
        """ACTIVE with the dirty bytes of each disk's recording bitmap, or UNTRUSTED when a
        bitmap is missing, inconsistent or not recording (only a resync is safe then)."""
        paths, cfg = self._locate(vm_id)
        if not paths.tracking.exists():
            return TrackingStatus(TrackingState.NOT_STARTED)
        with self._session(paths, cfg) as (cyc, _):
            tr = read_record(paths.tracking)
            if tr is None:
                return TrackingStatus(TrackingState.NOT_STARTED)
            reasons, counts = self._bitmap_problems(cfg, cyc, tr["bitmap"])
            if reasons:
                return TrackingStatus(TrackingState.UNTRUSTED, tr["epoch"], "; ".join(reasons),
                                      {d.disk_id: d.size for d in cfg.disks})
            return TrackingStatus(TrackingState.ACTIVE, tr["epoch"], "", counts)

    def seal(self, vm_id: str, *, app_consistent: bool = False) -> SealedCycle:
        """Rotate every disk's bitmap and freeze every disk in ONE QMP transaction.

        Raises ``TrackingLost`` without an epoch or when a bitmap is not trusted,
        ``Conflict`` while a cycle is unreleased. With ``app_consistent`` the guest's file
        systems are frozen through qemu-guest-agent around the transaction; without an
        answering agent the cycle is crash-consistent and ``note`` says why.

        Synchronous mode (``set_sync``): the seal begins a mirror run on the configured
        overlay when none runs, and its ``sync_mark`` names the run (``syncmirror``).
        """
        paths, _ = self._locate(vm_id)
        with _vm_lock(paths):
            conf = self._sync_to_begin(paths)
            return self._seal(vm_id, app_consistent=app_consistent, sync_begin=conf)

    def _sync_to_begin(self, paths: VmDir) -> dict[str, Any] | None:
        """The sync configuration whose overlay this seal should begin a run on: synchronous
        mode, the VM running, its overlay not used yet, no healthy run, and the recovery
        site answering a probe (within the budget, before the seal's session: a
        ``blockdev-add`` to a silent site would block QEMU's main loop)."""
        conf = read_record(paths.sync_config)
        r = current_runner(paths)
        if conf is None or conf.get("used") or r is None or r.kind != "vm":
            return None
        with QmpClient.connect(str(paths.qmp_socket), timeout=10.0) as q:
            if syncmirror.healthy(q, paths, r) is not None:
                return None
        why = syncmirror.probe(conf, int(conf["budget_ms"]) / 1000.0)
        if why is not None:
            syncmirror.not_begun(paths, conf, why)
            return None
        return conf

    def _seal(self, vm_id: str, *, app_consistent: bool, extra_notes: tuple[str, ...] = (),
              sync_begin: dict[str, Any] | None = None,
              after_cut: Callable[[QmpClient], None] | None = None) -> SealedCycle:
        """The seal (see :meth:`seal`). ``after_cut`` runs on the session's QMP connection
        right after the transaction that is the cut, before the changed extents are read and
        the record written: what a held guest needs no longer waits for that (a barrier's
        hold ends there)."""
        paths, cfg = self._locate(vm_id)
        with self._session(paths, cfg) as (cyc, runner):
            tr = read_record(paths.tracking)
            if tr is None:
                raise TrackingLost(f"VM {cfg.name}: change tracking was not started")
            if paths.cycle.exists():
                rec = read_record(paths.cycle) or {}
                raise Conflict(f"VM {cfg.name} has unreleased cycle {rec.get('cycle_id')}",
                               hint="Finish the pending cycle (ship and release it) first.")
            reasons, _ = self._bitmap_problems(cfg, cyc, tr["bitmap"])
            if reasons:
                raise TrackingLost(f"VM {cfg.name}: " + "; ".join(reasons))
            cycle_id = uuid.uuid4().hex[:16]
            gen = int(tr.get("gen", 0)) + 1
            nxt = f"{BITMAP_PREFIX}{tr['epoch'][:12]}-{gen}"
            tr["sealing"] = {"cycle_id": cycle_id, "next": nxt}
            write_record(paths.tracking, tr)
            notes = [*tr.get("notes", []), *extra_notes]
            consistency = Consistency.CRASH
            # synchronous mode: a run begins before the transaction (its mirror must sit on
            # the root node, which a frozen view's fleece filter is not), and before the
            # guest's freeze (beginning may take a while). An overlay begun before a seal
            # holds every write after it: point + overlay = the disks.
            mark = self._sync_mark(cyc.qmp, paths, cfg, runner, sync_begin, notes)
            agent: GuestAgent | None = None
            if app_consistent:
                agent, consistency, note = self._quiesce(paths, cfg, runner)
                if note:
                    notes.append(note)
            views: list[FrozenView] = []
            try:
                try:
                    views = cyc.seal_many([(d.node, tr["bitmap"], nxt) for d in cfg.disks],
                                          cycle_id)
                    sealed_at = time.time()
                    if after_cut is not None:
                        try:
                            after_cut(cyc.qmp)
                        except (DrsiteError, OSError) as e:  # the cut stands; the caller's end of
                            notes.append(f"after the cut: {e}")  # the hold tries again
                            log.warning("VM %s: after the cut: %s", cfg.name, e)
                finally:
                    if agent is not None:
                        try:
                            agent.thaw()
                        except DrsiteError as e:
                            notes.append(f"guest agent thaw failed: {e}")
                        agent.close()
                full = not tr.get("base_released", False)
                changed: dict[str, ExtentList] = {}
                for d, v in zip(cfg.disks, views, strict=True):
                    if full:
                        changed[d.disk_id] = ExtentList.of([(0, v.size)])
                    else:
                        with cyc.open_reader(v) as c:
                            changed[d.disk_id] = c.dirty_extents(v.bitmap).clip(v.size)
                if full:
                    notes.insert(0, "first cycle of the epoch: whole disks")
                rec = {"cycle_id": cycle_id, "vm_id": cfg.vm_id, "epoch": tr["epoch"],
                       "sealed_at": sealed_at, "consistency": consistency.value,
                       "notes": notes, "full": full, "runner": runner.token,
                       "views": [_view_to_dict(d.disk_id, v)
                                 for d, v in zip(cfg.disks, views, strict=True)],
                       "changed": {k: e.to_pairs() for k, e in changed.items()},
                       "sync": mark}
                write_record(paths.cycle, rec)  # the commit point of the seal
            except BaseException:
                # seal_many undoes its own half-done views before it raises, but that undo
                # fails too when the QMP connection is gone (a transaction applied whose reply
                # timed out): so undo by the views' names again (idempotent) and clear
                # "sealing" only when every undo worked; else the next session's reconcile
                # folds the bitmaps back (no change is lost, no TrackingLost)
                undone = True
                for v in views or [cyc.view(d.node, tr["bitmap"], nxt, f"{cycle_id}-{i}", 0)
                                   for i, d in enumerate(cfg.disks)]:
                    try:
                        cyc.undo_seal(v)
                    except (DrsiteError, OSError):
                        undone = False
                if undone:
                    tr["sealing"] = None
                    write_record(paths.tracking, tr)
                raise
            tr.update(bitmap=nxt, gen=gen, sealing=None, notes=[])
            write_record(paths.tracking, tr)
            return self._cycle(rec)

    def _sync_mark(self, q: QmpClient, paths: VmDir, cfg: QemuVmConfig, runner: Runner,
                   begin: dict[str, Any] | None, notes: list[str]) -> dict[str, Any] | None:
        """The seal's instant in synchronous mode: a run begun here (``seq`` 0), the next
        seal of a healthy run, or None (asynchronous). A run that cannot begin leaves the
        seal as it is (the status says why)."""
        if begin is not None:
            try:
                run = syncmirror.begin(q, paths, cfg, begin, runner, self._sync_watchers)
            except DrsiteError as e:
                syncmirror.not_begun(paths, begin, f"the mirror could not begin: {e}")
                notes.append(f"sync mirror not begun: {e}")
                return None
            return {"stream": run["stream"], "seq": 0}
        if runner.kind != "vm" or not paths.sync_config.exists():
            return None
        return syncmirror.next_mark(q, paths, runner)

    # -- synchronous mode (contract.SyncMirrorHost; the mechanics in syncmirror.py) -----------
    def set_sync(self, vm_id: str, config: dict[str, Any] | None) -> None:
        """Enter (``config``: ``syncmirror.check_config``'s fields: the recovery site's
        overlay export per disk, its ``stream``, the budget, this host's certificate files)
        or leave (None) synchronous mode. Leaving ends the mirror run now; entering takes
        effect at the next seal (a running healthy run goes on until it ends)."""
        paths, cfg = self._locate(vm_id)
        with _vm_lock(paths):
            if config is None:
                r = current_runner(paths)
                if r is not None and r.kind == "vm":
                    with QmpClient.connect(str(paths.qmp_socket), timeout=10.0) as q:
                        syncmirror.end(q, paths, self._sync_watchers)
                else:
                    syncmirror.end(None, paths, self._sync_watchers)
                syncmirror.store_config(paths, None)
                paths.sync_watch.unlink(missing_ok=True)
                return
            syncmirror.store_config(paths, syncmirror.check_config(config, cfg))

    def sync_status(self, vm_id: str) -> dict[str, Any] | None:
        """The mirror's state (``syncmirror.status``), or None (not in synchronous mode, or
        the VM is off)."""
        paths, _ = self._locate(vm_id)
        with _vm_lock(paths):
            if not paths.sync_config.exists():
                return None
            r = current_runner(paths)
            if r is None or r.kind != "vm":
                return None
            with QmpClient.connect(str(paths.qmp_socket), timeout=10.0) as q:
                return syncmirror.status(q, paths, r)

    def sync_disks(self, vm_id: str) -> dict[str, int]:
        """Disk id → size: what the recovery site's overlay of this VM must hold."""
        _, cfg = self._locate(vm_id)
        return {d.disk_id: d.size for d in cfg.disks}

    # -- group barrier (contract.WriteHolder; the mechanics in hold.py) -------------------------
    def hold(self, vm_id: str, barrier_id: str, *, timeout_s: float,
             app_consistent: bool = False) -> dict[str, object]:
        """Hold the guest's writes for a group barrier: QMP ``stop`` until :meth:`seal_held`
        or :meth:`unhold` resume it (``cont``), never past ``timeout_s`` (a ``holdwatch``
        process keeps the bound even when this process is stopped or killed). A VM in
        ``prelaunch`` is held without a stop; an off VM, or one paused by someone else, is not
        held (its seal reports ``held: false``). ``app_consistent`` is not honoured (a stopped
        guest cannot run its freeze): the member point is crash-consistent with a note, which
        keeps the cut consistent. Writes through :meth:`write` (the NBD test writer) are not
        guest I/O and are not held."""
        if not 0 < timeout_s <= 60:
            raise InvalidInput("a write hold lasts more than 0 and at most 60 seconds")
        paths, cfg = self._locate(vm_id)
        with _vm_lock(paths):
            return holds.begin(paths, cfg.name, barrier_id, timeout_s, app_consistent,
                               self._watchdogs)

    def seal_held(self, vm_id: str, barrier_id: str, *, app_consistent: bool = False
                  ) -> tuple[SealedCycle, dict[str, object]]:
        """Seal (one QMP transaction, as :meth:`seal`) while the VM is held, then resume it;
        ``held`` is True only when the hold of ``barrier_id`` lasted without a break."""
        paths, _ = self._locate(vm_id)
        with _vm_lock(paths):
            mine = holds.recorded(paths, barrier_id)
            held = mine is not None and holds.unbroken(paths, mine)
            notes: tuple[str, ...] = ()
            if not held:
                notes = (f"group barrier {barrier_id}: the write hold had ended; a per-VM "
                         "point",)
            elif app_consistent or (mine or {}).get("app_consistent"):
                notes = ("held by QMP stop, without the guest's freeze: crash-consistent",)
            resumed: list[float] = []

            def resume(q: QmpClient) -> None:
                # the cut is taken: the guest runs on while the seal reads its changed extents
                # and writes its record (the hold's record and watchdog end below)
                if mine is not None:
                    holds.resume(q, paths, mine)
                    resumed.append(time.monotonic())

            try:
                cycle = self._seal(vm_id, app_consistent=app_consistent and not held,
                                   extra_notes=notes, sync_begin=self._sync_to_begin(paths),
                                   after_cut=resume)
            finally:
                if mine is not None:
                    holds.end(paths, mine, self._watchdogs)
                    resumed.append(time.monotonic())
        paused = resumed[0] - float(mine["started"]) if mine is not None else 0.0
        return cycle, {"id": barrier_id, "held": held, "paused_s": paused}

    def unhold(self, vm_id: str, barrier_id: str) -> bool:
        """End the hold of ``barrier_id`` without sealing (resume the VM); False if none."""
        paths, _ = self._locate(vm_id)
        with _vm_lock(paths):
            rec = holds.recorded(paths, barrier_id)
            if rec is None:
                return False
            holds.end(paths, rec, self._watchdogs)
            return True

    def _quiesce(self, paths: VmDir, cfg: QemuVmConfig, runner: Runner
                 ) -> tuple[GuestAgent | None, Consistency, str]:
        """Freeze the guest's file systems (the returned agent must thaw them). A stopped VM
        is quiesced iff its guest shut down cleanly."""
        if runner.kind != "vm":
            stop = read_record(paths.stop) or {}
            if stop.get("clean"):
                return None, Consistency.APP, "VM was shut down cleanly"
            return None, Consistency.CRASH, "VM was not shut down cleanly: crash-consistent"
        if not cfg.guest_agent and not paths.qga_socket.exists():
            return None, Consistency.CRASH, "VM has no guest agent: crash-consistent"
        try:
            agent = GuestAgent.connect(str(paths.qga_socket), timeout=self.agent_timeout)
        except DrsiteError as e:
            return None, Consistency.CRASH, f"guest agent did not answer ({e}): crash-consistent"
        try:
            n = agent.freeze()
        except DrsiteError as e:
            with suppress(DrsiteError):
                agent.thaw()
            agent.close()
            return None, Consistency.CRASH, f"guest fsfreeze failed ({e}): crash-consistent"
        return agent, Consistency.APP, f"guest agent froze {n} file system(s)"

    @staticmethod
    def _cycle(rec: dict[str, Any]) -> SealedCycle:
        changed = {k: ExtentList.of([(int(s), int(n)) for s, n in v])
                   for k, v in rec["changed"].items()}
        sizes = {vd["disk_id"]: int(vd["size"]) for vd in rec["views"]}
        return SealedCycle(rec["cycle_id"], rec["vm_id"], rec["epoch"], float(rec["sealed_at"]),
                           Consistency(rec["consistency"]), changed, sizes, True,
                           "; ".join(rec.get("notes", [])), rec.get("sync"))

    def _live_cycle(self, paths: VmDir) -> dict[str, Any] | None:
        rec = read_record(paths.cycle)
        if rec is None:
            return None
        r = current_runner(paths)
        if r is None or r.token != rec.get("runner"):
            return None  # its frozen view died with its QEMU: carried at the next session
        return rec

    def set_change_log_limit(self, vm_id: str, max_bytes: int) -> None:
        """QEMU tracks with dirty bitmaps, which do not grow with writes: nothing to cap
        (``VmNotFound`` for an unknown VM, like every call)."""
        self._locate(vm_id)

    def pending_cycle(self, vm_id: str) -> SealedCycle | None:
        """The sealed cycle whose frozen view is still held by a live QEMU, else None."""
        paths, _ = self._locate(vm_id)
        with _vm_lock(paths):
            rec = self._live_cycle(paths)
            return self._cycle(rec) if rec is not None else None

    def open_cycle_reader(self, cycle: SealedCycle, disk_id: str) -> DiskReader:
        """An NBD reader of the cycle's frozen view of ``disk_id`` (``NotFound`` once the
        cycle is released or its view is gone)."""
        paths, cfg = self._locate(cycle.vm_id)
        cfg.disk(disk_id)
        with _vm_lock(paths):
            rec = self._live_cycle(paths)
            if rec is None or rec["cycle_id"] != cycle.cycle_id:
                raise NotFound(f"cycle {cycle.cycle_id} was released or its frozen view is gone")
            for vd in rec["views"]:
                if vd["disk_id"] == disk_id:
                    v = _view_from_dict(vd)
                    return NbdDiskReader(v.nbd_socket, v.export_name, v.size)
        raise NotFound(f"cycle {cycle.cycle_id} has no view of disk {disk_id}")

    def open_live_reader(self, vm_id: str, disk_id: str) -> DiskReader:
        """A read-only NBD export of the disk's live node (removed when the reader closes)."""
        paths, cfg = self._locate(vm_id)
        disk = cfg.disk(disk_id)
        export = f"live-{uuid.uuid4().hex[:12]}"
        with self._session(paths, cfg) as (cyc, r):
            cyc.ensure_nbd_server()
            size = cyc.node_size(disk.node)
            cyc.qmp.execute("block-export-add", {"type": "nbd", "id": export,
                                                 "node-name": disk.node, "name": export,
                                                 "writable": False})
        try:
            return NbdDiskReader(str(paths.nbd_socket), export, size,
                                 on_close=lambda: self._drop_export(paths, r, export))
        except BaseException:
            self._drop_export(paths, r, export)
            raise

    def _drop_export(self, paths: VmDir, r: Runner, export: str) -> None:
        with suppress(DrsiteError), _vm_lock(paths):
            cur = current_runner(paths)
            if cur is None or cur.token != r.token:
                return
            with QmpClient.connect(str(paths.qmp_socket), timeout=10.0) as q:
                q.take_events("BLOCK_EXPORT_DELETED")
                q.execute("block-export-del", {"id": export, "mode": "hard"})
                q.wait_event("BLOCK_EXPORT_DELETED", timeout=30,
                             match=lambda d: d.get("id") == export)
            self._park(paths)

    def release(self, cycle: SealedCycle) -> None:
        """Remove the cycle's exports, fleece jobs and overlays and its (old) bitmaps; mark
        the epoch's base released after its first cycle. Idempotent."""
        try:
            paths, cfg = self._locate(cycle.vm_id)
        except VmNotFound:
            return
        with _vm_lock(paths):
            rec = read_record(paths.cycle)
            if rec is None or rec["cycle_id"] != cycle.cycle_id:
                return
            with self._session(paths, cfg, reconcile=False) as (cyc, _):
                for vd in rec["views"]:
                    cyc.release(_view_from_dict(vd))
                if rec.get("full"):
                    tr = read_record(paths.tracking)
                    if tr is not None and tr["epoch"] == rec["epoch"]:
                        tr["base_released"] = True
                        write_record(paths.tracking, tr)
                paths.cycle.unlink(missing_ok=True)
            self._park(paths)

    def _park(self, paths: VmDir) -> None:
        """Stop a storage daemon that holds nothing anymore (no cycle, no reader export): a
        stopped VM keeps no QEMU process around between cycles."""
        r = current_runner(paths)
        if r is None or r.kind != "daemon" or paths.cycle.exists():
            return
        with QmpClient.connect(str(paths.qmp_socket), timeout=10.0) as q:
            exports = [e for e in q.execute("query-block-exports")
                       if not str(e.get("id", "")).startswith("guest-")]
        if not exports:
            self._forget_writers(paths)
            quit_runner(paths, r)

    # -- guest-side writes (tests, demo) --------------------------------------------------------
    def write(self, vm_id: str, disk_id: str, offset: int, data: bytes) -> None:
        """A write through QEMU's block layer (a writable NBD export of the disk's node, so
        the dirty bitmaps see it like a guest write). For tests and the demo, not a data
        path."""
        paths, cfg = self._locate(vm_id)
        disk = cfg.disk(disk_id)
        key = (paths.dir, disk_id)
        with self._writers_lock:  # fast path: a connection to the current runner
            cached = self._writers.get(key)
            r = current_runner(paths)
            if cached is not None and r is not None and cached[0] == r.token:
                cached[1].write(offset, data)
                return
        with _vm_lock(paths), self._writers_lock:  # lock order: VM, then writers
            old = self._writers.pop(key, None)
            if old is not None:
                old[1].close()
            export = f"guest-{disk.node}"
            with self._session(paths, cfg) as (cyc, r2):
                cyc.ensure_nbd_server()
                exports = {e.get("id") for e in cyc.qmp.execute("query-block-exports")}
                if export not in exports:
                    # while a frozen view lives, writes must enter above its copy-before-write
                    # filter (the export moves down to the disk's node when the filter goes)
                    top = disk.node
                    rec = self._live_cycle(paths)
                    for vd in (rec or {}).get("views", []):
                        if vd["disk_id"] == disk_id:
                            top = _view_from_dict(vd).filter_node
                    cyc.qmp.execute("block-export-add", {
                        "type": "nbd", "id": export, "node-name": top,
                        "name": export, "writable": True})
            client = NbdClient.connect_unix(str(paths.nbd_socket), export)
            self._writers[key] = (r2.token, client)
            client.write(offset, data)

    def flush(self, vm_id: str) -> None:
        """Flush the test writer connections of the VM (see :meth:`write`)."""
        paths, _ = self._locate(vm_id)
        with self._writers_lock:
            for (d, _), (_, c) in self._writers.items():
                if d == paths.dir:
                    c.flush()

    def _forget_writers(self, paths: VmDir) -> None:
        with self._writers_lock:
            for key in [k for k in self._writers if k[0] == paths.dir]:
                self._writers.pop(key)[1].close()

    # -- creation -----------------------------------------------------------------------------
    def _reserve(self, spec: VmSpec) -> VmDir:
        validate_name("VM", spec.name)
        ids = [validate_name("disk", d.disk_id) for d in spec.disks]
        if len(set(ids)) != len(ids):
            raise InvalidInput(f"duplicate disk ids in {ids}")
        if any(d.size <= 0 for d in spec.disks):
            raise InvalidInput("disk sizes must be positive")
        if any(c.name == spec.name for _, c in self._configs()):
            raise Conflict(f"a VM named {spec.name!r} exists")
        final = self.root / spec.name
        try:
            final.mkdir()  # atomic: a concurrent creator of the same name fails here
        except FileExistsError:
            raise Conflict(f"a VM named {spec.name!r} exists") from None
        return VmDir(final)

    def _commit(self, paths: VmDir, spec: VmSpec, disks: list[QemuDisk], *,
                guest_agent: bool = True) -> VmInfo:
        cfg = QemuVmConfig(str(uuid.uuid4()), spec.name, spec.vcpus, spec.memory_mib,
                           spec.nics, tuple(disks), guest_agent)
        write_record(paths.config, cfg.to_dict())  # the VM exists from here on
        return cfg.info(PowerState.STOPPED)

    def create_blank(self, spec: VmSpec, *, guest_agent: bool = True) -> VmInfo:
        """Create a stopped VM with empty qcow2 disks (``Conflict`` if the name exists).
        ``guest_agent``: give it a virtio-serial port for qemu-guest-agent."""
        paths = self._reserve(spec)
        try:
            for d in spec.disks:
                run_tool(["qemu-img", "create", "-q", "-f", "qcow2", str(paths.qcow2(d.disk_id)),
                          str(d.size)])
            return self._commit(paths, spec, [QemuDisk(d.disk_id, d.size, f"drv{i}")
                                              for i, d in enumerate(spec.disks)],
                                guest_agent=guest_agent)
        except BaseException:
            shutil.rmtree(paths.dir, ignore_errors=True)
            raise

    def create_vm(self, spec: VmSpec, disk_images: dict[str, str]) -> VmInfo:
        """Create a stopped VM from image files, MOVED into the VM directory (rename; across
        file systems a sparse copy, then the source is removed).

        A raw image stays raw: it becomes the external data file of a small qcow2
        (``data_file_raw=on``) that holds the bitmaps, so nothing is converted or copied. A
        qcow2 image is used as is. A smaller image is extended to the spec's size; a larger
        one is refused. With no ``spec.disks`` the images' own sizes are used."""
        infos: dict[str, tuple[str, int]] = {}
        for k, v in disk_images.items():
            infos[validate_name("disk", k)] = _image_info(Path(v))
        disks = spec.disks or tuple(DiskSpec(k, n) for k, (_, n) in sorted(infos.items()))
        if sorted(d.disk_id for d in disks) != sorted(infos):
            raise InvalidInput(f"disk images {sorted(infos)} do not match the spec's disks")
        for d in disks:
            if infos[d.disk_id][1] > d.size:
                raise InvalidInput(f"image of disk {d.disk_id} is {infos[d.disk_id][1]} bytes, "
                                   f"larger than {d.size}")
        spec = VmSpec(spec.name, spec.vcpus, spec.memory_mib, spec.nics, tuple(disks))
        paths = self._reserve(spec)
        try:
            for d in disks:
                fmt, size = infos[d.disk_id]
                src = Path(disk_images[d.disk_id])
                if fmt == "qcow2":
                    move_sparse(src, paths.qcow2(d.disk_id))
                    if size < d.size:
                        run_tool(["qemu-img", "resize", "-q", "-f", "qcow2",
                                  str(paths.qcow2(d.disk_id)), str(d.size)])
                    continue
                raw = paths.raw(d.disk_id)
                # qemu-img creates (truncates) the data file: let it, then put the image there
                run_tool(["qemu-img", "create", "-q", "-f", "qcow2", "-o",
                          f"data_file={raw},data_file_raw=on", str(paths.qcow2(d.disk_id)),
                          str(d.size)])
                move_sparse(src, raw)
                if size < d.size:
                    os.truncate(raw, d.size)
            return self._commit(paths, spec, [QemuDisk(d.disk_id, d.size, f"drv{i}")
                                              for i, d in enumerate(disks)])
        except OSError as e:
            shutil.rmtree(paths.dir, ignore_errors=True)
            raise classify_os_error(e, f"creating VM {spec.name}") from e
        except BaseException:
            shutil.rmtree(paths.dir, ignore_errors=True)
            raise

    def create_vm_cow(self, spec: VmSpec, backing: dict[str, Path]) -> VmInfo:
        """Create a stopped VM whose disks are qcow2 overlays over read-only images (raw or
        qcow2): instant and size-independent, nothing is copied and ``backing`` files are
        never written. A smaller backing image reads as zero-extended; a larger one is
        refused. Such a VM can be change-tracked (the bitmaps live in the overlays).

        Not responsible for keeping the backing images unchanged while the VM exists, or for
        removing them: :meth:`delete_vm` removes only the VM's own directory."""
        paths_by_disk: dict[str, Path] = {}
        infos: dict[str, tuple[str, int]] = {}
        for k, v in backing.items():
            p = Path(v).absolute()
            if not p.is_file():
                raise InvalidInput(f"backing image {p} of disk {k!r} is not a file")
            paths_by_disk[validate_name("disk", k)] = p
            infos[k] = _image_info(p)
        disks = spec.disks or tuple(DiskSpec(k, infos[k][1]) for k in sorted(paths_by_disk))
        if sorted(d.disk_id for d in disks) != sorted(paths_by_disk):
            raise InvalidInput(f"backing images {sorted(paths_by_disk)} do not match the spec's "
                               f"disks {sorted(d.disk_id for d in disks)}")
        for d in disks:
            if infos[d.disk_id][1] > d.size:
                raise InvalidInput(f"backing image of disk {d.disk_id} is {infos[d.disk_id][1]} "
                                   f"bytes, larger than {d.size}")
        spec = VmSpec(spec.name, spec.vcpus, spec.memory_mib, spec.nics, tuple(disks))
        if any(p.is_relative_to((self.root / spec.name).absolute())
               for p in paths_by_disk.values()):
            raise InvalidInput("a backing image cannot live inside the VM's own directory")
        paths = self._reserve(spec)
        try:
            qdisks = []
            for i, d in enumerate(disks):
                b = paths_by_disk[d.disk_id]
                run_tool(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(b), "-F",
                          infos[d.disk_id][0], str(paths.qcow2(d.disk_id)), str(d.size)])
                qdisks.append(QemuDisk(d.disk_id, d.size, f"drv{i}", str(b)))
            return self._commit(paths, spec, qdisks)
        except BaseException:
            shutil.rmtree(paths.dir, ignore_errors=True)
            raise

    def delete_vm(self, vm_id: str) -> None:
        """Stop the VM's QEMU (and any storage daemon) and remove its directory; idempotent.
        Backing images of copy-on-write disks are left alone."""
        try:
            paths, _ = self._locate(vm_id)
        except VmNotFound:
            return
        with _vm_lock(paths):
            self._forget_writers(paths)
            r = current_runner(paths)
            if r is not None:
                quit_runner(paths, r, timeout=5.0)
            gone = self.root / f".deleting-{uuid.uuid4().hex[:8]}"
            with suppress(FileNotFoundError):
                os.rename(paths.dir, gone)  # atomic: the VM disappears from listings at once
            shutil.rmtree(paths.run_dir, ignore_errors=True)
        shutil.rmtree(gone, ignore_errors=True)

    def close(self) -> None:
        """Close cached connections (QEMU processes keep running)."""
        with self._writers_lock:
            for _, c in self._writers.values():
                c.close()
            self._writers.clear()


def _image_info(path: Path) -> tuple[str, int]:
    """``(format, virtual size)`` of an image file (raw or qcow2)."""
    if not path.is_file():
        raise InvalidInput(f"disk image {path} is not a file")
    info = json.loads(run_tool(["qemu-img", "info", "--output=json", "-U", str(path)]))
    fmt = str(info.get("format", "raw"))
    if fmt not in ("raw", "qcow2"):
        raise InvalidInput(f"disk image {path} is {fmt}; only raw and qcow2 are supported")
    return fmt, int(info["virtual-size"])
