"""A group barrier's write hold on a QEMU VM (``QemuHypervisor.hold``/``seal_held``/
``unhold``; invariants in ``vault/barrier_design.md``).

The hold is QMP ``stop``: QEMU drains the in-flight I/O and the vCPUs stop, so the guest
issues no write until ``cont``. Its record, ``hold.json`` in the VM directory, names the
barrier, the runner it stopped, and its monotonic deadline. The bound is kept by a
``holdwatch`` process started *before* the stop, in its own session: at the deadline, under
the VM directory's lock, it resumes the VM if the record still names its barrier. A VM in
``prelaunch`` (vCPUs never started, it cannot go back there) is held without a stop.

Every function here runs under the VM's lock (``driver._vm_lock``), which the watchdog takes
too, so a seal and an expiry never interleave. Responsible for: the record, the stop, the
resume, the watchdog. Not responsible for: the seal (the driver's).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from drsite.core.errors import Conflict
from drsite.fsutil import read_record, write_record
from drsite.hypervisors.qemu import holdwatch
from drsite.hypervisors.qemu.layout import VmDir
from drsite.hypervisors.qemu.qmp import QmpClient
from drsite.hypervisors.qemu.runner import current_runner

Watchdogs = dict[Path, "subprocess.Popen[bytes]"]  # the holdwatch process per VM directory


def _status(paths: VmDir) -> str:
    with QmpClient.connect(str(paths.qmp_socket), timeout=10.0) as q:
        return str(q.execute("query-status").get("status"))


def info(rec: dict[str, Any]) -> dict[str, object]:
    return {"barrier_id": rec["barrier_id"], "held_at": rec["held_at"],
            "timeout_s": float(rec["deadline"]) - float(rec["started"])}


def begin(paths: VmDir, name: str, barrier_id: str, timeout_s: float, app_consistent: bool,
          watchdogs: Watchdogs) -> dict[str, object]:
    """Hold the VM's writes (see the module); idempotent per barrier, ``Conflict`` while
    another barrier holds it. An off VM, or one paused by someone else, is not held."""
    r = current_runner(paths)
    rec = read_record(paths.hold)
    if rec is not None and r is not None and rec.get("runner") == r.token \
            and time.monotonic() < float(rec["deadline"]):
        if rec["barrier_id"] == barrier_id:
            return info(rec)
        raise Conflict(f"VM {name} is held by barrier {rec['barrier_id']}")
    if rec is not None:  # stale: its QEMU is gone, or its watchdog is about to end it
        end(paths, rec, watchdogs)
    started = time.monotonic()
    out: dict[str, object] = {"barrier_id": barrier_id, "held_at": time.time(),
                              "timeout_s": timeout_s}
    if r is None or r.kind != "vm":
        return out  # off: nothing to hold; its seal reports held: false
    with QmpClient.connect(str(paths.qmp_socket), timeout=10.0) as q:
        status = str(q.execute("query-status").get("status"))
        if status not in ("running", "prelaunch"):
            return out  # paused by someone else: not ours to hold or resume
        rec = {"barrier_id": barrier_id, "runner": r.token, "status": status,
               "stopped": status == "running", "held_at": out["held_at"],
               "started": started, "deadline": started + timeout_s,
               "app_consistent": app_consistent}
        write_record(paths.hold, rec)  # before the watchdog: it acts on this record
        if status == "running":
            _start_watchdog(paths, rec, watchdogs)
            try:
                q.execute("stop")
            except BaseException:
                end(paths, rec, watchdogs)
                raise
    return info(rec)


def _start_watchdog(paths: VmDir, rec: dict[str, Any], watchdogs: Watchdogs) -> None:
    old = watchdogs.pop(paths.dir, None)
    if old is not None:
        old.kill()
        old.wait()
    with open(paths.log, "ab") as log:
        watchdogs[paths.dir] = subprocess.Popen(
            [sys.executable, "-I", "-S", holdwatch.__file__, str(paths.dir),
             str(rec["barrier_id"]), repr(float(rec["deadline"])), str(paths.qmp_socket)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)


def resume(q: QmpClient, paths: VmDir, rec: dict[str, Any]) -> None:
    """Resume the VM through ``q`` when this hold stopped it and it is still paused (a VM the
    hold did not stop, or one its watchdog resumed, is left as it is). The record stays:
    :func:`end` drops it."""
    if not rec.get("stopped"):
        return
    r = current_runner(paths)
    if r is not None and r.token == rec.get("runner") \
            and q.execute("query-status").get("status") == "paused":
        q.execute("cont")


def end(paths: VmDir, rec: dict[str, Any], watchdogs: Watchdogs) -> None:
    """Resume a VM this hold stopped, drop the record, stop its watchdog."""
    try:
        if rec.get("stopped"):
            r = current_runner(paths)
            if r is not None and r.token == rec.get("runner"):
                with QmpClient.connect(str(paths.qmp_socket), timeout=10.0) as q:
                    resume(q, paths, rec)
    finally:
        paths.hold.unlink(missing_ok=True)
        w = watchdogs.pop(paths.dir, None)
        if w is not None:
            w.kill()
            w.wait()


def recorded(paths: VmDir, barrier_id: str) -> dict[str, Any] | None:
    """The hold record of ``barrier_id`` (whether or not it still holds)."""
    rec = read_record(paths.hold)
    return rec if rec is not None and rec.get("barrier_id") == barrier_id else None


def unbroken(paths: VmDir, rec: dict[str, Any]) -> bool:
    """The hold ``rec`` lasted without a break until now: its QEMU runs, its bound has not
    passed, and the VM is still paused by it (or never left prelaunch)."""
    r = current_runner(paths)
    if r is None or r.token != rec.get("runner") or time.monotonic() > float(rec["deadline"]):
        return False
    return _status(paths) == ("paused" if rec.get("stopped") else "prelaunch")
