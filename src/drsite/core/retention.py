"""Retention maths: which recovery points to keep.

Rules (all times in seconds, ``now`` injected):
- the newest point is always kept (it is what failover to "latest" uses);
- pinned points (a test failover or an uncommitted failover uses them) are always kept;
- every point younger than ``keep_all_s`` is kept;
- within the retention window, one crash-consistent point per ``thin_interval_s`` bucket is kept
  (the newest of its bucket), and one app-consistent point per ``app_interval_s`` bucket;
- points older than the retention window are pruned.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class RetentionRule:
    retention_s: float = 24 * 3600.0
    keep_all_s: float = 3600.0
    thin_interval_s: float = 3600.0
    app_interval_s: float = 3600.0


def rule_for_hours(hours: float) -> RetentionRule:
    """The rule a policy's ``retention_hours`` stands for: points for that long, every point of
    the first hour (of the whole window when it is shorter). Agents apply it; the vault checks
    the removals agents report against it."""
    keep_s = hours * 3600.0
    return RetentionRule(retention_s=keep_s, keep_all_s=min(RetentionRule().keep_all_s, keep_s))


@dataclass(frozen=True)
class PointStamp:
    point_id: str
    created_at: float
    app_consistent: bool = False
    pinned: bool = False
    seq: int = 0   # commit order; the newest point is the highest seq (clocks can step back)


def points_to_keep(points: Iterable[PointStamp], rule: RetentionRule, now: float) -> set[str]:
    pts = sorted(points, key=lambda p: (p.created_at, p.point_id))
    if not pts:
        return set()
    newest = max(pts, key=lambda p: (p.seq, p.created_at, p.point_id))
    keep: set[str] = {newest.point_id}
    crash_buckets: dict[int, PointStamp] = {}
    app_buckets: dict[int, PointStamp] = {}
    for p in pts:
        age = now - p.created_at
        if p.pinned or age < rule.keep_all_s:
            keep.add(p.point_id)
            continue
        if age > rule.retention_s:
            continue
        # bucket by absolute time so that buckets do not slide as ``now`` moves
        cb = int(p.created_at // max(rule.thin_interval_s, 1.0))
        crash_buckets[cb] = p  # sorted ascending: the last one wins, i.e. the newest
        if p.app_consistent:
            ab = int(p.created_at // max(rule.app_interval_s, 1.0))
            app_buckets[ab] = p
    keep.update(p.point_id for p in crash_buckets.values())
    keep.update(p.point_id for p in app_buckets.values())
    return keep
