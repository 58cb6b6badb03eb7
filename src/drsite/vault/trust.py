"""How far the vault believes what an agent's heartbeat says.

An agent's certificate proves which host speaks, not that what it says is true. The vault
therefore accepts an item's report, ``new_points`` and ``removed_points`` only from the host the
vault assigned the item to (``items.host_id``: the source host; a reverse item after re-protect
is its own row, assigned to the recovery host). Anything else — another host's item, an item the
vault does not know — is ignored, recorded and alerted.

A point removal from the owner must be explained by something the vault can check itself:
- an operation the vault ordered: ``unprotect`` with ``delete_points`` (every point), or a
  failover commit (every point but the committed one);
- the item's retention rule (:func:`drsite.core.retention.points_to_keep` over the vault's own
  catalogue, ``rule_for_hours(policy.retention_hours)``, evaluated ``retention_skew_s`` ahead
  to absorb the agent's clock running ahead): a point the rule keeps, the newest point, and a
  member point of a group point the rule keeps (``barrier.kept_member_points``) are never
  removable by retention.
An unexplained removal is refused (the catalogue keeps the point), recorded and alerted.

Security alerts (``kind`` ``security``, severity critical) are raised by events, not by
conditions: one open alert per key, refreshed while it repeats, cleared once an operator
acknowledged it (see :class:`drsite.vault.health.HealthMonitor`). Each refusal is in the audit
trail (``agent.*`` actions; a refused report that repeats every heartbeat once per open alert).

Store audit reports (the heartbeat's ``audit``: deletes and overwrites a store did or refused)
are accepted only from the host whose store it is: for an item, the item's own host or a
store-serving host of the item's target site; without an item, a store-serving host. They are
recorded with ``caller`` (the host its client named) as actor and the reporting host in the
detail; anything else is refused, recorded and alerted.

Responsible for: these verdicts and their alerts. Not responsible for: applying accepted facts
(``heartbeat``) or authenticating the host (``auth``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from drsite.core.errors import InvalidInput, PointNotAuthentic, from_dict
from drsite.core.retention import PointStamp, RetentionRule, points_to_keep, rule_for_hours
from drsite.core.states import CommandStatus
from drsite.vault.audit import AuditEntry, record_audit, record_event
from drsite.vault.barrier import kept_member_points
from drsite.vault.db.models import Alert, Command, Failover, Host, Item, Point
from drsite.vault.scheduler import item_policy
from drsite.vault.storeacl import serves_store

log = logging.getLogger(__name__)

SECURITY = "security"
"""Alert kind of refused agent claims (raised by events; cleared when acknowledged)."""
# an order that reached (or may reach) the agent
ORDERED_STATES = frozenset({CommandStatus.SENT, CommandStatus.RUNNING, CommandStatus.SUCCEEDED})


def owns(host: Host, item: Item) -> bool:
    """Whether ``host`` is the host the vault assigned ``item`` to."""
    return item.host_id == host.id


def raise_security_alert(s: Session, now: float, key: str, subject: str, message: str) -> bool:
    """Raise (or refresh) the open security alert ``key``; True when it is new. The event trail
    gets one line per new alert, not one per repetition."""
    open_alert = s.scalars(select(Alert).where(Alert.key == key[:200],
                                               Alert.cleared_at.is_(None))).first()
    if open_alert is not None:
        open_alert.last_seen_at = now
        open_alert.message = message
        return False
    s.add(Alert(key=key[:200], kind=SECURITY, severity="critical", subject=subject[:128],
                message=message, raised_at=now, last_seen_at=now))
    record_event(s, now, "alert", subject, f"raised: {message}")
    return True


def refuse_report(s: Session, host: Host, item_id: str, item: Item | None, now: float) -> str:
    """Record that ``host`` reported an item it does not own; returns the reason."""
    if item is None:
        why = f"item {item_id} the vault does not know"
    else:
        why = f"item {item_id} ({item.vm_name}) it does not own (the vault assigned it to {item.host_id})"
    message = (f"host {host.name} ({host.id}) reported {why}; its report, new points and point "
               "removals were ignored")
    if raise_security_alert(s, now, f"untrusted_report:{host.id}:{item_id}", host.name, message):
        log.warning("%s", message)
        record_audit(s, AuditEntry(at=now, actor_kind="host", actor=host.id,
                                   action="agent.report_item", target=f"item={item_id}",
                                   outcome="refused", error_code="untrusted_report",
                                   detail={"owner": item.host_id if item is not None else None}))
    return why


def _ordered_delete_all(s: Session, item: Item) -> bool:
    """The vault ordered every point of the item deleted (``unprotect`` with delete_points, or
    the store-side ``retention`` with ``delete_all`` that goes with it on a site store)."""
    for kind, args in s.execute(select(Command.kind, Command.args).where(
            Command.item_id == item.id, Command.kind.in_(("unprotect", "retention")),
            Command.status.in_(ORDERED_STATES))):
        flag = "delete_points" if kind == "unprotect" else "delete_all"
        if isinstance(args, dict) and args.get(flag) is True:
            return True
    return False


def _committed_points(s: Session, item: Item) -> set[str]:
    """Points that ordered failover commits keep (every other point of the item goes)."""
    kept: set[str] = set()
    for args in s.scalars(select(Command.args).where(Command.item_id == item.id,
                                                     Command.kind == "failover_commit",
                                                     Command.status.in_(ORDERED_STATES))):
        fid = args.get("failover_id") if isinstance(args, dict) else None
        fo = s.get(Failover, fid) if isinstance(fid, str) else None
        if fo is not None and fo.point_id:
            kept.add(fo.point_id)
    return kept


def retention_rule(s: Session, item: Item) -> RetentionRule:
    policy = item_policy(s, item)
    return rule_for_hours(policy.retention_hours) if policy is not None else RetentionRule()


def judge_removals(s: Session, item: Item, removed: list[str], now: float,
                   skew_s: float) -> tuple[list[str], dict[str, str]]:
    """Split the removals an owner reported into (accepted point ids, {refused id: why}). Ids
    the catalogue does not hold are neither (nothing to remove)."""
    ids = sorted({str(x) for x in removed})
    rows = s.execute(select(Point.point_id, Point.seq, Point.created_at, Point.consistency)
                     .where(Point.item_id == item.id)).all()
    known = {r.point_id for r in rows}
    asked = [pid for pid in ids if pid in known]
    if not asked:
        return [], {}
    if _ordered_delete_all(s, item):
        return asked, {}
    committed = _committed_points(s, item)
    if committed:
        return [p for p in asked if p not in committed], {
            p: "a failover commit keeps it" for p in asked if p in committed}
    rule = retention_rule(s, item)
    newest = max(rows, key=lambda r: (r.seq, r.created_at, r.point_id)).point_id
    keep = points_to_keep([PointStamp(r.point_id, r.created_at, r.consistency == "app", False,
                                      seq=r.seq) for r in rows], rule, now + skew_s)
    grouped = kept_member_points(s, item.id, item.group_id, rule, now + skew_s)
    accepted: list[str] = []
    refused: dict[str, str] = {}
    for pid in asked:
        if pid == newest:
            refused[pid] = "it is the newest point"
        elif pid in grouped:
            refused[pid] = "a group point within the retention keeps it"
        elif pid in keep:
            refused[pid] = (f"the retention rule ({rule.retention_s / 3600:g} h, every point of "
                            f"the last {rule.keep_all_s / 3600:g} h) keeps it")
        else:
            accepted.append(pid)
    return accepted, refused


def refuse_removals(s: Session, host: Host, item: Item, refused: dict[str, str],
                    now: float) -> None:
    """Record and alert removals the vault refused (the catalogue keeps those points)."""
    detail = "; ".join(f"{pid}: {why}" for pid, why in sorted(refused.items())[:20])
    more = f" (and {len(refused) - 20} more)" if len(refused) > 20 else ""
    message = (f"host {host.name} ({host.id}) reported {len(refused)} point(s) of {item.vm_name} "
               f"({item.id}) removed that neither the item's retention nor an operation the vault "
               f"ordered explains; the catalogue keeps them — {detail}{more}. If the points were "
               "damaged, verify the item's store; otherwise look for who deleted them")
    if raise_security_alert(s, now, f"point_removal:{item.id}", item.vm_name, message):
        log.warning("%s", message)
    record_audit(s, AuditEntry(at=now, actor_kind="host", actor=host.id,
                               action="agent.remove_points", target=f"item={item.id}",
                               outcome="refused", error_code="unexplained_removal",
                               detail={"points": sorted(refused)[:20],
                                       "why": sorted(set(refused.values()))[:3]}))


STORE_OPS = ("delete", "overwrite")
STORE_OUTCOMES = ("ok", "refused")


@dataclass(frozen=True)
class StoreAudit:
    """One store delete/overwrite a host reports (done, or refused by its store)."""

    op: str
    key: str
    item_id: str | None
    caller: str
    outcome: str
    at: float | None = None

    def check(self) -> None:
        if self.op not in STORE_OPS or self.outcome not in STORE_OUTCOMES:
            raise InvalidInput(f"audit entries need op in {STORE_OPS} and outcome in {STORE_OUTCOMES}")
        if not 0 < len(self.key) <= 1024 or not 0 < len(self.caller) <= 128 or \
                (self.item_id is not None and not 0 < len(self.item_id) <= 64):
            raise InvalidInput("audit entries need a key (at most 1024 characters), a caller (at "
                               "most 128) and an item_id of at most 64 characters or null")


def _store_of(s: Session, host: Host, item_id: str | None) -> bool:
    """Whether ``host``'s store (or, for its own items, ``host`` itself) holds ``item_id``."""
    serves = serves_store(s, host)
    if item_id is None:
        return serves
    item = s.get(Item, item_id)
    if item is None:
        return False
    return owns(host, item) or (serves and item.target_site_id == host.site_id)


def record_store_audit(s: Session, host: Host, entries: list[StoreAudit], now: float) -> None:
    """Audit the store deletes/overwrites ``host`` reports (see the module's docstring)."""
    for e in entries:
        e.check()
    refused = 0
    for e in entries:
        at = e.at if e.at is not None and 0 < e.at <= now + 3600 else now
        if _store_of(s, host, e.item_id):
            record_audit(s, AuditEntry(at=at, actor_kind="host", actor=e.caller,
                                       action=f"store.{e.op}", target=f"item={e.item_id}, key={e.key}",
                                       outcome=e.outcome,
                                       detail={"reported_by": host.id, "store_url": host.store_url}))
            continue
        refused += 1
        record_audit(s, AuditEntry(at=now, actor_kind="host", actor=host.id,
                                   action="agent.store_audit", target=f"item={e.item_id}, key={e.key}",
                                   outcome="refused", error_code="untrusted_report",
                                   detail={"op": e.op, "caller": e.caller}))
    if refused:
        message = (f"host {host.name} ({host.id}) reported {refused} store delete/overwrite(s) "
                   "of items its store does not hold; they were recorded as refused")
        if raise_security_alert(s, now, f"untrusted_audit:{host.id}", host.name, message):
            log.warning("%s", message)


def alert_not_authentic(s: Session, host: Host, cmd: Command, now: float) -> None:
    """A command that failed because a recovery point is not authentic: security alert and
    audit entry (the agent refused the point; someone wrote the store without the key)."""
    if cmd.status != CommandStatus.FAILED or not cmd.error:
        return
    err = from_dict(cmd.error)
    if err.code != PointNotAuthentic.code:
        return
    message = (f"{cmd.kind} of item {cmd.item_id} on host {host.name} refused a recovery point "
               f"that is not authentic: {err.message}")
    raise_security_alert(s, now, f"point_not_authentic:{cmd.item_id}", str(cmd.item_id), message)
    record_audit(s, AuditEntry(at=now, actor_kind="host", actor=host.id,
                               action=f"agent.{cmd.kind}", target=f"item={cmd.item_id}",
                               outcome="refused", error_code=PointNotAuthentic.code,
                               detail={"command_id": cmd.id, "message": err.message[:500]}))
