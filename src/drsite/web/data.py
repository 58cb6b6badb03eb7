"""What each page shows, read through the API's own routes and views (never from internals).

Every function here calls the REST API's route functions (``vault.api.inventory``,
``operations``, ``protection``) or its view functions (``vault.api.views``) — the same
serialisable reports the API returns — with the logged-in user as the principal, so the
dashboard and ``GET /api/v1/...`` can never disagree. Four reads have no route of their own
and use the API's view over one query: the jobs of one item (``job_view``), the recovery points
of the plotted window and the damaged ones (``dict(point.info)`` with ``damage``, as ``GET
/items/{id}/points``), and the changed bytes of the last hour per item (summed over that same
catalogue). Drills are ``vault.api.drills``' routes.
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import func, select

from drsite.core.errors import NotFound
from drsite.core.states import JobState, TaskState
from drsite.vault import recovery_plans
from drsite.vault.api import audit as audit_api
from drsite.vault.api import drills as drills_api
from drsite.vault.api import inventory, operations, protection
from drsite.vault.api.deps import Principal
from drsite.vault.api.schemas import VerifyIn
from drsite.vault.api.views import job_view
from drsite.vault.context import Vault
from drsite.vault.db.models import Job, Point
from drsite.vault.jobs import create
from drsite.web import charts
from drsite.web.session import WebUser

log = logging.getLogger(__name__)

CHURN_WINDOW_S = 3600.0
DAMAGED_SHOWN = 20


def principal(user: WebUser) -> Principal:
    return Principal(user.name, user.role)


def overview(vault: Vault, user: WebUser) -> dict[str, Any]:
    p = principal(user)
    health = operations.health(vault, p)
    hosts = inventory.list_hosts(vault, p)
    sites = inventory.list_sites(vault, p)
    for site in sites:
        mine = [h for h in hosts if h["site"] == site["name"] and not h["revoked"]]
        site["up"] = sum(1 for h in mine if h["up"])
        site["down"] = len(mine) - site["up"]
    return {"health": health, "sites": sites,
            "hosts": [h for h in hosts if not h["revoked"]],
            "alerts": operations.list_alerts(vault, p, state="active", limit=10),
            "jobs": operations.list_jobs(vault, p, limit=8)}


def churn_by_item(vault: Vault, now: float, item_id: str | None = None) -> dict[str, float]:
    """Changed bytes per second over the last hour, per item (points after the first: the
    initial copy is not churn), from the recovery-point catalogue."""
    since = now - CHURN_WINDOW_S
    q = (select(Point.item_id, func.count(), func.min(Point.created_at), func.max(Point.created_at),
                func.sum(Point.bytes_written))
         .where(Point.created_at >= since, Point.seq > 1).group_by(Point.item_id))
    if item_id is not None:
        q = q.where(Point.item_id == item_id)
    with vault.db.read() as s:
        rows = s.execute(q).all()
    out: dict[str, float] = {}
    for item_id, n, first, last, total in rows:
        if n >= 2 and last > first:
            out[str(item_id)] = float(total or 0) / (float(last) - float(first))
    return out


def protected_vms(vault: Vault, user: WebUser) -> dict[str, Any]:
    p = principal(user)
    now = vault.settings.clock.now()
    items = protection.list_items(vault, p)
    churn = churn_by_item(vault, now)
    for it in items:
        it["churn_bps"] = churn.get(it["id"])
    unprotected = [v for v in inventory.list_vms(vault, p) if v["item_id"] is None and v["present"]]
    return {"items": items, "unprotected": unprotected}


def item_points(vault: Vault, item_id: str, window: str | None, now: float) -> dict[str, Any]:
    """The item's recovery points for the page, each exactly as ``GET /items/{id}/points``
    serialises it (``dict(point.info)``), but only what the page draws: the points of the
    window plus the newest one before it (where the RPO curve starts), the 15 newest for the
    table, and counts. (The route returns the whole catalogue: too much to read every 2 s.)"""
    with vault.db.read() as s:
        base = select(Point).where(Point.item_id == item_id)
        n, n_app, oldest = s.execute(
            select(func.count(), func.count().filter(Point.consistency == "app"), func.min(Point.created_at))
            .where(Point.item_id == item_id)).one()
        key, w = charts.window_for(window, now, [{"created_at": oldest}] if oldest is not None else [])
        inside = [dict(p.info) for p in s.scalars(base.where(Point.created_at >= w.start)
                                                   .order_by(Point.seq, Point.id))]
        before = s.scalars(base.where(Point.created_at < w.start)
                           .order_by(Point.seq.desc(), Point.id.desc()).limit(1)).first()
        recent = [dict(p.info) for p in s.scalars(base.order_by(Point.seq.desc(), Point.id.desc()).limit(15))]
    points = ([dict(before.info)] if before is not None else []) + inside
    return {"points": points, "recent_points": recent, "n_points": int(n), "n_app": int(n_app),
            "oldest": oldest, "window": key, "w": w}


def item_page(vault: Vault, user: WebUser, item_id: str, window: str | None) -> dict[str, Any]:
    p = principal(user)
    now = vault.settings.clock.now()
    item = protection.show_item(item_id, vault, p)
    pts = item_points(vault, item["id"], window, now)
    policy = None
    if item.get("policy"):
        try:
            policy = protection.show_policy(item["policy"], vault, p)
        except NotFound:
            policy = None
    with vault.db.read() as s:
        jobs = [job_view(s, j) for j in s.scalars(select(Job).where(Job.item_id == item["id"])
                                                  .order_by(Job.created_at.desc(), Job.id.desc())
                                                  .limit(20))]
    threshold = float(policy["rpo_threshold_s"]) if policy else None
    w = pts.pop("w")
    return {"item": item, "policy": policy, "jobs": jobs, **pts, "windows": list(charts.WINDOWS),
            "damaged": damaged_points(vault, item["id"]), "scrub": scrub_status(item, policy),
            "rpo_svg": charts.rpo_chart(pts["points"], w, threshold),
            "timeline_svg": charts.timeline(pts["points"], w),
            "churn_bps": churn_by_item(vault, now, item["id"]).get(item["id"])}


def item(vault: Vault, user: WebUser, item_id: str) -> dict[str, Any]:
    return protection.show_item(item_id, vault, principal(user))


def damaged_points(vault: Vault, item_id: str) -> list[dict[str, Any]]:
    """The item's newest points marked damaged (by a scrub or a verify), newest first, each as
    ``GET /items/{id}/points`` serialises it."""
    with vault.db.read() as s:
        rows = s.scalars(select(Point).where(Point.item_id == item_id, Point.damage.is_not(None))
                         .order_by(Point.seq.desc(), Point.id.desc()).limit(DAMAGED_SHOWN))
        return [{**dict(p.info), "damage": p.damage} for p in rows]


def scrub_status(item: dict[str, Any], policy: dict[str, Any] | None) -> dict[str, Any]:
    """The item's last scrub as the item view reports it, and when the next pass is due."""
    sc = dict(item.get("scrub") or {})
    interval = policy.get("scrub_interval_s") if policy else None
    last = item.get("last_scrub_at")
    return {**sc, "interval_s": interval, "rate_bps": policy.get("scrub_rate_bps") if policy else None,
            "last_pass_at": last,
            "next_at": (float(last) + float(interval)) if last is not None and interval else None,
            "findings": list(sc.get("findings") or [])[:10],
            "findings_total": int(sc.get("findings_total") or 0)}


def start_verify(vault: Vault, user: WebUser, item_id: str, which: str) -> str:
    """A Verify job of the item's newest point or of all its points; the job's id."""
    body = VerifyIn(point=None, all=which == "all")
    return str(protection.verify(item_id, body, vault, principal(user))["job_id"])


def drills(vault: Vault, user: WebUser, plan: str | None,
           group: str | None = None) -> list[dict[str, Any]]:
    return drills_api.list_drills(vault, principal(user), plan=plan or None,
                                  group=group or None, limit=100)


def drill(vault: Vault, user: WebUser, drill_id: str) -> dict[str, Any]:
    return drills_api.show_drill(drill_id, vault, principal(user))


def jobs(vault: Vault, user: WebUser, state: str | None, kind: str | None) -> list[dict[str, Any]]:
    return operations.list_jobs(vault, principal(user), state=state or None, kind=kind or None, limit=100)


def job(vault: Vault, user: WebUser, job_id: str) -> dict[str, Any]:
    j = operations.show_job(job_id, vault, principal(user))
    j["waiting_for_operator"] = waiting_for_operator(j)
    return j


def waiting_for_operator(j: dict[str, Any]) -> bool:
    """A plan job paused at a manual step: still running, its current task waits for a resume."""
    if j.get("state") != JobState.RUNNING:
        return False
    current = next((t for t in j.get("tasks", []) if t.get("state") == TaskState.RUNNING), None)
    return current is not None and "waiting for operator" in str(current.get("message") or "").lower()


def audit(vault: Vault, user: WebUser, actor: str | None, before: int | None) -> dict[str, Any]:
    """The audit trail page (admin only: the route refuses other roles)."""
    return audit_api.list_audit(vault, principal(user), limit=100, actor=actor, before=before)


def alerts(vault: Vault, user: WebUser, state: str | None) -> list[dict[str, Any]]:
    return operations.list_alerts(vault, principal(user), state=state or None, limit=200)


# ------------------------------------------------------------------------- recovery plans

def plans(vault: Vault) -> list[dict[str, Any]]:
    with vault.db.read() as s:
        return recovery_plans.list_plans(s)


def plan(vault: Vault, name: str) -> dict[str, Any]:
    with vault.db.read() as s:
        return recovery_plans.plan_view(s, name)


def start_plan_action(vault: Vault, name: str, action: str, args: dict[str, Any]) -> str:
    """Start ``action`` of plan ``name``; the new job's id."""
    now = vault.settings.clock.now()
    with vault.db.tx() as s:
        return str(recovery_plans.start_plan_action(s, name, action, args, now).id)


def resume_job(vault: Vault, job_id: str) -> None:
    now = vault.settings.clock.now()
    with vault.db.tx() as s:
        create.resume_job(s, job_id, now)


def cancel_job(vault: Vault, user: WebUser, job_id: str) -> None:
    operations.cancel_job(job_id, vault, principal(user))


def ack_alert(vault: Vault, user: WebUser, alert_id: str) -> None:
    operations.ack_alert(alert_id, vault, principal(user))

