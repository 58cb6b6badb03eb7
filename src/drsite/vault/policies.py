"""Policy rules: validation of a policy's values and the settings an agent receives.

Responsible for: the ranges of every policy field and turning a policy into the ``settings``
dict of ``protect``/``update_settings`` commands. Not responsible for: storage or scheduling.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from drsite.core.errors import InvalidInput
from drsite.replication.planner import ResyncWindow, parse_hhmm
from drsite.vault.db.models import Policy

DEFAULT_RESYNC_WINDOW = "18:00-08:00"


def parse_window(text: str) -> ResyncWindow:
    """``"HH:MM-HH:MM"`` → :class:`ResyncWindow` (may wrap midnight; equal ends = always)."""
    start, sep, end = text.partition("-")
    try:
        if not sep:
            raise ValueError(text)
        parse_hhmm(start)
        parse_hhmm(end)
    except ValueError:
        raise InvalidInput(f"invalid resync window {text!r}",
                           hint="Use 'HH:MM-HH:MM', e.g. '18:00-08:00' (outside office hours).") from None
    return ResyncWindow(start.strip(), end.strip())


def parse_initial_start(text: str | None, now: float, minute_of_day: int) -> float:
    """When initial replication may start: ``None`` → now; ``"HH:MM"`` → the next time the
    local clock shows it; an ISO 8601 date-time (with offset, or UTC) → that instant."""
    if text is None:
        return now
    if len(text) <= 5 and ":" in text:
        target = parse_hhmm(text)
        wait_min = (target - minute_of_day) % (24 * 60)
        return now + wait_min * 60.0
    when = dt.datetime.fromisoformat(text)
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.timestamp()


def validate_initial_start(text: str | None) -> str | None:
    if text is None:
        return None
    try:
        parse_initial_start(text, 0.0, 0)
    except ValueError:
        raise InvalidInput(f"invalid initial_replication_start {text!r}",
                           hint="Use a time of day 'HH:MM', an ISO 8601 date-time, or null "
                                "for now.") from None
    return text


@dataclass(frozen=True)
class PolicyValues:
    """A policy's fields, checked."""

    frequency_s: float
    retention_hours: float
    app_consistent_every_s: float | None
    initial_replication_start: str | None
    compression: str  # "auto" | "zstd" | "off" (core.compression.compression_mode)
    encryption: bool
    bandwidth_limit_bps: int | None
    resync_window: str
    rpo_threshold_s: float
    scrub_interval_s: float | None = 86400.0
    scrub_rate_bps: int | None = 32 << 20
    mode: str = "async"
    sync_budget_ms: int = 50

    def check(self) -> PolicyValues:
        if self.mode not in ("async", "sync"):
            raise InvalidInput(f"mode must be 'async' or 'sync', not {self.mode!r}",
                               hint="sync: a guest write waits for the recovery site (file "
                                    "VMs on an agent-to-agent store); async: cycles only.")
        if not 1 <= self.sync_budget_ms <= 60_000:
            raise InvalidInput("sync_budget_ms must be between 1 and 60000",
                               hint="The most a guest write may wait for the recovery site "
                                    "before the item falls back to asynchronous; 50 suits "
                                    "a metro link.")
        if self.frequency_s < 5:
            raise InvalidInput("frequency_s must be at least 5 seconds",
                               hint="Use 30, 300 or 900, or any value >= 5.")
        if self.frequency_s > 86400:
            raise InvalidInput("frequency_s must be at most 86400 seconds (one day)")
        if not 0 < self.retention_hours <= 24 * 365:
            raise InvalidInput("retention_hours must be > 0 and at most one year (8760)")
        if self.app_consistent_every_s is not None and self.app_consistent_every_s < self.frequency_s:
            raise InvalidInput("app_consistent_every_s must be at least frequency_s (or null)")
        if self.bandwidth_limit_bps is not None and self.bandwidth_limit_bps < 1024:
            raise InvalidInput("bandwidth_limit_bps must be at least 1024 (or null for no limit)")
        # encryption: true is checked against each group's store (vault.stores.check_encryption):
        # only a cloud store with keys encrypts at rest; a group with a site store refuses it
        if self.rpo_threshold_s < self.frequency_s:
            raise InvalidInput("rpo_threshold_s must be at least frequency_s")
        if self.scrub_interval_s is not None and not 10 <= self.scrub_interval_s <= 366 * 86400:
            raise InvalidInput("scrub_interval_s must be between 10 seconds and a year (or null "
                               "for no scrub)", hint="One day (86400) suits most stores.")
        if self.scrub_rate_bps is not None and self.scrub_rate_bps < 64 * 1024:
            raise InvalidInput("scrub_rate_bps must be at least 65536 (or null for no limit)")
        parse_window(self.resync_window)
        validate_initial_start(self.initial_replication_start)
        return self


def apply_values(p: Policy, v: PolicyValues) -> None:
    p.frequency_s = v.frequency_s
    p.retention_hours = v.retention_hours
    p.app_consistent_every_s = v.app_consistent_every_s
    p.initial_replication_start = v.initial_replication_start
    p.compression = v.compression
    p.encryption = v.encryption
    p.bandwidth_limit_bps = v.bandwidth_limit_bps
    p.resync_window = v.resync_window
    p.rpo_threshold_s = v.rpo_threshold_s
    p.scrub_interval_s = v.scrub_interval_s
    p.scrub_rate_bps = v.scrub_rate_bps
    p.mode = v.mode
    p.sync_budget_ms = v.sync_budget_ms


def agent_settings(p: Policy) -> dict[str, Any]:
    """The ``settings`` of ``protect`` and ``update_settings`` commands."""
    return {"frequency_s": p.frequency_s, "app_consistent_every_s": p.app_consistent_every_s,
            "rpo_threshold_s": p.rpo_threshold_s, "retention_hours": p.retention_hours,
            # an agent reads "compression_mode"; one older than it reads the boolean
            "resync_window": p.resync_window, "compression": p.compression != "off",
            "compression_mode": p.compression, "encryption": p.encryption,
            "bandwidth_limit_bps": p.bandwidth_limit_bps,
            "mode": p.mode or "async", "sync_budget_ms": p.sync_budget_ms or 50}
