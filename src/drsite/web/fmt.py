"""Formatting for humans: relative times with the absolute time on hover, sizes, durations.

Pure functions (the current time is passed in), registered as Jinja filters by ``render``.
Everything returned as ``Markup`` escapes what it interpolates.
"""

from __future__ import annotations

import time
from typing import Any

from markupsafe import Markup

from drsite.core.states import NOT_PROTECTED, ItemProtection, JobState, TaskState
from drsite.replication.report import Health, ItemState


def utc(t: float | None) -> str:
    """``2026-11-23 21:30:05 UTC`` (empty for None)."""
    if t is None:
        return ""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


def iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def duration(seconds: float | None) -> str:
    """A short human duration: ``45 s``, ``3 min``, ``2 h 5 min``, ``3 d 4 h``."""
    if seconds is None:
        return "—"
    s = abs(float(seconds))
    if s < 1:
        return f"{s:.1f} s" if s >= 0.05 else "0 s"
    if s < 90:
        return f"{s:.0f} s"
    if s < 3600:
        return f"{s / 60:.0f} min"
    if s < 86400:
        h, m = divmod(int(s) // 60, 60)
        return f"{h} h {m} min" if m else f"{h} h"
    d, h = divmod(int(s) // 3600, 24)
    return f"{d} d {h} h" if h else f"{d} d"


def ago_text(t: float | None, now: float) -> str:
    if t is None:
        return "never"
    delta = now - t
    if -2 <= delta < 2:
        return "just now"
    if delta < 0:
        return f"in {duration(-delta)}"
    return f"{duration(delta)} ago"


def ago(t: float | None, now: float) -> Markup:
    """``<time datetime=… title="absolute UTC">3 min ago</time>``."""
    if t is None:
        return Markup('<span class="muted">never</span>')
    return Markup('<time datetime="{}" title="{}">{}</time>').format(iso(t), utc(t), ago_text(t, now))


def size(n: float | int | None) -> str:
    """Bytes in binary units: ``512 B``, ``3.2 MiB``."""
    if n is None:
        return "—"
    v = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(v) < 1024 or unit == "TiB":
            return f"{v:.0f} {unit}" if unit == "B" else f"{v:.1f} {unit}"
        v /= 1024
    return f"{v:.1f} TiB"  # pragma: no cover


def rate(bps: float | None) -> str:
    """Bytes per second: ``1.5 MiB/s``."""
    return "—" if bps is None else f"{size(bps)}/s"


def pct(v: float | None) -> str:
    return "—" if v is None else f"{v:.0f} %"


HEALTH_CLASSES: dict[str, str] = {Health.NORMAL: "ok", Health.WARNING: "warn",
                                  Health.CRITICAL: "crit"}
STATE_CLASSES: dict[str, str] = {
    JobState.SUCCEEDED: "ok", JobState.RUNNING: "run", JobState.QUEUED: "muted",
    JobState.CANCELLING: "warn", JobState.FAILED: "crit", JobState.CANCELLED: "muted",
    TaskState.PENDING: "muted", TaskState.SKIPPED: "muted",
    # protected items: replication state and protection life cycle
    ItemProtection.PROTECTED: "ok", ItemState.INITIAL_REPLICATION: "run",
    ItemState.RESYNCING: "run", ItemProtection.ENABLING: "run", ItemState.RESYNC_REQUIRED: "warn",
    ItemProtection.FAILING_OVER: "run", ItemProtection.FAILED_OVER: "warn",
    NOT_PROTECTED: "warn", ItemState.CRITICAL: "crit",
    "passed": "ok",  # a drill (running and failed are the job states' words)
    # synchronous mode (the item's ``sync.state``)
    "in_sync": "ok", "suspended": "warn", "unknown": "muted"}


def badge(value: Any, kind: str = "state") -> Markup:
    """A coloured label for a health or a job/task/item state."""
    text = "—" if value is None else str(value)
    table = HEALTH_CLASSES if kind == "health" else STATE_CLASSES
    cls = table.get(text, HEALTH_CLASSES.get(text, "neutral"))
    return Markup('<span class="badge {}">{}</span>').format(cls, text.replace("_", " "))


def hint_text(err: dict[str, Any] | None) -> str:
    if not err:
        return ""
    return str(err.get("hint") or "")


def short(s: Any, n: int = 80) -> str:
    text = "" if s is None else str(s)
    return text if len(text) <= n else text[: n - 1] + "…"

