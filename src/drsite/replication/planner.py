"""The planner: decides what an item does next. Pure: inputs in, a decision out, no I/O.

Order of precedence (first match wins):
1. an item in CRITICAL does nothing until an operator acts (a manual resync clears it);
2. a transient failure waits for its retry time (seed schedule, see ``core.retry``);
3. a resync asked for by hand runs now, inside or outside the window;
4. no committed point yet → initial replication (resumes a staged copy);
5. tracking untrusted or lost, or the change log covers > 50% of a disk → resync required;
   a required resync runs inside the resync window, a resync in progress resumes at once;
6. a sealed cycle left by a crash is finished before anything new is sealed;
7. a delta cycle when the frequency says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from drsite.core.model import TrackingState
from drsite.replication.report import ItemState

RESYNC_LOG_FRACTION = 0.5


class Action(StrEnum):
    NOTHING = "nothing"
    WAIT = "wait"
    INITIAL = "initial"
    DELTA = "delta"
    RESYNC = "resync"
    MARK_RESYNC = "mark_resync"


@dataclass(frozen=True)
class PlanInput:
    state: ItemState
    now: float
    next_cycle_at: float
    retry_due: bool
    resync_by_hand: bool
    in_resync_window: bool
    tracking: TrackingState
    largest_log_fraction: float   # max over disks of changed-bytes / disk size since last seal
    has_point: bool
    cycle_in_flight: bool


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str = ""


def plan(i: PlanInput) -> Decision:
    if i.resync_by_hand and i.has_point:
        return Decision(Action.RESYNC, "started by hand")
    if i.state is ItemState.CRITICAL:
        return Decision(Action.NOTHING, "critical: operator action required")
    if not i.retry_due:
        return Decision(Action.WAIT, "waiting for retry")
    if not i.has_point:
        return Decision(Action.INITIAL, "no committed recovery point yet")
    if i.state is ItemState.RESYNCING:
        return Decision(Action.RESYNC, "resuming an interrupted resync")
    if i.state is not ItemState.RESYNC_REQUIRED:
        if i.tracking is TrackingState.UNTRUSTED:
            return Decision(Action.MARK_RESYNC, "change tracking is untrusted")
        if i.tracking is TrackingState.NOT_STARTED:
            return Decision(Action.MARK_RESYNC, "change tracking was lost")
        if i.largest_log_fraction > RESYNC_LOG_FRACTION:
            return Decision(Action.MARK_RESYNC,
                            f"change log covers {i.largest_log_fraction:.0%} of a disk (> 50%)")
    if i.state is ItemState.RESYNC_REQUIRED:
        if i.in_resync_window:
            return Decision(Action.RESYNC, "resync window open")
        return Decision(Action.WAIT, "resync pending until the resync window opens")
    if i.cycle_in_flight:
        return Decision(Action.DELTA, "finishing a sealed cycle")
    if i.now >= i.next_cycle_at:
        return Decision(Action.DELTA, "cycle due")
    return Decision(Action.WAIT, "next cycle not due")


def parse_hhmm(s: str) -> int:
    """``"HH:MM"`` → minutes after midnight."""
    h, _, m = s.partition(":")
    hh, mm = int(h), int(m or 0)
    if not (0 <= hh < 24 and 0 <= mm < 60):
        raise ValueError(f"invalid time of day {s!r}")
    return hh * 60 + mm


@dataclass(frozen=True)
class ResyncWindow:
    """A daily window ``[start, end)`` in local time; it may wrap midnight. Equal ends = always.

    The default, as the seed's "outside office hours", is 18:00-08:00.
    """

    start: str = "18:00"
    end: str = "08:00"

    def contains(self, minute_of_day: int) -> bool:
        a, b = parse_hhmm(self.start), parse_hhmm(self.end)
        if a == b:
            return True
        if a < b:
            return a <= minute_of_day < b
        return minute_of_day >= a or minute_of_day < b


ALWAYS = ResyncWindow("00:00", "00:00")


def next_cycle_at(last_cycle_started: float | None, frequency_s: float, now: float) -> float:
    """Cycles are anchored to their start times so that slow cycles do not drift the schedule;
    a missed slot is not made up twice."""
    if last_cycle_started is None:
        return now
    nxt = last_cycle_started + frequency_s
    if nxt < now - frequency_s:
        return now
    return nxt


def app_consistent_due(last_app_point: float | None, every_s: float | None, now: float) -> bool:
    if not every_s:
        return False
    return last_app_point is None or now - last_app_point >= every_s


def validate_frequency(frequency_s: float) -> float:
    """Replication frequency: 30 s, 5 min, 15 min, or any value >= 5 s."""
    if frequency_s < 5:
        raise ValueError("replication frequency must be at least 5 seconds")
    return frequency_s
