"""The seed's retry schedule.

Recoverable (transient) errors are retried with a back-off that grows from the first failed
attempt by 1, 2, 4, 8 and 10 minutes; if the error persists, every 30 minutes after that.
Non-recoverable (permanent) errors are never retried.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from drsite.core.errors import DrsiteError

BACKOFF_MINUTES: tuple[int, ...] = (1, 2, 4, 8, 10)
STEADY_MINUTES = 30


def retry_delay(failures: int) -> float:
    """Seconds to wait before the next attempt after ``failures`` consecutive failures (>= 1)."""
    if failures < 1:
        return 0.0
    if failures <= len(BACKOFF_MINUTES):
        return BACKOFF_MINUTES[failures - 1] * 60.0
    return STEADY_MINUTES * 60.0


@dataclass
class RetryState:
    """Per-item retry bookkeeping; serialisable, so a restart keeps the schedule."""

    failures: int = 0
    first_failure_at: float | None = None
    last_failure_at: float | None = None
    next_attempt_at: float | None = None
    last_error: dict[str, str] | None = None
    gave_up: bool = False
    history: list[float] = field(default_factory=list)

    def record_failure(self, err: DrsiteError, now: float) -> None:
        self.last_error = err.to_dict()
        if not err.transient:
            self.gave_up = True
            self.next_attempt_at = None
            return
        self.failures += 1
        if self.first_failure_at is None:
            self.first_failure_at = now
        self.last_failure_at = now
        self.next_attempt_at = now + retry_delay(self.failures)
        self.history.append(self.next_attempt_at)

    def record_success(self) -> None:
        self.failures = 0
        self.first_failure_at = None
        self.last_failure_at = None
        self.next_attempt_at = None
        self.last_error = None
        self.gave_up = False
        self.history.clear()

    def due(self, now: float) -> bool:
        if self.gave_up:
            return False
        return self.next_attempt_at is None or now >= self.next_attempt_at

    def to_dict(self) -> dict[str, object]:
        return {"failures": self.failures, "first_failure_at": self.first_failure_at,
                "last_failure_at": self.last_failure_at,
                "next_attempt_at": self.next_attempt_at, "last_error": self.last_error,
                "gave_up": self.gave_up}

    @staticmethod
    def from_dict(d: dict[str, object]) -> RetryState:
        le = d.get("last_error")
        return RetryState(failures=int(d.get("failures", 0) or 0),  # type: ignore[call-overload]
                          first_failure_at=d.get("first_failure_at"),  # type: ignore[arg-type]
                          # a state saved before it was kept: the first failure is the last known
                          last_failure_at=d.get("last_failure_at",  # type: ignore[arg-type]
                                                d.get("first_failure_at")),
                          next_attempt_at=d.get("next_attempt_at"),  # type: ignore[arg-type]
                          last_error=le if isinstance(le, dict) else None,
                          gave_up=bool(d.get("gave_up", False)))
