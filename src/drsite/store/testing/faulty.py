"""``FaultyObjectStore``: wraps a store and injects faults by operation and key prefix.

Kinds of fault:
- ``network``   the call raises ``NetworkError`` (transient);
- ``timeout``   the call raises a transient ``TransientError`` saying it timed out;
- ``enospc``    the call raises ``LowDiskSpace`` (transient), as a full disk would on ``put``;
- ``permanent`` the call raises ``PermanentError``;
- ``crash``     the call raises :class:`SimulatedCrash` (not a drsite error: the process "dies");
- ``truncate``  ``get``/``get_range`` return only the first half of the data;
- ``bitflip``   ``get``/``get_range`` return the data with one bit flipped.

With ``after=True`` an error fault fires *after* the inner call succeeded (the reply was lost:
a put landed but the caller saw an error), which exercises idempotent retries.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

from drsite.core.errors import LowDiskSpace, NetworkError, PermanentError, TransientError
from drsite.store.contract import ObjectStore

OPS = ("put", "get", "get_range", "exists", "size", "list", "delete")
KINDS = ("network", "timeout", "enospc", "permanent", "crash", "truncate", "bitflip")


class SimulatedCrash(BaseException):  # a BaseException: no `except Exception` eats it
    """Raised by a ``crash`` fault: stands for the process being killed at that call."""


@dataclass
class Fault:
    """Fire on the ``nth`` matching call (1-based, counted from when the fault was added) and on
    the following ``times - 1`` matching calls (``times=None``: on every call from the nth)."""

    op: str
    kind: str
    prefix: str = ""
    nth: int = 1
    times: int | None = 1
    after: bool = False
    seen: int = 0
    fired: int = 0
    keys: list[str] = field(default_factory=list)

    def matches(self, op: str, key: str) -> bool:
        return self.op in (op, "*") and key.startswith(self.prefix)

    def should_fire(self) -> bool:
        self.seen += 1
        if self.seen < self.nth:
            return False
        if self.times is not None and self.fired >= self.times:
            return False
        self.fired += 1
        return True


class FaultyObjectStore:
    """An :class:`ObjectStore` that forwards to ``inner`` and injects the configured faults.

    ``calls`` counts every call per operation; ``log`` records ``(op, key)`` in order.
    """

    def __init__(self, inner: ObjectStore) -> None:
        self.inner = inner
        self.faults: list[Fault] = []
        self.calls: Counter[str] = Counter()
        self.log: list[tuple[str, str]] = []
        self._lock = threading.Lock()

    def inject(self, op: str, kind: str, *, prefix: str = "", nth: int = 1, times: int | None = 1,
               after: bool = False) -> Fault:
        """Add a fault; returns it so a test can look at ``fired`` and ``keys``."""
        if op not in (*OPS, "*") or kind not in KINDS:
            raise ValueError(f"unknown fault {op}/{kind}")
        f = Fault(op, kind, prefix, nth, times, after)
        with self._lock:
            self.faults.append(f)
        return f

    def clear(self) -> None:
        with self._lock:
            self.faults.clear()

    def _pick(self, op: str, key: str) -> Fault | None:
        with self._lock:
            self.calls[op] += 1
            self.log.append((op, key))
            for f in self.faults:
                if f.matches(op, key) and f.should_fire():
                    f.keys.append(key)
                    return f
        return None

    @staticmethod
    def _raise(f: Fault, op: str, key: str) -> None:
        what = f"injected fault on {op} {key!r}"
        if f.kind == "network":
            raise NetworkError(f"{what}: connection reset")
        if f.kind == "timeout":
            raise TransientError(f"{what}: timed out")
        if f.kind == "enospc":
            raise LowDiskSpace(f"{what}: no space left on device")
        if f.kind == "permanent":
            raise PermanentError(f"{what}: permanent failure")
        if f.kind == "crash":
            raise SimulatedCrash(what)

    def _data(self, f: Fault | None, data: bytes) -> bytes:
        if f is None:
            return data
        if f.kind == "truncate":
            return data[: len(data) // 2]
        if f.kind == "bitflip" and data:
            b = bytearray(data)
            b[len(b) // 2] ^= 0x10
            return bytes(b)
        return data

    def _call_pre(self, op: str, key: str) -> Fault | None:
        f = self._pick(op, key)
        if f is not None and not f.after and f.kind not in ("truncate", "bitflip"):
            self._raise(f, op, key)
        return f

    def _call_post(self, f: Fault | None, op: str, key: str) -> None:
        if f is not None and f.after:
            self._raise(f, op, key)

    def put(self, key: str, data: bytes | memoryview, *, overwrite: bool = False) -> None:
        f = self._call_pre("put", key)
        self.inner.put(key, data, overwrite=overwrite)
        self._call_post(f, "put", key)

    def get(self, key: str) -> bytes:
        f = self._call_pre("get", key)
        data = self.inner.get(key)
        self._call_post(f, "get", key)
        return self._data(f, data)

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        f = self._call_pre("get_range", key)
        data = self.inner.get_range(key, offset, length)
        self._call_post(f, "get_range", key)
        return self._data(f, data)

    def exists(self, key: str) -> bool:
        f = self._call_pre("exists", key)
        r = self.inner.exists(key)
        self._call_post(f, "exists", key)
        return r

    def size(self, key: str) -> int:
        f = self._call_pre("size", key)
        r = self.inner.size(key)
        self._call_post(f, "size", key)
        return r

    def list(self, prefix: str = "") -> Iterator[str]:
        f = self._call_pre("list", prefix)
        keys = list(self.inner.list(prefix))
        self._call_post(f, "list", prefix)
        return iter(keys)

    def delete(self, key: str) -> None:
        f = self._call_pre("delete", key)
        self.inner.delete(key)
        self._call_post(f, "delete", key)
