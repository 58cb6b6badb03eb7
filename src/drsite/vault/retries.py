"""When a failed command is tried again (beyond the seed's table).

The seed's schedule (``core.retry``: 1, 2, 4, 8, 10 min, then every 30 min) is for faults that
take time to clear. A failure to reach the *other site* right after one of its processes was
killed is the common case of issue 19, and it clears in seconds: the first retry of such a
failure comes as soon as that site's store agent heartbeats after the failure (it is back), or
two heartbeat intervals after it while that agent counts as up, once per run of failures — a
second failure (the link itself is down) follows the seed's schedule. Used by the scheduler
(cycles, resyncs) and by the EnableProtection job (``protect``).

Responsible for: that rule and the facts it needs. Not responsible for: the schedule itself.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from drsite.core.retry import RetryState
from drsite.vault.db.models import Host, Site

EARLY_RETRY_CODES = ("network", "peer_unavailable", "command_interrupted")


def store_came_back(code: str | None, failed_at: float | None,
                    store_beat_at: float | None) -> bool:
    """A failure to reach the item's recovery store (``code``), and the agent serving that
    store has heartbeated since (``store_beat_at`` > ``failed_at``): it is back, the usual
    cause being that agent restarting."""
    return (code in EARLY_RETRY_CODES and failed_at is not None and store_beat_at is not None
            and store_beat_at > failed_at)


def early_retry(retry: RetryState, store_beat_at: float | None, now: float,
                heartbeat_interval: float) -> bool:
    """The first retry after a failure to reach the other site comes early — as soon as the
    agent serving the item's store heartbeats after the failure (``store_beat_at``: its last
    heartbeat while it counts as up, None when it does not), or two heartbeat intervals after
    it — not after the seed's first minute: the usual cause is that agent restarting (issue
    19: after a kill -9 anywhere, back to protected within a cycle). Once only per run of
    failures: a second failure (the link itself is down) follows the seed's schedule."""
    if retry.failures != 1 or retry.gave_up or store_beat_at is None \
            or retry.first_failure_at is None:
        return False
    code = (retry.last_error or {}).get("code")
    return store_came_back(code, retry.first_failure_at, store_beat_at) or (
        code in EARLY_RETRY_CODES and now - retry.first_failure_at >= 2 * heartbeat_interval)


def store_sites_up(s: Session, now: float, down_after_s: float) -> dict[int, float]:
    """Sites with an agent that serves a recovery store and is up (a heartbeat within
    ``down_after_s``), and that agent's last heartbeat."""
    rows = s.execute(select(Host.site_id, Host.last_heartbeat).join(
        Site, Site.store_host_id == Host.id).where(
        Host.site_id == Site.id, Host.store_url.is_not(None), Host.revoked_at.is_(None),
        Host.last_heartbeat >= now - down_after_s))
    return {site: float(at) for site, at in rows if at is not None}
