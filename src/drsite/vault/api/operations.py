"""Operator routes for jobs, alerts, events and the health summary."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from sqlalchemy import func, select

from drsite.core.errors import InvalidInput, NotFound
from drsite.core.states import ACTIVE_JOB_STATES, JOB_FILTER_ACTIVE, LIVE_ITEM_STATUSES, JobState
from drsite.replication.report import Health
from drsite.vault.api.deps import Operator, Reader, VaultDep, name
from drsite.vault.api.views import alert_view, event_view, job_view
from drsite.vault.db.models import Alert, Event, Host, Item, Job
from drsite.vault.health import agent_up, item_health
from drsite.vault.jobs.create import request_cancel
from drsite.vault.jobs.registry import HANDLERS
from drsite.vault.scheduler import item_policy, preload_policies

router = APIRouter()


def _limit(limit: int) -> int:
    if not 1 <= limit <= 1000:
        raise InvalidInput("limit must be between 1 and 1000")
    return limit


@router.get("/jobs", summary="List jobs, newest first")
def list_jobs(vault: VaultDep, _p: Reader, state: str | None = None, kind: str | None = None,
              limit: int = 100) -> list[dict[str, Any]]:
    q = select(Job).order_by(Job.created_at.desc(), Job.id.desc()).limit(_limit(limit))
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
    with vault.db.read() as s:
        return [job_view(s, j) for j in s.scalars(q)]


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


@router.get("/alerts", summary="List alerts (state=active|cleared, newest first)")
def list_alerts(vault: VaultDep, _p: Reader, state: str | None = None,
                limit: int = 200) -> list[dict[str, Any]]:
    q = select(Alert).order_by(Alert.raised_at.desc(), Alert.id.desc()).limit(_limit(limit))
    if state == "active":
        q = q.where(Alert.cleared_at.is_(None))
    elif state == "cleared":
        q = q.where(Alert.cleared_at.is_not(None))
    elif state is not None:
        raise InvalidInput(f"unknown alert state {state!r}", hint="Use active or cleared.")
    with vault.db.read() as s:
        return [alert_view(a) for a in s.scalars(q)]


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


@router.get("/events", summary="The event trail, newest first (kind and subject: exact matches)")
def list_events(vault: VaultDep, _p: Reader, limit: int = 200, kind: str | None = None,
                subject: str | None = None) -> list[dict[str, Any]]:
    q = select(Event).order_by(Event.at.desc(), Event.id.desc()).limit(_limit(limit))
    if kind is not None:
        q = q.where(Event.kind == name("event kind", kind))
    if subject is not None:
        q = q.where(Event.subject == subject[:128])
    with vault.db.read() as s:
        return [event_view(e) for e in s.scalars(q)]


@router.get("/health", summary="Counts by health, worst RPOs, agents up/down")
def health(vault: VaultDep, _p: Reader) -> dict[str, Any]:
    now = vault.settings.clock.now()
    with vault.db.read() as s:
        hosts = {h.id: h for h in s.scalars(select(Host).where(Host.revoked_at.is_(None)))}
        _keep = preload_policies(s)  # keeps them in the identity map
        counts = {h.value: 0 for h in Health}
        rpos: list[dict[str, Any]] = []
        for item in s.scalars(select(Item).where(Item.status.in_(LIVE_ITEM_STATUSES))):
            up_ = agent_up(hosts.get(item.host_id), now, vault.settings)
            ih = item_health(item, item_policy(s, item), up_, now)
            counts[ih.health.value] += 1
            if ih.rpo_s is not None:
                rpos.append({"item_id": item.id, "vm_name": item.vm_name, "rpo_s": ih.rpo_s,
                             "health": ih.health.value})
        up = sum(1 for h in hosts.values() if agent_up(h, now, vault.settings))
        n_alerts = s.scalar(select(func.count()).select_from(Alert).where(Alert.cleared_at.is_(None)))
        n_jobs = s.scalar(select(func.count()).select_from(Job).where(Job.state.in_(ACTIVE_JOB_STATES)))
        return {"items": counts, "worst_rpo": sorted(rpos, key=lambda r: -r["rpo_s"])[:10],
                "agents": {"up": up, "down": len(hosts) - up}, "alerts_active": int(n_alerts or 0),
                "jobs_active": int(n_jobs or 0)}
