"""Rows → the JSON objects the API returns (never a secret, never a hash)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from drsite.core.states import LIVE_ITEM_STATUSES
from drsite.replication.report import ItemState
from drsite.vault.db.models import (
    Alert,
    ApiToken,
    Event,
    Failover,
    Group,
    Host,
    Item,
    Job,
    Policy,
    Site,
    Store,
    Task,
    Vm,
)
from drsite.vault.health import SYNC_SUSPENDED, agent_up, item_health
from drsite.vault.itemfacts import ItemRow
from drsite.vault.membership import normalise_match
from drsite.vault.scheduler import item_policy
from drsite.vault.scrub import Damage, damage_of
from drsite.vault.settings import VaultSettings


def site_names(s: Session) -> dict[int, str]:
    return {site.id: site.name for site in s.scalars(select(Site))}


def site_view(site: Site, hosts: int) -> dict[str, Any]:
    return {"name": site.name, "description": site.description, "created_at": site.created_at,
            "hosts": hosts, "store_host": site.store_host_id}


def store_roles(s: Session) -> set[str]:
    """Ids of the hosts holding their site's store role."""
    return {h for h in s.scalars(select(Site.store_host_id)) if h is not None}


def host_view(h: Host, site: str, now: float, settings: VaultSettings,
              roles: set[str]) -> dict[str, Any]:
    """A host; ``store_url`` is what its agent claims, ``store_role`` whether an admin gave
    it its site's store role (only then does it serve the site's store: ``storerole``)."""
    return {"id": h.id, "name": h.name, "site": site, "last_heartbeat": h.last_heartbeat,
            "up": agent_up(h, now, settings), "version": h.version, "store_url": h.store_url,
            "store_role": h.id in roles,
            "registered_at": h.registered_at, "revoked": h.revoked_at is not None}


def vm_view(vm: Vm, host: Host, site: str, item_id: str | None, *,
            warning: str | None = None) -> dict[str, Any]:
    """``warning``: e.g. the VM's item failed over and the old primary is not fenced yet (the
    same VM may be running on both sites)."""
    info = vm.info
    return {"vm_id": vm.vm_id, "name": vm.name, "host_id": host.id, "host": host.name, "site": site,
            "disks": info.get("disks", []), "nics": info.get("nics", []), "power": info.get("power"),
            "vcpus": info.get("vcpus"), "memory_mib": info.get("memory_mib"),
            "labels": info.get("labels", []), "present": vm.present, "last_seen": vm.last_seen,
            "item_id": item_id, "warning": warning}


def policy_view(p: Policy) -> dict[str, Any]:
    return {"name": p.name, "frequency_s": p.frequency_s, "retention_hours": p.retention_hours,
            "app_consistent_every_s": p.app_consistent_every_s,
            "initial_replication_start": p.initial_replication_start, "compression": p.compression,
            "encryption": p.encryption, "bandwidth_limit_bps": p.bandwidth_limit_bps,
            "resync_window": p.resync_window, "rpo_threshold_s": p.rpo_threshold_s,
            "scrub_interval_s": p.scrub_interval_s, "scrub_rate_bps": p.scrub_rate_bps,
            "mode": p.mode or "async", "sync_budget_ms": p.sync_budget_ms or 50,
            "created_at": p.created_at, "updated_at": p.updated_at}


def group_view(s: Session, g: Group, sites: dict[int, str]) -> dict[str, Any]:
    policy = s.get(Policy, g.policy_id) if g.policy_id else None
    n = len(s.scalars(select(Item.id).where(Item.group_id == g.id,
                                            Item.status.in_(LIVE_ITEM_STATUSES))).all())
    store = s.get(Store, g.store_id) if g.store_id else None
    return {"name": g.name, "site": sites.get(g.site_id), "target_site": sites.get(g.target_site_id),
            "policy": policy.name if policy else None, "match": normalise_match(g.match),
            "store": store.name if store else None, "items": n, "drill": g.drill,
            "consistent": bool(g.consistent), "barrier_timeout_ms": g.barrier_timeout_ms,
            "created_at": g.created_at}


@dataclass(frozen=True)
class PageLookups:
    """What :func:`item_view` reads beside the item, for a page of items at once: site names,
    the page's hosts, groups and their policies, and the page's store damage — a fixed number
    of queries per page, and dictionary lookups (not ``Session.get``) per item."""

    sites: dict[int, str]
    hosts: dict[str, Host]
    groups: dict[int, Group]
    policies: dict[int, Policy]
    damages: dict[str, Damage]

    @classmethod
    def read(cls, s: Session, items: Sequence[Item | ItemRow]) -> PageLookups:
        hosts = {h.id: h for h in s.scalars(select(Host).where(
            Host.id.in_(sorted({i.host_id for i in items}))))} if items else {}
        groups = {g.id: g for g in s.scalars(select(Group).where(
            Group.id.in_(sorted({i.group_id for i in items}))))} if items else {}
        wanted = sorted({g.policy_id for g in groups.values() if g.policy_id is not None})
        policies = {p.id: p for p in s.scalars(select(Policy).where(Policy.id.in_(wanted)))} \
            if wanted else {}
        return cls(site_names(s), hosts, groups, policies,
                   damage_of(s, [i.id for i in items]) if items else {})


def sync_view(item: Item | ItemRow, policy: Policy | None, agent_is_up: bool) -> dict[str, Any]:
    """The item's replication mode as its policy sets it: ``mode`` ("async" | "sync"), and in
    synchronous mode the latency ``budget_ms`` and whether the item is at RPO 0: ``state``
    ``in_sync``; ``suspended`` with the agent's ``reason`` (its report line, as the
    ``sync_suspended`` alert says it); or ``unknown`` with why (not replicating, its agent
    silent, no report yet). Asynchronous: ``budget_ms``, ``state`` and ``reason`` are None."""
    mode = (policy.mode if policy is not None else None) or "async"
    out: dict[str, Any] = {"mode": mode, "budget_ms": None, "state": None, "reason": None}
    if mode != "sync" or policy is None:
        return out
    out["budget_ms"] = policy.sync_budget_ms
    line = next((str(x) for x in (item.report or {}).get("agent_issues") or []
                 if str(x).startswith(SYNC_SUSPENDED)), None)
    if item.status not in LIVE_ITEM_STATUSES:
        out.update(state="unknown", reason=f"the item is {item.status.replace('_', ' ')}")
    elif not agent_is_up:
        out.update(state="unknown", reason="its agent does not report")
    elif not item.report:
        out.update(state="unknown", reason="no report from its agent yet")
    elif line is not None:
        out.update(state="suspended", reason=line[len(SYNC_SUSPENDED):])
    else:
        out["state"] = "in_sync"
    return out


def item_view(s: Session, item: Item | ItemRow, now: float, settings: VaultSettings,
              page: PageLookups | None = None) -> dict[str, Any]:
    """One item as the API shows it (an ORM row, or the columns a list read: ``ItemRow``);
    ``page``: what its page read once (:class:`PageLookups`), else the item's own rows are
    read."""
    if page is not None:
        sites = page.sites
        host = page.hosts.get(item.host_id)
        group = page.groups.get(item.group_id)
        policy = page.policies.get(group.policy_id) if group and group.policy_id else None
    else:
        sites = site_names(s)
        host = s.get(Host, item.host_id)
        group = s.get(Group, item.group_id)
        policy = item_policy(s, item)
    live = item.status in LIVE_ITEM_STATUSES
    if not live:
        damage = None
    elif page is not None:
        damage = page.damages.get(item.id)
    else:
        damage = damage_of(s, [item.id]).get(item.id)
    up = agent_up(host, now, settings)
    ih = item_health(item, policy, up, now, damage) if live else None
    retry = item.retry or {}
    return {"id": item.id, "lineage_id": item.lineage_id or item.id, "vm_id": item.vm_id,
            "vm_name": item.vm_name, "origin_item_id": item.origin_item_id,
            "group": group.name if group else None, "policy": policy.name if policy else None,
            "source_host": host.name if host else None, "source_host_id": item.host_id,
            "site": sites.get(host.site_id) if host else None,
            "target_site": sites.get(item.target_site_id), "protection": item.status,
            "state": ItemState.CRITICAL if item.critical_error else item.state,
            "health": ih.health.value if ih else item.health,
            "health_reasons": ih.reasons if ih else list(item.health_reasons or []),
            "rpo_s": ih.rpo_s if ih else None, "last_point_time": item.last_point_time,
            "last_app_point_time": item.last_app_point_time, "last_error": retry.get("last_error"),
            "next_attempt_at": retry.get("next_attempt_at"), "critical_error": item.critical_error,
            "active_job_id": item.active_job_id, "created_at": item.created_at,
            "updated_at": item.updated_at, "report": item.report,
            "scrub": item.scrub, "last_scrub_at": item.last_scrub_at,
            "damaged_points": sorted(damage.points) if damage else [],
            "sync": sync_view(item, policy, up)}


def task_view(t: Task) -> dict[str, Any]:
    """A task; a recovery plan's group task also names the job it started per VM
    (``child_jobs``: VM name → job id)."""
    out: dict[str, Any] = {"name": t.name, "title": t.title, "state": t.state,
                           "started_at": t.started_at, "ended_at": t.ended_at,
                           "progress": t.progress, "message": t.message}
    jobs = (t.data or {}).get("jobs") if t.name == "plan_group" else None
    if isinstance(jobs, dict):
        out["child_jobs"] = {str(k): str(v) for k, v in jobs.items()}
    return out


# what a job's arguments may show (never a secret): the failover action, the recovery point
# asked for ("latest", "latest_app" or a point id), the failover and the plan job it belongs to
JOB_ARGS_SHOWN = {"action": "action", "point": "point", "failover_id": "failover_id",
                  "plan_job": "parent_job_id", "host": "host"}


def job_view(s: Session, job: Job) -> dict[str, Any]:
    tasks = s.scalars(select(Task).where(Task.job_id == job.id).order_by(Task.idx)).all()
    args = job.args or {}
    return {"id": job.id, "kind": job.kind, "state": job.state, "target": job.target,
            "item_id": job.item_id, "progress": job.progress, "message": job.message,
            "error": job.error, "cancel_requested": job.cancel_requested,
            "created_at": job.created_at, "started_at": job.started_at, "ended_at": job.ended_at,
            **{shown: args.get(arg) for arg, shown in JOB_ARGS_SHOWN.items()},
            "tasks": [task_view(t) for t in tasks]}


def alert_view(a: Alert) -> dict[str, Any]:
    return {"id": str(a.id), "key": a.key, "kind": a.kind, "severity": a.severity,
            "subject": a.subject, "message": a.message, "raised_at": a.raised_at,
            "last_seen_at": a.last_seen_at, "cleared_at": a.cleared_at, "acked_at": a.acked_at,
            "active": a.cleared_at is None}


def event_view(e: Event) -> dict[str, Any]:
    return {"id": e.id, "at": e.at, "kind": e.kind, "subject": e.subject, "message": e.message}


def token_view(t: ApiToken) -> dict[str, Any]:
    return {"name": t.name, "role": t.role, "created_at": t.created_at, "last_used_at": t.last_used_at}


def failover_view(fo: Failover) -> dict[str, Any]:
    return {"id": fo.id, "item_id": fo.item_id, "kind": fo.kind, "state": fo.state,
            "point_id": fo.point_id, "point_created_at": fo.point_created_at,
            "recovery_host_id": fo.recovery_host_id, "vm_name": fo.vm_name, "vm_id": fo.vm_id,
            "generation": fo.generation, "rto_s": fo.rto_s,
            "wall_s": (fo.result or {}).get("wall_s"), "notes": fo.notes,
            "job_id": fo.job_id, "created_at": fo.created_at, "updated_at": fo.updated_at,
            "result": {k: v for k, v in (fo.result or {}).items() if k != "source"}
            | ({"source": {k: v for k, v in fo.result["source"].items() if k != "fingerprints"}}
               if (fo.result or {}).get("source") else {})}


def host_name(s: Session, host_id: str | None) -> str | None:
    h = s.get(Host, host_id) if host_id else None
    return h.name if h else None
