"""Starting failover jobs for one item or a whole recovery plan; recovery plans (validation,
apply with a diff); network mappings; resuming a job that waits for an operator.

The API, the CLI (through the API) and the web dashboard call these functions inside a
transaction (``vault.db.tx()``). Responsible for: what must hold before a job exists (item
state, one active job per item, a known failover to act on) and the plan documents. Not
responsible for: doing the work (``jobs/failover.py``, ``jobs/plans.py``).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from drsite.core.errors import Conflict, InvalidInput, NotFound
from drsite.core.model import validate_name
from drsite.core.states import (
    ACTIVE_JOB_STATES,
    FAILOVER_ITEM_STATUSES,
    LIVE_ITEM_STATUSES,
    NOT_PROTECTED,
    FailoverState,
    ItemProtection,
    JobState,
    TaskState,
)
from drsite.vault.audit import record_event
from drsite.vault.db.models import (
    Failover,
    Host,
    Item,
    Job,
    NetworkMapping,
    RecoveryPlan,
    Site,
    Task,
)
from drsite.vault.ids import new_id
from drsite.vault.jobs import plan as P
from drsite.vault.jobs.create import claim_item, create_job

ITEM_ACTIONS = ("test_failover", "cleanup_test_failover", "planned_failover", "unplanned_failover",
                "commit", "cancel", "change_point", "reprotect")
PLAN_ACTIONS = ("test_failover", "cleanup_test_failover", "planned_failover", "unplanned_failover",
                "commit", "cancel", "reprotect")
FAILOVER_KINDS = {"test_failover": "test", "planned_failover": "planned",
                  "unplanned_failover": "unplanned"}
ACTIVE_ITEM_STATUSES = LIVE_ITEM_STATUSES | FAILOVER_ITEM_STATUSES
# a failover holds the item and may still be committed, cancelled or moved to another point
_HELD = frozenset({ItemProtection.FAILING_OVER, ItemProtection.FAILED_OVER})


def _latest_failover(s: Session, item: Item, *, kind: str | None = None,
                     states: tuple[FailoverState, ...]) -> Failover | None:
    q = select(Failover).where(Failover.item_id == item.id, Failover.state.in_(states))
    if kind is not None:
        q = q.where(Failover.kind == kind)
    return s.scalars(q.order_by(Failover.created_at.desc())).first()


def _get_item(s: Session, item_id: str) -> Item:
    item = s.get(Item, validate_name("item", item_id))
    if item is None:
        raise NotFound(f"no item {item_id!r}", hint="List items with GET /api/v1/items.")
    return item


def _point_arg(args: dict[str, Any]) -> str:
    point = str(args.get("point") or "latest")
    if point not in ("latest", "latest_app"):
        validate_name("point", point)
    return point


def start_item_action(s: Session, item_id: str, action: str, args: dict[str, Any],
                      now: float) -> Job:
    """Start the job of ``action`` on one item (``Conflict`` when the item's state does not
    allow it or another job holds the item)."""
    if action not in ITEM_ACTIONS:
        raise InvalidInput(f"unknown failover action {action!r}; known: {', '.join(ITEM_ACTIONS)}")
    item = _get_item(s, item_id)
    if item.active_job_id is not None:  # checked before anything is created (claim_item is final)
        raise Conflict(f"item {item.id} is busy with job {item.active_job_id}",
                       hint=f"Wait for job {item.active_job_id} to end, or cancel it.")
    args = dict(args)
    for key in ("vm_name",):
        if args.get(key) is not None:
            args[key] = validate_name("VM", str(args[key]))
    if action in FAILOVER_KINDS:
        kind = FAILOVER_KINDS[action]
        if item.status != ItemProtection.PROTECTED:
            raise Conflict(f"{item.vm_name} is {item.status}; only a protected item can fail over",
                           hint="Commit or cancel the failover in progress first." if
                           item.status in _HELD else None)
        if kind == "test" and _latest_failover(s, item, kind="test", states=(
                FailoverState.STARTING, FailoverState.TEST_RUNNING)):
            raise Conflict(f"{item.vm_name} already has a test failover running",
                           hint="Clean it up first (cleanup_test_failover).")
        point = _point_arg(args)
        fo = Failover(id=new_id("f"), item_id=item.id, kind=kind, state=FailoverState.STARTING,
                      point_id=None,
                      result={}, notes=[], created_at=now, updated_at=now)
        s.add(fo)
        jkind = {"test": P.TEST_FAILOVER, "planned": P.PLANNED, "unplanned": P.UNPLANNED}[kind]
        job_args: dict[str, Any] = {"failover_id": fo.id, "point": point}
        job_args.update({k: args[k] for k in ("vm_name", "replace_vm", "shutdown_timeout", "plan_job")
                         if k in args})
        if kind == "planned" and item.origin_item_id and "replace_vm" not in job_args \
                and "vm_name" not in job_args:
            origin = s.get(Item, item.origin_item_id)
            if origin is not None:  # failback: to the original VM, re-created in place
                job_args["replace_vm"] = origin.vm_id
        job = create_job(s, jkind, target=item.vm_name, item_id=item.id, args=job_args, now=now)
        fo.job_id = job.id
    else:
        found: Failover | None
        if action == "cleanup_test_failover":
            found = _latest_failover(s, item, kind="test", states=(
                FailoverState.TEST_RUNNING, FailoverState.STARTING, FailoverState.FAILED,
                FailoverState.CANCELLED))
            if found is None:
                raise Conflict(f"{item.vm_name} has no test failover to clean up")
            jkind = P.CLEANUP_TEST
        elif action in ("commit", "cancel", "change_point"):
            found = s.get(Failover, item.failover_id) if item.failover_id else None
            if found is None or item.status not in _HELD:
                raise Conflict(f"{item.vm_name} is {item.status}; there is no failover to {action}",
                               hint="Fail the item over first.")
            if action == "commit" and found.state != FailoverState.PENDING_COMMIT:
                raise Conflict(f"failover {found.id} is {found.state}; only a failover pending commit "
                               "can be committed", hint="Cancel it instead.")
            jkind = {"commit": P.COMMIT, "cancel": P.CANCEL, "change_point": P.CHANGE_POINT}[action]
        else:  # reprotect
            found = _latest_failover(s, item, states=(FailoverState.COMMITTED,))
            if found is None or item.status != ItemProtection.COMMITTED:
                raise Conflict(f"{item.vm_name} is {item.status}; re-protect needs a committed "
                               "failover", hint="Commit the failover first.")
            jkind = P.REPROTECT
        fo = found
        job_args = {"failover_id": fo.id, "notes": str(args.get("notes") or "")[:2000],
                    **({"plan_job": args["plan_job"]} if "plan_job" in args else {})}
        if action == "change_point":
            job_args["point"] = _point_arg(args)
        tasks = P.COMMIT_AND_REPROTECT if action == "commit" and fo.kind == "planned" \
            and args.get("reprotect", True) else None
        job = create_job(s, jkind, target=item.vm_name, item_id=item.id, args=job_args, now=now,
                         tasks=tasks)
    claim_item(s, item, job.id)
    return job


# ------------------------------------------------------------------------------ network mappings

def _site(s: Session, name: str) -> Site:
    site = s.scalars(select(Site).where(Site.name == validate_name("site", name))).first()
    if site is None:
        raise NotFound(f"no site {name!r}", hint="List sites with GET /api/v1/sites.")
    return site


def _check_rule(rule: dict[str, Any]) -> dict[str, Any]:
    from drsite.agent.failover import ip_rule_from_dict

    ip_rule_from_dict(rule)  # InvalidInput on a bad rule
    return dict(rule)


def set_network_mapping(s: Session, *, source_site: str, recovery_site: str, source_network: str,
                        recovery_network: str, test_network: str | None,
                        ip_rule: dict[str, Any] | None, now: float) -> NetworkMapping:
    """Create or replace the mapping of ``source_network`` from one site to another."""
    src, dst = _site(s, source_site), _site(s, recovery_site)
    if src.id == dst.id:
        raise InvalidInput("a network mapping goes from one site to another")
    for n in (source_network, recovery_network, test_network):
        if n is not None:
            validate_name("network", n)
    rule = _check_rule(ip_rule or {"kind": "keep"})
    row = s.scalars(select(NetworkMapping).where(
        NetworkMapping.source_site_id == src.id, NetworkMapping.recovery_site_id == dst.id,
        NetworkMapping.source_network == source_network)).first()
    if row is None:
        row = NetworkMapping(source_site_id=src.id, recovery_site_id=dst.id,
                             source_network=source_network, recovery_network=recovery_network,
                             test_network=test_network, ip_rule=rule, created_at=now)
        s.add(row)
    else:
        row.recovery_network, row.test_network, row.ip_rule = recovery_network, test_network, rule
    s.flush()
    record_event(s, now, "network", f"{source_site}/{source_network}",
                 f"mapped to {recovery_site}/{recovery_network} (test: {test_network})")
    return row


def network_mapping_view(s: Session, row: NetworkMapping) -> dict[str, Any]:
    names = {x.id: x.name for x in s.scalars(select(Site))}
    return {"id": row.id, "source_site": names.get(row.source_site_id),
            "recovery_site": names.get(row.recovery_site_id), "source_network": row.source_network,
            "recovery_network": row.recovery_network, "test_network": row.test_network,
            "ip_rule": row.ip_rule}


# ------------------------------------------------------------------------------ recovery plans

def _action_spec(d: Any, where: str) -> dict[str, Any]:
    if not isinstance(d, dict):
        raise InvalidInput(f"{where}: an action is an object with 'script' or 'manual'")
    if ("script" in d) == ("manual" in d):
        raise InvalidInput(f"{where}: an action has exactly one of 'script' or 'manual'")
    if "manual" in d:
        text = str(d["manual"]).strip()
        if not text:
            raise InvalidInput(f"{where}: a manual action needs its instruction text")
        return {"manual": text[:2000]}
    script = str(d["script"]).strip()
    if not script:
        raise InvalidInput(f"{where}: a script action needs a command")
    on = str(d.get("on") or "vault")
    if on != "vault":
        validate_name("host", on)
    try:
        timeout = float(d.get("timeout_s", 300))
    except (TypeError, ValueError):
        raise InvalidInput(f"{where}: timeout_s must be a number of seconds") from None
    if not 0 < timeout <= 24 * 3600:
        raise InvalidInput(f"{where}: timeout_s must be between 0 and 86400")
    return {"script": script, "on": on, "timeout_s": timeout}


def validate_plan(d: Any) -> dict[str, Any]:
    """A plan document → its normalised spec (``InvalidInput`` naming the bad field)."""
    if not isinstance(d, dict):
        raise InvalidInput("a recovery plan is an object with 'name' and 'groups'")
    name = validate_name("plan", str(d.get("name") or ""))
    groups = d.get("groups")
    if not isinstance(groups, list) or not groups:
        raise InvalidInput(f"plan {name}: 'groups' must be a non-empty list")
    out_groups: list[dict[str, Any]] = []
    seen_vms: set[str] = set()
    for i, g in enumerate(groups):
        where = f"plan {name}, group {i + 1}"
        if not isinstance(g, dict):
            raise InvalidInput(f"{where}: a group is an object with 'vms'")
        vms = g.get("vms")
        if not isinstance(vms, list) or not vms:
            raise InvalidInput(f"{where}: 'vms' must be a non-empty list of VM names")
        names = [validate_name("VM", str(v)) for v in vms]
        dup = seen_vms.intersection(names)
        if dup:
            raise InvalidInput(f"{where}: VM {sorted(dup)[0]} is in the plan twice")
        seen_vms.update(names)
        out_groups.append({
            "name": validate_name("group", str(g.get("name") or f"group-{i + 1}")),
            "vms": names,
            "pre": [_action_spec(a, f"{where}, pre action {j + 1}")
                    for j, a in enumerate(g.get("pre") or [])],
            "post": [_action_spec(a, f"{where}, post action {j + 1}")
                     for j, a in enumerate(g.get("post") or [])]})
    return {"name": name, "description": str(d.get("description") or "")[:1000], "groups": out_groups}


def _spec_of(p: RecoveryPlan) -> dict[str, Any]:
    return {"name": p.name, "description": p.description, "groups": p.spec.get("groups", [])}


def apply_plans(s: Session, docs: list[Any], now: float, *, dry_run: bool,
                prune: bool = False) -> list[dict[str, Any]]:
    """Make the vault's plans match ``docs``: a diff ``[{plan, change: create|update|delete|
    unchanged, fields}]``; nothing is written when ``dry_run``. ``prune`` deletes plans not in
    the documents."""
    specs = [validate_plan(d) for d in docs]
    names = [x["name"] for x in specs]
    if len(set(names)) != len(names):
        raise InvalidInput("a plan name appears twice in the documents")
    existing = {p.name: p for p in s.scalars(select(RecoveryPlan))}
    diff: list[dict[str, Any]] = []
    for spec in specs:
        cur = existing.get(spec["name"])
        if cur is None:
            diff.append({"plan": spec["name"], "change": "create", "fields": ["description", "groups"]})
            if not dry_run:
                s.add(RecoveryPlan(name=spec["name"], description=spec["description"],
                                   spec={"groups": spec["groups"]}, created_at=now, updated_at=now))
            continue
        old = _spec_of(cur)
        fields = [k for k in ("description", "groups") if old[k] != spec[k]]
        diff.append({"plan": spec["name"], "change": "update" if fields else "unchanged",
                     "fields": fields})
        if fields and not dry_run:
            cur.description, cur.spec, cur.updated_at = spec["description"], {"groups": spec["groups"]}, now
    if prune:
        for pname, p in existing.items():
            if pname not in names:
                diff.append({"plan": pname, "change": "delete", "fields": []})
                if not dry_run:
                    s.delete(p)
    if not dry_run:
        s.flush()
        for d in diff:
            if d["change"] != "unchanged":
                record_event(s, now, "plan", d["plan"], f"{d['change']}d")
    return diff


def get_plan(s: Session, name: str) -> RecoveryPlan:
    p = s.scalars(select(RecoveryPlan).where(RecoveryPlan.name == validate_name("plan", name))).first()
    if p is None:
        raise NotFound(f"no recovery plan {name!r}", hint="List plans with GET /api/v1/plans.")
    return p


def _items_by_vm(s: Session) -> dict[str, Item]:
    """Active items by VM name (newest wins: a re-protected VM's reverse item)."""
    out: dict[str, Item] = {}
    for it in s.scalars(select(Item).where(Item.status.in_(ACTIVE_ITEM_STATUSES))
                        .order_by(Item.created_at)):
        out[it.vm_name] = it
    return out


def plan_view(s: Session, name: str) -> dict[str, Any]:
    p = get_plan(s, name)
    items = _items_by_vm(s)
    last = s.scalars(select(Job).where(Job.kind == P.PLAN, Job.target == p.name)
                     .order_by(Job.created_at.desc())).first()
    groups = []
    for g in p.spec.get("groups", []):
        groups.append({"name": g["name"], "pre": g.get("pre", []), "post": g.get("post", []),
                       "items": [{"vm_name": v, "item_id": items[v].id if v in items else None,
                                  "status": items[v].status if v in items else NOT_PROTECTED}
                                 for v in g["vms"]]})
    return {"name": p.name, "description": p.description, "groups": groups,
            "created_at": p.created_at, "updated_at": p.updated_at,
            "last_job": {"id": last.id, "action": last.args.get("action"), "state": last.state,
                         "message": last.message} if last else None}


def list_plans(s: Session) -> list[dict[str, Any]]:
    return [plan_view(s, p.name) for p in s.scalars(select(RecoveryPlan).order_by(RecoveryPlan.name))]


def delete_plan(s: Session, name: str, now: float) -> None:
    p = get_plan(s, name)
    if s.scalars(select(Job.id).where(Job.kind == P.PLAN, Job.target == p.name,
                                      Job.state.in_(ACTIVE_JOB_STATES))).first():
        raise Conflict(f"recovery plan {name} has a job running")
    s.delete(p)
    record_event(s, now, "plan", name, "deleted")


def _describe(a: dict[str, Any]) -> str:
    if "manual" in a:
        return f"manual: {a['manual'][:80]}"
    return f"script on {a['on']}: {a['script'][:60]}"


def start_plan_action(s: Session, name: str, action: str, args: dict[str, Any], now: float) -> Job:
    """A RecoveryPlan job running ``action`` group by group (VMs of a group in parallel);
    failovers run each group's pre/post actions."""
    if action not in PLAN_ACTIONS:
        raise InvalidInput(f"unknown plan action {action!r}; known: {', '.join(PLAN_ACTIONS)}")
    p = get_plan(s, name)
    if s.scalars(select(Job.id).where(Job.kind == P.PLAN, Job.target == p.name,
                                      Job.state.in_(ACTIVE_JOB_STATES))).first():
        raise Conflict(f"recovery plan {name} already has a job running",
                       hint="Wait for it to end, or cancel it.")
    items = _items_by_vm(s)
    groups = list(p.spec.get("groups", []))
    missing = [v for g in groups for v in g["vms"] if v not in items]
    if missing:
        raise Conflict(f"plan {name}: VM(s) {', '.join(missing)} are not protected",
                       hint="Protect them or remove them from the plan.")
    if action == "cancel":
        groups = groups[::-1]  # undo in reverse order
    with_actions = action in FAILOVER_KINDS
    tasks: list[tuple[str, str]] = []
    data: list[dict[str, Any]] = []
    for gi, g in enumerate(groups):
        if with_actions:
            for j, a in enumerate(g.get("pre", [])):
                tasks.append(("plan_action", f"Group {g['name']}: pre {_describe(a)}"))
                data.append({"group": g["name"], "phase": "pre", "action": a, "idx": j})
        tasks.append(("plan_group", f"Group {g['name']}: {action.replace('_', ' ')} of "
                                    f"{len(g['vms'])} VM(s)"))
        data.append({"group": g["name"], "vms": g["vms"], "order": gi})
        if with_actions:
            for j, a in enumerate(g.get("post", [])):
                tasks.append(("plan_action", f"Group {g['name']}: post {_describe(a)}"))
                data.append({"group": g["name"], "phase": "post", "action": a, "idx": j})
    tasks.append(("plan_summary", "Plan summary (measured RTO)"))
    data.append({})
    point = _point_arg(args) if action in ("test_failover", "unplanned_failover") else None
    job = create_job(s, P.PLAN, target=p.name, item_id=None, now=now, tasks=tuple(tasks),
                     args={"action": action, "plan": p.name,
                           **({"point": point} if point else {}),
                           **({"notes": str(args.get("notes"))[:2000]} if args.get("notes") else {})})
    for t in s.scalars(select(Task).where(Task.job_id == job.id).order_by(Task.idx)):
        t.data = data[t.idx]
    return job


def resume_job(s: Session, job_id: str, now: float) -> Job:
    """Let a job waiting for an operator (a manual action) go on."""
    job = s.get(Job, validate_name("job", job_id))
    if job is None:
        raise NotFound(f"no job {job_id!r}")
    task = s.scalars(select(Task).where(Task.job_id == job.id, Task.state == TaskState.RUNNING)
                     .order_by(Task.idx)).first()
    if job.state != JobState.RUNNING or task is None or not (task.data or {}).get("waiting_for_operator"):
        raise Conflict(f"job {job_id} is not waiting for an operator",
                       hint="Only a job whose current step is a manual action can be resumed.")
    task.data = {**dict(task.data or {}), "resumed_at": now, "waiting_for_operator": False}
    record_event(s, now, "job", job.id, f"{job.kind} of {job.target}: resumed by an operator")
    return job


def failover_view(fo: Failover) -> dict[str, Any]:
    return {"id": fo.id, "item_id": fo.item_id, "kind": fo.kind, "state": fo.state,
            "point_id": fo.point_id, "point_created_at": fo.point_created_at,
            "recovery_host_id": fo.recovery_host_id, "vm_name": fo.vm_name, "vm_id": fo.vm_id,
            "generation": fo.generation, "rto_s": fo.rto_s, "notes": fo.notes,
            "job_id": fo.job_id, "created_at": fo.created_at, "updated_at": fo.updated_at,
            "result": {k: v for k, v in (fo.result or {}).items() if k != "source"}
            | ({"source": {k: v for k, v in fo.result["source"].items() if k != "fingerprints"}}
               if (fo.result or {}).get("source") else {})}


def host_name(s: Session, host_id: str | None) -> str | None:
    h = s.get(Host, host_id) if host_id else None
    return h.name if h else None
