"""Small durable-file helpers shared by the agent-side components (not used by ``core``).

Two families: ``atomic_write_*``/``read_json`` raise ``OSError`` (their callers translate it
with a message of their own), ``write_record``/``read_record`` raise :mod:`drsite.core.errors`
(a component's small JSON records, e.g. the hypervisor drivers' VM configs and tracking state).
Both write the same way: temp file, fsync, rename, fsync the directory.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from drsite.core.errors import InvalidInput, PermanentError, classify_os_error
from drsite.core.model import validate_name


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def flock_exclusive(fd: int, timeout: float) -> bool:
    """Take an exclusive ``flock`` on the open file ``fd``, waiting up to ``timeout`` seconds
    (0: one try). False if another holder kept it that long; the caller decides what that
    means (busy, or a probe that the holder lives) and closes ``fd``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)


def atomic_write_bytes(path: Path, data: bytes, *, parents: bool = True) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old or the new file, whole.

    The temp file (mode 0600, beside ``path``, removed on failure) is fsynced before the rename
    and the directory after it. ``parents``: create missing parent directories (else a missing
    directory is ``FileNotFoundError``). Concurrent writers of one path never share a temp
    file; the last rename wins.
    """
    if parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(path.parent)


def atomic_write_json(path: Path, obj: Any, *, parents: bool = True) -> None:
    """``obj`` as JSON (sorted keys), written with :func:`atomic_write_bytes`."""
    atomic_write_bytes(path, json.dumps(obj, indent=1, sort_keys=True).encode(), parents=parents)


def read_json(path: Path) -> Any:
    """The JSON value in ``path``. Raises ``OSError`` (``FileNotFoundError`` when missing) and
    ``ValueError`` when it is not JSON."""
    with open(path, "rb") as f:
        return json.loads(f.read())


def write_record(path: Path, data: dict[str, Any]) -> None:
    """Replace the JSON record ``path`` atomically (:func:`atomic_write_json`); its directory
    must exist (a record never recreates a directory that was removed, e.g. a deleted VM's).
    Raises drsite errors (``classify_os_error``): ``NotFound`` for a missing directory."""
    try:
        atomic_write_json(path, data, parents=False)
    except OSError as e:
        raise classify_os_error(e, f"writing {path}") from e


def read_record(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``, or None when there is no such file. Raises
    ``PermanentError`` when it cannot be read or holds anything but a JSON object."""
    try:
        with open(path) as f:
            d = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise PermanentError(f"cannot read {path}: {e}") from e
    if not isinstance(d, dict):
        raise PermanentError(f"{path}: not a JSON object")
    return d


def named_subdirs(root: Path, kind: str, what: str) -> list[str]:
    """The sub-directories of ``root`` whose names are valid ``kind`` names
    (:func:`drsite.core.model.validate_name`), sorted; none if ``root`` does not exist. Other
    entries are skipped; an unreadable ``root`` raises the drsite error for it (``what`` names
    it)."""
    try:
        names = sorted(p.name for p in root.iterdir() if p.is_dir())
    except FileNotFoundError:
        return []
    except OSError as e:
        raise classify_os_error(e, what) from e
    out: list[str] = []
    for n in names:
        try:
            out.append(validate_name(kind, n))
        except InvalidInput:
            continue
    return out


DROPPED = ".dropped-"   # a name renamed aside for removal: one rename, then rmtree at leisure


def drop_aside(path: Path, what: str) -> bool:
    """Rename the directory ``path`` aside for removal (``.dropped-<name>-<random>`` in its
    parent, the parent fsynced): from here on it is gone by its name, and
    :func:`sweep_dropped` removes it, after a crash too. Whether there was one."""
    try:
        if not path.is_dir():
            return False
        os.replace(path, path.parent / f"{DROPPED}{path.name}-{secrets.token_hex(4)}")
        fsync_dir(path.parent)
        return True
    except OSError as e:
        raise classify_os_error(e, f"{what} {path}") from e


def sweep_dropped(root: Path, what: str) -> int:
    """Remove every ``.dropped-*`` entry of ``root``: removals that a crash interrupted after
    the rename that made them final. How many were found (0 when ``root`` does not exist)."""
    try:
        gone = [p for p in root.iterdir() if p.name.startswith(DROPPED)]
    except FileNotFoundError:
        return 0
    except OSError as e:
        raise classify_os_error(e, f"{what} {root}") from e
    for p in gone:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return len(gone)


def monotonic_clock_id() -> str:
    """The id of this process's ``CLOCK_MONOTONIC``. On Linux every process of one boot and
    one time namespace reads the same monotonic clock, so processes with equal ids (a vault's
    API workers; an agent and its host's file guests) can exchange ``time.monotonic()``
    instants as they are. Another machine or another time namespace has another id; without
    ``/proc`` the id names this process alone (an instant from elsewhere is then refused,
    never mis-mapped)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        try:
            ns = os.readlink("/proc/self/ns/time")  # "time:[4026531834]"
        except OSError:  # a kernel without time namespaces: one monotonic clock per boot
            ns = "time:[none]"
        return f"clk-{boot}-{ns[6:-1]}"
    except OSError:
        return f"clk-{os.getpid()}-{secrets.token_hex(6)}"
