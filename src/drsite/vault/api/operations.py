"""Operator routes for jobs, alerts, events, the health summary and the controller."""

from __future__ import annotations

import os
import socket
from typing import Any

from fastapi import APIRouter, Request, Response
from sqlalchemy import func, select

from drsite.core.errors import InvalidInput, NotFound
from drsite.core.states import (
    ACTIVE_JOB_STATES,
    FAILOVER_ITEM_STATUSES,
    JOB_FILTER_ACTIVE,
    LIVE_ITEM_STATUSES,
    JobState,
)
from drsite.replication.report import Health
from drsite.vault.api.deps import Admin, Operator, Reader, VaultDep, authorize, json_response, name
from drsite.vault.api.paging import DEFAULT_LIMIT, Key, page
from drsite.vault.api.views import alert_view, event_view, job_view
from drsite.vault.auth import Role
from drsite.vault.db.models import Alert, Event, Host, Item, Job
from drsite.vault.health import agent_up
from drsite.vault.jobs.create import request_cancel
from drsite.vault.jobs.registry import HANDLERS

router = APIRouter()


JOB_ORDER = (Key(Job.created_at, descending=True), Key(Job.id, descending=True))
ALERT_ORDER = (Key(Alert.raised_at, descending=True), Key(Alert.id, descending=True))
EVENT_ORDER = (Key(Event.at, descending=True), Key(Event.id, descending=True))


def _text(kind: str, value: str, limit: int = 128) -> str:
    if len(value) > limit or any(ord(c) < 32 for c in value):
        raise InvalidInput(f"{kind} must be at most {limit} characters, no control characters")
    return value


@router.get("/jobs", summary="List jobs, newest first, a page at a time (filters: state, kind, "
                             "item, since)")
def list_jobs(vault: VaultDep, _p: Reader, state: str | None = None, kind: str | None = None,
              item: str | None = None, since: float | None = None, limit: int = DEFAULT_LIMIT,
              cursor: str | None = None) -> dict[str, Any]:
    """``state``: a job state or ``active``; ``item``: an item id; ``since``: created at or
    after (epoch seconds)."""
    q = select(Job)
    if state is not None:
        if state not in (*JobState, JOB_FILTER_ACTIVE):
            raise InvalidInput(f"unknown job state {state!r}",
                               hint=f"Use one of {', '.join(JobState)}, {JOB_FILTER_ACTIVE}.")
        q = q.where(Job.state.in_(ACTIVE_JOB_STATES) if state == JOB_FILTER_ACTIVE
                    else Job.state == JobState(state))
    if kind is not None:
        if kind not in HANDLERS:
            raise InvalidInput(f"unknown job kind {kind!r}", hint=f"Use one of {', '.join(HANDLERS)}.")
        q = q.where(Job.kind == kind)
    if item is not None:
        q = q.where(Job.item_id == name("item id", item))
    if since is not None:
        q = q.where(Job.created_at >= since)
    with vault.db.read() as s:
        return page(s, q, JOB_ORDER, limit=limit, cursor=cursor, view=lambda j: job_view(s, j))


def _job(s: Any, job_id: str) -> Job:
    job = s.get(Job, name("job id", job_id))
    if job is None:
        raise NotFound(f"no job {job_id!r}")
    assert isinstance(job, Job)
    return job


@router.get("/jobs/{job_id}", summary="Show a job with its ordered tasks")
def show_job(job_id: str, vault: VaultDep, _p: Reader) -> dict[str, Any]:
    with vault.db.read() as s:
        return job_view(s, _job(s, job_id))


@router.post("/jobs/{job_id}/cancel", status_code=202,
             summary="Cancel a job at its next task boundary (EnableProtection is rolled back)")
def cancel_job(job_id: str, vault: VaultDep, _p: Operator) -> dict[str, Any]:
    with vault.db.tx() as s:
        job = _job(s, job_id)
        request_cancel(s, job, vault.settings.clock.now())
        return job_view(s, job)


@router.get("/alerts", summary="List alerts, newest first, a page at a time (filters: state, "
                               "kind, severity, since)")
def list_alerts(vault: VaultDep, _p: Reader, state: str | None = None, kind: str | None = None,
                severity: str | None = None, since: float | None = None,
                limit: int = DEFAULT_LIMIT, cursor: str | None = None) -> dict[str, Any]:
    """``state``: active or cleared; ``since``: raised at or after (epoch seconds)."""
    q = select(Alert)
    if state == "active":
        q = q.where(Alert.cleared_at.is_(None))
    elif state == "cleared":
        q = q.where(Alert.cleared_at.is_not(None))
    elif state is not None:
        raise InvalidInput(f"unknown alert state {state!r}", hint="Use active or cleared.")
    if kind is not None:
        q = q.where(Alert.kind == _text("kind", kind, 32))
    if severity is not None:
        if severity not in ("warning", "critical"):
            raise InvalidInput(f"unknown severity {severity!r}", hint="Use warning or critical.")
        q = q.where(Alert.severity == severity)
    if since is not None:
        q = q.where(Alert.raised_at >= since)
    with vault.db.read() as s:
        return page(s, q, ALERT_ORDER, limit=limit, cursor=cursor, view=alert_view)


@router.post("/alerts/{alert_id}/ack", summary="Acknowledge an alert")
def ack_alert(alert_id: str, vault: VaultDep, _p: Operator) -> dict[str, Any]:
    if not alert_id.isdigit() or len(alert_id) > 18:
        raise NotFound(f"no alert {alert_id!r}")
    with vault.db.tx() as s:
        a = s.get(Alert, int(alert_id))
        if a is None:
            raise NotFound(f"no alert {alert_id!r}")
        if a.acked_at is None:
            a.acked_at = vault.settings.clock.now()
        return alert_view(a)


@router.get("/events", summary="The event trail, newest first, a page at a time (filters: "
                               "kind, subject, since)")
def list_events(vault: VaultDep, _p: Reader, kind: str | None = None, subject: str | None = None,
                since: float | None = None, limit: int = DEFAULT_LIMIT,
                cursor: str | None = None) -> dict[str, Any]:
    q = select(Event)
    if kind is not None:
        q = q.where(Event.kind == name("event kind", kind))
    if subject is not None:
        q = q.where(Event.subject == _text("subject", subject))
    if since is not None:
        q = q.where(Event.at >= since)
    with vault.db.read() as s:
        return page(s, q, EVENT_ORDER, limit=limit, cursor=cursor, view=event_view)


@router.get("/health", summary="Counts by health, worst RPOs, agents up/down")
def health_route(request: Request, vault: VaultDep) -> Response:
    """:func:`health` (reader token), checked, read and rendered in one worker thread."""
    return json_response(health(vault, authorize(request, vault, Role.READER)))


def health(vault: VaultDep, _p: Reader) -> dict[str, Any]:
    """Counts of the health the vault last evaluated (every ``health_interval``) by SQL, the
    ten oldest newest-points, agents, open alerts and active jobs: a handful of queries,
    whatever the number of items."""
    now = vault.settings.clock.now()
    live = Item.status.in_(LIVE_ITEM_STATUSES)
    # counted: every item a VM has — replicating, or held by a failover that is not over (a
    # failed-over item whose old primary may still write is the one an operator must see);
    # the RPO list: the replicating ones (an item held by a failover does not replicate)
    counted = Item.status.in_(sorted(LIVE_ITEM_STATUSES | FAILOVER_ITEM_STATUSES))
    # counts of a summary: each query may see a later commit than the one before (no
    # transaction on PostgreSQL: two round trips fewer)
    with vault.db.read_loose() as s:
        hosts = list(s.scalars(select(Host).where(Host.revoked_at.is_(None))))
        counts = {h.value: 0 for h in Health}
        for value, n in s.execute(select(Item.health, func.count()).where(counted)
                                  .group_by(Item.health)):
            if value in counts:
                counts[value] = int(n)
        worst = s.execute(select(Item.id, Item.vm_name, Item.last_point_time, Item.health)
                          .where(live, Item.last_point_time.is_not(None))
                          .order_by(Item.last_point_time, Item.id).limit(10)).all()
        up = sum(1 for h in hosts if agent_up(h, now, vault.settings))
        n_alerts = s.scalar(select(func.count()).select_from(Alert).where(Alert.cleared_at.is_(None)))
        n_jobs = s.scalar(select(func.count()).select_from(Job).where(Job.state.in_(ACTIVE_JOB_STATES)))
        return {"items": counts,
                "worst_rpo": [{"item_id": i, "vm_name": n, "rpo_s": max(0.0, now - (t or 0.0)),
                               "health": hl}
                              for i, n, t, hl in worst],
                "agents": {"up": up, "down": len(hosts) - up}, "alerts_active": int(n_alerts or 0),
                "jobs_active": int(n_jobs or 0)}


@router.get("/controller", summary="Which vault process is the controller (lease, epoch)")
def controller(vault: VaultDep, _p: Reader) -> dict[str, Any]:
    """The controller lease as the database holds it, and the process that answered (several
    API processes may serve one vault: ``this_process.controller`` tells whether it is the
    one running the background work)."""
    lease = vault.lease.view()
    return {"lease": lease.to_dict(), "role": vault.role,
            "this_process": {"host": socket.gethostname(), "pid": os.getpid(),
                             "controller": vault.lease.held
                             and lease.holder == vault.lease.ident.holder,
                             "epoch": vault.lease.epoch}}


@router.post("/vault/promote", summary="Make this standby vault the active one (admin)")
def promote(vault: VaultDep, _p: Admin, force: bool = False) -> dict[str, Any]:
    """Promote this vault's database (a hot standby) and take the controller lease with a new
    epoch, whoever holds it: the old active, if it returns, is fenced. Manual by design: run it
    only when the active vault's site is lost (docs/control-plane.md, "Vault pair"). On an
    active vault it only makes sure this process is the controller. Refused (409) while the
    peer vault answers as the active one, unless ``force`` (a planned switchover)."""
    return vault.promote(force=force)
