"""Operator routes for policies, protection groups, protected items and recovery points."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response, status
from sqlalchemy import ColumnElement, select
from sqlalchemy.orm import Session

from drsite.core.compression import compression_mode
from drsite.core.errors import Conflict, InvalidInput, NotFound
from drsite.core.states import FAILOVER_ITEM_STATUSES, LIVE_ITEM_STATUSES, ItemProtection
from drsite.replication.report import Health, ItemState
from drsite.vault import barrier, commands
from drsite.vault.api.deps import Operator, Reader, VaultDep, authorize, json_response, name
from drsite.vault.api.inventory import get_site
from drsite.vault.api.paging import DEFAULT_LIMIT, Key, page
from drsite.vault.api.schemas import GroupIn, GroupUpdate, ItemIn, MatchIn, PolicyIn, VerifyIn
from drsite.vault.api.views import PageLookups, group_view, item_view, policy_view, site_names
from drsite.vault.audit import record_event
from drsite.vault.auth import Role
from drsite.vault.db.models import Group, Host, Item, Job, Point, Policy, Task, Vm
from drsite.vault.itemfacts import ITEM_ROW_COLUMNS, item_rows
from drsite.vault.jobs.create import (
    start_disable_protection,
    start_enable_protection,
    start_policy_association,
    start_resync,
    start_verify,
)
from drsite.vault.jobs.kinds import VERIFY
from drsite.vault.policies import PolicyValues, agent_settings, apply_values
from drsite.vault.recovery_plans import validate_drill
from drsite.vault.stores import check_encryption, get_store

router = APIRouter()


# ---------------------------------------------------------------------------------- policies

def _values(body: PolicyIn) -> PolicyValues:
    return PolicyValues(frequency_s=body.frequency_s, retention_hours=body.retention_hours,
                        app_consistent_every_s=body.app_consistent_every_s,
                        initial_replication_start=body.initial_replication_start,
                        compression=compression_mode(body.compression),
                        encryption=body.encryption,
                        bandwidth_limit_bps=body.bandwidth_limit_bps,
                        resync_window=body.resync_window, rpo_threshold_s=body.rpo_threshold_s,
                        scrub_interval_s=body.scrub_interval_s,
                        scrub_rate_bps=body.scrub_rate_bps, mode=body.mode,
                        sync_budget_ms=body.sync_budget_ms).check()


def get_policy(s: Session, policy_name: str) -> Policy:
    p = s.scalars(select(Policy).where(Policy.name == name("policy", policy_name))).first()
    if p is None:
        raise NotFound(f"no policy {policy_name!r}", hint="List policies with 'drsite policies list'.")
    return p


@router.get("/policies", summary="List replication policies")
def list_policies(vault: VaultDep, _p: Reader) -> list[dict[str, Any]]:
    with vault.db.read() as s:
        return [policy_view(p) for p in s.scalars(select(Policy).order_by(Policy.name))]


@router.post("/policies", status_code=status.HTTP_201_CREATED, summary="Create a policy")
def create_policy(body: PolicyIn, vault: VaultDep, _p: Operator) -> dict[str, Any]:
    if body.name is None:
        raise InvalidInput("a policy needs a name")
    policy_name = name("policy", body.name)
    values = _values(body)
    now = vault.settings.clock.now()
    with vault.db.tx() as s:
        if s.scalars(select(Policy.id).where(Policy.name == policy_name)).first() is not None:
            raise Conflict(f"policy {policy_name} exists",
                           hint=f"Change it: drsite policies update {policy_name}")
        p = Policy(name=policy_name, created_at=now, updated_at=now)
        apply_values(p, values)
        s.add(p)
        s.flush()
        record_event(s, now, "policy", policy_name, "created")
        return policy_view(p)


@router.get("/policies/{policy}", summary="Show a policy")
def show_policy(policy: str, vault: VaultDep, _p: Reader) -> dict[str, Any]:
    with vault.db.read() as s:
        return policy_view(get_policy(s, policy))


@router.put("/policies/{policy}", summary="Replace a policy's values (sent to every item under it)")
def update_policy(policy: str, body: PolicyIn, vault: VaultDep, _p: Operator) -> dict[str, Any]:
    if body.name is not None and body.name != policy:
        raise InvalidInput("a policy cannot be renamed",
                           hint="Create a policy under the new name instead: drsite policies "
                                "create")
    values = _values(body)
    now = vault.settings.clock.now()
    with vault.db.tx() as s:
        p = get_policy(s, policy)
        apply_values(p, values)
        p.updated_at = now
        for g in s.scalars(select(Group).where(Group.policy_id == p.id)):
            check_encryption(s, g, p)
        group_ids = list(s.scalars(select(Group.id).where(Group.policy_id == p.id)))
        items = s.scalars(select(Item).where(Item.group_id.in_(group_ids),
                                             Item.status == ItemProtection.PROTECTED)).all()
        for item in items:
            commands.enqueue(s, host_id=item.host_id, kind="update_settings", item_id=item.id,
                             args={"settings": agent_settings(p)}, now=now)
        record_event(s, now, "policy", p.name, f"updated; settings sent to {len(items)} item(s)")
        return policy_view(p)


@router.delete("/policies/{policy}", status_code=status.HTTP_204_NO_CONTENT, summary="Delete a policy")
def delete_policy(policy: str, vault: VaultDep, _p: Operator) -> Response:
    now = vault.settings.clock.now()
    with vault.db.tx() as s:
        p = get_policy(s, policy)
        used = s.scalars(select(Group.name).where(Group.policy_id == p.id)).all()
        if used:
            raise Conflict(f"policy {p.name} is used by group(s) {', '.join(used)}",
                           hint="Give those groups another policy first: drsite groups update GROUP "
                                "--policy POLICY")
        s.delete(p)
        record_event(s, now, "policy", p.name, "deleted")
    return Response(status_code=status.HTTP_204_NO_CONTENT)


# ------------------------------------------------------------------------------------ groups

def get_group(s: Session, group_name: str) -> Group:
    g = s.scalars(select(Group).where(Group.name == name("group", group_name))).first()
    if g is None:
        raise NotFound(f"no group {group_name!r}", hint="List groups with 'drsite groups list'.")
    return g


def _match(m: MatchIn) -> dict[str, list[str]]:
    return {"vm_names": sorted({name("VM", v) for v in m.vm_names}),
            "hosts": sorted({name("host", v) for v in m.hosts}),
            "labels": sorted({name("label", v) for v in m.labels})}


@router.get("/groups", summary="List protection groups")
def list_groups(vault: VaultDep, _p: Reader) -> list[dict[str, Any]]:
    with vault.db.read() as s:
        sites = site_names(s)
        return [group_view(s, g, sites) for g in s.scalars(select(Group).order_by(Group.name))]


@router.post("/groups", status_code=status.HTTP_201_CREATED,
             summary="Create a protection group (with a policy: runs a PolicyAssociation job)")
def create_group(body: GroupIn, vault: VaultDep, _p: Operator) -> dict[str, Any]:
    group_name = name("group", body.name)
    match = _match(body.match)
    now = vault.settings.clock.now()
    with vault.db.tx() as s:
        site, target = get_site(s, body.site), get_site(s, body.target_site)
        if site.id == target.id:
            raise InvalidInput("a group's target site must differ from its site")
        policy = get_policy(s, body.policy) if body.policy is not None else None
        if s.scalars(select(Group.id).where(Group.name == group_name)).first() is not None:
            raise Conflict(f"group {group_name} exists")
        cloud = get_store(s, body.store) if body.store is not None else None
        g = Group(name=group_name, site_id=site.id, target_site_id=target.id,
                  policy_id=policy.id if policy else None, match=match, created_at=now,
                  store_id=cloud.id if cloud else None, drill=_drill(group_name, body.drill),
                  consistent=body.consistent,
                  barrier_timeout_ms=barrier.check_timeout_ms(body.barrier_timeout_ms))
        check_encryption(s, g, policy)
        s.add(g)
        s.flush()
        record_event(s, now, "group", group_name, "created")
        job = start_policy_association(s, g, now=now) if policy is not None else None
        return {**group_view(s, g, site_names(s)), "job_id": job.id if job else None}


@router.get("/groups/{group}", summary="Show a protection group")
def show_group(group: str, vault: VaultDep, _p: Reader) -> dict[str, Any]:
    with vault.db.read() as s:
        return group_view(s, get_group(s, group), site_names(s))


@router.put("/groups/{group}",
            summary="Change a group's policy, match, store or drill schedule (policy change: "
                    "PolicyAssociation job)")
def update_group(group: str, body: GroupUpdate, vault: VaultDep, _p: Operator) -> dict[str, Any]:
    now = vault.settings.clock.now()
    fields = body.model_fields_set
    match = _match(body.match) if "match" in fields and body.match is not None else None
    with vault.db.tx() as s:
        g = get_group(s, group)
        job = None
        if "store" in fields:
            _set_store(s, g, body.store, now)
        if "barrier_timeout_ms" in fields and body.barrier_timeout_ms is not None:
            g.barrier_timeout_ms = barrier.check_timeout_ms(body.barrier_timeout_ms)
        if "consistent" in fields and body.consistent is not None \
                and body.consistent != g.consistent:
            g.consistent = body.consistent
            barrier.check_members(s, g)  # > 16 VMs: refused (the transaction rolls back)
            record_event(s, now, "group", g.name, "multi-VM consistent" if g.consistent
                         else "not multi-VM consistent")
        if match is not None and match != g.match:
            g.match = match
        if "drill" in fields:
            drill = _drill(g.name, body.drill)
            if drill != g.drill:
                g.drill = drill
                record_event(s, now, "group", g.name,
                             f"drill every {drill['every_s']:.0f} s" if drill else "no drill")
        if "policy" in fields:
            policy = get_policy(s, body.policy) if body.policy is not None else None
            new_id = policy.id if policy else None
            check_encryption(s, g, policy)
            if new_id != g.policy_id:
                g.policy_id = new_id
                record_event(s, now, "group", g.name,
                             f"policy set to {policy.name}" if policy else "policy removed")
                if policy is not None:
                    job = start_policy_association(s, g, now=now)
        elif match is not None and g.policy_id is not None:
            job = start_policy_association(s, g, now=now)
        if "store" in fields and "policy" not in fields:
            check_encryption(s, g, s.get(Policy, g.policy_id) if g.policy_id else None)
        return {**group_view(s, g, site_names(s)), "job_id": job.id if job else None}


def _drill(group_name: str, spec: dict[str, Any] | None) -> dict[str, Any] | None:
    """A group's drill schedule, validated as a plan's (``recovery_plans.validate_drill``)."""
    return validate_drill(spec, f"group {group_name}, drill") if spec is not None else None


def _set_store(s: Session, g: Group, store_name: str | None, now: float) -> None:
    """Point a group at a cloud store (or back at its target site's agent store). Only while
    the group protects nothing: the points of its items live in the store they were made in."""
    cloud = get_store(s, store_name) if store_name is not None else None
    new_id = cloud.id if cloud else None
    if new_id == g.store_id:
        return
    live = s.scalars(select(Item.id).where(Item.group_id == g.id,
                                           Item.status.in_(LIVE_ITEM_STATUSES))).all()
    if live:
        raise Conflict(f"group {g.name} still protects {len(live)} item(s); its recovery store "
                       "cannot change under them",
                       hint="Disable protection of its items first ('drsite items unprotect "
                                "ITEM'), or create another group.")
    g.store_id = new_id
    record_event(s, now, "group", g.name, f"recovery store set to {cloud.name}" if cloud
                 else "recovery store set to the target site's agent store")


@router.get("/groups/{group}/points",
            summary="A consistent group's group points (newest first; all=true: every barrier)")
def list_group_points(group: str, vault: VaultDep, _p: Reader, all: bool = False,
                      limit: int = 100) -> list[dict[str, Any]]:
    with vault.db.read() as s:
        g = get_group(s, group)
        return [barrier.view(b, g.name, s) for b in barrier.group_points(
            s, g, include_partial=all, limit=max(1, min(limit, 1000)))]


@router.delete("/groups/{group}", status_code=status.HTTP_204_NO_CONTENT, summary="Delete a group")
def delete_group(group: str, vault: VaultDep, _p: Operator) -> Response:
    now = vault.settings.clock.now()
    with vault.db.tx() as s:
        g = get_group(s, group)
        live = s.scalars(select(Item.id).where(Item.group_id == g.id,
                                               Item.status.in_(LIVE_ITEM_STATUSES))).all()
        if live:
            raise Conflict(f"group {g.name} still protects {len(live)} item(s)",
                           hint="Disable protection of its items first ('drsite items unprotect ITEM'), "
                                "then delete it.")
        for retired in s.scalars(select(Item).where(Item.group_id == g.id)):
            s.delete(retired)  # removed or failed items: their jobs and events keep the history
        s.flush()
        s.delete(g)
        record_event(s, now, "group", g.name, "deleted")
    return Response(status_code=status.HTTP_204_NO_CONTENT)


# ------------------------------------------------------------------------------------- items

def get_item(s: Session, item_id: str) -> Item:
    item = s.get(Item, name("item id", item_id))
    if item is None:
        raise NotFound(f"no item {item_id!r}",
                       hint="List items with 'drsite items list --include-removed'.")
    return item


ITEM_ORDER = (Key(Item.vm_name), Key(Item.id))


def _choice(kind: str, value: str, allowed: list[str]) -> str:
    if value not in allowed:
        raise InvalidInput(f"unknown {kind} {value!r}", hint=f"Use one of {', '.join(allowed)}.")
    return value


def item_filters(s: Session, *, all: bool = False, protection: str | None = None,
                 state: str | None = None, health: str | None = None, host: str | None = None,
                 site: str | None = None, target_site: str | None = None,
                 group: str | None = None, q: str | None = None) -> list[ColumnElement[bool]]:
    """The WHERE clauses of ``GET /items``'s filters (each checked: 400 on a bad value)."""
    out: list[ColumnElement[bool]] = []
    if protection is not None:
        out.append(Item.status == ItemProtection(
            _choice("protection", protection, [p.value for p in ItemProtection])))
    elif not all:
        out.append(Item.status.in_(LIVE_ITEM_STATUSES | FAILOVER_ITEM_STATUSES))
    if state is not None:
        # the vault sets the stored state to critical with critical_error, and a report does
        # not overwrite it while critical_error stands: the column is the effective state
        out.append(Item.state == _choice("state", state, [x.value for x in ItemState]))
    if health is not None:
        out.append(Item.health == _choice("health", health, [h.value for h in Health]))
    if host is not None:
        host_name = name("host", host)
        out.append(Item.host_id.in_(select(Host.id).where((Host.name == host_name)
                                                          | (Host.id == host_name))))
    if site is not None:
        out.append(Item.host_id.in_(select(Host.id).where(Host.site_id == get_site(s, site).id)))
    if target_site is not None:
        out.append(Item.target_site_id == get_site(s, target_site).id)
    if group is not None:
        out.append(Item.group_id.in_(select(Group.id).where(Group.name == name("group", group))))
    if q:
        if len(q) > 64:
            raise InvalidInput("q must be at most 64 characters")
        pattern = q.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        out.append(Item.vm_name.ilike(f"%{pattern}%", escape="\\"))
    return out


@router.get("/items", summary="List protected items, a page at a time (filters: protection, "
                              "state, health, host, site, target_site, group, q)")
def list_items_route(request: Request, vault: VaultDep, all: bool = False,
                     protection: str | None = None, state: str | None = None,
                     health: str | None = None, host: str | None = None, site: str | None = None,
                     target_site: str | None = None, group: str | None = None,
                     q: str | None = None, limit: int = DEFAULT_LIMIT,
                     cursor: str | None = None) -> Response:
    """:func:`list_items` (reader token), checked, read and rendered in one worker thread."""
    p = authorize(request, vault, Role.READER)
    return json_response(list_items(vault, p, all=all, protection=protection, state=state,
                                    health=health, host=host, site=site,
                                    target_site=target_site, group=group, q=q, limit=limit,
                                    cursor=cursor))


def list_items(vault: VaultDep, _p: Reader, all: bool = False, protection: str | None = None,
               state: str | None = None, health: str | None = None, host: str | None = None,
               site: str | None = None, target_site: str | None = None,
               group: str | None = None, q: str | None = None, limit: int = DEFAULT_LIMIT,
               cursor: str | None = None) -> dict[str, Any]:
    """Items by VM name (then id): removed and failed ones only with ``all=true`` or
    ``protection=…``; ``health`` is the health the vault last evaluated (every
    ``health_interval``); ``q`` a part of the VM name (any case)."""
    now = vault.settings.clock.now()
    with vault.db.read() as s:
        where = item_filters(s, all=all, protection=protection, state=state, health=health,
                             host=host, site=site, target_site=target_site, group=group, q=q)
        lookups: list[PageLookups] = []
        # the shown columns as plain tuples (not ORM rows; vm_spec, the VM's recorded spec for
        # failover, is not shown: not read nor decoded)
        return page(s, select(*ITEM_ROW_COLUMNS).where(*where), ITEM_ORDER,
                    limit=limit, cursor=cursor, rows_of=item_rows,
                    prepare=lambda rows: lookups.append(PageLookups.read(s, rows)),
                    view=lambda i: item_view(s, i, now, vault.settings, lookups[0]))


@router.get("/items/{item_id}", summary="Show a protected item and its report")
def show_item(item_id: str, vault: VaultDep, _p: Reader) -> dict[str, Any]:
    now = vault.settings.clock.now()
    with vault.db.read() as s:
        return item_view(s, get_item(s, item_id), now, vault.settings)


@router.post("/items", status_code=status.HTTP_202_ACCEPTED,
             summary="Protect a VM under a group's policy (EnableProtection job)")
def protect(body: ItemIn, vault: VaultDep, _p: Operator) -> dict[str, Any]:
    if not body.vm_id or len(body.vm_id) > 128 or any(ord(c) < 32 or ord(c) == 127 for c in body.vm_id):
        raise InvalidInput("invalid vm_id")
    now = vault.settings.clock.now()
    with vault.db.tx() as s:
        group = get_group(s, body.group)
        rows = s.execute(select(Vm, Host).join(Host, Host.id == Vm.host_id)
                         .where(Vm.vm_id == body.vm_id, Vm.present.is_(True),
                                Host.revoked_at.is_(None))).all()
        if not rows:
            raise NotFound(f"no VM {body.vm_id!r} in the inventory",
                           hint="List VMs with 'drsite vms list' (agents report them).")
        if len(rows) > 1:
            raise Conflict(f"VM id {body.vm_id!r} is reported by {len(rows)} hosts")
        vm, host = rows[0]
        job, item = start_enable_protection(s, vm=vm, host=host, group=group, now=now,
                                            reason="protected by an operator")
        return {"job_id": job.id, "item_id": item.id}


@router.delete("/items/{item_id}", status_code=status.HTTP_202_ACCEPTED,
               summary="Disable protection (DisableProtection job)")
def unprotect(item_id: str, vault: VaultDep, _p: Operator, delete_points: bool = False) -> dict[str, Any]:
    now = vault.settings.clock.now()
    with vault.db.tx() as s:
        job = start_disable_protection(s, get_item(s, item_id), delete_points=delete_points, now=now)
        return {"job_id": job.id}


@router.post("/items/{item_id}/resync", status_code=status.HTTP_202_ACCEPTED,
             summary="Resynchronize now, inside or outside the window (Resync job)")
def resync(item_id: str, vault: VaultDep, _p: Operator) -> dict[str, Any]:
    now = vault.settings.clock.now()
    with vault.db.tx() as s:
        job = start_resync(s, get_item(s, item_id), now=now)
        return {"job_id": job.id}


POINT_ORDER = (Key(Point.seq), Key(Point.id))


@router.get("/items/{item_id}/points",
            summary="Recovery-point catalogue of an item, oldest first, a page at a time")
def points(item_id: str, vault: VaultDep, _p: Reader, since: float | None = None,
           consistency: str | None = None, limit: int = DEFAULT_LIMIT,
           cursor: str | None = None) -> dict[str, Any]:
    """``PointInfo`` dicts by seq; ``since``: created at or after (epoch seconds);
    ``consistency``: crash or app."""
    with vault.db.read() as s:
        item = get_item(s, item_id)
        q = select(Point).where(Point.item_id == item.id)
        if since is not None:
            q = q.where(Point.created_at >= since)
        if consistency is not None:
            q = q.where(Point.consistency == _choice("consistency", consistency, ["crash", "app"]))
        return page(s, q, POINT_ORDER, limit=limit, cursor=cursor,
                    view=lambda p: {**dict(p.info), "damage": p.damage})


@router.post("/items/{item_id}/verify", status_code=status.HTTP_202_ACCEPTED,
             summary="Prove recovery points restore to their manifests (Verify job)")
def verify(item_id: str, body: VerifyIn, vault: VaultDep, _p: Operator) -> dict[str, Any]:
    now = vault.settings.clock.now()
    with vault.db.tx() as s:
        job = start_verify(s, get_item(s, item_id), point=body.point, all_points=body.all,
                           now=now)
        return {"job_id": job.id}


@router.get("/items/{item_id}/verifications/{job_id}",
            summary="The report of a Verify job (per point and disk)")
def verification(item_id: str, job_id: str, vault: VaultDep, _p: Reader) -> dict[str, Any]:
    with vault.db.read() as s:
        item = get_item(s, item_id)
        job = s.get(Job, job_id)
        if job is None or job.item_id != item.id or job.kind != VERIFY:
            raise NotFound(f"no verification {job_id!r} of item {item.id}",
                           hint=f"Start one: drsite items verify {item.id}")
        task = s.scalars(select(Task).where(Task.job_id == job.id)).first()
        report = dict((task.data or {}).get("report") or {}) if task is not None else {}
        return {"job_id": job.id, "state": job.state, "message": job.message,
                "error": job.error, "report": report}
