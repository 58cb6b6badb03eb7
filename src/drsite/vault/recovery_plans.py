"""Recovery plans: plan documents (validation, apply with a diff), views, and starting a plan's
job (``start_plan_action``: one ``RecoveryPlan`` job that runs the groups in order).

Called by the API and the dashboard inside a transaction. Responsible for: what must hold
before a plan job exists, and the plan documents. Not responsible for: doing the work
(``jobs/plans.py``).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from drsite.core.actions import FAILOVER_KINDS, PLAN_ACTIONS, POINT_ACTIONS, FailoverAction
from drsite.core.errors import Conflict, InvalidInput, NotFound
from drsite.core.model import validate_name
from drsite.core.states import ACTIVE_JOB_STATES, NOT_PROTECTED
from drsite.vault.audit import record_event
from drsite.vault.db.models import Job, RecoveryPlan, Task
from drsite.vault.jobs import kinds as K
from drsite.vault.jobs.create import create_job
from drsite.vault.jobs.item_actions import point_arg
from drsite.vault.membership import items_by_vm
from drsite.vault.policies import parse_window


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
    out: dict[str, Any] = {"name": name, "description": str(d.get("description") or "")[:1000],
                           "groups": out_groups, "drill": None}
    if d.get("drill") is not None:
        out["drill"] = validate_drill(d["drill"], f"plan {name}, drill")
    return out


def validate_drill(d: Any, where: str) -> dict[str, Any]:
    """A drill schedule: ``{"every_s": seconds (or "daily"/"weekly"), "window": "HH:MM-HH:MM"
    or null, "boot_timeout_s": 120, "probe": {"script", "timeout_s"} or null}``."""
    if not isinstance(d, dict):
        raise InvalidInput(f"{where}: a drill is an object with 'every_s'")
    every = d.get("every_s", "weekly")
    every = {"daily": 86400.0, "weekly": 7 * 86400.0}.get(str(every)) or every
    try:
        every_s = float(every)
        boot = float(d.get("boot_timeout_s", 120))
    except (TypeError, ValueError):
        raise InvalidInput(f"{where}: every_s and boot_timeout_s are seconds") from None
    if not 10 <= every_s <= 366 * 86400:
        raise InvalidInput(f"{where}: every_s must be between 10 s and a year ('weekly', 'daily')")
    if not 1 <= boot <= 3600:
        raise InvalidInput(f"{where}: boot_timeout_s must be between 1 and 3600")
    window = d.get("window")
    if window is not None:
        window = str(window)
        parse_window(window)
    probe = d.get("probe")
    if probe is not None:
        if not isinstance(probe, dict) or not str(probe.get("script") or "").strip():
            raise InvalidInput(f"{where}: a probe is an object with a 'script'")
        t = float(probe.get("timeout_s", 60))
        if not 0 < t <= 3600:
            raise InvalidInput(f"{where}: probe timeout_s must be between 0 and 3600")
        probe = {"script": str(probe["script"]).strip(), "timeout_s": t}
    return {"every_s": every_s, "window": window, "boot_timeout_s": boot, "probe": probe}


def _spec_of(p: RecoveryPlan) -> dict[str, Any]:
    return {"name": p.name, "description": p.description, "groups": p.spec.get("groups", []),
            "drill": p.spec.get("drill")}


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
            diff.append({"plan": spec["name"], "change": "create",
                         "fields": ["description", "groups", *(["drill"] if spec["drill"] else [])]})
            if not dry_run:
                s.add(RecoveryPlan(name=spec["name"], description=spec["description"],
                                   spec={"groups": spec["groups"], "drill": spec["drill"]},
                                   created_at=now, updated_at=now))
            continue
        old = _spec_of(cur)
        fields = [k for k in ("description", "groups", "drill") if old[k] != spec[k]]
        diff.append({"plan": spec["name"], "change": "update" if fields else "unchanged",
                     "fields": fields})
        if fields and not dry_run:
            cur.description, cur.updated_at = spec["description"], now
            cur.spec = {"groups": spec["groups"], "drill": spec["drill"]}
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
        raise NotFound(f"no recovery plan {name!r}", hint="List plans with 'drsite plan list'.")
    return p


def plan_view(s: Session, name: str) -> dict[str, Any]:
    p = get_plan(s, name)
    items = items_by_vm(s)
    last = s.scalars(select(Job).where(Job.kind == K.PLAN, Job.target == p.name)
                     .order_by(Job.created_at.desc())).first()
    groups = []
    for g in p.spec.get("groups", []):
        groups.append({"name": g["name"], "pre": g.get("pre", []), "post": g.get("post", []),
                       "items": [{"vm_name": v, "item_id": items[v].id if v in items else None,
                                  "status": items[v].status if v in items else NOT_PROTECTED}
                                 for v in g["vms"]]})
    return {"name": p.name, "description": p.description, "groups": groups,
            "drill": p.spec.get("drill"),
            "created_at": p.created_at, "updated_at": p.updated_at,
            "last_job": {"id": last.id, "action": _action_of(last), "state": last.state,
                         "message": last.message} if last else None}


def _action_of(job: Job) -> str | None:
    """The action a plan job ran, in its one spelling (older jobs stored ``test_failover``)."""
    raw = job.args.get("action")
    try:
        return FailoverAction.parse(str(raw)).value if raw else None
    except InvalidInput:
        return str(raw)


def list_plans(s: Session) -> list[dict[str, Any]]:
    return [plan_view(s, p.name) for p in s.scalars(select(RecoveryPlan).order_by(RecoveryPlan.name))]


def delete_plan(s: Session, name: str, now: float) -> None:
    p = get_plan(s, name)
    if s.scalars(select(Job.id).where(Job.kind == K.PLAN, Job.target == p.name,
                                      Job.state.in_(ACTIVE_JOB_STATES))).first():
        raise Conflict(f"recovery plan {name} has a job running",
                       hint="Wait for it to end ('drsite jobs list --state active'), or cancel it.")
    s.delete(p)
    record_event(s, now, "plan", name, "deleted")


def _describe(a: dict[str, Any]) -> str:
    if "manual" in a:
        return f"manual: {a['manual'][:80]}"
    return f"script on {a['on']}: {a['script'][:60]}"


def start_plan_action(s: Session, name: str, action: str | FailoverAction,
                      args: dict[str, Any], now: float) -> Job:
    """A RecoveryPlan job running ``action`` group by group (VMs of a group in parallel);
    failovers run each group's pre/post actions."""
    act = FailoverAction.parse(str(action), PLAN_ACTIONS)
    p = get_plan(s, name)
    if s.scalars(select(Job.id).where(Job.kind == K.PLAN, Job.target == p.name,
                                      Job.state.in_(ACTIVE_JOB_STATES))).first():
        raise Conflict(f"recovery plan {name} already has a job running",
                       hint="Wait for it to end ('drsite jobs list --state active'), or cancel it.")
    items = items_by_vm(s)
    groups = list(p.spec.get("groups", []))
    missing = [v for g in groups for v in g["vms"] if v not in items]
    if missing:
        raise Conflict(f"plan {name}: VM(s) {', '.join(missing)} are not protected",
                       hint="Protect them ('drsite items protect VM --group GROUP'), or remove "
                            "them from the plan ('drsite plan apply -f FILE').")
    tasks, data = plan_tasks(groups, act)
    tasks.append(("plan_summary", "Plan summary (measured RTO)"))
    data.append({})
    point = point_arg(args) if act in POINT_ACTIONS else None
    job = create_job(s, K.PLAN, target=p.name, item_id=None, now=now, tasks=tuple(tasks),
                     args={"action": act.value, "plan": p.name,
                           **({"point": point} if point else {}),
                           **({"create_reverse_mapping": True}
                              if args.get("create_reverse_mapping") else {}),
                           **({"notes": str(args.get("notes"))[:2000]} if args.get("notes") else {})})
    for t in s.scalars(select(Task).where(Task.job_id == job.id).order_by(Task.idx)):
        t.data = data[t.idx]
    return job


def plan_tasks(groups: list[dict[str, Any]], action: FailoverAction
               ) -> tuple[list[tuple[str, str]], list[dict[str, Any]]]:
    """The tasks (and their data) that run ``action`` over a plan's groups, in order: pre
    actions, the group's VMs in parallel, post actions (failovers only)."""
    if action is FailoverAction.CANCEL:
        groups = groups[::-1]  # undo in reverse order
    with_actions = action in FAILOVER_KINDS
    tasks: list[tuple[str, str]] = []
    data: list[dict[str, Any]] = []
    for gi, g in enumerate(groups):
        if with_actions:
            for j, a in enumerate(g.get("pre", [])):
                tasks.append(("plan_action", f"Group {g['name']}: pre {_describe(a)}"))
                data.append({"group": g["name"], "phase": "pre", "action": a, "idx": j})
        tasks.append(("plan_group", f"Group {g['name']}: {action.words} of "
                                    f"{len(g['vms'])} VM(s)"))
        data.append({"group": g["name"], "vms": g["vms"], "order": gi})
        if with_actions:
            for j, a in enumerate(g.get("post", [])):
                tasks.append(("plan_action", f"Group {g['name']}: post {_describe(a)}"))
                data.append({"group": g["name"], "phase": "post", "action": a, "idx": j})
    return tasks, data
