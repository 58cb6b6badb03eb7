"""What the controller's passes read of every item, without loading ORM rows.

The scheduler (every 0.5 s) and the health monitor (every 2 s) look at every protected item;
loading them as ORM objects decoded every JSON column (the agent's whole report first) and built
and expired thousands of instances per pass — most of the vault's CPU at 1,000 items. They read
plain column tuples instead (:func:`load_facts`); the agent's report, needed only to explain a
critical or resync-pending item, is fetched for those items alone (:func:`attach_reports`).

Responsible for: reading. Not responsible for: deciding (``scheduler``, ``health``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, select
from sqlalchemy.orm import Session

from drsite.core.states import ItemProtection
from drsite.vault.db.models import Item

_COLUMNS = (Item.id, Item.host_id, Item.group_id, Item.vm_name, Item.status, Item.state,
            Item.critical_error, Item.retry, Item.active_job_id, Item.last_cycle_sent_at,
            Item.last_point_time, Item.last_app_point_time, Item.last_app_cycle_at,
            Item.last_retention_at, Item.health, Item.health_reasons)


@dataclass(slots=True)
class ItemFacts:
    """The columns of one item the controller's passes use (attribute names as on ``Item``,
    so the pure rules — ``effective_state``, ``item_health`` — take either). ``report`` is
    None unless :func:`attach_reports` fetched it."""

    id: str
    host_id: str
    group_id: int
    vm_name: str
    status: ItemProtection
    state: str
    critical_error: dict[str, Any] | None
    retry: dict[str, Any]
    active_job_id: str | None
    last_cycle_sent_at: float | None
    last_point_time: float | None
    last_app_point_time: float | None
    last_app_cycle_at: float | None
    last_retention_at: float | None
    health: str
    health_reasons: list[Any]
    report: dict[str, Any] | None = None


def load_facts(s: Session, *where: ColumnElement[bool]) -> list[ItemFacts]:
    """The facts of the items matching ``where``, in id order."""
    return [ItemFacts(*row) for row in s.execute(select(*_COLUMNS).where(*where)
                                                 .order_by(Item.id))]


def attach_reports(s: Session, facts: list[ItemFacts],
                   need: Callable[[ItemFacts], bool]) -> None:
    """Fetch the agent's report of the items for which ``need`` is true (in one query)."""
    wanted = {f.id: f for f in facts if need(f)}
    for i in range(0, len(wanted), 500):
        ids = list(wanted)[i:i + 500]
        for item_id, report in s.execute(select(Item.id, Item.report).where(Item.id.in_(ids))):
            wanted[item_id].report = report
