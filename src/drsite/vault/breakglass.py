"""What the vault learns from a break-glass failover (``drsite agent failover``, run on a
recovery site's store agent while no vault answered; issue 14 part 4).

The agent reports each finished break-glass failover in its heartbeats (``breakglass``: the
failover library's record) until the reply acknowledges its id (``breakglass_ack``). On the
first report the vault records what happened exactly as if its own unplanned failover had
done it: a ``failovers`` row (kind ``unplanned``, the point used, the recovery VM, the
generation, ``result.breakglass``), the item ``failed_over`` (so nothing schedules its
replication and no second failover starts: only a protected item fails over), its open
commands withdrawn, the recovery VM registered and never auto-protected, and the old primary
fenced (``failover_fence``, as after any unplanned failover). The store's access list then
makes the item read-only for the old primary, and the store's generation record fences its
engine in any case. Commit, cancel and change-point go through the vault as usual.

Reports are believed only from the store host of the item's target site (the holder of its
store role, ``storerole``: it holds the item's point key and replica; a host that merely claims
a store in its heartbeat is not believed); anything else is refused, audited and alerted. A
report for an item that a *different* failover already holds (the vault failed it over too
before it was lost) is a conflict: two recovery VMs may exist; a critical alert says so.
Idempotent per failover id.

Responsible for: digesting reports into the vault's state. Not responsible for: the failover
(the agent), fencing itself (``fencing``).
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from drsite.core.errors import InvalidInput
from drsite.core.model import validate_name
from drsite.core.states import FailoverState, ItemProtection
from drsite.failover.wire import BREAKGLASS_MAX_REPORTS
from drsite.vault import commands, fencing, storeacl
from drsite.vault.audit import AuditEntry, record_audit, record_event
from drsite.vault.db.models import Failover, Group, Host, Item, Site, Vm
from drsite.vault.trust import raise_security_alert
from drsite.vault.vmrows import vm_row

log = logging.getLogger(__name__)

MAX_REPORTS = BREAKGLASS_MAX_REPORTS
# a break-glass failover may land on an item the vault had protected, or was failing over
TAKEN_STATUSES = frozenset({ItemProtection.PROTECTED, ItemProtection.FAILING_OVER,
                            ItemProtection.ENABLING})


def _refuse(s: Session, host: Host, fid: str, item_id: str, why: str, now: float) -> None:
    raise_security_alert(s, now, f"breakglass:{fid}", item_id or host.id,
                         f"host {host.name} reported break-glass failover {fid} of item "
                         f"{item_id or '?'}, refused: {why}")
    record_audit(s, AuditEntry(at=now, actor_kind="host", actor=host.id,
                               action="agent.breakglass", target=f"item={item_id}",
                               outcome="refused", detail={"failover_id": fid, "why": why}))


def item_ids(reports: list[dict[str, Any]]) -> set[str]:
    """The well-formed item ids ``reports`` name (what :func:`apply_reports` may write), for
    the caller to lock in id order first. Malformed ones, and too many reports, are left to
    ``apply_reports`` to refuse (the schema bounds the list already)."""
    out: set[str] = set()
    for rec in reports:
        try:
            out.add(validate_name("item", str(rec.get("item_id") or "")))
        except (InvalidInput, AttributeError):
            continue
    return out


def apply_reports(s: Session, host: Host, reports: list[dict[str, Any]], now: float) -> list[str]:
    """Digest ``reports`` from ``host``; the failover ids to acknowledge (recorded, already
    known, or refused for good: a refused report is not accepted later either).

    The caller has locked the reported items (``FOR UPDATE``, fresh: ``populate_existing``)
    in id order with every other item its transaction writes: the status read here is then
    the one this transaction overwrites (PostgreSQL: a failover job committing meanwhile is
    waited for, not overwritten), and withdrawing an item's commands never precedes locking
    an item of lower id (the lock order, ``vault/design.md``)."""
    if len(reports) > MAX_REPORTS:
        raise InvalidInput(f"at most {MAX_REPORTS} break-glass reports per heartbeat")
    acked: list[str] = []
    for rec in reports:
        try:
            fid = validate_name("failover", str(rec.get("failover_id") or ""))
            item_id = validate_name("item", str(rec.get("item_id") or ""))
            state = FailoverState(str(rec.get("state")))
            point_id = validate_name("point", rec["point_id"])
            generation = rec["generation"]
            if not isinstance(generation, int) or isinstance(generation, bool):
                raise TypeError("generation")
            for key in ("point_created_at", "rto_s", "requested_at"):
                if rec.get(key) is not None:
                    float(rec[key])
        except (InvalidInput, KeyError, TypeError, ValueError) as e:
            raise InvalidInput(f"malformed break-glass report ({type(e).__name__})") from None
        acked.append(fid)
        if s.get(Failover, fid) is not None:
            continue  # recorded already (a lost acknowledgement)
        item = s.get(Item, item_id)
        if item is None:
            _refuse(s, host, fid, item_id, "no such item", now)
            continue
        group = s.get(Group, item.group_id)
        if host.site_id != item.target_site_id or not storeacl.serves_store(s, host) \
                or group is None or group.store_id is not None:
            _refuse(s, host, fid, item_id, "the host does not serve the item's recovery store",
                    now)
            continue
        if state not in (FailoverState.PENDING_COMMIT, FailoverState.COMMITTED):
            _refuse(s, host, fid, item_id, f"a failover in state {state.value} is not finished",
                    now)
            continue
        if item.status not in TAKEN_STATUSES:
            other = item.failover_id or "?"
            raise_security_alert(
                s, now, f"breakglass:{fid}", item.id,
                f"break-glass failover {fid} of {item.vm_name} on host {host.name} (point "
                f"{point_id}) while the item was already {item.status} (failover {other}): "
                "two recovery VMs may exist; keep one, delete the other by hand, then cancel or "
                "commit the vault's failover")
            continue
        # a failover promotes: generation 2 at least, and above every generation the vault
        # recorded for the item (a lower one would make the old primary's agent take the
        # fence for a stale one and leave its VM running)
        earlier = max((g or 0 for g in s.scalars(select(Failover.generation).where(
            Failover.item_id == item.id))), default=0)
        if generation < 2 or generation <= earlier:
            _refuse(s, host, fid, item_id, f"generation {generation} is no promotion (the "
                    f"item's failovers reached generation {max(earlier, 1)})", now)
            continue
        _record(s, host, item, rec, fid, state, point_id, generation, now)
    return acked


def _number(v: Any) -> float | None:
    return float(v) if v is not None else None


def _record(s: Session, host: Host, item: Item, rec: dict[str, Any], fid: str,
            state: FailoverState, point_id: str, generation: int, now: float) -> None:
    site = s.get(Site, item.target_site_id)
    fo = Failover(id=fid, item_id=item.id, kind="unplanned", state=state, point_id=point_id,
                  point_created_at=_number(rec.get("point_created_at")), recovery_host_id=host.id,
                  vm_name=str(rec.get("vm_name") or item.vm_name)[:64],
                  vm_id=str(rec.get("vm_id") or "")[:128] or None, generation=generation,
                  rto_s=_number(rec.get("rto_s")),
                  result={"agent": rec, "breakglass": {"host": host.name, "recorded_at": now}},
                  notes=[*[str(n) for n in rec.get("notes") or []],
                         f"break-glass failover on host {host.name} while no vault answered"],
                  job_id=None, created_at=float(rec.get("requested_at") or now), updated_at=now)
    s.add(fo)
    s.flush()
    storeacl.set_status(item, ItemProtection.FAILED_OVER, now)
    item.failover_id = fid
    item.updated_at = now
    # an EnableProtection rolled back (or failed) meanwhile may have queued "unprotect" with
    # its points deleted: those points are what the recovery VM came from — withdrawn too
    commands.cancel_open(s, item.id, now, "item failed over (break-glass)", unprotect=True)
    if fo.vm_id:
        vm_id = fo.vm_id
        row, _new = vm_row(s, host.id, vm_id, lambda: Vm(
            host_id=host.id, vm_id=vm_id, name=(fo.vm_name or vm_id)[:64], info={},
            present=False, first_seen=now, last_seen=now, auto_protect_blocked=True))
        row.auto_protect_blocked = True
    fencing.request_fence(s, item, fo, site.name if site else "", now)
    record_audit(s, AuditEntry(at=now, actor_kind="host", actor=host.id,
                               action="agent.breakglass", target=f"item={item.id}",
                               outcome="ok", detail={"failover_id": fid, "point_id": point_id,
                                                     "generation": generation}))
    record_event(s, now, "item", item.id,
                 f"break-glass failover {fid} (recorded from host {host.name}): {fo.vm_name} "
                 f"runs on the recovery site from point {point_id} (generation {generation}); "
                 "commit or cancel it")
    log.info("break-glass failover %s of %s recorded from host %s", fid, item.id, host.id)
