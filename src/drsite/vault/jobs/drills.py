"""Task bodies of the Drill job: a recovery plan's test failover, proven and cleaned up.

A Drill job (of a plan, or of a protection group as one plan group: ``vault/drills.py``) runs
the plan's own tasks (``plan_action`` / ``plan_group`` of ``jobs/plans.py``:
pre actions, each group's VMs in parallel through TestFailover jobs, post actions), then
``drill_probe`` (each test VM booted: its guest answers or the drill's probe script passes, on
the recovery host), then the cleanup groups (``plan_group`` with ``action:
cleanup_test_failover``: CleanupTestFailover jobs), then ``drill_report``. The test failover
verifies each test VM's disk images against its point before the VM starts.

A drill always cleans up: a failed probe is recorded and the cleanup still runs; a failure
before that (a group's test failover failed) fails the job, and ``drill_on_end`` starts the
cleanup of every test failover the drill opened. The report (``drills.report``) names per VM the
point used, its age when the VM's test failover was requested (RPO achieved: what a disaster at
that moment would have lost), the time to running (RTO achieved:
the test failover's request → VM running, plus the time until the guest answered), the
verification and the probe; a failed drill raises a ``drill:PLAN`` alert (``health``).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from drsite.core.actions import FailoverAction
from drsite.core.errors import Conflict, DrsiteError, PermanentError
from drsite.core.states import ACTIVE_JOB_STATES, FailoverState, JobState
from drsite.vault.audit import record_event
from drsite.vault.db.models import Drill, Failover, Host, Item, Job, Task
from drsite.vault.jobs.failover import run_command
from drsite.vault.jobs.item_actions import start_item_action
from drsite.vault.jobs.model import JobHandlers, Step, TaskContext, done, wait
from drsite.vault.jobs.plans import plan_action, plan_group

PASSED, FAILED, RUNNING = "passed", "failed", "running"


def _test_jobs(ctx: TaskContext) -> dict[str, str]:
    """VM name → TestFailover job id, from the drill's test-failover groups."""
    out: dict[str, str] = {}
    for t in ctx.s.scalars(select(Task).where(Task.job_id == ctx.job.id,
                                              Task.name == "plan_group")):
        data = dict(t.data or {})
        if not data.get("action"):  # the test-failover groups (cleanup groups carry an action)
            out.update({str(k): str(v) for k, v in dict(data.get("jobs") or {}).items()})
    return out


def _subject_env(ctx: TaskContext) -> dict[str, str]:
    """What the probe is told the drill is of: ``DRSITE_PLAN`` or ``DRSITE_DRILL_GROUP``."""
    if ctx.job.args.get("group"):
        return {"DRSITE_DRILL_GROUP": str(ctx.job.args["group"])}
    return {"DRSITE_PLAN": str(ctx.job.args.get("plan") or ctx.job.target)}


def _what(ctx: TaskContext) -> tuple[str, str]:
    """(what the drill is of, the command that runs it again)."""
    group = ctx.job.args.get("group")
    if group:
        return f"protection group {group}", f"drsite drills run --group {group}"
    plan = ctx.job.args.get("plan") or ctx.job.target
    return f"plan {plan}", f"drsite drills run {plan}"


def _failover_of(ctx: TaskContext, job_id: str) -> Failover | None:
    return ctx.s.scalars(select(Failover).where(Failover.job_id == job_id)).first()


def drill_probe(ctx: TaskContext) -> Step:
    """Send ``drill_probe`` for every running test VM (one command each, ids kept), wait for
    all; results go into the task's data. Never fails the job: the cleanup must run."""
    spec = dict(ctx.job.args.get("drill") or {})
    results: dict[str, Any] = dict(ctx.data.get("results") or {})
    pending = 0
    for vm, jid in sorted(_test_jobs(ctx).items()):
        if vm in results:
            continue
        fo = _failover_of(ctx, jid)
        if fo is None or fo.state != FailoverState.TEST_RUNNING or not fo.vm_name:
            results[vm] = {"ok": False, "reason": "the test VM did not start"}
            continue
        host = ctx.s.get(Host, fo.recovery_host_id) if fo.recovery_host_id else None
        args = {"vm_name": fo.vm_name, "boot_timeout_s": spec.get("boot_timeout_s") or 120,
                "probe": spec.get("probe"),
                "env": {**_subject_env(ctx), "DRSITE_DRILL_ID": str(ctx.job.args.get("drill_id"))}}
        try:
            got = run_command(ctx, host, "drill_probe", args, item_id=fo.item_id,
                              key=f"probe:{vm}")
        except DrsiteError as e:
            results[vm] = {"ok": False, "reason": e.message}
            continue
        if isinstance(got, Step):
            pending += 1
            continue
        results[vm] = dict((got.result or {}).get("drill_probe") or {})
    ctx.put(results=results)
    if pending:
        return wait(50, f"{pending} test VM(s) booting or being probed")
    bad = sorted(vm for vm, r in results.items() if not r.get("ok"))
    if bad:
        return done(f"{len(bad)} of {len(results)} test VM(s) not proven: "
                    + "; ".join(f"{vm}: {results[vm].get('reason')}" for vm in bad[:3]))
    return done(f"{len(results)} test VM(s) running; guests answer"
                + (" and the probe passed" if spec.get("probe") else ""))


def _report(ctx: TaskContext) -> dict[str, Any]:
    probes: dict[str, Any] = {}
    cleanup_ok = True
    for t in ctx.s.scalars(select(Task).where(Task.job_id == ctx.job.id).order_by(Task.idx)):
        if t.name == "drill_probe":
            probes = dict((t.data or {}).get("results") or {})
        if t.name == "plan_group" and (t.data or {}).get("action") and t.state != "succeeded":
            cleanup_ok = False
    started = float(ctx.job.started_at or ctx.job.created_at)
    vms: list[dict[str, Any]] = []
    for vm, jid in sorted(_test_jobs(ctx).items()):
        fo = _failover_of(ctx, jid)
        job = ctx.s.get(Job, jid)
        agent = dict((fo.result or {}).get("agent") or {}) if fo is not None else {}
        pr = dict(probes.get(vm) or {})
        rto = fo.rto_s if fo is not None else None
        ready = pr.get("ready_after_s")
        row = {"vm": vm, "item_id": fo.item_id if fo else None,
               "test_vm": fo.vm_name if fo else None,
               "failover_id": fo.id if fo else None,
               "point_id": fo.point_id if fo else None,
               "point_created_at": fo.point_created_at if fo else None,
               # the data a disaster at the failover's request would have lost: the point's
               # age then (a group that starts later may use a point newer than the drill)
               "rpo_s": round(max(0.0, fo.created_at - fo.point_created_at), 3)
               if fo is not None and fo.point_created_at else None,
               "rto_s": round(rto + float(ready or 0.0), 3) if rto is not None else None,
               "to_running_s": rto, "guest_ready_after_s": ready,
               "verified": bool(agent.get("verified")),
               "image_source": agent.get("image_source"),
               "guest_ready": pr.get("guest_ready"), "probe": pr.get("probe"),
               "ok": bool(fo is not None and job is not None and job.state == JobState.SUCCEEDED
                          and agent.get("verified") and pr.get("ok")),
               "reason": pr.get("reason") or (job.message if job is not None
                                              and job.state != JobState.SUCCEEDED else "")}
        vms.append(row)
    ok = bool(vms) and all(v["ok"] for v in vms) and cleanup_ok
    rtos = [v["rto_s"] for v in vms if v["rto_s"] is not None]
    rpos = [v["rpo_s"] for v in vms if v["rpo_s"] is not None]
    return {"plan": ctx.job.args.get("plan"), "group": ctx.job.args.get("group"), "ok": ok,
            "vms": vms, "cleaned_up": cleanup_ok,
            "rto_s": max(rtos) if rtos else None, "rpo_s": max(rpos) if rpos else None,
            "started_at": started, "ended_at": ctx.now}


def _finish(ctx: TaskContext, report: dict[str, Any], state: str) -> None:
    drill = ctx.s.get(Drill, str(ctx.job.args.get("drill_id")))
    if drill is None:
        return
    drill.report = report
    drill.state = state
    drill.ended_at = ctx.now
    record_event(ctx.s, ctx.now, "drill", ctx.job.target,
                 f"drill {drill.id} {state}: RTO {report.get('rto_s')} s, "
                 f"RPO {report.get('rpo_s')} s")


def drill_report(ctx: TaskContext) -> Step:
    report = _report(ctx)
    _finish(ctx, report, PASSED if report["ok"] else FAILED)
    ctx.put(report=report)
    if not report["ok"]:
        bad = [v for v in report["vms"] if not v["ok"]]
        detail = "; ".join(f"{v['vm']}: {v['reason'] or 'not verified'}" for v in bad[:3]) \
            or "the cleanup did not finish"
        what, again = _what(ctx)
        raise PermanentError(f"drill of {what} failed: {detail}",
                             hint=f"See 'drsite drills show {ctx.job.args.get('drill_id')}'; fix "
                                  f"the cause, then '{again}'.")
    return done(f"drill passed: {len(report['vms'])} VM(s) recovered, verified and probed; "
                f"RTO {report['rto_s']} s, RPO {report['rpo_s']} s")


def drill_on_end(ctx: TaskContext, state: JobState) -> None:
    """A drill that ended early still cleans up what it opened, and records its report."""
    drill = ctx.s.get(Drill, str(ctx.job.args.get("drill_id")))
    if drill is None or drill.state != RUNNING:
        return
    for _vm, jid in sorted(_test_jobs(ctx).items()):
        fo = _failover_of(ctx, jid)
        if fo is None or fo.state in (FailoverState.CLEANED_UP,):
            continue
        job = ctx.s.get(Job, jid)
        if job is not None and job.state in ACTIVE_JOB_STATES:
            continue  # its own end leaves it failed; the next drill's plan cleans it
        item = ctx.s.get(Item, fo.item_id)
        if item is None or item.active_job_id is not None:
            continue
        try:
            start_item_action(ctx.s, item.id, FailoverAction.CLEANUP_TEST_FAILOVER,
                              {"notes": f"cleanup after drill {drill.id} {state}"}, ctx.now)
        except (Conflict, DrsiteError):
            continue
    report = _report(ctx)
    report["ok"] = False
    report["error"] = ctx.job.message
    _finish(ctx, report, FAILED)


DRILL_HANDLERS = JobHandlers(tasks={"plan_action": plan_action, "plan_group": plan_group,
                                    "drill_probe": drill_probe, "drill_report": drill_report},
                             on_end=drill_on_end)
