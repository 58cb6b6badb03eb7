"""The vault's scheduler: when each protected item replicates.

Per protected item that no job holds, at each tick (clock injected), the pure planner
(:func:`drsite.replication.planner.plan`) decides from the item's last report and the vault's
own facts:

- ``delta`` → a ``cycle`` command (``app_consistent`` when the policy's app-consistent interval
  has passed since the last app-consistent point); cycles are anchored to the times they were
  sent, so slow cycles do not drift the schedule;
- ``resync`` → a ``resync`` command (``by_hand: false``) — the planner only says so inside the
  policy's resync window (by hand, the Resync job sends it at once);
- never more than one outstanding replication command (protect, cycle, resync) per item;
- ``retention`` hourly (own command, one outstanding at most);
- after a failed command: transient → next attempt after 1, 2, 4, 8, 10 min, then every 30 min
  (:class:`drsite.core.retry.RetryState`, kept in the item row so a restart keeps the schedule);
  permanent → the item goes Critical and nothing more is sent until an operator resyncs by hand.
  ``tracking_lost`` and ``corrupt_data`` are not Critical: the agent marks the item for resync.

Responsible for: sending replication commands on time and digesting their results. Not
responsible for: jobs (they own an item while active) or health (``health``).
"""

from __future__ import annotations

import logging

from sqlalchemy import select
from sqlalchemy.orm import Session

from drsite.core.model import TrackingState
from drsite.core.retry import RetryState
from drsite.replication.planner import Action, PlanInput, app_consistent_due, next_cycle_at, plan
from drsite.replication.report import ItemState
from drsite.vault import commands
from drsite.vault.audit import record_event
from drsite.vault.db.database import Database
from drsite.vault.db.models import Command, Group, Item, Policy
from drsite.vault.policies import parse_window
from drsite.vault.settings import VaultSettings

log = logging.getLogger(__name__)

# permanent errors the agent remedies itself by marking the item for resync
SELF_REMEDIED = frozenset({"tracking_lost", "corrupt_data"})


def effective_state(item: Item) -> ItemState:
    if item.critical_error is not None:
        return ItemState.CRITICAL
    try:
        return ItemState(item.state)
    except ValueError:
        return ItemState.NEW


def item_policy(s: Session, item: Item) -> Policy | None:
    group = s.get(Group, item.group_id)
    return s.get(Policy, group.policy_id) if group is not None and group.policy_id else None


def apply_result(s: Session, cmd: Command, now: float) -> None:
    """Digest the end of a scheduler command (no job): retry bookkeeping and Critical."""
    if cmd.job_id is not None or cmd.item_id is None or cmd.kind not in ("cycle", "resync", "retention"):
        return
    item = s.get(Item, cmd.item_id)
    if item is None or item.status != "protected":
        return
    retry = RetryState.from_dict(item.retry or {})
    if cmd.status == "succeeded":
        if cmd.kind in ("cycle", "resync"):
            retry.record_success()
            item.retry = retry.to_dict()
        if cmd.kind == "cycle" and cmd.args.get("app_consistent"):
            item.last_app_cycle_at = cmd.created_at
        return
    if cmd.status != "failed":
        return
    err = commands.error_from_dict(cmd.error)
    if not err.transient and err.code in SELF_REMEDIED:
        return
    if cmd.kind == "retention":
        log.warning("retention of %s failed: %s", item.id, err.message)
        return
    retry.record_failure(err, now)
    item.retry = retry.to_dict()
    if not err.transient:
        item.critical_error = err.to_dict()
        item.state = ItemState.CRITICAL.value
        record_event(s, now, "item", item.id, f"{item.vm_name} is critical: {err.message}")
    item.updated_at = now


class Scheduler:
    """Sends replication commands on time. ``tick()`` is called by the vault's loop or tests."""

    def __init__(self, db: Database, settings: VaultSettings) -> None:
        self.db = db
        self.settings = settings

    def tick(self) -> list[Command]:
        """One pass over the protected items; returns the commands it queued."""
        sent: list[Command] = []
        with self.db.tx() as s:
            now = self.settings.clock.now()
            items = s.scalars(select(Item).where(Item.status == "protected",
                                                 Item.active_job_id.is_(None)).order_by(Item.id)).all()
            for item in items:
                sent.extend(self._item(s, item, now))
        return sent

    def decide(self, s: Session, item: Item, policy: Policy, now: float) -> Action:
        """The planner's action for ``item`` now (pure in what it reads)."""
        retry = RetryState.from_dict(item.retry or {})
        window = parse_window(policy.resync_window)
        report = item.report or {}
        nxt = next_cycle_at(item.last_cycle_sent_at, policy.frequency_s, now)
        if retry.failures and retry.due(now):
            nxt = now  # a retry is an attempt of its own, whatever the frequency
        pi = PlanInput(
            state=effective_state(item), now=now, next_cycle_at=nxt,
            retry_due=retry.due(now), resync_by_hand=False,
            in_resync_window=window.contains(self.settings.minute_of_day(now)),
            tracking=TrackingState.ACTIVE, largest_log_fraction=0.0,
            has_point=item.last_point_time is not None or bool(report.get("last_point_id")),
            cycle_in_flight=False)
        return plan(pi).action

    def _item(self, s: Session, item: Item, now: float) -> list[Command]:
        policy = item_policy(s, item)
        if policy is None:
            return []
        out: list[Command] = []
        if commands.outstanding(s, item.id, commands.REPLICATION_KINDS) is None:
            action = self.decide(s, item, policy, now)
            if action is Action.DELTA:
                last_app = max(item.last_app_point_time or 0.0, item.last_app_cycle_at or 0.0) or None
                app = app_consistent_due(last_app, policy.app_consistent_every_s, now)
                out.append(commands.enqueue(s, host_id=item.host_id, kind="cycle", item_id=item.id,
                                            args={"app_consistent": app}, now=now))
                item.last_cycle_sent_at = now
            elif action is Action.RESYNC:
                out.append(commands.enqueue(s, host_id=item.host_id, kind="resync", item_id=item.id,
                                            args={"by_hand": False}, now=now))
        if effective_state(item) is not ItemState.CRITICAL and (
                item.last_retention_at is None
                or now - item.last_retention_at >= self.settings.retention_every_s) \
                and commands.outstanding(s, item.id, ("retention",)) is None:
            out.append(commands.enqueue(s, host_id=item.host_id, kind="retention", item_id=item.id,
                                        args={}, now=now))
            item.last_retention_at = now
        return out
