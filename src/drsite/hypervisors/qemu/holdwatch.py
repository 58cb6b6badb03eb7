"""The bound of a QEMU write hold, kept outside the agent (``QemuHypervisor.hold``).

Run as a script by the driver *before* it stops the VM (``python -I -S holdwatch.py VM_DIR
BARRIER_ID DEADLINE_MONOTONIC QMP_SOCKET``, its own session): it sleeps until the deadline,
takes the VM directory's lock (the driver's sessions take it too, so it never interleaves with
a seal), and when ``hold.json`` still names its barrier it resumes the VM (QMP ``cont``, only
from ``paused``) and removes the record. So an agent that is stopped or killed after the
hold never leaves the guest paused past the bound.

Standard library only (it starts in milliseconds and does not depend on the agent's
environment). Responsible for: ending one expired hold. Not responsible for: anything else
about the VM.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from typing import Any


def _read(f: Any) -> dict[str, Any]:
    """The next QMP reply (events skipped)."""
    while True:
        line = f.readline()
        if not line:
            raise ConnectionError("QMP connection closed")
        msg = json.loads(line)
        if "return" in msg or "error" in msg:
            return dict(msg)


def _qmp(sock_path: str, commands: list[str]) -> list[dict[str, Any]]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(30.0)
        s.connect(sock_path)
        f = s.makefile("rwb")
        f.readline()  # greeting
        out = []
        for cmd in ["qmp_capabilities", *commands]:
            f.write(json.dumps({"execute": cmd}).encode() + b"\n")
            f.flush()
            out.append(_read(f))
        return out[1:]


def expire(vm_dir: str, barrier_id: str, qmp_socket: str) -> bool:
    """End the hold of ``barrier_id`` if it is still recorded; True if it was."""
    fd = os.open(os.path.join(vm_dir, ".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # the driver's sessions are short; a seal ends the hold
        path = os.path.join(vm_dir, "hold.json")
        try:
            with open(path, "rb") as f:
                rec = json.loads(f.read())
        except (OSError, ValueError):
            return False
        if not isinstance(rec, dict) or rec.get("barrier_id") != barrier_id:
            return False
        try:
            with open(os.path.join(vm_dir, "runner.json"), "rb") as f:
                runner = json.loads(f.read()).get("token")
        except (OSError, ValueError, AttributeError):
            runner = None
        if rec.get("stopped") and runner == rec.get("runner"):  # not a QEMU started since
            with contextlib.suppress(OSError, ValueError):  # QEMU gone: nothing to resume
                (status,) = _qmp(qmp_socket, ["query-status"])
                if status.get("return", {}).get("status") == "paused":
                    _qmp(qmp_socket, ["cont"])
        os.unlink(path)
        print(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} write hold of barrier {barrier_id} ended "
              "at its bound (the VM resumed)", file=sys.stderr, flush=True)
        return True
    finally:
        os.close(fd)


def main(argv: list[str]) -> int:
    vm_dir, barrier_id, deadline, qmp_socket = argv[1], argv[2], float(argv[3]), argv[4]
    while (left := deadline - time.monotonic()) > 0:
        time.sleep(left)
    expire(vm_dir, barrier_id, qmp_socket)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
