"""Core logic with no I/O: extents, retry schedule, retention, planner."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drsite.core.clock import FakeClock
from drsite.core.errors import CorruptData, LowDiskSpace, NetworkError, VmNotFound
from drsite.core.extents import ExtentList, blocks_to_extents, coalesce
from drsite.core.model import TrackingState, validate_name
from drsite.core.retention import PointStamp, RetentionRule, points_to_keep
from drsite.core.retry import RetryState, retry_delay
from drsite.replication.planner import (
    Action,
    PlanInput,
    ResyncWindow,
    app_consistent_due,
    next_cycle_at,
    plan,
    validate_frequency,
)
from drsite.replication.report import ItemState

# ------------------------------------------------------------------------------------ extents


def _mask(ext: ExtentList, size: int) -> np.ndarray:
    m = np.zeros(size, bool)
    for s, n in ext:
        m[s:s + n] = True
    return m


ranges = st.lists(st.tuples(st.integers(0, 500), st.integers(0, 60)), max_size=30)


@given(ranges)
def test_coalesce_is_union_and_canonical(pairs: list[tuple[int, int]]) -> None:
    e = ExtentList.of(pairs)
    m = np.zeros(600, bool)
    for s, n in pairs:
        m[s:s + n] = True
    assert (_mask(e, 600) == m).all()
    ends = e.ends
    assert (e.lengths > 0).all()
    assert (e.starts[1:] > ends[:-1]).all()  # touching ranges merged


@given(ranges, ranges)
def test_subtract_intersect_union(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> None:
    ea, eb = ExtentList.of(a), ExtentList.of(b)
    ma, mb = _mask(ea, 600), _mask(eb, 600)
    assert (_mask(ea.subtract(eb), 600) == (ma & ~mb)).all()
    assert (_mask(ea.intersect(eb), 600) == (ma & mb)).all()
    assert (_mask(ea.union(eb), 600) == (ma | mb)).all()


@given(ranges, st.integers(1, 50))
def test_split_align_blocks(a: list[tuple[int, int]], k: int) -> None:
    e = ExtentList.of(a)
    s = e.split(k)
    assert (s.lengths <= k).all()
    assert (_mask(s, 600) == _mask(e, 600)).all()
    al = e.align(k, 560)
    assert (al.starts % k == 0).all()
    assert (_mask(al, 600) >= _mask(e.clip(560), 600)).all()
    blocks = e.blocks(k)
    back = blocks_to_extents(blocks, k, 600)
    assert (_mask(back, 600) >= _mask(e, 600)).all()


def test_coalesce_large_is_fast() -> None:
    rng = np.random.default_rng(1)
    s = rng.integers(0, 1 << 34, 1_000_000) // 4096 * 4096
    e = coalesce(s, np.full(s.size, 4096))
    assert e.total == len(np.unique(s)) * 4096


# ------------------------------------------------------------------------------------ retry


def test_retry_schedule_is_the_seeds() -> None:
    assert [retry_delay(i) / 60 for i in range(1, 9)] == [1, 2, 4, 8, 10, 30, 30, 30]


def test_retry_state_transient_then_permanent() -> None:
    clock = FakeClock()
    r = RetryState()
    for expected in (1, 2, 4, 8, 10, 30, 30):
        r.record_failure(NetworkError("peer down"), clock.now())
        assert r.next_attempt_at == clock.now() + expected * 60
        assert not r.due(clock.now())
        clock.advance(expected * 60)
        assert r.due(clock.now())
    r.record_failure(LowDiskSpace("full"), clock.now())
    assert r.last_error and r.last_error["class"] == "transient"
    r.record_success()
    assert r.failures == 0 and r.due(clock.now())
    r.record_failure(VmNotFound("gone"), clock.now())
    assert r.gave_up and not r.due(clock.now() + 10**6)
    assert RetryState.from_dict(r.to_dict()).gave_up


def test_error_classes() -> None:
    assert NetworkError("x").transient and not CorruptData("x").transient
    d = CorruptData("bad pack").to_dict()
    assert d["class"] == "permanent" and d["hint"]


# ------------------------------------------------------------------------------------ retention


def test_retention_keeps_recent_thins_old_prunes_expired() -> None:
    now = 100 * 3600.0
    rule = RetentionRule(retention_s=24 * 3600, keep_all_s=3600, thin_interval_s=3600,
                         app_interval_s=4 * 3600)
    # a 5-minute policy for 30 hours: 360 points, every 12th app-consistent
    pts = [PointStamp(f"p{i:04d}", now - i * 300, app_consistent=(i % 12 == 0)) for i in range(360)]
    keep = points_to_keep(pts, rule, now)
    ages = {p.point_id: now - p.created_at for p in pts}
    assert "p0000" in keep
    assert all(ages[k] <= 24 * 3600 for k in keep)
    recent = [p.point_id for p in pts if now - p.created_at < 3600]
    assert set(recent) <= keep
    older = [k for k in keep if ages[k] >= 3600]
    assert 20 <= len(older) <= 30  # about one per hour over the remaining 23 hours
    pinned = PointStamp("old-pinned", now - 29 * 3600, pinned=True)
    assert "old-pinned" in points_to_keep([*pts, pinned], rule, now)


def test_retention_always_keeps_newest() -> None:
    rule = RetentionRule(retention_s=60, keep_all_s=0)
    assert points_to_keep([PointStamp("a", 0.0)], rule, 10_000.0) == {"a"}


# ------------------------------------------------------------------------------------ planner


def _inp(**kw: object) -> PlanInput:
    base: dict[str, object] = dict(state=ItemState.PROTECTED, now=1000.0, next_cycle_at=900.0,
                                   retry_due=True, resync_by_hand=False, in_resync_window=False,
                                   tracking=TrackingState.ACTIVE, largest_log_fraction=0.1,
                                   has_point=True, cycle_in_flight=False)
    base.update(kw)
    return PlanInput(**base)  # type: ignore[arg-type]


def test_planner_rules() -> None:
    assert plan(_inp()).action is Action.DELTA
    assert plan(_inp(next_cycle_at=2000.0)).action is Action.WAIT
    assert plan(_inp(has_point=False)).action is Action.INITIAL
    assert plan(_inp(retry_due=False)).action is Action.WAIT
    assert plan(_inp(state=ItemState.CRITICAL)).action is Action.NOTHING
    assert plan(_inp(state=ItemState.CRITICAL, resync_by_hand=True)).action is Action.RESYNC
    assert plan(_inp(tracking=TrackingState.UNTRUSTED)).action is Action.MARK_RESYNC
    assert plan(_inp(largest_log_fraction=0.51)).action is Action.MARK_RESYNC
    assert plan(_inp(largest_log_fraction=0.5)).action is Action.DELTA
    assert plan(_inp(state=ItemState.RESYNC_REQUIRED)).action is Action.WAIT
    assert plan(_inp(state=ItemState.RESYNC_REQUIRED, in_resync_window=True)).action is Action.RESYNC
    assert plan(_inp(state=ItemState.RESYNCING)).action is Action.RESYNC
    assert plan(_inp(cycle_in_flight=True, next_cycle_at=2000.0)).action is Action.DELTA


def test_resync_window_and_schedule() -> None:
    w = ResyncWindow()  # outside office hours, 18:00-08:00
    assert w.contains(23 * 60) and w.contains(7 * 60 + 59) and not w.contains(12 * 60)
    assert ResyncWindow("09:00", "10:00").contains(9 * 60 + 30)
    assert ResyncWindow("00:00", "00:00").contains(12 * 60)
    assert next_cycle_at(None, 300, 50.0) == 50.0
    assert next_cycle_at(100.0, 300, 150.0) == 400.0
    assert next_cycle_at(100.0, 300, 5000.0) == 5000.0  # missed slots are not made up twice
    assert app_consistent_due(None, 3600, 0.0) and not app_consistent_due(0.0, 3600, 10.0)
    assert not app_consistent_due(None, None, 0.0)
    with pytest.raises(ValueError):
        validate_frequency(4.9)
    assert validate_frequency(30) == 30


def test_names_refuse_traversal() -> None:
    from drsite.core.errors import InvalidInput

    assert validate_name("vm", "web-01") == "web-01"
    for bad in ("../etc", "a/b", "", "x" * 64, "a\nb", "..", ".hidden"):
        with pytest.raises(InvalidInput):
            validate_name("vm", bad)


@settings(max_examples=50)
@given(st.integers(1, 40))
def test_retry_delay_monotone(n: int) -> None:
    assert retry_delay(n) <= retry_delay(n + 1)


def test_token_bucket_holds_the_rate() -> None:
    from drsite.core.throttle import TokenBucket

    clock = FakeClock()
    b = TokenBucket(1000.0, clock, burst_s=0.5)
    t0 = clock.now()
    for _ in range(100):
        b.consume(100)  # 10,000 bytes at 1,000 B/s
    assert 9.4 <= clock.now() - t0 <= 10.0
    assert max(clock.sleeps) <= 0.11  # small pieces: no long stalls
    # an empty bucket (a scrub) has no burst at its start: every byte is paid for
    clock = FakeClock()
    b = TokenBucket(1000.0, clock, burst_s=0.5, full=False)
    t0 = clock.now()
    for _ in range(100):
        b.consume(100)
    assert clock.now() - t0 == pytest.approx(10.0)
