"""Object-store decorators. ``RetryingStore`` retries transient errors inside one call;
``RateLimitedStore`` limits bytes per second; ``ConcurrencyLimitedStore`` limits calls in flight."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

from drsite.core.clock import Clock, SystemClock
from drsite.core.errors import DrsiteError, ObjectExists, ObjectNotFound
from drsite.core.throttle import TokenBucket
from drsite.store.contract import ObjectStore

T = TypeVar("T")


class ForwardingStore:
    """Passes every call to ``inner`` unchanged: the base of store decorators, which override
    only the calls they change."""

    def __init__(self, inner: ObjectStore) -> None:
        self.inner = inner

    def put(self, key: str, data: bytes | memoryview, *, overwrite: bool = False) -> None:
        self.inner.put(key, data, overwrite=overwrite)

    def get(self, key: str) -> bytes:
        return self.inner.get(key)

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        return self.inner.get_range(key, offset, length)

    def exists(self, key: str) -> bool:
        return self.inner.exists(key)

    def size(self, key: str) -> int:
        return self.inner.size(key)

    def list(self, prefix: str = "") -> Iterator[str]:
        return self.inner.list(prefix)

    def delete(self, key: str) -> None:
        self.inner.delete(key)


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


class RateLimitedStore(ForwardingStore):
    """Limits the bytes moved by ``put``/``get``/``get_range`` of ``inner`` to ``rate_bps`` on
    average, with a smooth :class:`~drsite.core.throttle.TokenBucket` (``clock`` injected).

    A transfer is paid for in pieces of at most ``piece`` bytes, so a large object waits in
    small steps instead of causing a burst followed by one long stall; puts and ranged reads pay
    before the call (the size is known), whole-object gets pay after it (the size is not).
    One bucket is shared by every thread using this wrapper. Not responsible for shaping the
    transfer on the wire (the SDK sends each call at full speed; the limit holds on average
    over calls), nor for metadata calls (exists, size, list, delete are free).
    """

    def __init__(self, inner: ObjectStore, rate_bps: float, clock: Clock | None = None, *,
                 piece: int = 256 * 1024, burst_s: float = 0.25) -> None:
        if piece <= 0:
            raise ValueError("piece must be positive")
        super().__init__(inner)
        self.bucket = TokenBucket(rate_bps, clock or SystemClock(), burst_s=burst_s)
        self.piece = piece
        self._lock = threading.Lock()

    def _pay(self, n: int) -> None:
        while n > 0:
            step = min(n, self.piece)
            with self._lock:
                self.bucket.consume(step)
            n -= step

    def put(self, key: str, data: bytes | memoryview, *, overwrite: bool = False) -> None:
        self._pay(memoryview(data).nbytes)
        self.inner.put(key, data, overwrite=overwrite)

    def get(self, key: str) -> bytes:
        data = self.inner.get(key)
        self._pay(len(data))
        return data

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        self._pay(length)
        return self.inner.get_range(key, offset, length)


class ConcurrencyLimitedStore:
    """At most ``max_in_flight`` calls of ``inner`` at once across threads; callers beyond that
    wait their turn. Listings are materialised inside the slot so a half-read listing does not
    hold or leak it. ``peak`` records the highest concurrency seen (for tests and metrics).
    Not responsible for fairness between callers or for limiting bytes (``RateLimitedStore``)."""

    def __init__(self, inner: ObjectStore, max_in_flight: int) -> None:
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be >= 1")
        self.inner = inner
        self.max_in_flight = max_in_flight
        self._slots = threading.BoundedSemaphore(max_in_flight)
        self._count_lock = threading.Lock()
        self.in_flight = 0
        self.peak = 0

    def _run(self, fn: Callable[[], T]) -> T:
        with self._slots:
            with self._count_lock:
                self.in_flight += 1
                self.peak = max(self.peak, self.in_flight)
            try:
                return fn()
            finally:
                with self._count_lock:
                    self.in_flight -= 1

    def put(self, key: str, data: bytes | memoryview, *, overwrite: bool = False) -> None:
        self._run(lambda: self.inner.put(key, data, overwrite=overwrite))

    def get(self, key: str) -> bytes:
        return self._run(lambda: self.inner.get(key))

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        return self._run(lambda: self.inner.get_range(key, offset, length))

    def exists(self, key: str) -> bool:
        return self._run(lambda: self.inner.exists(key))

    def size(self, key: str) -> int:
        return self._run(lambda: self.inner.size(key))

    def list(self, prefix: str = "") -> Iterator[str]:
        return iter(self._run(lambda: list(self.inner.list(prefix))))

    def delete(self, key: str) -> None:
        self._run(lambda: self.inner.delete(key))
