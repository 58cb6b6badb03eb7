"""What each page shows, read through the API's own routes and views (never from internals).

Every function here calls the REST API's route functions (``vault.api.inventory``,
``operations``, ``protection``, ``history``, ``failover``) or its view functions
(``vault.api.views``) — the same serialisable reports the API returns — with the logged-in user
as the principal, so the dashboard and ``GET /api/v1/...`` can never disagree. A few reads have
no route of their own and use the API's view over one query: the jobs of one item and a plan
job's child jobs (``job_view``), the recovery points of the plotted window and the damaged ones
(``dict(point.info)`` with ``damage``, as ``GET /items/{id}/points``), the changed bytes of the
last hour per item (summed over that same catalogue), and how many jobs exist. Which failover
actions an item (or a plan) allows now is the API's own check (``item_actions.preflight``), so
a button is enabled exactly when the API would accept its action. Drills are
``vault.api.drills``' routes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from sqlalchemy import func, select

from drsite.core.actions import PLAN_ACTIONS
from drsite.core.errors import DrsiteError, NotFound
from drsite.core.states import LIVE_ITEM_STATUSES, JobState, TaskState
from drsite.vault import recovery_plans
from drsite.vault.api import audit as audit_api
from drsite.vault.api import drills as drills_api
from drsite.vault.api import failover as failover_api
from drsite.vault.api import history as history_api
from drsite.vault.api import inventory, operations, protection
from drsite.vault.api.deps import Principal
from drsite.vault.api.schemas import VerifyIn
from drsite.vault.api.views import failover_view, job_view, sync_view
from drsite.vault.context import Vault
from drsite.vault.db.models import Event, Failover, Group, Host, Item, Job, Point, Policy
from drsite.vault.health import agent_up
from drsite.vault.jobs import create, item_actions
from drsite.vault.jobs.registry import HANDLERS
from drsite.vault.membership import items_by_vm
from drsite.web import charts
from drsite.web.lists import ListQuery, Page, paginate
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
    alerts = operations.list_alerts(vault, p, state="active", limit=10)
    recent = operations.list_jobs(vault, p, limit=8)
    return {"health": health, "sites": sites,
            "hosts": [h for h in hosts if not h["revoked"]],
            "alerts": alerts["entries"], "alerts_total": alerts["total"],
            "jobs": recent["entries"], "jobs_total": recent["total"]}


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


# entries per page the dashboard reads from a paged API list (the API's maximum)
API_PAGE = 500
ITEMS_PER_PAGE = API_PAGE
ITEM_SORTS = ("vm_name", "health", "status", "rpo_s", "last_point_time", "group", "site",
              "churn_bps")
ITEM_FILTERS = ("health", "status", "site", "group")
ITEM_API_FILTERS = ("health", "site", "group")  # GET /items filters them (status: here)
HEALTH_ORDER = {"critical": 0, "warning": 1, "normal": 2}


def read_pages(fetch: Callable[[int, str | None], dict[str, Any]], *, per_page: int,
               need: int | None = None) -> tuple[list[dict[str, Any]], int]:
    """Entries of a paged API list, page after page along its keyset cursor (``fetch(limit,
    cursor)``): every one, or at least the first ``need``; and how many the list holds."""
    rows: list[dict[str, Any]] = []
    cursor: str | None = None
    while True:
        pg = fetch(per_page, cursor)
        rows.extend(pg["entries"])
        total, cursor = int(pg["total"]), pg.get("next_cursor")
        if not cursor or (need is not None and len(rows) >= need):
            return rows, total


def api_page(rows: list[dict[str, Any]], total: int, query: ListQuery) -> Page:
    """The page ``query`` asks for of a list in the API's own order (``rows``: its first
    entries, at least up to the page's end; ``total``: the API's count)."""
    return Page(rows[query.offset:query.offset + query.limit], total, query)


def item_status(it: dict[str, Any]) -> str:
    """One word for where an item stands: its protection while a failover holds it (or while
    it is enabled or removed), else its replication state."""
    return str(it["state"] if it.get("protection") == "protected" else it.get("protection"))


def protected_vms(vault: Vault, user: WebUser, query: ListQuery) -> dict[str, Any]:
    """A page of protected VMs and the VMs that are not protected. Health, site and group are
    the API's filters; in the API's order (VM name) without a search or a status filter only
    the pages up to the one shown are read (``ITEMS_PER_PAGE`` a request), with the API's
    total; another order, a search or a status filter read every matching item (the list is
    sorted, searched and cut here)."""
    p = principal(user)
    now = vault.settings.clock.now()
    api = {k: v for k, v in query.filters.items() if k in ITEM_API_FILTERS}
    local = replace(query, filters={k: v for k, v in query.filters.items()
                                    if k not in ITEM_API_FILTERS})
    in_api_order = query.sort == "vm_name" and not query.desc and not query.q \
        and not local.filters
    try:
        items, total = read_pages(
            lambda limit, cursor: protection.list_items(
                vault, p, health=api.get("health"), site=api.get("site"), group=api.get("group"),
                limit=limit, cursor=cursor),
            per_page=ITEMS_PER_PAGE, need=query.offset + query.limit if in_api_order else None)
    except DrsiteError:  # an unknown site or group matches nothing (never an error page)
        items, total = [], 0
    churn = churn_by_item(vault, now)
    for it in items:
        it["churn_bps"] = churn.get(it["id"])
        it["status"] = item_status(it)

    def sort_value(r: dict[str, Any], key: str) -> Any:
        return HEALTH_ORDER.get(str(r.get("health")), 3) if key == "health" else r.get(key)

    page = api_page(items, total, query) if in_api_order else paginate(
        items, local, search=("vm_name", "id", "group", "source_host", "site", "target_site",
                              "status"), sort_value=sort_value)
    page = replace(page, query=query)
    unprotected = [v for v in inventory.list_vms(vault, p) if v["item_id"] is None and v["present"]]
    return {"page": page, "query": query, "unprotected": unprotected,
            "facets": item_facets(vault, p, items)}


def item_facets(vault: Vault, p: Principal, items: list[dict[str, Any]]) -> dict[str, list[str]]:
    """The choices of the VM list's filters: every health, site and group there is (the items
    read may be only the first pages), and the statuses of the items read."""
    return {"health": list(HEALTH_ORDER),
            "status": sorted({str(it["status"]) for it in items}),
            "site": sorted(str(s["name"]) for s in inventory.list_sites(vault, p)),
            "group": sorted(str(g["name"]) for g in protection.list_groups(vault, p))}


def facets(rows: list[dict[str, Any]], names: tuple[str, ...]) -> dict[str, list[str]]:
    """The values each filter can take in ``rows`` (the filter's choices)."""
    return {n: sorted({str(r.get(n)) for r in rows if r.get(n) not in (None, "")}) for n in names}


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
    link = f"/ui/items/{item['id']}/points/"
    return {"item": item, "policy": policy, "jobs": jobs, **pts, "windows": list(charts.WINDOWS),
            "damaged": damaged_points(vault, item["id"]), "scrub": scrub_status(item, policy),
            "rpo_svg": charts.rpo_chart(pts["points"], w, threshold),
            "rpo_svg_narrow": charts.rpo_chart(pts["points"], w, threshold, narrow=True),
            "timeline_svg": charts.timeline(pts["points"], w, link=link),
            "timeline_svg_narrow": charts.timeline(pts["points"], w, link=link, narrow=True),
            "churn_bps": churn_by_item(vault, now, item["id"]).get(item["id"]),
            "actions": allowed(vault, item["id"]),
            "history": history_api.history(item["id"], vault, p, limit=20),
            "failover": open_failover(vault, item)}


def open_failover(vault: Vault, item: dict[str, Any]) -> dict[str, Any] | None:
    """The failover that holds the item, or its test failover that runs, as the API shows it."""
    with vault.db.read() as s:
        fo = s.scalars(select(Failover).where(Failover.item_id == item["id"],
                                              Failover.state.in_(OPEN_FAILOVER))
                       .order_by(Failover.created_at.desc())).first()
        return failover_view(fo) if fo is not None else None


OPEN_FAILOVER = ("starting", "test_running", "pending_commit")


def allowed(vault: Vault, item_id: str) -> dict[str, DrsiteError | None]:
    """Each action of the VM page: None when it may start now, else the API's refusal. The
    failover actions, resync and verify."""
    with vault.db.read() as s:
        item = s.get(Item, item_id)
        if item is None:
            raise NotFound(f"no item {item_id!r}")
        out: dict[str, DrsiteError | None] = {
            a.value: e for a, e in item_actions.allowed_actions(s, item).items()}
        for name, check in (("resync", create.check_resync), ("verify", create.check_verify)):
            try:
                check(item)
                out[name] = None
            except DrsiteError as e:
                out[name] = e
        return out


def refusal(vault: Vault, item_id: str, action: str, args: dict[str, Any]) -> DrsiteError | None:
    """The refusal ``action`` with ``args`` would get now (the confirmation page shows it)."""
    try:
        with vault.db.read() as s:
            if action == "resync":
                create.check_resync(item_actions.get_item(s, item_id))
            else:
                item_actions.preflight(s, item_id, action, args)
    except DrsiteError as e:
        return e
    return None


POINT_SORTS = ("created_at", "consistency", "kind", "bytes_written", "bytes_stored")


def points_page(vault: Vault, user: WebUser, item_id: str, query: ListQuery) -> dict[str, Any]:
    """The item's whole catalogue, a page at a time (newest first by default), with absolute
    times (the point picker and the points list)."""
    p = principal(user)
    item = protection.show_item(item_id, vault, p)
    rows = all_points(vault, p, item_id)

    def match(r: dict[str, Any], name: str, value: str) -> bool:
        if name == "damaged":
            return (r.get("damage") is not None) == (value == "yes")
        return str(r.get(name)) == value

    return {"item": item, "page": paginate(rows, query, search=("point_id", "kind",
                                                                  "consistency"), match=match),
            "query": query, "actions": allowed(vault, item_id)}


def all_points(vault: Vault, p: Principal, item_id: str) -> list[dict[str, Any]]:
    """Every recovery point of the item (``GET /items/{id}/points``, all its pages)."""
    return read_pages(lambda limit, cursor: protection.points(item_id, vault, p, limit=limit,
                                                              cursor=cursor),
                      per_page=API_PAGE)[0]


def point(vault: Vault, user: WebUser, item_id: str, point_id: str) -> dict[str, Any]:
    p = principal(user)
    item = protection.show_item(item_id, vault, p)
    for row in all_points(vault, p, item_id):
        if row.get("point_id") == point_id:
            return {"item": item, "point": row, "actions": allowed(vault, item_id)}
    raise NotFound(f"no recovery point {point_id!r} of item {item_id}",
                   hint=f"List its points: drsite items points {item_id}")


def start_item_action(vault: Vault, user: WebUser, item_id: str, action: str,
                      args: dict[str, Any]) -> str:
    """Start an item's failover action (or its resync) as the API does; the job's id."""
    if action == "resync":
        return str(protection.resync(item_id, vault, principal(user))["job_id"])
    body = failover_api.ActionIn(**args)
    return str(failover_api.item_action(item_id, action, vault, principal(user), body)["id"])


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


def start_drill(vault: Vault, user: WebUser, plan: str) -> str:
    """A drill of plan ``plan`` now, with the plan's own drill settings; the drill's id."""
    return str(drills_api.run_drill(drills_api.DrillIn(plan=plan), vault,
                                    principal(user))["drill_id"])


JOB_SORTS = ("created_at", "kind", "target", "state", "progress", "started_at")
JOB_LIST_MAX = 1000


def jobs(vault: Vault, user: WebUser, query: ListQuery) -> dict[str, Any]:
    """Jobs, newest first (state and kind filtered by the API). In the API's order (newest
    first) without a search only the pages up to the one shown are read, with the API's total;
    another order or a search works on the newest ``JOB_LIST_MAX`` (``capped`` says when more
    exist)."""
    p = principal(user)
    state, kind = query.filters.get("state") or None, query.filters.get("kind") or None
    in_api_order = query.sort == "created_at" and query.desc and not query.q
    need = query.offset + query.limit if in_api_order else JOB_LIST_MAX
    rows, existing = read_pages(
        lambda limit, cursor: operations.list_jobs(vault, p, state=state, kind=kind,
                                                   limit=limit, cursor=cursor),
        per_page=min(API_PAGE, need), need=need)
    if in_api_order:
        page = api_page(rows, existing, query)
    else:
        page = replace(paginate(rows[:JOB_LIST_MAX], replace(query, filters={}),
                                search=("id", "kind", "target", "state", "message")), query=query)
    return {"page": page, "query": query, "existing": existing, "listed_max": JOB_LIST_MAX,
            "capped": not in_api_order and existing > JOB_LIST_MAX, "kinds": sorted(HANDLERS)}


def job(vault: Vault, user: WebUser, job_id: str) -> dict[str, Any]:
    """A job; a plan job also with its child jobs (per VM, with the failover each made and the
    point it used), a child job with its plan job."""
    p = principal(user)
    j = operations.show_job(job_id, vault, p)
    j["waiting_for_operator"] = waiting_for_operator(j)
    child_ids = [jid for t in j.get("tasks", []) for jid in (t.get("child_jobs") or {}).values()]
    children: list[dict[str, Any]] = []
    with vault.db.read() as s:
        for t in j.get("tasks", []):
            for vm, jid in (t.get("child_jobs") or {}).items():
                row = s.get(Job, jid)
                if row is None:
                    continue
                fo = s.scalars(select(Failover).where(Failover.job_id == jid)).first()
                children.append({"vm": vm, "group_task": t.get("title"), "job": job_view(s, row),
                                 "failover": failover_view(fo) if fo is not None else None})
        fid = j.get("failover_id")
        fo = s.get(Failover, fid) if fid else None
        j["failover"] = failover_view(fo) if fo is not None else None
    j["children"] = children if child_ids else []
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


ALERT_SEVERITY = {"critical": 0, "warning": 1}
ALERT_LIST_MAX = 1000


def alerts(vault: Vault, user: WebUser, query: ListQuery) -> dict[str, Any]:
    """Alerts grouped by cause (their kind: two agent_down alerts are not lost among 27 RPO
    alerts): groups with a critical alert first, then by size; each group newest first. The
    newest ``ALERT_LIST_MAX`` of the state asked for are read (pages of the API) and grouped;
    ``existing`` (the API's total) says when there are more."""
    p = principal(user)
    state = query.filters.get("state", "active")
    if state not in ("active", "cleared", "all"):
        state = "active"
    rows, existing = read_pages(
        lambda limit, cursor: operations.list_alerts(
            vault, p, state=None if state == "all" else state, limit=limit, cursor=cursor),
        per_page=API_PAGE, need=ALERT_LIST_MAX)
    rows = rows[:ALERT_LIST_MAX]
    unfiltered = replace(query, filters={k: v for k, v in query.filters.items() if k != "state"},
                         limit=1000, offset=0)
    found = paginate(rows, unfiltered, search=("kind", "subject", "message", "severity")).rows
    groups: dict[str, list[dict[str, Any]]] = {}
    for a in found:
        groups.setdefault(str(a.get("kind")), []).append(a)
    ordered = sorted(groups.items(), key=lambda kv: (
        min(ALERT_SEVERITY.get(str(a.get("severity")), 2) for a in kv[1]), -len(kv[1]), kv[0]))
    return {"groups": [{"kind": k, "alerts": v, "open": sum(1 for a in v if a.get("active")),
                        "severity": min((str(a.get("severity")) for a in v),
                                        key=lambda x: ALERT_SEVERITY.get(x, 2))}
                       for k, v in ordered],
            "total": len(found), "state": state, "query": query, "existing": existing,
            "listed_max": ALERT_LIST_MAX,
            "kinds": sorted({str(a.get("kind")) for a in rows})}


EVENT_SORTS = ("at", "kind", "subject")
EVENT_LIST_MAX = 1000


def events(vault: Vault, user: WebUser, query: ListQuery) -> dict[str, Any]:
    """Events of the kind asked for (the API's filter, so a kind reaches older events), newest
    first. In the API's order without a search only the pages up to the one shown are read,
    with the API's total; another order or a search works on the newest ``EVENT_LIST_MAX``
    (``capped`` says when more exist)."""
    kind = query.filters.get("kind")
    with vault.db.read() as s:
        kinds = sorted(s.scalars(select(Event.kind).distinct()))
    in_api_order = query.sort == "at" and query.desc and not query.q
    need = query.offset + query.limit if in_api_order else EVENT_LIST_MAX
    # an unknown kind matches nothing (a list's bad parameter is never an error page)
    rows, existing = ([], 0) if kind and kind not in kinds else read_pages(
        lambda limit, cursor: operations.list_events(vault, principal(user), kind=kind or None,
                                                     limit=limit, cursor=cursor),
        per_page=min(API_PAGE, need), need=need)
    if in_api_order:
        page = api_page(rows, existing, query)
    else:
        page = replace(paginate(rows[:EVENT_LIST_MAX], replace(query, filters={}),
                                search=("kind", "subject", "message")), query=query)
    return {"page": page, "query": query, "kinds": kinds, "existing": existing,
            "listed_max": EVENT_LIST_MAX, "capped": not in_api_order and existing > EVENT_LIST_MAX}


def sites(vault: Vault, user: WebUser) -> dict[str, Any]:
    """Sites with their hosts, and per host how many VMs it reports and protects."""
    p = principal(user)
    hosts = [h for h in inventory.list_hosts(vault, p) if not h["revoked"]]
    vms = inventory.list_vms(vault, p)
    for h in hosts:
        mine = [v for v in vms if v["host_id"] == h["id"]]
        h["vms"] = len(mine)
        h["running"] = sum(1 for v in mine if v.get("power") == "running")
        h["protected"] = sum(1 for v in mine if v.get("item_id"))
    out = inventory.list_sites(vault, p)
    for site in out:
        site["host_rows"] = [h for h in hosts if h["site"] == site["name"]]
    return {"sites": out}


def host(vault: Vault, user: WebUser, host_id: str) -> dict[str, Any]:
    p = principal(user)
    h = inventory.show_host(host_id, vault, p)
    vms = [v for v in inventory.list_vms(vault, p, all=True) if v["host_id"] == h["id"]]
    items = read_pages(lambda limit, cursor: protection.list_items(vault, p, host=h["id"],
                                                                   limit=limit, cursor=cursor),
                       per_page=API_PAGE)[0]
    return {"host": h, "vms": vms, "items": items}


# ------------------------------------------------------------------------- recovery plans

def policies(vault: Vault, user: WebUser) -> dict[str, Any]:
    """Every policy as the API shows it, with the groups that use it, how many VMs it
    protects and, for a synchronous one, how many are in sync, suspended or unknown
    (``sync_counts``) and the VMs that are not in sync (``suspended``: id, VM, state,
    reason), as each item's ``sync`` says (``views.sync_view``)."""
    rows = protection.list_policies(vault, principal(user))
    now = vault.settings.clock.now()
    with vault.db.read() as s:
        by_id = {p.id: p for p in s.scalars(select(Policy))}
        groups: dict[int, list[str]] = {}
        for g in s.scalars(select(Group).order_by(Group.name)):
            if g.policy_id is not None:
                groups.setdefault(g.policy_id, []).append(g.name)
        hosts = {h.id: h for h in s.scalars(select(Host))}
        counted: dict[int | None, list[tuple[str, str, dict[str, Any]]]] = {}
        for item, pid in s.execute(select(Item, Group.policy_id)
                                   .join(Group, Group.id == Item.group_id)
                                   .where(Item.status.in_(sorted(LIVE_ITEM_STATUSES)))
                                   .order_by(Item.vm_name, Item.id)):
            pol = by_id.get(pid) if pid is not None else None
            up = agent_up(hosts.get(item.host_id), now, vault.settings)
            counted.setdefault(pid, []).append((item.id, item.vm_name,
                                                sync_view(item, pol, up)))
        ids = {p.name: pid for pid, p in by_id.items()}
    for r in rows:
        pid = ids.get(r["name"])
        mine = counted.get(pid, []) if pid is not None else []
        r["groups"] = groups.get(pid, []) if pid is not None else []
        r["n_vms"] = len(mine)
        states = [v["state"] for _, _, v in mine]
        r["sync_counts"] = {k: states.count(k) for k in ("in_sync", "suspended", "unknown")}
        r["suspended"] = [{"id": i, "vm_name": n, "state": v["state"], "reason": v["reason"]}
                          for i, n, v in mine if v["state"] in ("suspended", "unknown")][:20]
    return {"policies": rows}


def plans(vault: Vault) -> list[dict[str, Any]]:
    with vault.db.read() as s:
        return recovery_plans.list_plans(s)


def plan(vault: Vault, name: str) -> dict[str, Any]:
    with vault.db.read() as s:
        return recovery_plans.plan_view(s, name)


def plan_allowed(vault: Vault, name: str) -> dict[str, str | None]:
    """Each plan action: None when at least one VM of the plan may do it now (the plan skips
    VMs already there), else why none can."""
    with vault.db.read() as s:
        plan_ = recovery_plans.get_plan(s, name)
        items = items_by_vm(s)
        vms = [v for g in plan_.spec.get("groups", []) for v in g["vms"]]
        out: dict[str, str | None] = {}
        for act in PLAN_ACTIONS:
            reasons: list[str] = []
            for vm in vms:
                it = items.get(vm)
                if it is None:
                    reasons.append(f"{vm} is not protected")
                    continue
                try:
                    item_actions.preflight(s, it.id, act, {"create_reverse_mapping": True})
                    break
                except DrsiteError as e:
                    reasons.append(f"{vm}: {e.message}")
            else:
                out[act.value] = "; ".join(reasons[:3]) or "the plan has no VM"
                continue
            out[act.value] = None
        return out


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

