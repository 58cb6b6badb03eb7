"""When a failed command is tried again (beyond the seed's table).

The seed's schedule (``core.retry``: 1, 2, 4, 8, 10 min, then every 30 min) is for faults that
take time to clear. A failure to reach the *other site* right after one of its processes was
killed is the common case of issue 19, and it clears in seconds: the first retry of such a
failure comes as soon as that site's store agent heartbeats after the failure (it is back), or
two heartbeat intervals after it while that agent counts as up, once per run of failures — a
second failure (the link itself is down) follows the seed's schedule. Besides, every restart of
that agent after the last failure (its first heartbeat saying ``restarted``,
``hosts.started_at``) earns one retry at once, whatever the count: an agent killed twice in a
row is back in seconds both times, while a link that stays down (no restart) is not hammered.
Used by the scheduler (cycles, resyncs) and by the EnableProtection job (``protect``).

Responsible for: that rule and the facts it needs. Not responsible for: the schedule itself.
"""

from __future__ import annotations

from typing import NamedTuple

from sqlalchemy import select
from sqlalchemy.orm import Session

from drsite.core.retry import RetryState
from drsite.vault.db.models import Host, Site

EARLY_RETRY_CODES = ("network", "peer_unavailable", "command_interrupted")


class StoreAgent(NamedTuple):
    """The agent serving a site's recovery store, while it counts as up."""

    beat_at: float  # its last heartbeat
    started_at: float | None  # when its process last started (vault time), if known


def store_came_back(code: str | None, failed_at: float | None,
                    store_beat_at: float | None) -> bool:
    """A failure to reach the item's recovery store (``code``), and the agent serving that
    store has heartbeated since (``store_beat_at`` > ``failed_at``): it is back, the usual
    cause being that agent restarting."""
    return (code in EARLY_RETRY_CODES and failed_at is not None and store_beat_at is not None
            and store_beat_at > failed_at)


def early_retry(retry: RetryState, store: StoreAgent | None, now: float,
                heartbeat_interval: float) -> bool:
    """Whether a retry after a failure to reach the other site goes now, before the seed's
    schedule (``store``: the agent serving the item's store, None while it counts as down):
    - the first failure of a run: as soon as that agent heartbeats after it, or two heartbeat
      intervals after it (issue 19: after a kill -9 anywhere, back to protected within a cycle);
    - any failure: once that agent has restarted since the last failure (one retry per
      restart: a failure after it waits for the next restart or the schedule)."""
    if retry.gave_up or store is None or retry.first_failure_at is None:
        return False
    code = (retry.last_error or {}).get("code")
    if code not in EARLY_RETRY_CODES:
        return False
    # (a state saved before last_failure_at was kept reads it as first_failure_at: from_dict)
    if store.started_at is not None and retry.last_failure_at is not None \
            and store.started_at > retry.last_failure_at:
        return True
    return retry.failures == 1 and (
        store_came_back(code, retry.first_failure_at, store.beat_at)
        or now - retry.first_failure_at >= 2 * heartbeat_interval)


def store_sites_up(s: Session, now: float, down_after_s: float) -> dict[int, StoreAgent]:
    """Sites with an agent that serves a recovery store and is up (a heartbeat within
    ``down_after_s``), and that agent's last heartbeat and start."""
    rows = s.execute(select(Host.site_id, Host.last_heartbeat, Host.started_at).join(
        Site, Site.store_host_id == Host.id).where(
        Host.site_id == Site.id, Host.store_url.is_not(None), Host.revoked_at.is_(None),
        Host.last_heartbeat >= now - down_after_s))
    return {site: StoreAgent(float(at), None if started is None else float(started))
            for site, at, started in rows if at is not None}
