"""Clock-cut maths for group barriers (``vault/barrier_design.md``, "The clock cut").

The vault names a cut instant ``T`` on its cut clock; a member maps it to its own monotonic
clock with an offset estimated from round trips (NTP-style) and an uncertainty that is a
*bound*, not a guess: the vault's reading was taken between the request's send and receive,
so the offset is within half the round trip of the midpoint estimate, widened by the most
the two clocks can drift apart since (``DRIFT``, per second). The member may claim the cut
only when its own readings prove, within that bound, that its hold began before ``T`` and
its seal began after ``T``.

Pure: no I/O, times are passed in.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

# both monotonic clocks may be slewed by NTP (at most 500 ppm each) and run off by their
# crystals' tolerance (well under 100 ppm): 1000 ppm bounds how fast they drift apart
DRIFT = 1e-3


@dataclass(frozen=True)
class ClockSample:
    """One reading ``vault_t`` of the vault clock ``clock_id``, taken while this host's
    monotonic clock went from ``sent`` to ``received``."""

    clock_id: str
    vault_t: float
    sent: float
    received: float

    @property
    def offset(self) -> float:
        """Estimate of vault clock − local clock."""
        return self.vault_t - (self.sent + self.received) / 2

    @property
    def radius(self) -> float:
        """Bound on the estimate's error when it was taken (half the round trip)."""
        return (self.received - self.sent) / 2

    @property
    def reach(self) -> float:
        """The error bound's constant part: the radius, plus the drift over the radius (the
        reading was taken anywhere in the round trip, so up to a radius from its middle)."""
        return self.radius * (1 + DRIFT)

    def uncertainty(self, local_t: float) -> float:
        """Bound on the estimate's error at local time ``local_t``: the true offset at the
        reading's real instant ``a`` (within the round trip) is within the radius of the
        estimate, and drifts by at most ``DRIFT * |local_t - a|`` since."""
        mid = (self.sent + self.received) / 2
        return self.reach + DRIFT * abs(local_t - mid)


def best_sample(samples: Iterable[ClockSample], clock_id: str, local_t: float
                ) -> ClockSample | None:
    """The sample of ``clock_id`` with the smallest uncertainty at ``local_t``."""
    mine = [s for s in samples if s.clock_id == clock_id and s.received >= s.sent]
    return min(mine, key=lambda s: s.uncertainty(local_t), default=None)


@dataclass(frozen=True)
class CutPlan:
    """Where a member's hold goes on its own monotonic clock for the cut ``cut_at``."""

    sample: ClockSample
    cut_at: float
    margin_s: float

    @property
    def cut_local(self) -> float:
        """The estimate of ``cut_at`` on the local clock."""
        return self.cut_at - self.sample.offset

    def hold_at(self) -> float:
        """When to start holding: early enough that the hold (taking up to ``margin_s``)
        surely began before the cut."""
        u = self.sample.uncertainty(self.cut_local)
        return self.cut_local - u - self.margin_s

    def hold_by(self) -> float:
        """The last local time (at or after the sample) at which a hold in place still surely
        began before the cut: :meth:`held_before_cut` is true up to it, false after."""
        s = self.sample
        mid = (s.sent + s.received) / 2
        # t + offset + reach + DRIFT * (t - mid) < cut_at, for t >= mid
        t = (self.cut_at - s.offset - s.reach + DRIFT * mid) / (1 + DRIFT)
        return t - 1e-6

    def held_before_cut(self, held_local: float) -> bool:
        """A hold in place at local time ``held_local`` surely began before the cut."""
        return held_local + self.sample.offset + self.sample.uncertainty(held_local) < self.cut_at

    def seal_from(self) -> float:
        """The first local time at which a seal surely begins after the cut."""
        s = self.sample
        mid = (s.sent + s.received) / 2
        # t + offset - reach - DRIFT * (t - mid) > cut_at, for t >= mid
        t = (self.cut_at - s.offset + s.reach - DRIFT * mid) / (1 - DRIFT)
        return max(t, mid) + 1e-6

    def sealed_after_cut(self, seal_local: float) -> bool:
        """A seal started at local time ``seal_local`` surely began after the cut."""
        return seal_local + self.sample.offset - self.sample.uncertainty(seal_local) > self.cut_at
