"""Object-store decorators. ``RetryingStore`` retries transient errors inside one call."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import TypeVar

from drsite.core.errors import DrsiteError, ObjectExists, ObjectNotFound
from drsite.store.contract import ObjectStore

T = TypeVar("T")


class RetryingStore:
    """Retries transient errors of ``inner`` up to ``attempts`` times with exponential back-off
    (``base_delay * 2**n``; ``sleep`` is injectable). Permanent errors pass through at once.

    Outcomes that a lost reply can cause are resolved here: a retried delete that finds nothing
    is done; a retried no-overwrite put that finds the key holding identical bytes is done.
    Not responsible for the seed's minutes-long retry schedule (the replication driver is).
    """

    def __init__(self, inner: ObjectStore, attempts: int = 4, base_delay: float = 0.05,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if attempts < 1:
            raise ValueError("attempts must be >= 1")
        self.inner = inner
        self.attempts = attempts
        self.base_delay = base_delay
        self.sleep = sleep
        self.retries = 0

    def _run(self, fn: Callable[[int], T]) -> T:
        """Call ``fn(attempt)`` until it returns or raises a permanent error or runs out."""
        for attempt in range(self.attempts):
            try:
                return fn(attempt)
            except DrsiteError as exc:
                if not exc.transient or attempt == self.attempts - 1:
                    raise
                self.retries += 1
                self.sleep(self.base_delay * (2 ** attempt))
        raise AssertionError("unreachable")

    def put(self, key: str, data: bytes | memoryview, *, overwrite: bool = False) -> None:
        def once(attempt: int) -> None:
            try:
                self.inner.put(key, data, overwrite=overwrite)
            except ObjectExists:
                # an earlier attempt may have landed before its reply was lost
                if attempt == 0 or not self._same(key, data):
                    raise

        self._run(once)

    def _same(self, key: str, data: bytes | memoryview) -> bool:
        try:
            if self.inner.size(key) != len(memoryview(data).cast("B")):
                return False
            return self.inner.get(key) == bytes(data)
        except ObjectNotFound:
            return False

    def get(self, key: str) -> bytes:
        return self._run(lambda _a: self.inner.get(key))

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        return self._run(lambda _a: self.inner.get_range(key, offset, length))

    def exists(self, key: str) -> bool:
        return self._run(lambda _a: self.inner.exists(key))

    def size(self, key: str) -> int:
        return self._run(lambda _a: self.inner.size(key))

    def list(self, prefix: str = "") -> Iterator[str]:
        # materialise inside the retry so a listing broken half-way is retried whole
        return iter(self._run(lambda _a: list(self.inner.list(prefix))))

    def delete(self, key: str) -> None:
        def once(_attempt: int) -> None:
            try:
                self.inner.delete(key)
            except ObjectNotFound:
                return

        self._run(once)
