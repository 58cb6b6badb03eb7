"""Group commit: calls that queue while a write transaction runs share the next one.

On SQLite one process writes at a time (``Database``'s writer queue) and every commit is an
``fsync`` of the write-ahead log: at 1,000 protected items the agents' command results (~40 a
second) spent most of their time queued behind each other's commits, and so did everything
behind them (a command's delivery, which marks it sent). :class:`GroupCommit` runs the calls
that arrived while the previous batch ran in one transaction: one commit, one ``fsync``.

Invariants:
- each call's outcome is its own: when any call of a batch raises (or the commit fails), the
  batch is rolled back and every call runs again alone, in its own transaction — so a call's
  function must be safe to run again (it was rolled back, never committed, before it runs
  again) and keep nothing outside the database of what it did before the commit;
- a call sees the changes of the calls before it in its batch (one session, flushed after
  each call; but a Core ``UPDATE`` would leave rows another call loaded stale), so a batch
  ends as the same calls would, one after the other;
- calls run in arrival order, as the writer queue would have run them one by one;
- no thread leads for long: a leader runs one batch, then hands the lead to the oldest call
  that queued meanwhile (whose thread then runs the next batch) and returns.

Responsible for batching and outcomes. Not responsible for: what the calls do, or retrying a
transaction the database failed (the caller's error handling sees the call's own error).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Generic, TypeVar

from sqlalchemy.orm import Session

T = TypeVar("T")


class _Call(Generic[T]):
    __slots__ = ("done", "error", "fn", "lead", "result")

    def __init__(self, fn: Callable[[Session], T]) -> None:
        self.fn = fn
        self.done = threading.Event()
        self.lead = False
        self.result: T | None = None
        self.error: BaseException | None = None

    def outcome(self) -> T:
        if self.error is not None:
            raise self.error
        return self.result  # type: ignore[return-value]


class GroupCommit:
    """Group commit over ``tx`` (a write transaction's context manager factory)."""

    def __init__(self, tx: Callable[[], AbstractContextManager[Session]]) -> None:
        self._tx = tx
        self._mu = threading.Lock()
        self._queue: list[_Call[object]] = []
        self._leading = False
        self.batches = 0   # transactions run for batches of more than one call (for tests)

    def run(self, fn: Callable[[Session], T]) -> T:
        call = _Call(fn)
        with self._mu:
            self._queue.append(call)  # type: ignore[arg-type]
            lead = not self._leading
            self._leading = True
        if not lead:
            call.done.wait()
            if not call.lead:
                return call.outcome()
        with self._mu:
            batch, self._queue = self._queue, []
        try:
            self._run(batch)
        finally:
            with self._mu:
                if self._queue:   # the oldest waiting call runs the next batch
                    nxt = self._queue[0]
                    nxt.lead = True
                    nxt.done.set()
                else:
                    self._leading = False
        return call.outcome()

    def _run(self, batch: list[_Call[object]]) -> None:
        try:
            if len(batch) == 1:
                self._alone(batch[0])
                return
            try:
                with self._tx() as s:
                    for c in batch:
                        c.result = c.fn(s)
                        s.flush()   # the next call sees this one's rows, even in a Core read
                self.batches += 1
            except Exception:
                for c in batch:   # rolled back: each alone, for its own outcome
                    c.result = None
                    self._alone(c)
        except BaseException as e:   # interrupted: no call waits for ever
            for c in batch:
                if c.result is None and c.error is None:
                    c.error = e
            raise
        finally:
            for c in batch:
                if not c.lead:
                    c.done.set()

    def _alone(self, c: _Call[object]) -> None:
        try:
            with self._tx() as s:
                c.result = c.fn(s)
        except Exception as e:
            c.error = e
