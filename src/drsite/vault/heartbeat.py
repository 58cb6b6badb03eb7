"""What a heartbeat does to the vault's state, and what its reply carries.

In one transaction: the host's liveness, version and store URL; the VM inventory when sent
(``null`` = unchanged; VMs no longer reported are marked absent); each reported item's report
(agents list an item only when its report or points changed) and recovery-point catalogue
(``new_points`` upserted by point id, ``removed_points`` deleted; the reply's ``ack`` is the
highest catalogued seq, so the agent resends anything the vault did not keep); EnableProtection
jobs for newly discovered VMs that a group with a policy matches; then the commands due to the
host (marked sent). Item facts count only from the item's own host, and a removal only when the
vault can explain it (``trust``): the rest is ignored, recorded and alerted. The store
deletes/overwrites a store-serving host reports (``audit``) go to the audit trail; its
``store_url`` is a claim, acted on only for the holder of the site's store role (``storerole``:
a claim without it raises a security alert); a store-serving host gets its store's access list
when its copy is outdated (``storeacl``), and its recovery book likewise (``recoverybook``);
break-glass failovers it reports are recorded first (``breakglass``) and acknowledged in the
reply.

Responsible for: applying agent facts. Not responsible for: deciding what replicates when
(``scheduler``) or health (``health``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from drsite.core.errors import DrsiteError, InvalidInput
from drsite.core.states import FAILOVER_ITEM_STATUSES, RETIRED_ITEM_STATUSES, FailoverState
from drsite.replication.report import ItemReport, ItemState
from drsite.store.format import PointInfo
from drsite.vault import breakglass, commands, recoverybook, storeacl, storerole, trust
from drsite.vault.db.models import Failover, Group, Host, Item, Point, Vm
from drsite.vault.jobs.create import start_enable_protection
from drsite.vault.membership import active_item_for_vm, group_for_vm
from drsite.vault.settings import VaultSettings
from drsite.vault.vmrows import vm_row

log = logging.getLogger(__name__)

# items.acked_seq of a restored database: ask the agent for its whole catalogue (RESTORED),
# then expect it (AWAITING_FULL_CATALOGUE) and reconcile
RESTORED = -1
AWAITING_FULL_CATALOGUE = -2
VM_SEEN_EVERY_S = 60.0  # a VM row's last_seen is refreshed at most this often (see the host row)
# a report that differs from the stored one only in its time stamps is stored at most this often
REPORT_EVERY_S = 30.0
_REPORT_CLOCKS = ("updated_at", "rpo_s")


def _report_news(old: dict[str, Any] | None, new: dict[str, Any]) -> bool:
    """Whether ``new`` must replace the stored report: something besides its clocks changed,
    or the stored one is ``REPORT_EVERY_S`` old (an item row is not rewritten every beat)."""
    if old is None:
        return True
    # both sides' keys: a field that went away (``agent_issues`` once the condition ended)
    # is news too, else the stored report kept it until REPORT_EVERY_S
    if any(old.get(k) != new.get(k) for k in old.keys() | new.keys() if k not in _REPORT_CLOCKS):
        return True
    return float(new.get("updated_at") or 0.0) - float(old.get("updated_at") or 0.0) >= REPORT_EVERY_S


@dataclass
class ItemBeat:
    item_id: str
    report: dict[str, Any]
    new_points: list[dict[str, Any]] = field(default_factory=list)
    removed_points: list[str] = field(default_factory=list)


@dataclass
class Beat:
    host_name: str
    version: str
    store_url: str | None
    vms: list[dict[str, Any]] | None  # None: unchanged since the agent's last heartbeat
    items: list[ItemBeat]
    audit: list[trust.StoreAudit] = field(default_factory=list)
    store_acl_digest: str | None = None   # the store access list the agent has (storeacl)
    held: list[str] | None = None  # command ids the agent holds (None: it does not say)
    restarted: bool = False  # the agent's first answered heartbeat since its process started
    recovery_book_digest: str | None = None  # the recovery book the agent has (recoverybook)
    recovery_book_patches: bool = False  # the agent takes a patch of its book (recoverybook)
    breakglass: list[dict[str, Any]] = field(default_factory=list)  # break-glass failovers


def _vm_fields(d: dict[str, Any]) -> tuple[str, str]:
    vm_id, name = d.get("vm_id"), d.get("name")
    if not isinstance(vm_id, str) or not vm_id or len(vm_id) > 128 or not isinstance(name, str):
        raise InvalidInput("every VM needs a string vm_id (at most 128 characters) and name")
    return vm_id, name


def _lock_items(s: Session, ids: set[str]) -> None:
    """Lock the existing items of ``ids`` (``FOR UPDATE``; SQLite: its one writer already),
    in id order, and load them fresh into the session."""
    if ids:
        s.scalars(select(Item).where(Item.id.in_(sorted(ids))).order_by(Item.id)
                  .with_for_update().execution_options(populate_existing=True)).all()


def apply_heartbeat(s: Session, host: Host, beat: Beat, settings: VaultSettings) -> dict[str, Any]:
    """Apply ``beat`` from ``host``; returns the reply ``{"commands", "ack", "heartbeat_interval"}``."""
    now = settings.clock.now()
    prev_beat_at = host.last_heartbeat
    host.last_heartbeat = now  # liveness lives on the host row only
    if beat.restarted:
        host.started_at = now  # its process is new: failures to reach it retry once more
    if host.version != beat.version[:64]:
        host.version = beat.version[:64]
    if host.store_url != beat.store_url:
        # only the host's claim: a store is served by the holder of the site's store role
        host.store_url = beat.store_url
        storerole.judge_claim(s, host, beat.store_url, now)
    # break-glass failovers first: the recovery VMs in this very inventory must be known as
    # such (never auto-protected), and the items failed over before anything is scheduled
    bg_acked: list[str] = []
    if beat.breakglass:
        # a report fails its item over and withdraws its commands; the reported items are
        # written at the end: lock all of them first, in id order (items → barriers →
        # commands), as the scheduler does, or this beat and a scheduler tick could each hold
        # an item the other waits for (PostgreSQL)
        _lock_items(s, breakglass.item_ids(beat.breakglass) | {ib.item_id for ib in beat.items})
        bg_acked = breakglass.apply_reports(s, host, beat.breakglass, now)
    new_vms = _apply_inventory(s, host, beat.vms, now) if beat.vms is not None else []
    ack: dict[str, int] = {}
    ids = sorted({ib.item_id for ib in beat.items})
    items = {i.id: i for i in s.scalars(select(Item).where(Item.id.in_(ids)))} if ids else {}
    # one flush for all items at the end (each item's own queries read only its own rows; a
    # flush per query made a heartbeat of 25 items 25 round trips of UPDATEs and INSERTs)
    with s.no_autoflush:
        for ib in sorted(beat.items, key=lambda x: x.item_id):  # id order, like the scheduler
            item = items.get(ib.item_id)
            if item is None or not trust.owns(host, item):
                trust.refuse_report(s, host, ib.item_id, item, now)
                continue
            if item.status in RETIRED_ITEM_STATUSES:
                log.debug("host %s reported item %s, which is %s; ignored", host.id, item.id,
                          item.status)
                continue
            ack[item.id] = _apply_item(s, host, item, ib, now, settings)
    if beat.audit:
        trust.record_store_audit(s, host, beat.audit, now)
    _auto_protect(s, host, new_vms, now)
    due = commands.deliver(s, host.id, now, resend_after_s=settings.resend_after_s,
                           stale_running_s=settings.stale_running_s,
                           held=set(beat.held) if beat.held is not None else None,
                           # a restarted agent holds every command it will ever run of
                           # those delivered before now: the rest died with the old process
                           prev_beat_at=now if beat.restarted else prev_beat_at)
    return {"commands": [commands.to_wire(c) for c in due], "ack": ack,
            "heartbeat_interval": settings.heartbeat_interval,
            **storeacl.reply_fields(s, host, beat.store_acl_digest, now),
            **recoverybook.reply_fields(s, host, beat.recovery_book_digest,
                                        patches=beat.recovery_book_patches),
            **({"breakglass_ack": bg_acked} if bg_acked else {})}


def _apply_inventory(s: Session, host: Host, vms: list[dict[str, Any]], now: float) -> list[Vm]:
    rows = {v.vm_id: v for v in s.scalars(select(Vm).where(Vm.host_id == host.id))}
    seen: set[str] = set()
    new: list[Vm] = []
    for d in vms:
        vm_id, name = _vm_fields(d)
        seen.add(vm_id)
        row = rows.get(vm_id)
        inserted = False
        if row is None:
            # a failover or VM job may insert the same VM at this moment (vmrows)
            row, inserted = vm_row(s, host.id, vm_id, partial(
                Vm, host_id=host.id, vm_id=vm_id, name=name[:64], info=d, present=True,
                first_seen=now, last_seen=now, auto_protect_blocked=False))
            rows[vm_id] = row
        if inserted:
            new.append(row)
        else:
            changed = False
            if row.info != d:
                row.info = d
                changed = True
            if row.name != name[:64] or not row.present:
                row.name = name[:64]
                row.present = True
                changed = True
            # the host row carries liveness; a VM row is written when it changes, and its
            # last_seen refreshed at most once a minute (not on every beat)
            if changed or now - row.last_seen >= VM_SEEN_EVERY_S:
                row.last_seen = now
    for vm_id, row in rows.items():
        if vm_id not in seen and row.present:
            row.present = False
    s.flush()
    return new


def _stored_report(report: ItemReport, raw: dict[str, Any]) -> dict[str, Any]:
    """The report as stored: the engine's fields, plus the agent's own conditions
    (``agent_issues``: e.g. the item's peer store does not answer), at most 5 short lines."""
    out = report.to_dict()
    issues = raw.get("agent_issues")
    if isinstance(issues, list) and issues:
        out["agent_issues"] = [str(x)[:300] for x in issues[:5]]
    return out


def _apply_item(s: Session, host: Host, item: Item, ib: ItemBeat, now: float,
                settings: VaultSettings) -> int:
    """Apply one item's report and new/removed points; the row is written only when something
    changed. Only the reported points are looked up (``point_id IN (...)``); removals only when
    explained (:func:`trust.judge_removals`), after the new points are in."""
    try:
        report = ItemReport.from_dict(ib.report)
    except (KeyError, TypeError, ValueError) as e:
        raise InvalidInput(f"item {item.id}: unreadable report ({type(e).__name__})") from None
    changed = False

    def put(attr: str, value: Any) -> None:
        nonlocal changed
        if getattr(item, attr) != value:
            setattr(item, attr, value)
            changed = True

    new_report = _stored_report(report, ib.report)
    if _report_news(item.report, new_report):
        put("report", new_report)
    if item.critical_error is None or report.state is ItemState.CRITICAL:
        put("state", report.state.value)
    if report.last_point_time is not None:
        put("last_point_time", max(item.last_point_time or 0.0, report.last_point_time))
    if report.last_app_point_time is not None:
        put("last_app_point_time", max(item.last_app_point_time or 0.0, report.last_app_point_time))
    points: list[PointInfo] = []
    for pd in ib.new_points:
        try:
            points.append(PointInfo.from_dict({**pd, "item_id": item.id}))
        except (KeyError, TypeError, ValueError) as e:
            raise InvalidInput(f"item {item.id}: unreadable point ({type(e).__name__})") from None
    # a restored database (``vault/backup.py``) may lack points the agents reported to the
    # vault before it was lost, which they will not report again (their ack is past them):
    # ask the agent for its whole catalogue once (ack 0), then reconcile with it
    restored = (item.acked_seq or 0) < 0
    acked = max(0, item.acked_seq or 0)
    reconciled = item.acked_seq == AWAITING_FULL_CATALOGUE and bool(points) \
        and _reconcile_catalogue(s, item, points, now, settings)
    if points:
        known = set(s.scalars(select(Point.point_id).where(
            Point.item_id == item.id, Point.point_id.in_(sorted({p.point_id for p in points})))))
        for p in points:
            if p.point_id in known:
                acked = max(acked, p.seq)  # catalogued already
                continue
            known.add(p.point_id)
            s.add(Point(item_id=item.id, point_id=p.point_id, seq=p.seq, created_at=p.created_at,
                        consistency=p.consistency.value, bytes_written=p.bytes_written,
                        info=p.to_dict()))
            acked = max(acked, p.seq)
            put("last_point_time", max(item.last_point_time or 0.0, p.created_at))
            if p.consistency.value == "app":
                put("last_app_point_time", max(item.last_app_point_time or 0.0, p.created_at))
    if ib.removed_points:
        s.flush()
        accepted, refused = trust.judge_removals(s, item, ib.removed_points, now,
                                                 settings.retention_skew_s)
        if refused:
            trust.refuse_removals(s, host, item, refused, now)
        if accepted:
            s.execute(delete(Point).where(Point.item_id == item.id, Point.point_id.in_(accepted)))
            s.flush()
        acked = int(s.scalar(select(func.max(Point.seq)).where(Point.item_id == item.id)) or 0)
    if restored and not reconciled:
        put("acked_seq", AWAITING_FULL_CATALOGUE)
        return 0   # the agent reports every point it has in its next heartbeat
    put("acked_seq", acked)
    if changed:
        item.updated_at = now
    return acked


def _reconcile_catalogue(s: Session, item: Item, points: list[PointInfo], now: float,
                         settings: VaultSettings) -> bool:
    """After a restore: ``points`` is the agent's whole catalogue when it reaches back to the
    oldest point the vault holds (else the agent has not taken the ack 0 yet: ask again).
    Points the vault holds that the agent no longer has were removed after the backup; each
    is judged like a reported removal (the retention rule must explain it), else kept."""
    rows = s.execute(select(Point.point_id, Point.seq).where(Point.item_id == item.id)).all()
    if rows and min(p.seq for p in points) > min(r.seq for r in rows):
        return False
    gone = sorted({r.point_id for r in rows} - {p.point_id for p in points})
    if gone:
        accepted, _refused = trust.judge_removals(s, item, gone, now, settings.retention_skew_s)
        if accepted:
            s.execute(delete(Point).where(Point.item_id == item.id, Point.point_id.in_(accepted)))
            s.flush()
    return True


def _made_by_failover(s: Session, host: Host, vm: Vm) -> bool:
    """A new VM of this site named like an item failing over into it (or its test VM)."""
    if s.scalars(select(Item.id).where(Item.target_site_id == host.site_id, Item.vm_name == vm.name,
                                       Item.status.in_(FAILOVER_ITEM_STATUSES))
                 ).first() is not None:
        return True
    if not vm.name.endswith("-test"):
        return False
    return s.scalars(select(Failover.id).join(Item, Item.id == Failover.item_id).where(
        Item.target_site_id == host.site_id, Item.vm_name == vm.name[:-len("-test")],
        Failover.kind == "test",
        Failover.state.in_((FailoverState.STARTING, FailoverState.TEST_RUNNING)))
    ).first() is not None


def _auto_protect(s: Session, host: Host, new_vms: list[Vm], now: float) -> None:
    """A policy applies to every VM of its group, also to VMs discovered later."""
    if not new_vms or host.revoked_at is not None:
        return
    groups = list(s.scalars(select(Group).where(Group.site_id == host.site_id,
                                                Group.policy_id.is_not(None))))
    for vm in new_vms:
        group = group_for_vm(groups, vm, host)
        if group is None or active_item_for_vm(s, host.id, vm.vm_id) is not None:
            continue
        if _made_by_failover(s, host, vm):
            # a VM created by a failover into this site (or a failback to the original VM, or
            # a test failover): its protection is the failover's re-protect, not a new item
            vm.auto_protect_blocked = True
            continue
        try:
            start_enable_protection(s, vm=vm, host=host, group=group, now=now,
                                    reason=f"discovered VM matches group {group.name}")
        except DrsiteError as e:
            log.warning("auto-protection of %s skipped: %s", vm.name, e.message)
