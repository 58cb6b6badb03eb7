"""Process helpers of the crash campaigns (``crash_campaign``, ``sync_campaign``)."""

from __future__ import annotations

import os
import signal
import time
from typing import Any


def until(check: Any, timeout: float, poll: float = 0.1) -> Any:
    """``check()``'s first truthy answer within ``timeout`` s, else None. An exception counts as
    no answer (a process being restarted: ask again)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            res = check()
        except Exception:
            res = None
        if res:
            return res
        if time.monotonic() > deadline:
            return None
        time.sleep(poll)


def kill9(pid: int | None) -> None:
    """SIGKILL ``pid`` and wait (10 s at most) until it is gone (reaped if it is our child)."""
    if pid is None:
        return
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.waitpid(pid, os.WNOHANG)
            os.kill(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            return
        time.sleep(0.01)
