"""Store deletes and overwrites, done or refused, waiting to reach the vault's audit trail.

The store server notes every remote ``DELETE`` and ``PUT ?overwrite=1`` (and the agent every
delete its own retention/GC does) with the caller's host id from its verified certificate; the
agent drains the entries into its next heartbeat's ``audit`` field (``{op, key, item_id,
caller, outcome, at}``, see ``docs/control-plane.md``). Entries that could not be sent go back
to the front of the queue. The queue is bounded: past ``limit`` the oldest entries are dropped,
and the count of dropped ones is logged (a flood of refused deletes must not exhaust memory).

Responsible for: the bounded queue. Not responsible for: delivering it (the agent's heartbeat)
or judging it (``drsite.vault.trust``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Any

log = logging.getLogger(__name__)

LIMIT = 10_000
BATCH = 500          # entries per heartbeat


class StoreAuditLog:
    """Thread-safe bounded queue of store audit entries."""

    def __init__(self, limit: int = LIMIT) -> None:
        self._q: deque[dict[str, Any]] = deque()
        self._limit = limit
        self._lock = threading.Lock()
        self.dropped = 0

    def record(self, op: str, key: str, item_id: str | None, caller: str, outcome: str,
               at: float | None = None) -> None:
        entry = {"op": op, "key": key[:1024], "item_id": item_id, "caller": caller[:128],
                 "outcome": outcome, "at": at if at is not None else time.time()}
        log.info("store %s of %s by %s: %s", op, key, caller, outcome)
        with self._lock:
            self._q.append(entry)
            while len(self._q) > self._limit:
                self._q.popleft()
                self.dropped += 1
                if self.dropped in (1, 10, 100) or self.dropped % 1000 == 0:
                    log.warning("store audit queue full: %d entries dropped", self.dropped)

    def take(self, n: int = BATCH) -> list[dict[str, Any]]:
        """Up to ``n`` oldest entries, removed from the queue."""
        with self._lock:
            return [self._q.popleft() for _ in range(min(n, len(self._q)))]

    def give_back(self, entries: list[dict[str, Any]]) -> None:
        """Entries that were not delivered: back to the front, in order."""
        with self._lock:
            self._q.extendleft(reversed(entries))
            while len(self._q) > self._limit:
                self._q.pop()
                self.dropped += 1

    def __len__(self) -> int:
        with self._lock:
            return len(self._q)
