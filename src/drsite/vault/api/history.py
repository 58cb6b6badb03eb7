"""A VM's one history across failover and failback (``GET /items/{id}/history``).

Failover, re-protect and failback make new items (each direction of replication is an item of
its own, with its own recovery store and points), so an item id names one leg of a VM's life.
Every item of a VM carries the VM's ``lineage_id`` (the first item's id): its history is the
items, failovers, jobs and events of the whole lineage, newest first, whichever item id asks.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from sqlalchemy import or_, select

from drsite.core.errors import InvalidInput
from drsite.core.states import RETIRED_ITEM_STATUSES, ItemProtection
from drsite.vault.api.deps import Reader, VaultDep, name
from drsite.vault.api.protection import get_item
from drsite.vault.api.views import event_view, failover_view, job_view, site_names
from drsite.vault.db.models import Event, Failover, Group, Host, Item, Job

router = APIRouter()

MAX_HISTORY = 500
GONE = RETIRED_ITEM_STATUSES | {ItemProtection.REPROTECTED}  # no longer the VM's item


def lineage_items(s: Any, item: Item) -> list[Item]:
    """Every item of ``item``'s VM, oldest first: each reverse item after the item it reverses
    (``origin_item_id``), whatever the clocks said."""
    lineage = item.lineage_id or item.id
    rows = list(s.scalars(select(Item).where(or_(Item.lineage_id == lineage, Item.id == item.id))
                          .order_by(Item.created_at, Item.id)))
    ids = {it.id for it in rows}
    out = [it for it in rows if it.origin_item_id not in ids]
    rest = [it for it in rows if it.origin_item_id in ids]
    while rest:
        placed = {it.id for it in out}
        nxt = [it for it in rest if it.origin_item_id in placed] or rest[:1]
        out.extend(nxt)
        rest = [it for it in rest if it not in nxt]
    return out


def leg_view(s: Any, it: Item, sites: dict[int, str]) -> dict[str, Any]:
    """One item of a lineage: which way it replicated, and how it stands."""
    host = s.get(Host, it.host_id)
    group = s.get(Group, it.group_id)
    return {"id": it.id, "vm_name": it.vm_name, "vm_id": it.vm_id, "protection": it.status,
            "source_site": sites.get(host.site_id) if host else None,
            "source_host": host.name if host else None,
            "target_site": sites.get(it.target_site_id), "group": group.name if group else None,
            "origin_item_id": it.origin_item_id, "created_at": it.created_at,
            "updated_at": it.updated_at}


@router.get("/items/{item_id}/history",
            summary="A VM's history across failover and failback: its items (one per direction "
                    "it replicated), failovers, jobs and events, newest first")
def history(item_id: str, vault: VaultDep, _p: Reader, limit: int = 100) -> dict[str, Any]:
    if not 1 <= limit <= MAX_HISTORY:
        raise InvalidInput(f"limit must be between 1 and {MAX_HISTORY}")
    with vault.db.read() as s:
        item = get_item(s, name("item id", item_id))
        legs = lineage_items(s, item)
        ids = [it.id for it in legs]
        sites = site_names(s)
        live = [it for it in legs if it.status not in GONE]
        failovers = s.scalars(select(Failover).where(Failover.item_id.in_(ids))
                              .order_by(Failover.created_at.desc(), Failover.id.desc())
                              .limit(limit))
        jobs = s.scalars(select(Job).where(Job.item_id.in_(ids))
                         .order_by(Job.created_at.desc(), Job.id.desc()).limit(limit))
        events = s.scalars(select(Event).where(Event.subject.in_(ids))
                           .order_by(Event.at.desc(), Event.id.desc()).limit(limit))
        return {"lineage_id": item.lineage_id or item.id, "vm_name": legs[-1].vm_name,
                "current_item_id": live[-1].id if live else None,
                "items": [leg_view(s, it, sites) for it in reversed(legs)],
                "failovers": [failover_view(f) for f in failovers],
                "jobs": [job_view(s, j) for j in jobs],
                "events": [event_view(e) for e in events]}
