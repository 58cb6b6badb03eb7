"""The vault's scheduler: when each protected item replicates.

Per protected item that no job holds, at each tick (clock injected), the pure planner
(:func:`drsite.replication.planner.plan`) decides from the item's last report and the vault's
own facts:

- ``delta`` → a ``cycle`` command (``app_consistent`` when the policy's app-consistent interval
  has passed since the last app-consistent point); each cycle is anchored to the time it was
  due (``items.last_cycle_sent_at`` holds that anchor), so neither slow cycles nor a late
  scheduler drift the schedule; a slot missed by more than one period is not made up;
- ``resync`` → a ``resync`` command (``by_hand: false``) — the planner only says so inside the
  policy's resync window (by hand, the Resync job sends it at once);
- never more than one outstanding replication command (protect, cycle, resync) per item, and
  none while the item's hand-back to its source (``failover_resume_source``) is open;
- ``retention`` hourly (own command, one outstanding at most; ``keep``: the member points
  group points within retention keep, ``barrier.kept_member_points``);
- ``scrub`` of the item's recovery store every ``policy.scrub_interval_s``, sent to the host
  that reads the store cheaply, and a repair ``resync`` (compared with what the store can
  restore) when a scrub found the newest point damaged (rules in ``vault/scrub.py``);
- after a failed command: transient → next attempt after 1, 2, 4, 8, 10 min, then every 30 min
  (:class:`drsite.core.retry.RetryState`, kept in the item row so a restart keeps the schedule);
  permanent → the item goes Critical and nothing more is sent until an operator resyncs by hand.
  A site store's refusal of the source's writes (``forbidden``) is Critical only when the
  store's agent has confirmed the item's grant (``storeacl.grant_pending``); before that (a
  list in flight after a cancelled failover) it is ``grant_pending``, retried as soon as the
  agent confirms the list.
  ``tracking_lost`` and ``corrupt_data`` are not Critical: the agent marks the item for resync.

Responsible for: sending replication commands on time and digesting their results. Not
responsible for: jobs (they own an item while active) or health (``health``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, false, or_, select, true, update
from sqlalchemy.orm import Session

from drsite.core.errors import CorruptData, Forbidden, GrantPending, TrackingLost, from_dict
from drsite.core.model import TrackingState
from drsite.core.retention import rule_for_hours
from drsite.core.retry import RetryState
from drsite.core.states import OPEN_COMMAND_STATUSES, CommandStatus, ItemProtection
from drsite.replication.planner import Action, PlanInput, app_consistent_due, next_cycle_at, plan
from drsite.replication.report import ItemState
from drsite.vault import commands, storeacl
from drsite.vault import scrub as scrubbing
from drsite.vault.audit import record_event
from drsite.vault.barrier import BarrierRunner, kept_member_points
from drsite.vault.db.database import Database
from drsite.vault.db.models import Command, Group, Host, Item, Policy
from drsite.vault.ids import new_id
from drsite.vault.itemfacts import ItemFacts, ItemRow, load_facts
from drsite.vault.policies import agent_settings, parse_window
from drsite.vault.retries import StoreAgent, early_retry, store_sites_up
from drsite.vault.settings import VaultSettings

log = logging.getLogger(__name__)

# permanent errors the agent remedies itself by marking the item for resync
SELF_REMEDIED = (TrackingLost, CorruptData)
# while one of these is open for an item, its source has not been told the item is back (a
# cancel's hand-back queued while the source's agent was down): nothing is sent before it — a
# cycle would write with the old generation and be fenced, leaving the item Critical
HANDBACK_KINDS = frozenset({"failover_resume_source"})


def effective_state(item: Item | ItemFacts) -> ItemState:
    if item.critical_error is not None:
        return ItemState.CRITICAL
    try:
        return ItemState(item.state)
    except ValueError:
        return ItemState.NEW


def item_policy(s: Session, item: Item | ItemFacts | ItemRow) -> Policy | None:
    group = s.get(Group, item.group_id)
    return s.get(Policy, group.policy_id) if group is not None and group.policy_id else None


def preload_policies(s: Session) -> list[object]:
    """Load every group and policy into ``s`` in two queries; keep the returned list alive so
    that :func:`item_policy` (``Session.get``) finds them in the identity map (it holds weak
    references) instead of querying twice per item."""
    return [*s.scalars(select(Group)), *s.scalars(select(Policy)), *s.scalars(select(Host))]


def apply_result(s: Session, cmd: Command, now: float) -> None:
    """Digest the end of a scheduler command (no job): retry bookkeeping and Critical; scrub
    reports (``vault/scrub.py``)."""
    if cmd.kind == "scrub" and cmd.item_id is not None and cmd.job_id is None:
        _apply_scrub(s, cmd, now)
        return
    if cmd.job_id is not None or cmd.item_id is None \
            or cmd.kind not in ("cycle", "resync", "retention", "group_seal"):
        return
    item = s.get(Item, cmd.item_id)
    if item is None or item.status != ItemProtection.PROTECTED:
        return
    retry = RetryState.from_dict(item.retry or {})
    if cmd.status == CommandStatus.SUCCEEDED:
        if cmd.kind in ("cycle", "resync", "group_seal"):
            retry.record_success()
            item.retry = retry.to_dict()
        if cmd.kind == "cycle" and cmd.args.get("app_consistent"):
            item.last_app_cycle_at = cmd.created_at
        return
    if cmd.status != CommandStatus.FAILED:
        return
    err = from_dict(cmd.error)
    if isinstance(err, SELF_REMEDIED):
        return
    if cmd.kind == "retention":
        log.warning("retention of %s failed: %s", item.id, err.message)
        return
    if err.code == Forbidden.code:
        # the site store refused the source's writes (the engine reports it as a failure to
        # retry: it cannot tell why). Writes the vault has granted but the store agent's list
        # does not hold yet (after a cancelled failover, before its next heartbeat) are tried
        # again as soon as the agent confirms the list (tick); with the grant confirmed, the
        # refusal is what it says: Critical
        why = storeacl.grant_pending(s, item, now)
        err = GrantPending(f"{err.message} ({why})") if why is not None \
            else Forbidden(err.message, hint=err.hint)
    retry.record_failure(err, now)
    item.retry = retry.to_dict()
    if not err.transient:
        item.critical_error = err.to_dict()
        item.state = ItemState.CRITICAL
        record_event(s, now, "item", item.id, f"{item.vm_name} is critical: {err.message}")
    item.updated_at = now


def _apply_scrub(s: Session, cmd: Command, now: float) -> None:
    item = s.get(Item, cmd.item_id)
    if item is None:
        return
    host = s.get(Host, cmd.host_id)
    name = host.name if host is not None else cmd.host_id
    if cmd.status == CommandStatus.SUCCEEDED:
        scrubbing.apply_scrub(s, item, dict((cmd.result or {}).get("scrub") or {}), name, now)
    elif cmd.status == CommandStatus.FAILED:
        log.warning("scrub of %s on %s failed: %s", item.id, name, (cmd.error or {}).get("message"))
        scrubbing.apply_scrub_failure(item, dict(cmd.error or {}), name, now)


@dataclass
class _Due:
    """One command the scheduler decided to send, and the item fields that go with it."""

    item_id: str
    host_id: str
    kind: str
    args: dict[str, Any]
    item_values: dict[str, Any]


class Scheduler:
    """Sends replication commands on time. ``tick()`` is called by the vault's loop or tests.

    A tick reads in set-based queries (the policies; the columns, as plain tuples
    (``itemfacts``), of only the protected items that may need something now; their open
    commands) outside any write transaction, decides in Python, then writes only the due
    commands and their items in one short transaction (items in id order, so it does not
    dead-lock with heartbeats on PostgreSQL)."""

    def __init__(self, db: Database, settings: VaultSettings) -> None:
        self.db = db
        self.settings = settings
        self._windows: dict[tuple[str, float], bool] = {}
        self.barriers = BarrierRunner(db, settings)

    def tick(self) -> list[Command]:
        """One pass over the protected items (and the consistency groups' barriers, whose
        members' cycles they are); returns the per-item commands it queued."""
        self.barriers.tick()
        now = self.settings.clock.now()
        with self.db.read() as s:
            policies = {gid: p for gid, p in s.execute(
                select(Group.id, Policy).join(Policy, Policy.id == Group.policy_id))}
            items = [f for f in load_facts(s, *self._candidates(now), with_policy=True)
                     if f.group_id in policies]
            if not items:
                return []
            open_kinds = _open_kinds(s, [f.id for f in items] if len(items) <= 500 else None)
            stores_up = store_sites_up(s, now, self.settings.agent_down_after_s)
            due: list[_Due] = []
            consistent_groups = set(s.scalars(select(Group.id).where(Group.consistent.is_(True))))
            for item in items:
                consistent = item.group_id in consistent_groups
                policy = policies[item.group_id]
                kinds = open_kinds.get(item.id, set())
                granted = _grant_now_confirmed(s, item, now)
                for d in self._item(item, policy, kinds, now, stores_up.get(item.target_site_id),
                                    granted):
                    if d.kind == "cycle" and consistent:
                        continue  # a consistent group's cycles come from its barrier
                    if d.kind == "retention":  # a site store's own agent runs it
                        row = s.get(Item, item.id)
                        if row is None:
                            continue
                        d.host_id, d.args = storeacl.retention_target(s, row,
                                                                      agent_settings(policy))
                        # member points of group points within retention stay
                        keep = kept_member_points(s, item.id, item.group_id,
                                                  rule_for_hours(policy.retention_hours), now)
                        if keep:
                            d.args = {**d.args, "keep": sorted(keep)}
                    due.append(d)
                due.extend(_scrub(s, item, policy, kinds, now))
        if not due:
            return []
        return self._write(due, now)

    def _candidates(self, now: float) -> tuple[ColumnElement[bool], ...]:
        """The protected items this tick may send something to — a superset of what
        :meth:`_item` and :func:`_scrub` decide, so most items (nothing due yet) are not even
        read: a replication state other than protected (resync, initial, critical: the planner
        decides), a transient failure on record, a cycle due (``last_cycle_sent_at + frequency
        <= now``: the anchor rule of ``next_cycle_at``), retention due, a scrub pass due or
        going on, or a repair the last scrub asked for. For :func:`load_facts` with the
        item's policy joined (a correlated subquery per policy column cost three index
        lookups per item row: 12,000 buffer reads a pass at 1,000 items)."""
        scrub_every = Policy.scrub_interval_s
        return (Item.status == ItemProtection.PROTECTED, Item.active_job_id.is_(None),
                or_(Item.state != ItemState.PROTECTED.value,
                    Item.retry["failures"].as_integer() > 0,
                    Item.last_cycle_sent_at.is_(None),
                    Item.last_cycle_sent_at + Policy.frequency_s <= now,
                    Item.last_retention_at.is_(None),
                    Item.last_retention_at <= now - self.settings.retention_every_s,
                    scrub_every.is_not(None) & Item.last_point_time.is_not(None)
                    & (Item.last_scrub_at.is_(None) | (Item.last_scrub_at + scrub_every <= now)),
                    Item.scrub["complete"].as_boolean() == false(),
                    Item.scrub["latest_damaged"].as_boolean() == true()))

    def _write(self, due: list[_Due], now: float) -> list[Command]:
        """Insert the due commands and update their items, re-checking (inside the write
        transaction) that nothing changed since the read: a job may have taken the item or a
        command may have been queued meanwhile."""
        ids = sorted({d.item_id for d in due})
        sent: list[Command] = []
        with self.db.tx() as s:
            # locked, in id order, before any is written (the batches below are per set of
            # columns, not in id order); an item a break-glass report or a job takes meanwhile
            # is re-read after that commit and no longer matches (PostgreSQL re-checks a locked
            # row's WHERE)
            still = set(s.scalars(select(Item.id).where(Item.id.in_(ids),
                                                        Item.status == ItemProtection.PROTECTED,
                                                        Item.active_job_id.is_(None))
                                  .order_by(Item.id).with_for_update()))
            open_kinds = _open_kinds(s, ids)
            # stamped after the re-check, not at the tick's start: a command the re-check saw
            # finish was finished before this one was created (the commands table says so)
            created = max(now, self.settings.clock.now())
            values: dict[str, dict[str, Any]] = {}
            for d in sorted(due, key=lambda x: x.item_id):
                if d.item_id not in still:
                    continue
                kinds = commands.REPLICATION_KINDS if d.kind in commands.REPLICATION_KINDS else (d.kind,)
                taken = open_kinds.setdefault(d.item_id, set())
                if taken.intersection(kinds) or taken.intersection(HANDBACK_KINDS):
                    continue
                taken.add(d.kind)
                sent.append(Command(id=new_id("c"), host_id=d.host_id, item_id=d.item_id, job_id=None,
                                    kind=d.kind, args=d.args, status=CommandStatus.PENDING, progress=0.0,
                                    deliveries=0, created_at=created, updated_at=created))
                values.setdefault(d.item_id, {}).update(d.item_values)
            # one executemany per set of columns (in id order), not a statement per item: the
            # scheduler's write was half of the controller's time at 1,000 items on PostgreSQL
            batches: dict[tuple[str, ...], list[dict[str, Any]]] = {}
            for item_id in sorted(values):
                if values[item_id]:
                    batches.setdefault(tuple(sorted(values[item_id])), []).append(
                        {"id": item_id, **values[item_id]})
            for rows in batches.values():
                s.execute(update(Item), rows)
            s.add_all(sent)
        return sent

    def _in_window(self, policy: Policy, now: float) -> bool:
        """Whether ``now`` is inside the policy's resync window (once per policy and tick)."""
        key = (policy.resync_window, now)
        hit = self._windows.get(key)
        if hit is None:
            if len(self._windows) > 64:
                self._windows.clear()
            hit = parse_window(policy.resync_window).contains(self.settings.minute_of_day(now))
            self._windows[key] = hit
        return hit

    def _plan(self, item: ItemFacts, policy: Policy, now: float,
              store: StoreAgent | None = None, granted: bool = False) -> tuple[Action, float]:
        """The planner's action and the time the next cycle is (was) due. ``store``: the agent
        serving the item's recovery store, if it is up (see :func:`early_retry`); ``granted``:
        the last attempt was refused for a grant the store's agent now confirms."""
        retry = RetryState.from_dict(item.retry) if item.retry else RetryState()
        if granted or early_retry(retry, store, now, self.settings.heartbeat_interval):
            retry.next_attempt_at = now
        report = item.report or {}
        nxt = next_cycle_at(item.last_cycle_sent_at, policy.frequency_s, now)
        if retry.failures and retry.due(now):
            nxt = now  # a retry is an attempt of its own, whatever the frequency
        pi = PlanInput(
            state=effective_state(item), now=now, next_cycle_at=nxt,
            retry_due=retry.due(now), resync_by_hand=False,
            in_resync_window=self._in_window(policy, now),
            tracking=TrackingState.ACTIVE, largest_log_fraction=0.0,
            has_point=item.last_point_time is not None or bool(report.get("last_point_id")),
            cycle_in_flight=False)
        return plan(pi).action, nxt

    def _item(self, item: ItemFacts, policy: Policy, open_kinds: set[str], now: float,
              store: StoreAgent | None = None, granted: bool = False) -> list[_Due]:
        out: list[_Due] = []
        if open_kinds.intersection(HANDBACK_KINDS):
            return out
        repair = scrubbing.repair_due(item)
        if repair is not None and not open_kinds.intersection(commands.REPLICATION_KINDS) \
                and effective_state(item) is not ItemState.CRITICAL:
            # the newest point is damaged in the store: re-send it from the source (the resync
            # compares the source with what the store can restore), before any new cycle
            sc = dict(item.scrub or {})
            out.append(_Due(item.id, item.host_id, "resync",
                            {"by_hand": False, "from_store": True, "reason": repair},
                            {"scrub": {**sc, "repair_for": sc.get("latest_point"),
                                       "repair_sent_at": now}}))
        elif not open_kinds.intersection(commands.REPLICATION_KINDS):
            action, due_at = self._plan(item, policy, now, store, granted)
            if action is Action.DELTA:
                last_app = max(item.last_app_point_time or 0.0, item.last_app_cycle_at or 0.0) or None
                app = app_consistent_due(last_app, policy.app_consistent_every_s, now)
                # anchored on the time the cycle was due, not the (late) time it is sent, so
                # lateness does not accumulate (``next_cycle_at`` drops slots missed by more than
                # one period, so the anchor never lags behind by more than that)
                out.append(_Due(item.id, item.host_id, "cycle", {"app_consistent": app},
                                {"last_cycle_sent_at": min(due_at, now)}))
            elif action is Action.RESYNC:
                out.append(_Due(item.id, item.host_id, "resync", {"by_hand": False}, {}))
        if effective_state(item) is not ItemState.CRITICAL and (
                item.last_retention_at is None
                or now - item.last_retention_at >= self.settings.retention_every_s) \
                and "retention" not in open_kinds:
            out.append(_Due(item.id, item.host_id, "retention", {}, {"last_retention_at": now}))
        return out


def _grant_now_confirmed(s: Session, item: ItemFacts, now: float) -> bool:
    """Whether the item's last replication was refused by its site store for a grant
    (``grant_pending``) that the store's agent has confirmed since: retry at once. Read only
    for such items (a handful), not for every item of a pass."""
    retry = item.retry or {}
    if not retry.get("failures") or (retry.get("last_error") or {}).get("code") \
            != GrantPending.code:
        return False
    row = s.get(Item, item.id)
    return row is not None and storeacl.grant_pending(s, row, now) is None


def _scrub(s: Session, item: ItemFacts, policy: Policy, open_kinds: set[str],
           now: float) -> list[_Due]:
    """A ``scrub`` for the item's store host when a pass is due or goes on (one open at most)."""
    if "scrub" in open_kinds:
        return []
    new_pass = scrubbing.scrub_due(item, policy, now)
    if new_pass is None:
        return []
    row = s.get(Item, item.id)
    if row is None:
        return []
    host, spec = scrubbing.scrub_host(s, row)
    if host is None:
        return []
    args = scrubbing.scrub_args(policy, spec, storeacl.existing_point_key(s, item.id))
    return [_Due(item.id, host.id, "scrub", args, {"last_scrub_at": now} if new_pass else {})]


def _open_kinds(s: Session, item_ids: list[str] | None) -> dict[str, set[str]]:
    """Kinds of the open commands per item: of every item (one query), or of ``item_ids``."""
    q = select(Command.item_id, Command.kind).where(Command.status.in_(OPEN_COMMAND_STATUSES),
                                                    Command.item_id.is_not(None))
    if item_ids is not None:
        q = q.where(Command.item_id.in_(item_ids))
    out: dict[str, set[str]] = {}
    for item_id, kind in s.execute(q):
        if item_id is not None:
            out.setdefault(item_id, set()).add(kind)
    return out
