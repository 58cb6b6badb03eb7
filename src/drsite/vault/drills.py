"""Drills: test failovers that run on a schedule and are proven each time.

A drill is of a recovery plan (its groups, in order, with their pre/post actions) or of a
protection group (its protected VMs, all in parallel, no actions). A plan's ``drill``
(``recovery_plans.validate_drill``: ``every_s``, an optional ``window``, the boot timeout and an
optional probe script) — or a group's — makes :class:`DrillScheduler` start a Drill job when the
last drill of that plan/group started ``every_s`` ago (or never ran) and the local time is
inside the window; ``drsite drills run PLAN`` (``--group G``) starts one by hand. One drill per
plan/group at a time, and none while another job of the plan runs. The job (``jobs/drills.py``)
is the test-failover tasks of the plan's groups (or of the group as one plan group), a
boot/probe step, the cleanup and the report; its row in ``drills`` holds the state (running,
passed, failed) and the report. The job's target is the plan's name, or ``group:NAME`` (names
never hold a colon).

Responsible for: starting drills and their views. Not responsible for: running them.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from drsite.core.actions import FailoverAction
from drsite.core.errors import Conflict, InvalidInput, NotFound
from drsite.core.model import validate_name
from drsite.core.states import ACTIVE_JOB_STATES, FailoverState, ItemProtection
from drsite.vault.audit import record_event
from drsite.vault.db.database import Database
from drsite.vault.db.models import Drill, Failover, Group, Item, Job, RecoveryPlan, Task
from drsite.vault.ids import new_id
from drsite.vault.jobs import kinds as K
from drsite.vault.jobs.create import create_job
from drsite.vault.jobs.drills import RUNNING
from drsite.vault.membership import items_by_vm
from drsite.vault.policies import parse_window
from drsite.vault.recovery_plans import get_plan, plan_tasks, validate_drill
from drsite.vault.settings import VaultSettings

DEFAULT_DRILL = {"every_s": 7 * 86400.0, "window": None, "boot_timeout_s": 120.0, "probe": None}


GROUP_TARGET = "group:"
OPEN_TEST = (FailoverState.STARTING, FailoverState.TEST_RUNNING)


def drill_target(*, plan: str | None, group: str | None) -> str:
    """The Drill job's target: the plan's name, or ``group:NAME``."""
    return str(plan) if plan is not None else f"{GROUP_TARGET}{group}"


def _group_vms(s: Session, g: Group) -> list[str]:
    """The names of the group's protected VMs (what a group drill fails over)."""
    return sorted(s.scalars(select(Item.vm_name).where(
        Item.group_id == g.id, Item.status == ItemProtection.PROTECTED)).all())


def start_drill(s: Session, plan_name: str | None = None, *, group_name: str | None = None,
                trigger: str, now: float, drill: dict[str, Any] | None = None) -> Drill:
    """A Drill job of a plan (or of a protection group's protected VMs), with its ``drill``
    spec, or ``drill``, or the defaults."""
    if (plan_name is None) == (group_name is None):
        raise InvalidInput("a drill is of a recovery plan or of a protection group (one of them)")
    if plan_name is not None:
        p = get_plan(s, plan_name)
        name, own, groups = p.name, dict(p.spec.get("drill") or {}), list(p.spec.get("groups", []))
        target = drill_target(plan=p.name, group=None)
    else:
        g = s.scalars(select(Group).where(Group.name == validate_name("group", str(group_name)))
                      ).first()
        if g is None:
            raise NotFound(f"no group {group_name!r}", hint="List groups: drsite groups list")
        vms = _group_vms(s, g)
        if not vms:
            raise Conflict(f"protection group {g.name} protects no VM yet",
                           hint="Protect its VMs first (give the group a policy).")
        name, own = g.name, dict(g.drill or {})
        groups = [{"name": g.name, "vms": vms, "pre": [], "post": []}]
        target = drill_target(plan=None, group=g.name)
    what = f"recovery plan {name}" if plan_name is not None else f"protection group {name}"
    busy = s.scalars(select(Job.id).where(Job.kind.in_((K.PLAN, K.DRILL)), Job.target == target,
                                          Job.state.in_(ACTIVE_JOB_STATES))).first()
    if busy is not None:
        raise Conflict(f"{what} has a job running ({busy})",
                       hint=f"Wait for it to end, or cancel it: drsite jobs cancel {busy}")
    items = items_by_vm(s)
    missing = [v for g_ in groups for v in g_["vms"] if v not in items]
    if missing:
        raise Conflict(f"{what}: VM(s) {', '.join(missing)} are not protected",
                       hint="Protect them or remove them from the plan.")
    # a drill cleans up what it opened: it must not adopt (and then remove) a test failover an
    # operator has running
    open_tests = sorted(s.scalars(select(Item.vm_name).join(Failover, Failover.item_id == Item.id)
                                  .where(Item.vm_name.in_([v for g_ in groups for v in g_["vms"]]),
                                         Failover.kind == "test",
                                         Failover.state.in_(OPEN_TEST))).all())
    if open_tests:
        raise Conflict(f"{what}: {', '.join(open_tests)} already run(s) a test failover",
                       hint="Clean it up first (drsite failover cleanup ITEM), "
                            "then run the drill.")
    spec = {**DEFAULT_DRILL, **own, **dict(drill or {})}
    test_tasks, test_data = plan_tasks(groups, FailoverAction.TEST_FAILOVER)
    clean_tasks, clean_data = plan_tasks(groups, FailoverAction.CLEANUP_TEST_FAILOVER)
    clean_data = [{**d, "action": FailoverAction.CLEANUP_TEST_FAILOVER.value} for d in clean_data]
    tasks = [*test_tasks, ("drill_probe", "Boot each test VM and run the probe"),
             *clean_tasks, ("drill_report", "Record the drill report (RPO, RTO, checks)")]
    data = [*test_data, {}, *clean_data, {}]
    did = new_id("d")
    job = create_job(s, K.DRILL, target=target, item_id=None, now=now, tasks=tuple(tasks),
                     args={"action": FailoverAction.TEST_FAILOVER.value, "point": "latest",
                           "drill_id": did,
                           "drill": spec, "notes": f"drill {did} ({trigger})",
                           **({"plan": name} if plan_name is not None else {"group": name})})
    for t in s.scalars(select(Task).where(Task.job_id == job.id).order_by(Task.idx)):
        t.data = data[t.idx]
    row = Drill(id=did, plan=name if plan_name is not None else None,
                group=name if group_name is not None else None, job_id=job.id, state=RUNNING,
                trigger=trigger, report={}, started_at=now, ended_at=None)
    s.add(row)
    s.flush()
    record_event(s, now, "drill", target, f"drill {did} started ({trigger})")
    return row


def validate_override(d: dict[str, Any]) -> dict[str, Any]:
    """Fields of a drill started by hand that replace the plan's (boot timeout, probe)."""
    spec = validate_drill({"every_s": "weekly", **d}, "drill")
    return {k: spec[k] for k in d if k in ("boot_timeout_s", "probe")}


def drill_view(d: Drill) -> dict[str, Any]:
    r = dict(d.report or {})
    return {"id": d.id, "plan": d.plan, "group": d.group, "job_id": d.job_id, "state": d.state,
            "trigger": d.trigger, "started_at": d.started_at, "ended_at": d.ended_at,
            "rto_s": r.get("rto_s"), "rpo_s": r.get("rpo_s"), "report": r}


def list_drills(s: Session, plan: str | None = None, limit: int = 100, *,
                group: str | None = None) -> list[dict[str, Any]]:
    q = select(Drill)
    if plan is not None:
        q = q.where(Drill.plan == validate_name("plan", plan))
    if group is not None:
        q = q.where(Drill.group == validate_name("group", group))
    return [drill_view(d) for d in s.scalars(q.order_by(Drill.started_at.desc()).limit(limit))]


def get_drill(s: Session, drill_id: str) -> Drill:
    d = s.get(Drill, validate_name("drill", drill_id))
    if d is None:
        raise NotFound(f"no drill {drill_id!r}", hint="List drills: drsite drills list")
    return d


class DrillScheduler:
    """Starts the drills that are due (called by the vault's loop)."""

    def __init__(self, db: Database, settings: VaultSettings) -> None:
        self.db = db
        self.settings = settings

    def tick(self) -> list[str]:
        now = self.settings.clock.now()
        started: list[str] = []
        with self.db.tx() as s:
            last_plan = dict(s.execute(select(Drill.plan, func.max(Drill.started_at))
                                       .where(Drill.plan.is_not(None)).group_by(Drill.plan)).all())
            last_group = dict(s.execute(select(Drill.group, func.max(Drill.started_at))
                                        .where(Drill.group.is_not(None))
                                        .group_by(Drill.group)).all())
            due: list[tuple[str | None, str | None]] = []
            for p in s.scalars(select(RecoveryPlan).order_by(RecoveryPlan.name)):
                if self._due(p.spec.get("drill"), last_plan.get(p.name), now):
                    due.append((p.name, None))
            for g in s.scalars(select(Group).where(Group.drill.is_not(None)).order_by(Group.name)):
                if self._due(g.drill, last_group.get(g.name), now):
                    due.append((None, g.name))
            for plan, group in due:
                try:
                    with s.begin_nested():
                        started.append(start_drill(s, plan, group_name=group,
                                                   trigger="schedule", now=now).id)
                except (Conflict, InvalidInput, NotFound):
                    continue
        return started

    def _due(self, spec: dict[str, Any] | None, prev: float | None, now: float) -> bool:
        if not spec:
            return False
        if prev is not None and now - prev < float(spec["every_s"]):
            return False
        return not (spec.get("window") and not parse_window(str(spec["window"])).contains(
            self.settings.minute_of_day(now)))
