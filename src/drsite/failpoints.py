"""Failpoints: named places where a test can make a real process die on purpose.

``DRSITE_FAILPOINTS="name=kill@N,other=kill"`` makes the process SIGKILL itself at the Nth hit
of ``name`` (default the first); ``name=enospc*K`` makes the first K hits raise
``OSError(ENOSPC)`` (a full disk that frees up after K attempts). Unset (the production case),
:func:`hit` is one dict lookup. Crash tests use this to kill the agent exactly mid-copy or
mid-commit, then check the restart.
"""

from __future__ import annotations

import errno
import os
import signal

_spec: dict[str, tuple[str, int]] | None = None
_hits: dict[str, int] = {}


def _load() -> dict[str, tuple[str, int]]:
    out: dict[str, tuple[str, int]] = {}
    for item in filter(None, os.environ.get("DRSITE_FAILPOINTS", "").split(",")):
        name, _, action = item.partition("=")
        if action.startswith("enospc"):
            out[name.strip()] = ("enospc", int(action.partition("*")[2] or 1))
            continue
        verb, _, nth = action.partition("@")
        if verb != "kill":
            raise ValueError(f"unknown failpoint action {action!r} for {name!r}")
        out[name.strip()] = ("kill", int(nth or 1))
    return out


def hit(name: str) -> None:
    global _spec
    if _spec is None:
        _spec = _load()
    if not _spec or name not in _spec:
        return
    _hits[name] = _hits.get(name, 0) + 1
    verb, n = _spec[name]
    if verb == "enospc":
        if _hits[name] <= n:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f"failpoint {name}")
        return
    if _hits[name] >= n:
        os.kill(os.getpid(), signal.SIGKILL)
