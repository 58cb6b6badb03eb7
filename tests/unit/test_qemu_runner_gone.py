"""A QEMU runner is gone only when every thread of it has exited (its files closed, the disks'
image locks released), not when its main thread shows as a zombie: a SIGKILLed QEMU stays in
between for tens of milliseconds, and a new QEMU started on its disks meanwhile failed with
``Failed to get "write" lock`` (the flake of test_engine_replica_equals_source_at_each_point).
No QEMU needed: a helper process stops half-way through its exit (``tests/dying.py``)."""

from __future__ import annotations

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
