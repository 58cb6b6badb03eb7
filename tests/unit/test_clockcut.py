"""Clock-cut maths (``core/clockcut.py``): whatever the true offset, the split of a round
trip between its two directions and a clock drift within ``DRIFT``, a member that claims its
hold began before the cut and its seal after it is right on the vault's clock."""

from __future__ import annotations

import time
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from drsite.core.clockcut import DRIFT, ClockSample, CutPlan, best_sample


@settings(max_examples=400, deadline=None)
@given(offset=st.floats(-1e6, 1e6), sent=st.floats(0, 1e5), up=st.floats(0, 0.05),
       down=st.floats(0, 0.05), drift=st.floats(-DRIFT * 0.999, DRIFT * 0.999),
       lead=st.floats(0.0, 0.5), probe=st.floats(-0.3, 0.3), margin=st.floats(0.001, 0.05))
def test_a_claim_is_true_on_the_vault_clock(offset: float, sent: float, up: float, down: float,
                                           drift: float, lead: float, probe: float,
                                           margin: float) -> None:
    # the vault's clock at local time t: V(t) = t + offset + drift * (t - at), read at ``at``
    at = sent + up

    def vault(t: float) -> float:
        return t + offset + drift * (t - at)

    s = ClockSample("c", vault(at), sent, at + down)
    cut_at = vault(at + down) + lead
    plan = CutPlan(s, cut_at, margin)
    t = plan.cut_local + probe
    if plan.held_before_cut(t):
        assert vault(t) < cut_at
    if plan.sealed_after_cut(t):
        assert vault(t) > cut_at
    # the planned instants keep their promise
    seal = plan.seal_from()
    assert plan.sealed_after_cut(seal) and vault(seal) > cut_at
    if plan.held_before_cut(plan.hold_at() + margin / 2):
        assert vault(plan.hold_at() + margin / 2) < cut_at
    # hold_by is the last instant a hold is surely before the cut
    by = plan.hold_by()
    if by >= (s.sent + s.received) / 2:
        assert plan.held_before_cut(by) and vault(by) < cut_at
        assert not plan.held_before_cut(by + 1e-5)


def test_the_shortest_round_trip_of_the_named_clock_wins() -> None:
    a = ClockSample("v1", 100.0, 10.0, 10.010)
    b = ClockSample("v1", 100.5, 10.5, 10.502)
    c = ClockSample("v2", 100.6, 10.6, 10.6001)
    assert best_sample([a, b, c], "v1", 10.6) is b
    assert best_sample([a, b, c], "v3", 10.6) is None
    assert abs(b.offset - 89.999) < 1e-9 and abs(b.radius - 0.001) < 1e-9
    # a hold 5 ms before the cut is surely before it; 1 ms is not (u is 1.3 ms)
    plan = CutPlan(b, 100.8, 0.01)  # 0.3 s on: u = 1 ms + 0.3 ms of drift
    assert plan.held_before_cut(plan.cut_local - 0.005)
    assert not plan.held_before_cut(plan.cut_local - 0.001)
    assert plan.seal_from() > plan.cut_local + b.radius


def test_the_agent_stops_reading_the_clock_before_the_readings_cost_the_cut() -> None:
    """On a loaded host a clock reading takes a scheduling round (here 30 ms, each with a
    15 ms radius: never 'good enough'): the agent stops as soon as another reading would end
    too close to when its hold must be asked for, instead of taking all five and coming too
    late for a cut 120 ms ahead."""
    from types import SimpleNamespace

    from drsite.agent.barrier import CUT_SAMPLES, BarrierCommands

    taken: list[float] = []

    def clock_sample(timeout: float = 2.0) -> tuple[str, float, float, float]:
        sent = time.monotonic()
        time.sleep(0.030)
        received = time.monotonic()
        taken.append(received)
        mid = (sent + received) / 2
        return "clk", mid + 1000.0 - 0.015 + 0.015, mid - 0.015, mid + 0.015

    host: Any = SimpleNamespace(link=SimpleNamespace(clock_sample=clock_sample))
    bc = BarrierCommands(host)
    now = time.monotonic()
    cut_at = now + 1000.0 + 0.120
    got = bc._samples("clk", now + 0.5, cut_at, 0.02, 0.0)
    assert 1 <= len(taken) < CUT_SAMPLES and len(got) == len(taken), taken
    plan = CutPlan(best_sample(got, "clk", time.monotonic()) or got[0], cut_at, 0.02)
    assert time.monotonic() < plan.hold_at()   # still in time to hold before the cut
    # with time to spare (a cut 2 s ahead) it keeps reading, up to five
    taken.clear()
    now = time.monotonic()
    got = bc._samples("clk", now + 0.5, now + 1000.0 + 2.0, 0.02, 0.0)
    assert len(taken) == CUT_SAMPLES   # the kept ones (15 ms radius) were not good enough
    assert len(got) > CUT_SAMPLES      # kept + new: the best of all is used


def _fake_host(radius: float, calls: list[float]) -> tuple[Any, Any]:
    from types import SimpleNamespace

    def clock_sample(timeout: float = 2.0) -> tuple[str, float, float, float]:
        mid = time.monotonic()
        calls.append(mid)
        return "clk", mid + 1000.0, mid - radius, mid + radius

    return SimpleNamespace(link=SimpleNamespace(clock_sample=clock_sample)), clock_sample


def test_a_fresh_kept_reading_maps_the_cut_without_a_round_trip() -> None:
    """The agent keeps the vault's cut clock read between barriers (``ClockKeeper``): a cut
    whose kept reading bounds it within ``CUT_FRESH_S`` takes no reading on its critical
    path; one older than ``CLOCK_MAX_AGE_S`` is never used, a kept one too uncertain (its
    drift term grown with age) is topped up by new readings."""
    from drsite.agent.barrier import CLOCK_MAX_AGE_S, CUT_FRESH_S, BarrierCommands

    calls: list[float] = []
    host, _ = _fake_host(0.0005, calls)
    bc = BarrierCommands(host)
    now = time.monotonic()
    fresh = ClockSample("clk", now - 0.5 + 1000.0, now - 0.5005, now - 0.4995)
    bc.clock.add(fresh)
    cut_at = now + 1000.0 + 0.2
    got = bc._samples("clk", now + 0.5, cut_at, 0.005, 0.0)
    assert calls == [] and got == [fresh]
    assert fresh.uncertainty(cut_at - fresh.offset) <= CUT_FRESH_S
    # a reading of another clock, or one past the staleness bound, is not used at all
    bc2 = BarrierCommands(host)
    bc2.clock.add(ClockSample("other", now + 5.0, now - 0.0005, now + 0.0005))
    old = now - CLOCK_MAX_AGE_S - 1.0
    bc2.clock.add(ClockSample("clk", old + 1000.0, old - 0.0005, old + 0.0005))
    assert bc2.clock.samples("clk", now) == []
    got = bc2._samples("clk", now + 0.5, cut_at, 0.005, 0.0)
    assert len(calls) >= 1 and all(s.received >= now for s in got)
    # a kept reading 12 s old: 0.5 ms radius + 12 ms drift > CUT_FRESH_S: read again
    calls.clear()
    bc3 = BarrierCommands(host)
    aged = now - 12.0
    bc3.clock.add(ClockSample("clk", aged + 1000.0, aged - 0.0005, aged + 0.0005))
    got = bc3._samples("clk", now + 0.5, cut_at, 0.005, 0.0)
    assert calls and best_sample(got, "clk", time.monotonic()) is not got[0]


def test_the_clock_keeper_reads_in_the_background_while_cuts_come() -> None:
    from drsite.agent.barrier import ClockKeeper

    calls: list[float] = []
    _, read = _fake_host(0.0005, calls)
    stop = False
    keeper = ClockKeeper(lambda: ClockSample(*read()), lambda: stop, every=0.02)
    time.sleep(0.1)
    assert calls == []   # nothing before the first cut
    keeper.cut_came()
    time.sleep(0.3)
    n = len(calls)
    assert n >= 3 and len(keeper.samples("clk", time.monotonic())) == min(n, 16)
    stop = True
    time.sleep(0.1)
    n = len(calls)
    time.sleep(0.1)
    assert len(calls) == n   # stopped with the agent
