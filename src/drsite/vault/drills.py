"""Drills: recovery plans whose test failover runs on a schedule and is proven each time.

A plan's ``drill`` (``recovery_plans.validate_drill``: ``every_s``, an optional ``window``, the
boot timeout and an optional probe script) makes :class:`DrillScheduler` start a Drill job when
the last drill of the plan started ``every_s`` ago (or never ran) and the local time is inside
the window; ``drsite drills run PLAN`` starts one by hand. One drill per plan at a time, and none
while another job of the plan runs. The job (``jobs/drills.py``) is the plan's own test-failover
tasks, a boot/probe step, the plan's cleanup and the report; its row in ``drills`` holds the
state (running, passed, failed) and the report.

Responsible for: starting drills and their views. Not responsible for: running them.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from drsite.core.errors import Conflict, InvalidInput, NotFound
from drsite.core.model import validate_name
from drsite.core.states import ACTIVE_JOB_STATES
from drsite.vault.audit import record_event
from drsite.vault.db.database import Database
from drsite.vault.db.models import Drill, Job, RecoveryPlan, Task
from drsite.vault.ids import new_id
from drsite.vault.jobs import plan as P
from drsite.vault.jobs.create import create_job
from drsite.vault.jobs.drills import RUNNING
from drsite.vault.membership import items_by_vm
from drsite.vault.policies import parse_window
from drsite.vault.recovery_plans import get_plan, plan_tasks, validate_drill
from drsite.vault.settings import VaultSettings

DEFAULT_DRILL = {"every_s": 7 * 86400.0, "window": None, "boot_timeout_s": 120.0, "probe": None}


def start_drill(s: Session, plan_name: str, *, trigger: str, now: float,
                drill: dict[str, Any] | None = None) -> Drill:
    """A Drill job of the plan (its ``drill`` spec, or ``drill``, or the defaults)."""
    p = get_plan(s, plan_name)
    busy = s.scalars(select(Job.id).where(Job.kind.in_((P.PLAN, P.DRILL)), Job.target == p.name,
                                          Job.state.in_(ACTIVE_JOB_STATES))).first()
    if busy is not None:
        raise Conflict(f"recovery plan {p.name} has a job running ({busy})",
                       hint="Wait for it to end, or cancel it.")
    items = items_by_vm(s)
    groups = list(p.spec.get("groups", []))
    missing = [v for g in groups for v in g["vms"] if v not in items]
    if missing:
        raise Conflict(f"plan {p.name}: VM(s) {', '.join(missing)} are not protected",
                       hint="Protect them or remove them from the plan.")
    spec = {**DEFAULT_DRILL, **dict(p.spec.get("drill") or {}), **dict(drill or {})}
    test_tasks, test_data = plan_tasks(groups, "test_failover")
    clean_tasks, clean_data = plan_tasks(groups, "cleanup_test_failover")
    clean_data = [{**d, "action": "cleanup_test_failover"} for d in clean_data]
    tasks = [*test_tasks, ("drill_probe", "Boot each test VM and run the probe"),
             *clean_tasks, ("drill_report", "Record the drill report (RPO, RTO, checks)")]
    data = [*test_data, {}, *clean_data, {}]
    did = new_id("d")
    job = create_job(s, P.DRILL, target=p.name, item_id=None, now=now, tasks=tuple(tasks),
                     args={"action": "test_failover", "plan": p.name, "point": "latest",
                           "drill_id": did, "drill": spec,
                           "notes": f"drill {did} ({trigger})"})
    for t in s.scalars(select(Task).where(Task.job_id == job.id).order_by(Task.idx)):
        t.data = data[t.idx]
    row = Drill(id=did, plan=p.name, job_id=job.id, state=RUNNING, trigger=trigger, report={},
                started_at=now, ended_at=None)
    s.add(row)
    s.flush()
    record_event(s, now, "drill", p.name, f"drill {did} started ({trigger})")
    return row


def validate_override(d: dict[str, Any]) -> dict[str, Any]:
    """Fields of a drill started by hand that replace the plan's (boot timeout, probe)."""
    spec = validate_drill({"every_s": "weekly", **d}, "drill")
    return {k: spec[k] for k in d if k in ("boot_timeout_s", "probe")}


def drill_view(d: Drill) -> dict[str, Any]:
    r = dict(d.report or {})
    return {"id": d.id, "plan": d.plan, "job_id": d.job_id, "state": d.state,
            "trigger": d.trigger, "started_at": d.started_at, "ended_at": d.ended_at,
            "rto_s": r.get("rto_s"), "rpo_s": r.get("rpo_s"), "report": r}


def list_drills(s: Session, plan: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
    q = select(Drill)
    if plan is not None:
        q = q.where(Drill.plan == validate_name("plan", plan))
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
            last = dict(s.execute(select(Drill.plan, func.max(Drill.started_at))
                                  .group_by(Drill.plan)).all())
            for p in s.scalars(select(RecoveryPlan).order_by(RecoveryPlan.name)):
                spec = p.spec.get("drill")
                if not spec:
                    continue
                prev = last.get(p.name)
                if prev is not None and now - prev < float(spec["every_s"]):
                    continue
                if spec.get("window") and not parse_window(str(spec["window"])).contains(
                        self.settings.minute_of_day(now)):
                    continue
                try:
                    with s.begin_nested():
                        started.append(start_drill(s, p.name, trigger="schedule", now=now).id)
                except (Conflict, InvalidInput, NotFound):
                    continue
        return started
