"""A process caught half-way through its exit, for the QEMU runner tests: its main thread has
exited (``/proc/<pid>/stat`` says ``Z``) while another thread still holds a file open with
QEMU's "write" image lock on it — what a SIGKILLed ``qemu-system-x86_64`` is for tens of
milliseconds while its last thread tears the KVM VM down before closing its disks.

:func:`start` returns the process (its token taken while it fully lived) once it is in that
state; the holding thread ends when the test closes the process's stdin (or SIGKILLs it).
Linux only (``/proc``, OFD locks, the raw ``exit`` syscall)."""

from __future__ import annotations

import fcntl
import os
import platform
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

# QEMU's file-posix locks: a user that does not share WRITE holds a read lock on byte
# 200 + BLK_PERM_WRITE's bit (1); an opener that wants WRITE tests that byte
WRITE_SHARED_BYTE = 201
_FLOCK = "hh4xqqi4x"  # struct flock on 64-bit Linux
_SYS_EXIT = {"x86_64": 60, "aarch64": 93}

_HELPER = r"""
import ctypes, fcntl, os, struct, sys, threading
fd = os.open(sys.argv[1], os.O_RDWR)
fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack("hh4xqqi4x", fcntl.F_RDLCK, os.SEEK_SET,
                                               int(sys.argv[2]), 1, 0))
print("locked", flush=True)
sys.stdin.readline()                 # "go": the test has taken our token


def hold():
    sys.stdin.buffer.read()          # until the test closes our stdin
    os._exit(0)


threading.Thread(target=hold).start()
# the main thread alone exits (exit, not exit_group): the lock lives on in the other thread
ctypes.CDLL(None).syscall(int(sys.argv[3]), 0)
"""


def locked(path: Path, byte: int = WRITE_SHARED_BYTE) -> bool:
    """Another open file description holds a lock on ``byte`` of ``path``."""
    fd = os.open(path, os.O_RDONLY)
    try:
        res = fcntl.fcntl(fd, fcntl.F_OFD_GETLK,
                          struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, byte, 1, 0))
        return bool(struct.unpack(_FLOCK, res)[0] != fcntl.F_UNLCK)
    finally:
        os.close(fd)


def _state(pid: int) -> str:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rfind(")") + 2:].split()[0]


def start(path: Path) -> tuple[subprocess.Popen[bytes], str]:
    """The half-exited process holding ``path``'s write lock, and its runner token."""
    from drsite.hypervisors.qemu.runner import process_token

    nr = _SYS_EXIT.get(platform.machine())
    if sys.platform != "linux" or nr is None:
        pytest.skip("needs Linux on x86_64 or aarch64")
    proc = subprocess.Popen([sys.executable, "-c", _HELPER, str(path), str(WRITE_SHARED_BYTE),
                             str(nr)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    assert proc.stdout.readline() == b"locked\n"
    tok = process_token(proc.pid)
    assert tok is not None
    proc.stdin.write(b"go\n")
    proc.stdin.flush()
    deadline = time.monotonic() + 10
    while _state(proc.pid) != "Z":
        assert time.monotonic() < deadline, "the helper's main thread did not exit"
        time.sleep(0.005)
    assert locked(path), "the helper's other thread does not hold the lock"
    return proc, tok


def release(proc: subprocess.Popen[bytes]) -> None:
    """Let the holding thread end (the process's exit completes); idempotent."""
    if proc.stdin is not None and not proc.stdin.closed:
        proc.stdin.close()


def finish(proc: subprocess.Popen[bytes]) -> None:
    """Let the holding thread end, and reap the process."""
    release(proc)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
