"""Fencing the old primary after an unplanned failover (issue 13 part 2).

An unplanned failover starts the recovery VM without asking the source — the source may be
down, hung or cut off, and its VM may still be running and writing. The moment the recovery
side has promoted, the vault queues ``failover_fence`` for the source host (no job: it waits
for the host however long it is away; the command channel or the next heartbeat delivers it
as soon as the agent is back). The agent powers the VM off and stops replicating it; an agent
whose engine meets the newer generation in the store fences itself the same way, even without
the vault.

Until the agent confirms, the failover's ``result.fence`` is ``pending`` and the item is
Critical with the reason ``old primary may still be writing``; ``GET /vms`` marks both VMs of
the item. A cancel withdraws a fence not yet delivered (the agent powers the VM on again if it
had fenced it).

Responsible for: the fence's record and what health and inventory say about it. Not
responsible for: powering anything off (the agent).
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from drsite.core.errors import PermanentError, from_dict
from drsite.core.states import OPEN_COMMAND_STATUSES, CommandStatus, ItemProtection
from drsite.vault import commands
from drsite.vault.audit import record_event
from drsite.vault.db.models import Command, Failover, Host, Item

PENDING, DONE, FAILED, WITHDRAWN = "pending", "done", "failed", "withdrawn"
WARNING = "old primary may still be writing"
FENCE_RETRIES = 5
FENCED_STATUSES = (ItemProtection.FAILING_OVER, ItemProtection.FAILED_OVER,
                   ItemProtection.COMMITTED)


def request_fence(s: Session, item: Item, fo: Failover, recovery_site: str, now: float) -> None:
    """Queue ``failover_fence`` for the item's source host (idempotent per failover)."""
    fence = dict((fo.result or {}).get("fence") or {})
    if fence.get("state") in (PENDING, DONE):
        return
    src = s.get(Host, item.host_id)
    if src is None or src.revoked_at is not None:
        fence = {"state": FAILED, "at": now,
                 "message": "the old primary's host is no longer registered: check by hand "
                            "that its VM is off"}
    else:
        cmd = commands.enqueue(s, host_id=src.id, kind="failover_fence", item_id=item.id,
                               args={"failover_id": fo.id, "generation": fo.generation or 0,
                                     "recovery_site": recovery_site}, now=now)
        fence = {"state": PENDING, "command_id": cmd.id, "requested_at": now,
                 "tries": int(fence.get("tries") or 0) + 1, "host": src.name}
    fo.result = {**dict(fo.result or {}), "fence": fence}


def apply_result(s: Session, cmd: Command, now: float) -> None:
    """Digest the end of a ``failover_fence`` command into its failover's record."""
    fid = str((cmd.args or {}).get("failover_id") or "")
    fo = s.get(Failover, fid) if fid else None
    item = s.get(Item, cmd.item_id) if cmd.item_id else None
    if fo is None or item is None:
        return
    fence = dict((fo.result or {}).get("fence") or {})
    if fence.get("command_id") != cmd.id:
        return  # an older attempt, or withdrawn
    if cmd.status == CommandStatus.SUCCEEDED:
        res = dict(cmd.result or {})
        fence.update(state=DONE, at=now, vm_power=res.get("vm_power"),
                     was_running=res.get("was_running"))
        record_event(s, now, "item", item.id,
                     f"old primary of {item.vm_name} fenced: its VM is "
                     f"{res.get('vm_power') or 'off'}")
        fo.result = {**dict(fo.result or {}), "fence": fence}
        return
    err = from_dict(cmd.error)
    tries = int(fence.get("tries") or 0)
    if err.transient and tries < FENCE_RETRIES:
        fence["state"] = FAILED  # lets request_fence queue the next attempt
        fo.result = {**dict(fo.result or {}), "fence": fence}
        site = str((cmd.args or {}).get("recovery_site") or "")
        request_fence(s, item, fo, site, now)
        return
    fence.update(state=FAILED, at=now, message=err.message, hint=err.hint)
    fo.result = {**dict(fo.result or {}), "fence": fence}
    record_event(s, now, "item", item.id, f"fencing the old primary of {item.vm_name} failed: "
                                          f"{err.message}")


def withdraw(s: Session, fo: Failover, now: float) -> None:
    """A cancel hands the item back: a fence not done yet is withdrawn — pending, and also
    delivered (sent/running): a delivery lost to an agent restart must never be re-delivered
    after the cancel (the agent also ignores a fence older than its item's generation). If the
    agent did fence, ``failover_resume_source`` (queued after it, same item lane) powers the VM
    on again."""
    fence = dict((fo.result or {}).get("fence") or {})
    if fence.get("state") != PENDING:
        return
    cmd = commands.locked(s, fence.get("command_id") or "")
    if cmd is not None and cmd.status in OPEN_COMMAND_STATUSES:
        cmd.status = CommandStatus.FAILED
        cmd.error = PermanentError("withdrawn: the failover was cancelled").to_dict()
        cmd.updated_at = cmd.finished_at = now
    fence.update(state=WITHDRAWN, at=now)
    fo.result = {**dict(fo.result or {}), "fence": fence}


def fence_issue(fo: Failover | None) -> str | None:
    """The health reason while the old primary is not known to be fenced, else None."""
    fence = dict((fo.result or {}).get("fence") or {}) if fo is not None else {}
    state = fence.get("state")
    if state == PENDING:
        return (f"{WARNING}: its agent (host {fence.get('host', '?')}) has not confirmed that "
                "the VM is off; it is fenced as soon as that agent is reachable")
    if state == FAILED:
        return f"{WARNING}: fencing failed ({fence.get('message', '?')}); power it off by hand"
    return None


def unfenced(s: Session) -> dict[str, tuple[Item, Failover, str]]:
    """Items in a failover whose old primary is not known to be fenced: item id → (item, its
    failover, the reason)."""
    out: dict[str, tuple[Item, Failover, str]] = {}
    rows = s.execute(select(Item, Failover).join(Failover, Failover.id == Item.failover_id)
                     .where(Item.status.in_(FENCED_STATUSES)))
    for item, fo in rows:
        issue = fence_issue(fo)
        if issue is not None:
            out[item.id] = (item, fo, issue)
    return out


def vm_warnings(s: Session) -> dict[tuple[str, str], str]:
    """(host id, vm id) → warning, for both VMs of every unfenced item (``GET /vms``)."""
    out: dict[tuple[str, str], str] = {}
    for item, fo, issue in unfenced(s).values():
        out[(item.host_id, item.vm_id)] = issue
        if fo.recovery_host_id and fo.vm_id:
            out[(fo.recovery_host_id, fo.vm_id)] = f"{WARNING} (the source VM of this recovery VM)"
    return out

