"""Health of items and agents, and the alerts raised from it.

Item health (:func:`item_health`, pure):
- **Critical**: a permanent failure (the vault's or the agent's report), the item's
  protection failed, or the newest recovery point cannot be restored and cannot be repaired
  (``vault/scrub.py``);
- **Warning**: the measured RPO (now − newest committed point) passed the policy's threshold,
  a resync is pending or running, a transient failure is being retried, the source agent misses
  heartbeats, the item has no policy, the newest point is damaged and being repaired, older
  points are damaged (unrepairable, refused for failover; the newest is intact), or the last
  scrub of the item's store failed;
- **Normal** otherwise (also during initial replication: there is no RPO yet).

An item held by a failover does not replicate; its health says what it waits for
(:func:`failover_health`): **critical** when the failover's job failed or was cancelled after
it reached the recovery site (the item is left ``failed_over`` for a cancel; nothing replicates
until then), or when that site started the recovery VM after the job ended (a late result:
commit or cancel it),
**warning** once committed and not re-protected (the VM is unprotected), normal while a
failover runs or waits for its commit (its state says so). An item that is over
(``reprotected``: a reverse item protects the VM now; ``removed``) is normal with no reasons:
what its last pass said (e.g. "re-protect it") is no longer true.

An agent is up when its last heartbeat is younger than ``missed_heartbeats × heartbeat_interval``.

Alerts (:class:`HealthMonitor`): one open alert per condition key (``rpo:ITEM``,
``critical:ITEM``, ``agent_down:HOST``, ``drill:PLAN`` (``drill:group:GROUP``) while the latest
drill of a plan (a group) failed,
``store_damage:ITEM`` while damage found by a scrub or a verify is not critical,
``sync:ITEM`` while a synchronous item is not at RPO 0 (its agent reports ``sync mode
suspended: …``: fallen back to asynchronous, or catching up until the recovery point sealed
where its journal restarted is committed),
``replication_failing:ITEM`` after ``FAILING_AFTER`` transient failures in a row — a full or
unreachable store, also during initial replication); raised when the condition starts,
refreshed while it lasts (no duplicates), cleared when it ends. Acknowledging only marks it
seen. Security alerts (``trust``) are raised by events, not conditions: they are cleared once
acknowledged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from drsite.core.states import (
    FAILOVER_ITEM_STATUSES,
    LIVE_ITEM_STATUSES,
    FailoverState,
    ItemProtection,
)
from drsite.replication.report import Health, ItemState
from drsite.vault import barrier, fencing
from drsite.vault.audit import record_event
from drsite.vault.db.database import Database
from drsite.vault.db.models import Alert, Drill, Failover, Group, Host, Item, Job, Policy
from drsite.vault.drills import drill_target
from drsite.vault.itemfacts import ItemFacts, ItemRow, load_facts
from drsite.vault.scrub import Damage, damage_of, damage_reasons
from drsite.vault.settings import VaultSettings
from drsite.vault.trust import SECURITY

FAILING_AFTER = 2  # transient failures in a row that raise a replication_failing alert
# the agent's report line of a synchronous item that is not at RPO 0 (agent/syncmode.py)
SYNC_SUSPENDED = "sync mode suspended: "
# an open alert's last_seen_at is refreshed at most this often (not a write per alert per pass)
ALERT_SEEN_EVERY_S = 30.0


@dataclass(frozen=True)
class ItemHealth:
    health: Health
    reasons: list[str] = field(default_factory=list)
    rpo_s: float | None = None
    rpo_exceeded: bool = False


def agent_up(host: Host | None, now: float, settings: VaultSettings) -> bool:
    return (host is not None and host.revoked_at is None and host.last_heartbeat is not None
            and now - host.last_heartbeat <= settings.agent_down_after_s)


def item_health(item: Item | ItemFacts | ItemRow, policy: Policy | None, host_is_up: bool, now: float,
                damage: Damage | None = None) -> ItemHealth:
    """The health of one item now, with the reasons an operator reads (``damage``: its damaged
    recovery points, :func:`drsite.vault.scrub.damage_of`)."""
    rpo = None if item.last_point_time is None else max(0.0, now - item.last_point_time)
    reasons: list[str] = []
    critical = False
    state = item.state
    if item.status == ItemProtection.FAILED:
        critical = True
        reasons.append("enable protection failed")
    if item.critical_error is not None or state == ItemState.CRITICAL.value:
        critical = True
        err = item.critical_error or (item.report or {}).get("last_error") or {}
        reasons.append(f"critical: {err.get('message', 'permanent failure')}; "
                       f"{err.get('hint') or 'operator action required'}")
    warn = False
    exceeded = False
    if policy is None and item.status in (ItemProtection.PROTECTED, ItemProtection.ENABLING):
        warn = True
        reasons.append("the item's group has no policy")
    if policy is not None and rpo is not None and rpo > policy.rpo_threshold_s:
        warn = exceeded = True
        reasons.append(f"RPO {rpo:.0f} s exceeds the threshold of {policy.rpo_threshold_s:.0f} s")
    if state == ItemState.RESYNC_REQUIRED.value:
        warn = True
        reason = (item.report or {}).get("resync_reason") or "resync required"
        reasons.append(f"resync pending: {reason}")
    elif state == ItemState.RESYNCING.value:
        warn = True
        reasons.append("resynchronizing")
    retry = item.retry or {}
    if not critical and retry.get("failures"):
        warn = True
        msg = (retry.get("last_error") or {}).get("message", "")
        reasons.append(f"retrying after {retry['failures']} transient failure(s): {msg}")
    if not host_is_up and item.status in LIVE_ITEM_STATUSES:
        warn = True
        reasons.append("source agent is not sending heartbeats")
    d_warn, d_crit, d_reasons = damage_reasons(item, damage)
    warn, critical = warn or d_warn, critical or d_crit
    reasons.extend(d_reasons)
    scrub_err = (item.scrub or {}).get("error")
    if scrub_err:
        warn = True
        reasons.append(f"the last scrub of the recovery store failed: {scrub_err.get('message')}")
    issues = (item.report or {}).get("agent_issues") or []
    if issues and item.status in LIVE_ITEM_STATUSES:
        warn = True
        reasons.extend(str(x) for x in issues)
    health = Health.CRITICAL if critical else Health.WARNING if warn else Health.NORMAL
    return ItemHealth(health, reasons, rpo, exceeded)


def failover_health(item: Item, fo: Failover | None, job: Job | None) -> ItemHealth:
    """The health of an item a failover holds (``fo``: the failover holding it or, once
    committed, the last one; ``job``: its job)."""
    if item.status == ItemProtection.COMMITTED:
        return ItemHealth(Health.WARNING, [
            f"failover committed: {item.vm_name} runs on the recovery site unprotected; "
            f"re-protect it: drsite failover reprotect {item.id}"])
    if fo is not None and fo.state == FailoverState.FAILED and item.status == \
            ItemProtection.FAILED_OVER:
        err = (job.error if job is not None else None) or {}
        return ItemHealth(Health.CRITICAL, [
            f"{fo.kind} failover {fo.id} failed: {err.get('message', 'see its job')}; "
            f"{item.vm_name} does not replicate until the failover is cancelled: drsite "
            f"failover cancel {item.id}"])
    if fo is not None and fo.state == FailoverState.CANCELLED and item.status == \
            ItemProtection.FAILED_OVER:
        # its job was cancelled after the recovery host took the command: that host may have
        # started the recovery VM (recorded when it answers: jobs.failover.apply_late_result)
        if (fo.result or {}).get("recovery_took") is False:
            return ItemHealth(Health.CRITICAL, [
                f"{fo.kind} failover {fo.id} was cancelled after the source was shut down; "
                f"{item.vm_name} runs nowhere and does not replicate until the failover is "
                f"cancelled (the source is resumed): drsite failover cancel {item.id}"])
        return ItemHealth(Health.CRITICAL, [
            f"{fo.kind} failover {fo.id} was cancelled after it reached the recovery site, "
            f"which may still start {item.vm_name} there; it does not replicate until the "
            f"failover is cancelled: drsite failover cancel {item.id}"])
    late = dict((fo.result or {}).get("late_start") or {}) if fo is not None else {}
    if fo is not None and late and fo.state == FailoverState.PENDING_COMMIT:
        return ItemHealth(Health.CRITICAL, [
            f"the recovery VM {fo.vm_name} of {fo.kind} failover {fo.id} started after its job "
            f"was {late.get('job_state') or 'ended'} and runs on the recovery site; keep it: "
            f"drsite failover commit {item.id}; or drsite failover cancel {item.id}, which "
            f"deletes it and what it wrote since point {fo.point_id} and resumes the source"])
    return ItemHealth(Health.NORMAL)  # running, or pending commit: its state says so


def failed_drills(s: Session) -> dict[str, Drill]:
    """Plans and groups whose latest finished drill failed, by drill target (the plan's name or
    ``group:NAME``: the ``drill:TARGET`` alerts)."""
    out: dict[str, Drill] = {}
    for col in (Drill.plan, Drill.group):
        latest = select(col.label("k"), func.max(Drill.started_at).label("t")).where(
            Drill.state != "running", col.is_not(None)).group_by(col).subquery()
        rows = s.scalars(select(Drill).join(latest, (col == latest.c.k)
                                            & (Drill.started_at == latest.c.t))).all()
        out.update({drill_target(plan=d.plan, group=d.group): d for d in rows
                    if d.state == "failed"})
    return out


def _drill_reason(report: dict[str, Any]) -> str:
    bad = [v for v in report.get("vms") or [] if not v.get("ok")]
    return "; ".join(f"{v.get('vm')}: {v.get('reason') or 'not verified'}" for v in bad[:3]) \
        or "see 'drsite drills show'"


def _damage_message(item: Item | ItemFacts, d: Damage) -> str:
    if d.newest_damaged:
        return (f"recovery store damage in the newest point of {item.vm_name}: "
                f"{d.points.get(d.newest or '', '')}; repairing from the source")
    older = d.older
    return (f"{len(older)} older recovery point(s) of {item.vm_name} cannot be restored "
            f"({d.points[older[0]]}); failover to them is refused; the newest point is intact")


class HealthMonitor:
    """Stores each item's health and keeps the alert table in step with conditions.

    A pass reads (item columns as plain tuples, ``itemfacts``; hosts; policies; damage; drills)
    in a read transaction, decides in Python, then writes in one short transaction only the
    items whose health changed, the fences' health and the alerts. An item that changed in
    between is set right by the next pass (every ``health_interval``)."""

    def __init__(self, db: Database, settings: VaultSettings) -> None:
        self.db = db
        self.settings = settings

    def tick(self) -> None:
        now = self.settings.clock.now()
        conditions: dict[str, tuple[str, str, str, str]] = {}  # key -> kind, severity, subject, msg
        changed: dict[str, ItemHealth] = {}
        with self.db.read() as s:
            hosts = {h.id: h for h in s.scalars(select(Host))}
            policies = {gid: p for gid, p in s.execute(
                select(Group.id, Policy).join(Policy, Policy.id == Group.policy_id))}
            for h in hosts.values():
                if (h.revoked_at is None and h.last_heartbeat is not None
                        and not agent_up(h, now, self.settings)):
                    conditions[f"agent_down:{h.id}"] = (
                        "agent_down", "warning", h.name,
                        f"agent {h.name} missed heartbeats (last {now - h.last_heartbeat:.0f} s ago)")
            items = load_facts(s, Item.status.in_(LIVE_ITEM_STATUSES | {ItemProtection.FAILED}))
            damage = damage_of(s)
            for item in items:
                policy = policies.get(item.group_id)
                ih = item_health(item, policy, agent_up(hosts.get(item.host_id), now, self.settings),
                                 now, damage.get(item.id))
                if item.health != ih.health.value or item.health_reasons != ih.reasons:
                    changed[item.id] = ih
                if item.status == ItemProtection.FAILED:
                    continue
                if ih.rpo_exceeded and policy is not None and ih.rpo_s is not None:
                    conditions[f"rpo:{item.id}"] = (
                        "rpo", "warning", item.vm_name,
                        f"RPO of {item.vm_name} is {ih.rpo_s:.0f} s "
                        f"(threshold {policy.rpo_threshold_s:.0f} s)")
                d = damage.get(item.id)
                if d is not None and d.points and ih.health is not Health.CRITICAL:
                    conditions[f"store_damage:{item.id}"] = (
                        "store_damage", "warning", item.vm_name, _damage_message(item, d))
                failures = int((item.retry or {}).get("failures") or 0)
                if failures >= FAILING_AFTER and ih.health is not Health.CRITICAL:
                    msg = ((item.retry or {}).get("last_error") or {}).get("message", "")
                    what = "initial replication" if item.status == ItemProtection.ENABLING \
                        else "replication"
                    conditions[f"replication_failing:{item.id}"] = (
                        "replication_failing", "warning", item.vm_name,
                        f"{what} of {item.vm_name} failed {failures} times in a row: {msg}")
                sync_line = next((str(x) for x in (item.report or {}).get("agent_issues") or []
                                  if str(x).startswith(SYNC_SUSPENDED)), None)
                if sync_line is not None:
                    conditions[f"sync:{item.id}"] = (
                        "sync_suspended", "warning", item.vm_name, f"{item.vm_name}: {sync_line}")
                if ih.health is Health.CRITICAL:
                    conditions[f"critical:{item.id}"] = (
                        "critical", "critical", item.vm_name,
                        f"{item.vm_name} is critical: {'; '.join(ih.reasons)}")
            for target, drill in failed_drills(s).items():
                rep = dict(drill.report or {})
                what = (f"recovery plan {drill.plan}" if drill.plan is not None
                        else f"protection group {drill.group}")
                conditions[f"drill:{target}"] = (
                    "drill", "critical", drill.plan or f"group {drill.group}",
                    f"the last drill of {what} failed ({drill.id}): "
                    f"{rep.get('error') or _drill_reason(rep)}")
        with self.db.tx() as s:
            unfenced = fencing.unfenced(s)
            # id order, like heartbeats and the scheduler (its health is the fence's for an
            # unfenced item: below); one executemany, not a round trip per item, so the item
            # rows are locked for a moment, not while a statement per item runs
            rows = [{"id": item_id, "health": changed[item_id].health.value,
                     "health_reasons": changed[item_id].reasons}
                    for item_id in sorted(changed) if item_id not in unfenced]
            if rows:
                s.execute(update(Item), rows)
            for gname, b in barrier.missed_barriers(s).items():
                conditions[f"group_barrier:{gname}"] = (
                    "group_barrier", "warning", f"group {gname}",
                    f"consistent group {gname} made no group point in its last barrier "
                    f"({b.id}): {b.message}")
            self._failover_items(s, conditions, unfenced)
            self._items_over(s)
            self._sync_alerts(s, conditions, now)

    @staticmethod
    def _failover_items(s: Session, conditions: dict[str, tuple[str, str, str, str]],
                        unfenced: dict[str, tuple[Item, Any, str]]) -> None:
        """Health of the items failovers hold (:func:`failover_health`); Critical while the
        old primary is not known to be fenced (``fencing.unfenced``). A critical one raises
        ``critical:ITEM`` like any other critical item."""
        for item in s.scalars(select(Item).where(Item.status.in_(FAILOVER_ITEM_STATUSES))):
            fo = s.get(Failover, item.failover_id) if item.failover_id else \
                s.scalars(select(Failover).where(Failover.item_id == item.id)
                          .order_by(Failover.created_at.desc())).first()
            job = s.get(Job, fo.job_id) if fo is not None and fo.job_id else None
            ih = failover_health(item, fo, job)
            if item.id in unfenced:
                issue = unfenced[item.id][2]
                ih = ItemHealth(Health.CRITICAL, [issue, *[r for r in ih.reasons
                                                           if ih.health is Health.CRITICAL]])
            if item.health != ih.health.value or item.health_reasons != ih.reasons:
                item.health = ih.health.value
                item.health_reasons = ih.reasons
            if ih.health is Health.CRITICAL:
                conditions[f"critical:{item.id}"] = (
                    "critical", "critical", item.vm_name,
                    f"{item.vm_name}: {'; '.join(ih.reasons)}")

    @staticmethod
    def _items_over(s: Session) -> None:
        """Items no pass looks at any more (re-protected, removed) lose the health their last
        pass gave them."""
        for item in s.scalars(select(Item).where(
                Item.status.in_((ItemProtection.REPROTECTED, ItemProtection.REMOVED)),
                Item.health != Health.NORMAL.value)):
            item.health = Health.NORMAL.value
            item.health_reasons = []

    def _sync_alerts(self, s: Session, conditions: dict[str, tuple[str, str, str, str]],
                     now: float) -> None:
        open_alerts = {a.key: a for a in s.scalars(select(Alert).where(Alert.cleared_at.is_(None)))}
        for key, (kind, severity, subject, message) in conditions.items():
            a = open_alerts.get(key)
            if a is None:
                s.add(Alert(key=key, kind=kind, severity=severity, subject=subject, message=message,
                            raised_at=now, last_seen_at=now))
                record_event(s, now, "alert", subject, f"raised: {message}")
            else:
                if a.message != message:
                    a.message = message
                if now - a.last_seen_at >= ALERT_SEEN_EVERY_S:
                    a.last_seen_at = now
        for key, a in open_alerts.items():
            if a.kind == SECURITY:  # raised by an event, not a condition: ends once it was seen
                if a.acked_at is not None:
                    a.cleared_at = now
                    record_event(s, now, "alert", a.subject, f"cleared: {a.kind} (acknowledged)")
                continue
            if key not in conditions:
                a.cleared_at = now
                record_event(s, now, "alert", a.subject, f"cleared: {a.kind}")
