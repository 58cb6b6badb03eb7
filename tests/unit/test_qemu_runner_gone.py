"""A QEMU runner is gone only when every thread of it has exited (its files closed, the disks'
image locks released), not when its main thread shows as a zombie: a SIGKILLed QEMU stays in
between for tens of milliseconds, and a new QEMU started on its disks meanwhile failed with
``Failed to get "write" lock`` (the flake of test_engine_replica_equals_source_at_each_point).
No QEMU needed: a helper process stops half-way through its exit (``tests/dying.py``)."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import pytest
from tests import dying

from drsite.hypervisors.qemu import runner as runner_mod
from drsite.hypervisors.qemu.runner import Runner, process_token, wait_gone


@pytest.mark.parametrize("ours", [True, False], ids=["own-child", "earlier-driver"])
def test_a_process_whose_main_thread_exited_is_not_gone_while_it_holds_a_file(
        tmp_path: Path, ours: bool) -> None:
    img = tmp_path / "d0.qcow2"
    img.write_bytes(b"\0" * 4096)
    proc, tok = dying.start(img)
    if ours:  # a runner this process started (power_on): wait_gone reaps it
        runner_mod._children[proc.pid] = proc
    try:
        assert process_token(proc.pid) == tok, "a process holding its files counted as gone"
        assert not wait_gone(Runner("vm", proc.pid, tok), 0.3)
        assert dying.locked(img)
        dying.release(proc)  # its last thread exits
        assert wait_gone(Runner("vm", proc.pid, tok), 10.0)
        assert not dying.locked(img), "gone, but its lock is still held"
        assert process_token(proc.pid) is None
    finally:
        runner_mod._children.pop(proc.pid, None)
        dying.finish(proc)


def test_kill_runner_returns_once_every_thread_is_gone(tmp_path: Path) -> None:
    img = tmp_path / "d0.qcow2"
    img.write_bytes(b"\0" * 4096)
    proc, tok = dying.start(img)
    runner_mod._children[proc.pid] = proc
    try:
        runner_mod.kill_runner(Runner("vm", proc.pid, tok))
        assert not dying.locked(img), "kill_runner returned while the process held its files"
        assert process_token(proc.pid) is None
    finally:
        runner_mod._children.pop(proc.pid, None)
        dying.finish(proc)


def _late_monitor(path: Path, listen_after: float) -> tuple[socket.socket, threading.Thread]:
    """A QMP monitor bound at ``path`` that listens only after ``listen_after`` s (QEMU binds,
    then listens: a connection in between is refused), then greets and answers one command."""
    path.parent.mkdir(parents=True, exist_ok=True)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))

    def serve() -> None:
        time.sleep(listen_after)
        srv.listen(1)
        conn, _ = srv.accept()
        with conn:
            conn.sendall(json.dumps({"QMP": {"version": {}, "capabilities": []}}).encode()
                         + b"\r\n")
            req = json.loads(conn.makefile().readline())
            conn.sendall(json.dumps({"return": {}, "id": req.get("id")}).encode() + b"\r\n")
            conn.recv(1)   # until the client closes

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return srv, t


def test_a_restarted_driver_waits_for_a_starting_runners_monitor(tmp_path: Path) -> None:
    """An agent killed while it waited for a new storage daemon's monitor, restarted at once,
    found the daemon's socket bound but not yet listening: the connection was refused and the
    operation failed (the CI flake of test_a_runner_started_by_an_agent_killed_before_qemu_
    answered_is_found_again). It now waits for the monitor while the runner lives."""
    import os

    from drsite.hypervisors.qemu.layout import VmDir
    from drsite.hypervisors.qemu.runner import connect_runner

    paths = VmDir(tmp_path / "vm")
    me = os.getpid()
    tok = process_token(me)
    assert tok is not None
    srv, served = _late_monitor(paths.qmp_socket, 0.5)
    try:
        with connect_runner(paths, Runner("daemon", me, tok), timeout=10.0) as q:
            assert q.greeting is not None
        served.join(5)
        assert not served.is_alive()
    finally:
        srv.close()
        paths.qmp_socket.unlink(missing_ok=True)


def test_a_runner_that_exits_before_its_monitor_answers_is_reported(tmp_path: Path) -> None:
    from drsite.core.errors import NetworkError
    from drsite.hypervisors.qemu.layout import VmDir
    from drsite.hypervisors.qemu.runner import connect_runner

    paths = VmDir(tmp_path / "vm")
    paths.qmp_socket.parent.mkdir(parents=True, exist_ok=True)
    gone = Runner("daemon", 2**22 + 12345, "no-such-process")
    with pytest.raises(NetworkError, match="exited before its monitor answered"):
        connect_runner(paths, gone, timeout=10.0)
