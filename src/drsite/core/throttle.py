"""A token bucket for replication bandwidth limits (clock injected, so tests do not wait)."""

from __future__ import annotations

from drsite.core.clock import Clock


class TokenBucket:
    """At most ``rate`` bytes per second on average, with bursts of at most ``burst_s`` seconds'
    worth. A request larger than the bucket borrows: the caller sleeps until the debt is paid,
    so the long-run rate holds whatever the piece size (callers keep pieces small for
    smoothness). ``full=False`` starts the bucket empty: a background reader (a scrub) that must
    keep its rate from the first byte, not burst at its start."""

    def __init__(self, rate: float, clock: Clock, *, burst_s: float = 0.25,
                 full: bool = True) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = float(rate)
        self.clock = clock
        self.capacity = self.rate * burst_s
        self.tokens = self.capacity if full else 0.0
        self.last = clock.now()
        self.waited_s = 0.0

    def consume(self, n: int) -> None:
        now = self.clock.now()
        self.tokens = min(self.capacity, self.tokens + (now - self.last) * self.rate)
        self.last = now
        self.tokens -= n
        if self.tokens < 0:
            wait = -self.tokens / self.rate
            self.waited_s += wait
            self.clock.sleep(wait)
            self.last = self.clock.now()
            self.tokens = 0.0
