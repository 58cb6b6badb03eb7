"""The runtime of a running file VM (used by the guest process and by in-process guests).

A :class:`GuestRuntime` owns an open :class:`FileVm`, serves its control socket, runs the
workload from ``vm.json`` and writes ``guest.pid``. The process form stops on SIGTERM/SIGINT or
the ``shutdown`` command (workload stops, logs and disks are flushed, logs marked clean). The
same runtime also runs inside a test process (:meth:`FileHypervisor.guest`).

Responsible for: the life cycle of a running VM. Not responsible for: starting/stopping itself
(the driver does) or any policy.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from contextlib import suppress
from typing import Any

from drsite.core.errors import InvalidInput
from drsite.fsutil import atomic_write_bytes, read_record
from drsite.hypervisors.file.control import ControlServer, decode_data
from drsite.hypervisors.file.syncmirror import SyncConfig, SyncMirror
from drsite.hypervisors.file.vm import FileVm
from drsite.hypervisors.file.workload import Workload, WorkloadSpec


class GuestRuntime:
    """A running VM: FileVm + control server + workload (+ pid file)."""

    def __init__(self, vm: FileVm) -> None:
        self.vm = vm
        self.stopped = threading.Event()
        self.workload: Workload | None = None
        self._life = threading.Lock()
        self.server = ControlServer(vm.paths.socket_address(), {
            "ping": lambda r: {"pong": True, "pid": os.getpid()},
            "status": lambda r: self.status(),
            "seal": lambda r: vm.seal(app_consistent=bool(r.get("app_consistent", False))),
            "release": lambda r: vm.release(str(r["cycle_id"])),
            "start_tracking": lambda r: vm.start_tracking(r.get("epoch")),
            "hold": lambda r: vm.hold(str(r["barrier_id"]), float(r["timeout_s"]),
                                      app_consistent=bool(r.get("app_consistent", False))),
            "seal_held": lambda r: vm.seal_held(str(r["barrier_id"]),
                                                app_consistent=bool(r.get("app_consistent"))),
            "unhold": lambda r: vm.unhold(str(r["barrier_id"])),
            "cut": lambda r: vm.cut(str(r["barrier_id"]), hold_at=float(r["hold_at"]),
                                    hold_by=float(r["hold_by"]), seal_at=float(r["seal_at"]),
                                    timeout_s=float(r["timeout_s"]),
                                    clock_id=str(r["clock_id"])),
            "freeze": lambda r: self._freeze(),
            "thaw": lambda r: vm.thaw(),
            "write": self._write,
            "flush": lambda r: vm.flush(),
            "workload": lambda r: self.set_workload(
                WorkloadSpec.from_dict(r["spec"]) if r.get("spec") else None),
            "shutdown": lambda r: self._shutdown_async(),
            "sync_config": lambda r: self.set_sync(
                SyncConfig.from_dict(r["config"]) if r.get("config") else None),
        })

    def start(self) -> None:
        self.set_workload(self.vm.config.workload)
        raw = read_record(self.vm.paths.sync_config)
        if raw:
            self.set_sync(SyncConfig.from_dict(raw))
        # the pid file before the control socket answers: a driver that saw a ping reply
        # finds the pid file too (power state = pid file + lock), never "stopped"
        atomic_write_bytes(self.vm.paths.pid, f"{os.getpid()}\n".encode())
        self.server.start()

    def status(self) -> dict[str, Any]:
        st = self.vm.status()
        st["workload"] = self.workload.stats() if self.workload else None
        return st

    def set_sync(self, config: SyncConfig | None) -> dict[str, Any] | None:
        """Enter synchronous mode with ``config`` (a new mirror, unless the current one has
        the same configuration) or leave it (None). Returns the mirror's status."""
        cur = self.vm.mirror
        if config is None:
            self.vm.set_mirror(None)
            return None
        if cur is None or cur.config != config:
            self.vm.set_mirror(SyncMirror(config))
        m = self.vm.mirror
        return m.status() if m is not None else None

    def _freeze(self) -> None:
        self.vm.freeze()

    def _write(self, r: dict[str, Any]) -> None:
        data = decode_data(str(r["data"]))
        if not data:
            raise InvalidInput("empty write")
        self.vm.write(str(r["disk_id"]), int(r["offset"]), data, tag=r.get("tag"),
                      frozen_timeout=30.0)

    def set_workload(self, spec: WorkloadSpec | None) -> dict[str, Any] | None:
        if self.workload is not None:
            self.workload.stop()
            self.workload = None
        if spec is not None:
            self.workload = Workload(self.vm, self.vm.config.disks, spec)
            self.workload.start()
        return self.workload.stats() if self.workload else None

    def _shutdown_async(self) -> dict[str, bool]:
        threading.Thread(target=self.stop, daemon=True).start()
        return {"stopping": True}

    def stop(self) -> None:
        """Graceful: stop writing, flush, close the logs cleanly, stop serving."""
        self._end(self.vm.close)

    def crash(self) -> None:
        """In-process stand-in for SIGKILL: nothing flushed, nothing marked clean."""
        self._end(self.vm.crash)

    def _end(self, release: Callable[[], None]) -> None:
        """Stop writing and serving, then ``release`` the VM (close or crash); once."""
        with self._life:
            if self.stopped.is_set():
                return
            if self.workload is not None:
                self.workload.stop()
            self.server.stop()
            try:
                release()
            finally:
                self._forget_pid()
                self.stopped.set()

    def _forget_pid(self) -> None:
        with suppress(OSError):
            if self.vm.paths.pid.read_text().strip() == str(os.getpid()):
                self.vm.paths.pid.unlink()
