"""Health of items and agents, and the alerts raised from it.

Item health (:func:`item_health`, pure):
- **Critical**: a permanent failure (the vault's or the agent's report), or the item's
  protection failed;
- **Warning**: the measured RPO (now − newest committed point) passed the policy's threshold,
  a resync is pending or running, a transient failure is being retried, the source agent misses
  heartbeats, or the item has no policy;
- **Normal** otherwise (also during initial replication: there is no RPO yet).

An agent is up when its last heartbeat is younger than ``missed_heartbeats × heartbeat_interval``.

Alerts (:class:`HealthMonitor`): one open alert per condition key (``rpo:ITEM``,
``critical:ITEM``, ``agent_down:HOST``); raised when the condition starts, refreshed while it
lasts (no duplicates), cleared when it ends. Acknowledging only marks it seen. Security alerts
(``trust``) are raised by events, not conditions: they are cleared once acknowledged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from drsite.core.states import LIVE_ITEM_STATUSES, ItemProtection
from drsite.replication.report import Health, ItemState
from drsite.vault.audit import record_event
from drsite.vault.db.database import Database
from drsite.vault.db.models import Alert, Group, Host, Item, Policy
from drsite.vault.itemfacts import ItemFacts, attach_reports, load_facts
from drsite.vault.settings import VaultSettings
from drsite.vault.trust import SECURITY

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


def needs_report(item: Item | ItemFacts) -> bool:
    """Whether :func:`item_health` reads the agent's report of this item (to explain it)."""
    return (item.critical_error is not None or item.state in (ItemState.CRITICAL.value,
                                                              ItemState.RESYNC_REQUIRED.value))


def item_health(item: Item | ItemFacts, policy: Policy | None, host_is_up: bool,
                now: float) -> ItemHealth:
    """The health of one item now, with the reasons an operator reads."""
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
    health = Health.CRITICAL if critical else Health.WARNING if warn else Health.NORMAL
    return ItemHealth(health, reasons, rpo, exceeded)


class HealthMonitor:
    """Stores each item's health and keeps the alert table in step with conditions.

    A pass reads (item columns as plain tuples, ``itemfacts``; hosts; policies) in a read
    transaction, decides in Python, then writes in one short transaction only the items whose
    health changed and the alerts. An item that changed in between is set right by the next
    pass (every ``health_interval``)."""

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
            attach_reports(s, items, needs_report)
            for item in items:
                policy = policies.get(item.group_id)
                ih = item_health(item, policy, agent_up(hosts.get(item.host_id), now, self.settings),
                                 now)
                if item.health != ih.health.value or item.health_reasons != ih.reasons:
                    changed[item.id] = ih
                if item.status == ItemProtection.FAILED:
                    continue
                if ih.rpo_exceeded and policy is not None and ih.rpo_s is not None:
                    conditions[f"rpo:{item.id}"] = (
                        "rpo", "warning", item.vm_name,
                        f"RPO of {item.vm_name} is {ih.rpo_s:.0f} s "
                        f"(threshold {policy.rpo_threshold_s:.0f} s)")
                if ih.health is Health.CRITICAL:
                    conditions[f"critical:{item.id}"] = (
                        "critical", "critical", item.vm_name,
                        f"{item.vm_name} is critical: {'; '.join(ih.reasons)}")
        with self.db.tx() as s:
            for item_id in sorted(changed):  # id order, like heartbeats and the scheduler
                ih = changed[item_id]
                s.execute(update(Item).where(Item.id == item_id)
                          .values(health=ih.health.value, health_reasons=ih.reasons)
                          .execution_options(synchronize_session=False))
            self._sync_alerts(s, conditions, now)

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
