"""The QEMU process that holds a VM's disks: ``qemu-system-x86_64`` (the VM runs) or
``qemu-storage-daemon`` (the VM is stopped but its disks are needed: seal, read, bitmaps).

A runner is identified by a token ``"<pid>:<start time>"`` (from ``/proc``), so a pid reused
by another process is never mistaken for it; ``runner.json`` in the VM directory names the
current runner, so a restarted driver finds it again; it is written before QEMU runs (a start
gate), so no QEMU process holds the disks unrecorded. Frozen views (fleece jobs, exports) live
inside the runner: when it stops, they are gone.

Responsible for: command lines, starting a runner and waiting for its QMP socket, liveness,
stopping (graceful, then ``quit``, then SIGKILL). Not responsible for: what is done through QMP
(tracking, exports), or deciding when a VM should run.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from drsite import failpoints
from drsite.core.errors import DrsiteError, NetworkError, NotFound, PermanentError
from drsite.fsutil import read_record, write_record
from drsite.hypervisors.qemu.layout import QemuVmConfig, VmDir
from drsite.hypervisors.qemu.qmp import QmpClient, wait_for_monitor

VM_BINARY = "qemu-system-x86_64"
DAEMON_BINARY = "qemu-storage-daemon"
START_TIMEOUT = 15.0

# Every runner is started behind this gate: a shell on the read end of a pipe that execs the
# QEMU command line (its arguments) only when it reads ``_GO``. EOF — the starting driver died,
# or gave up because the record could not be written — ends it without running QEMU. So no
# QEMU process ever holds a VM's disks unless ``runner.json`` named it first.
_GO = b"go\n"
_GATE = ("/bin/sh", "-c",
         'IFS= read -r go && [ "$go" = go ] || '
         '{ echo "drsite: start cancelled: its driver stopped before recording it" >&2; '
         'exit 97; }; exec "$@" </dev/null', "drsite-runner-gate")

# children started by this process, by pid: polled so they never linger as zombies
_children: dict[int, subprocess.Popen[bytes]] = {}


@dataclass(frozen=True)
class Runner:
    """A live runner: ``kind`` is ``"vm"`` or ``"daemon"``."""

    kind: str
    pid: int
    token: str


def process_token(pid: int) -> str | None:
    """``"<pid>:<start time>"`` of a live process, else None.

    Live means any thread of it still runs, not only its first one: ``/proc/<pid>/stat``
    shows the main thread, which is a zombie as soon as it has exited, while the process's
    other threads may still be exiting with its files open — and a file's image lock goes
    only when the last thread closes it. A SIGKILLed ``qemu-system-x86_64`` is such a process
    for tens of milliseconds (its last thread tears the KVM VM down, RCU grace periods,
    before its disks' fds are closed), longer on a loaded host; a new QEMU started on its
    disks meanwhile fails with ``Failed to get "write" lock``. A zombie whose other threads
    are all gone (``Threads: 1``) holds nothing any more.
    """
    child = _children.get(pid)
    if child is not None and child.poll() is not None:
        _children.pop(pid, None)
        return None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2:].split()
    if not fields:
        return None
    if fields[0] in ("Z", "X"):
        if _thread_count(pid) > 1:
            return f"{pid}:{fields[19]}"  # its main thread exited; others still hold its files
        try:
            os.waitpid(pid, os.WNOHANG)  # ours (started by an earlier driver object): reap it
        except ChildProcessError:
            pass
        return None
    return f"{pid}:{fields[19]}"


def _thread_count(pid: int) -> int:
    """The ``Threads:`` of ``/proc/<pid>/status`` (0 once the process is gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    for line in status.splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    return 0


def current_runner(paths: VmDir) -> Runner | None:
    """The runner named in ``runner.json`` if it still lives (same pid and start time)."""
    rec = read_record(paths.runner)
    if rec is None:
        return None
    pid = int(rec["pid"])
    tok = process_token(pid)
    if tok is None or tok != rec.get("token"):
        return None
    return Runner(str(rec["kind"]), pid, tok)


def vm_args(paths: VmDir, cfg: QemuVmConfig, *, start_cpus: bool) -> list[str]:
    """The ``qemu-system-x86_64`` command line of a VM (no display, no default devices)."""
    exe = shutil.which(VM_BINARY)
    if exe is None:
        raise NotFound(f"{VM_BINARY} is not installed",
                       hint="Install Debian's qemu-system-x86 package.")
    accel = "kvm:tcg" if os.access("/dev/kvm", os.R_OK | os.W_OK) else "tcg"
    args = [exe, "-name", f"guest={cfg.name}", "-nodefaults", "-no-user-config",
            "-display", "none", "-machine", f"q35,accel={accel}",
            "-m", str(cfg.memory_mib), "-smp", str(cfg.vcpus),
            "-chardev", f"socket,id=qmp0,path={paths.qmp_socket},server=on,wait=off",
            "-mon", "chardev=qmp0,mode=control",
            "-chardev", f"socket,id=qmpw,path={paths.watch_socket},server=on,wait=off",
            "-mon", "chardev=qmpw,mode=control"]
    if not start_cpus:
        args.append("-S")
    for i, d in enumerate(cfg.disks):
        args += ["-blockdev", _file_node(paths, d.disk_id, i),
                 "-blockdev", f"driver=qcow2,file=file{i},node-name={d.node}",
                 # a pass-through root above the disk's node: synchronous mode's mirror sits
                 # on the root while a fleece job (a frozen view) works on the node below —
                 # QEMU 7.2 refuses both jobs on one node (see design.md)
                 "-blockdev", f"driver=raw,file={d.node},node-name={root_node(d.node)}",
                 # share-rw: drsite's own NBD export of the node (test writes) may write too
                 "-device",
                 f"virtio-blk-pci,drive={root_node(d.node)},id=vd{i},share-rw=on,"
                 f"bootindex={i}"]
    if cfg.guest_agent:
        args += ["-chardev", f"socket,id=qga0,path={paths.qga_socket},server=on,wait=off",
                 "-device", "virtio-serial-pci",
                 "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0"]
    return args


def root_node(node: str) -> str:
    """The name of the pass-through root a running VM's device sits on, above ``node``."""
    return f"{node}-root"


def daemon_args(paths: VmDir, cfg: QemuVmConfig) -> list[str]:
    """The ``qemu-storage-daemon`` command line serving a stopped VM's disks (same nodes)."""
    exe = shutil.which(DAEMON_BINARY)
    if exe is None:
        raise NotFound(f"{DAEMON_BINARY} is not installed",
                       hint="Install Debian's qemu-system-common package.")
    args = [exe, "--chardev", f"socket,id=qmp0,path={paths.qmp_socket},server=on,wait=off",
            "--monitor", "chardev=qmp0"]
    for i, d in enumerate(cfg.disks):
        args += ["--blockdev", _file_node(paths, d.disk_id, i),
                 "--blockdev", f"driver=qcow2,file=file{i},node-name={d.node}"]
    return args


def _file_node(paths: VmDir, disk_id: str, i: int) -> str:
    return f"driver=file,filename={paths.qcow2(disk_id)},node-name=file{i}"


def start_runner(paths: VmDir, cfg: QemuVmConfig, kind: str, *, start_cpus: bool = False,
                 timeout: float = START_TIMEOUT) -> Runner:
    """Start a runner of ``kind`` for the VM and record it in ``runner.json``.

    Record first, then run: the process is started behind a gate (:data:`_GATE`) and execs
    QEMU only after ``runner.json`` names it (pid and start time survive the exec). A driver
    killed before that — the gate reads EOF and exits — or a record that cannot be written
    (the VM directory was deleted) leaves no QEMU process behind; one killed after it leaves
    a recorded process that a restarted driver finds (and ``delete_vm`` stops).

    The caller must have made sure no runner holds the disks. Raises ``PermanentError`` with
    QEMU's log if the process exits early, ``NetworkError`` if QMP does not come up in time.
    """
    args = vm_args(paths, cfg, start_cpus=start_cpus) if kind == "vm" else daemon_args(paths, cfg)
    for s in (paths.qmp_socket, paths.nbd_socket, paths.qga_socket, paths.watch_socket):
        s.unlink(missing_ok=True)
    with open(paths.log, "ab") as log:
        log.write(f"--- {time.strftime('%Y-%m-%dT%H:%M:%S')} starting {kind}\n".encode())
        log.flush()
        proc, gate = spawn_gated(args, stdout=log, cwd=paths.dir)
    _children[proc.pid] = proc
    try:
        failpoints.hit("qemu.runner-spawned")
        tok = process_token(proc.pid)
        if tok is None:
            raise PermanentError(f"QEMU {kind} of {cfg.name} exited at once: {log_tail(paths)}")
        write_record(paths.runner, {"kind": kind, "pid": proc.pid, "token": tok})
        failpoints.hit("qemu.runner-recorded")
    except BaseException:
        cancel_gated(proc, gate)
        _children.pop(proc.pid, None)
        raise
    open_gate(gate)
    try:
        wait_for_monitor(proc, paths.qmp_socket, timeout, f"QEMU {kind} of {cfg.name}",
                         lambda: f": {log_tail(paths)}")
    except DrsiteError:
        _children.pop(proc.pid, None)
        raise
    if process_token(proc.pid) != tok:
        raise PermanentError(f"QEMU {kind} of {cfg.name} exited at once: {log_tail(paths)}")
    return Runner(kind, proc.pid, tok)


def connect_runner(paths: VmDir, r: Runner, *, timeout: float) -> QmpClient:
    """A QMP connection to the live runner ``r`` of the VM at ``paths``, waiting up to
    ``timeout`` for its monitor: a runner that an earlier driver started (an agent killed while
    it waited, then restarted) may still be starting — its socket missing, or bound and not yet
    listening (refused). ``NetworkError`` if it does not answer in time, or if it exits
    meanwhile (then with its log)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return QmpClient.connect(str(paths.qmp_socket), timeout=10.0)
        except NetworkError:
            if process_token(r.pid) != r.token:
                raise NetworkError(f"QEMU {r.kind} (pid {r.pid}) exited before its monitor "
                                   f"answered: {log_tail(paths)}") from None
            if time.monotonic() > deadline:
                raise
        time.sleep(0.02)


def spawn_gated(args: list[str], *, stdout: IO[bytes], cwd: Path | None = None,
                pass_fds: tuple[int, ...] = ()) -> tuple[subprocess.Popen[bytes], int]:
    """Start ``args`` behind the gate (:data:`_GATE`: own session, stdin ``/dev/null`` once
    it runs). Returns the process — a shell until :func:`open_gate`; its pid and start time
    (:func:`process_token`) stay those of the program it execs — and the gate's pipe. The
    caller records the process, then :func:`open_gate`, or :func:`cancel_gated` if it could
    not; a caller killed in between leaves a shell that reads EOF and exits, having run
    nothing. Responsible for the gate only, not for recording or waiting for the program."""
    gate_r, gate_w = os.pipe()   # both close-on-exec; the gate gets the read end as stdin
    try:
        proc = subprocess.Popen([*_GATE, *args], stdin=gate_r, stdout=stdout, stderr=stdout,
                                start_new_session=True, close_fds=True, cwd=cwd,
                                pass_fds=pass_fds)
    except BaseException:
        os.close(gate_w)
        raise
    finally:
        os.close(gate_r)
    return proc, gate_w


def open_gate(gate: int) -> None:
    """Let a gated process run (it execs its program). A gate that is gone (killed) is left
    to the caller's wait for the program, which reports the exit."""
    try:
        os.write(gate, _GO)
    except BrokenPipeError:
        pass
    finally:
        os.close(gate)


def cancel_gated(proc: subprocess.Popen[bytes], gate: int) -> None:
    """End a gated process that must not run: EOF on its pipe (it exits having run
    nothing); waited for, and SIGKILLed if it lingers."""
    os.close(gate)
    try:
        proc.wait(timeout=5.0)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def wait_gone(runner: Runner, timeout: float) -> bool:
    """Wait until the runner's process has exited — every thread of it, so its files (the
    disks' image locks) are closed — and is reaped if ours; True if it did."""
    deadline = time.monotonic() + timeout
    while True:
        child = _children.get(runner.pid)
        if child is not None:
            try:
                child.wait(timeout=max(0.0, min(0.05, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                pass
        if process_token(runner.pid) != runner.token:
            _children.pop(runner.pid, None)
            return True
        if time.monotonic() > deadline:
            return False
        if child is None:
            time.sleep(0.02)


def quit_runner(paths: VmDir, runner: Runner, *, timeout: float = 10.0) -> None:
    """``quit`` over QMP (QEMU flushes its disks and stores persistent bitmaps: a clean stop
    for the block layer), SIGKILL if that does not end it within ``timeout``."""
    try:
        with QmpClient.connect(str(paths.qmp_socket), timeout=min(timeout, 5.0)) as q:
            q.execute("quit", timeout=min(timeout, 5.0))
    except DrsiteError:
        pass
    if not wait_gone(runner, timeout):
        kill_runner(runner)


def kill_runner(runner: Runner) -> None:
    """SIGKILL the runner (an unclean stop: bitmaps come back ``inconsistent``)."""
    if process_token(runner.pid) != runner.token:
        return
    try:
        os.kill(runner.pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    if not wait_gone(runner, 10.0):
        raise PermanentError(f"QEMU pid {runner.pid} did not die after SIGKILL")


def log_tail(paths: VmDir) -> str:
    try:
        return paths.log.read_text(errors="replace")[-800:].strip()
    except OSError:
        return "(no QEMU log)"
