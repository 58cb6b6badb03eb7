"""What the controller's passes read of every item, without loading ORM rows.

The scheduler (every 0.25 s) and the health monitor (every 2 s) look at many items; loading
them as ORM objects decoded every JSON column (the agent's whole report first) and built and
expired thousands of instances per pass — most of the vault's CPU at 1,000 items. They read
plain column tuples instead (:func:`load_facts`), and of the agent's report only the four
fields the rules read (``last_error``, ``resync_reason``, ``agent_issues``,
``last_point_id``), extracted by the database (JSON paths).

Responsible for: reading. Not responsible for: deciding (``scheduler``, ``health``).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from sqlalchemy import ColumnElement, select
from sqlalchemy.orm import Session

from drsite.core.states import ItemProtection
from drsite.vault.db.models import Group, Item, Policy

_COLUMNS = (Item.id, Item.host_id, Item.group_id, Item.target_site_id, Item.vm_name,
            Item.status, Item.state,
            Item.critical_error, Item.retry, Item.active_job_id, Item.last_cycle_sent_at,
            Item.last_point_time, Item.last_app_point_time, Item.last_app_cycle_at,
            Item.last_retention_at, Item.health, Item.health_reasons, Item.scrub,
            Item.last_scrub_at,
            Item.report["last_error"], Item.report["resync_reason"].as_string(),
            Item.report["agent_issues"], Item.report["last_point_id"].as_string())


@dataclass(slots=True)
class ItemFacts:
    """The columns of one item the controller's passes use (attribute names as on ``Item``,
    so the pure rules — ``effective_state``, ``item_health``, ``damage_reasons`` — take either).
    ``report`` holds only the fields the rules read (absent ones are left out)."""

    id: str
    host_id: str
    group_id: int
    target_site_id: int
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
    scrub: dict[str, Any] | None
    last_scrub_at: float | None
    report: dict[str, Any] | None


REPORT_FIELDS = ("last_error", "resync_reason", "agent_issues", "last_point_id")
_NAMES = tuple(f.name for f in fields(ItemFacts) if f.name != "report")


def load_facts(s: Session, *where: ColumnElement[bool], with_policy: bool = False) -> list[ItemFacts]:
    """The facts of the items matching ``where``, in id order. ``with_policy``: joined with
    their group and its policy, so ``where`` may name ``Group`` and ``Policy`` columns (items
    of a group without a policy are left out) — one join, not a subquery per item row."""
    out = []
    n = len(REPORT_FIELDS)
    q = select(*_COLUMNS)
    if with_policy:
        q = q.join(Group, Group.id == Item.group_id).join(Policy, Policy.id == Group.policy_id)
    for row in s.execute(q.where(*where).order_by(Item.id)):
        values: list[Any] = list(row)
        report = {k: v for k, v in zip(REPORT_FIELDS, values[-n:], strict=True) if v is not None}
        out.append(ItemFacts(**dict(zip(_NAMES, values[:-n], strict=True)),
                             report=report or None))
    return out


@dataclass(slots=True)
class ItemRow:
    """The columns of one item ``GET /items`` shows (attribute names as on ``Item``, so the
    views and pure rules take either): read as plain tuples (:func:`item_row_columns`), not
    ORM rows — no instance built, tracked and expired per item of a page."""

    id: str
    lineage_id: str | None
    vm_id: str
    vm_name: str
    origin_item_id: str | None
    group_id: int
    host_id: str
    target_site_id: int
    status: ItemProtection
    state: str
    critical_error: dict[str, Any] | None
    retry: dict[str, Any]
    active_job_id: str | None
    last_point_time: float | None
    last_app_point_time: float | None
    health: str
    health_reasons: list[Any]
    scrub: dict[str, Any] | None
    last_scrub_at: float | None
    created_at: float
    updated_at: float
    report: dict[str, Any] | None


ITEM_ROW_COLUMNS = tuple(getattr(Item, f.name) for f in fields(ItemRow))


def item_rows(rows: Any) -> list[ItemRow]:
    """``ItemRow`` of each result row of ``select(*ITEM_ROW_COLUMNS)``."""
    return [ItemRow(*row) for row in rows]
