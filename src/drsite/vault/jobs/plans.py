"""Task bodies of the RecoveryPlan job: one task per group action, per group and a summary.

``plan_group`` starts one item job per VM of the group (they run in parallel: the runner
advances every active job each tick), keeps their ids in its data, and waits until all ended;
any failure fails the group (after all its VMs ended) and so the plan, which stops there: an
operator sees which VM failed and why, and can run the plan again (done items are skipped) or
act on single items. ``plan_action`` runs a script (on the vault, or on an agent by host name,
with a timeout and the plan's context in its environment) or waits for an operator (manual
action, ``drsite job resume``). ``plan_summary`` reports the plan's measured RTO.

Scripts on the vault run detached (own session) writing their exit code to a file next to
their output, so a vault restart neither kills nor forgets them: the task polls the file.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
from pathlib import Path
from typing import Any

from sqlalchemy import select

from drsite.core.actions import FAILOVER_KINDS, FailoverAction
from drsite.core.errors import Conflict, DrsiteError, InvalidInput, PermanentError
from drsite.core.states import ACTIVE_JOB_STATES, FailoverState, ItemProtection, JobState
from drsite.vault.db.models import Failover, Host, Item, Job, Task
from drsite.vault.jobs.create import request_cancel
from drsite.vault.jobs.failover import run_command
from drsite.vault.jobs.item_actions import start_item_action
from drsite.vault.jobs.model import JobHandlers, Step, TaskContext, done, wait
from drsite.vault.membership import items_by_vm

OUTPUT_TAIL = 2000


def _env(ctx: TaskContext, data: dict[str, Any]) -> dict[str, str]:
    return {"DRSITE_PLAN": str(ctx.job.target), "DRSITE_PLAN_ACTION": _action(ctx).value,
            "DRSITE_JOB_ID": ctx.job.id, "DRSITE_GROUP": str(data.get("group")),
            "DRSITE_PHASE": str(data.get("phase"))}


def _action(ctx: TaskContext, data: dict[str, Any] | None = None) -> FailoverAction:
    """The action of a plan job (a drill's cleanup groups carry their own in the task's
    data); jobs written before the spellings were unified hold ``test_failover``."""
    return FailoverAction.parse(str((data or {}).get("action") or ctx.job.args.get("action")))


def _script_dir(ctx: TaskContext) -> Path:
    d = Path(ctx.settings.data_dir) / "scripts"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _tail(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - OUTPUT_TAIL))
            return f.read().decode("utf-8", "replace").strip()
    except OSError:
        return ""


def _vault_script(ctx: TaskContext, action: dict[str, Any], data: dict[str, Any]) -> Step:
    base = _script_dir(ctx) / f"{ctx.job.id}-{ctx.task.idx}"
    script, out, rc_file, pid_file = (base.with_suffix(x) for x in (".sh", ".log", ".rc", ".pid"))
    timeout = float(action.get("timeout_s") or 300)
    if "pid" not in data and pid_file.exists():
        # started before a vault restart cut off its bookkeeping: never start it twice
        ctx.put(pid=int(pid_file.read_text().strip() or 0), since=ctx.now)
        data = ctx.data
    if "pid" not in data:
        # the script runs from its own file (a syntax error is its own failure, with output);
        # the wrapper records its pid first and the exit code last (rename: whole or absent)
        script.write_text(f"{action['script']}\n")
        q = {k: shlex.quote(str(v)) for k, v in
             {"sh": script, "out": out, "rc": rc_file, "pid": pid_file}.items()}
        shell = (f"echo $$ >{q['pid']}; /bin/sh {q['sh']} >{q['out']} 2>&1; rc=$?; "
                 f"echo $rc >{q['rc']}.tmp && mv {q['rc']}.tmp {q['rc']}")
        env = {**os.environ, **_env(ctx, data)}
        proc = subprocess.Popen(["/bin/sh", "-c", shell], env=env, start_new_session=True,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        ctx.put(pid=proc.pid, since=ctx.now)
        data = ctx.data
    if rc_file.exists():
        rc = int(rc_file.read_text().strip() or "1")
        tail = _tail(out)
        ctx.put(rc=rc, output=tail)
        if rc != 0:
            raise PermanentError(f"script failed with exit code {rc}: {tail[-300:]}",
                                 hint=f"Fix the script (output in {out}), then run the plan again.")
        return done(f"script ended with exit code 0{': ' + tail[-200:] if tail else ''}")
    if ctx.now - float(data.get("since", ctx.now)) > timeout:
        pid = int(data.get("pid") or 0)
        if pid > 1:
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        raise PermanentError(f"script timed out after {timeout:.0f} s and was killed",
                             hint="Raise its timeout_s or make it faster.")
    return wait(50, f"script running (pid {data['pid']})")


def plan_action(ctx: TaskContext) -> Step:
    data = ctx.data
    action = dict(data.get("action") or {})
    if "manual" in action:
        if data.get("resumed_at"):
            return done(f"operator confirmed: {action['manual']}")
        if not data.get("waiting_for_operator"):
            ctx.put(waiting_for_operator=True, since=ctx.now)
        return wait(50, f"waiting for operator: {action['manual']} — then run "
                        f"'drsite job resume {ctx.job.id}'")
    if action.get("on", "vault") == "vault":
        return _vault_script(ctx, action, data)
    host = ctx.s.scalars(select(Host).where(Host.name == action["on"], Host.revoked_at.is_(None))
                         .order_by(Host.last_heartbeat.desc())).first()
    if host is None:
        raise InvalidInput(f"no host named {action['on']!r} for the script",
                           hint="Use a registered host's name, or 'vault'.")
    got = run_command(ctx, host, "run_script",
                      {"script": action["script"], "timeout_s": action.get("timeout_s", 300),
                       "env": _env(ctx, data)}, item_id="")
    if isinstance(got, Step):
        return got
    res = dict(got.result or {})
    return done(f"script on {host.name} ended with exit code {res.get('rc')}: "
                f"{str(res.get('output') or '')[-200:]}")


def plan_group(ctx: TaskContext) -> Step:
    data = ctx.data
    # a drill's cleanup groups carry their own action (the job's is its test failover)
    action = _action(ctx, data)
    jobs: dict[str, str] = dict(data.get("jobs") or {})
    if not data.get("started"):
        items = items_by_vm(ctx.s)
        # the group's items are claimed (written) below in the plan's order: locked first, in
        # id order, as every other writer of several items takes them
        ctx.lock_items(*(items[vm].id for vm in data.get("vms", []) if vm in items))
        skipped: list[str] = []
        for vm in data.get("vms", []):
            item = items.get(vm)
            if item is None:
                raise Conflict(f"VM {vm} of the plan is not protected")
            if vm in jobs:
                continue
            args: dict[str, Any] = {"plan_job": ctx.job.id}
            for k in ("point", "notes", "create_reverse_mapping"):
                if ctx.job.args.get(k):
                    args[k] = ctx.job.args[k]
            if _already_there(ctx, item, action):
                skipped.append(vm)
                continue
            try:
                job = start_item_action(ctx.s, item.id, action, args, ctx.now, ready=False)
            except Conflict as e:
                ctx.put(jobs=jobs)  # the jobs started for the group's other VMs stay visible
                raise Conflict(f"VM {vm}: {e.message}", hint=e.hint) from None
            jobs[vm] = job.id
        ctx.put(jobs=jobs, started=True, skipped=skipped, started_at=ctx.now)
    states = {vm: ctx.s.get(Job, jid) for vm, jid in jobs.items()}
    running = {vm: j for vm, j in states.items()
               if j is not None and j.state in ACTIVE_JOB_STATES}
    if running:
        prog = sum((j.progress if j else 100.0) for j in states.values()) / max(1, len(states))
        msgs = "; ".join(f"{vm}: {j.message}" for vm, j in list(running.items())[:3])
        return wait(prog, f"{len(states) - len(running)} of {len(states)} VM(s) done; {msgs}")
    failed = {vm: j for vm, j in states.items() if j is None or j.state != JobState.SUCCEEDED}
    if failed:
        detail = "; ".join(f"{vm}: {j.message if j else 'job missing'}" for vm, j in failed.items())
        raise PermanentError(f"{len(failed)} of {len(states)} VM(s) of group {data.get('group')} "
                             f"did not {action.words}: {detail}",
                             hint="Look at each VM's job, fix the cause, then run the plan again "
                                  "(VMs already done are skipped).")
    ctx.put(ended_at=ctx.now, group_seconds=round(ctx.now - float(data.get("started_at", ctx.now)), 3))
    skipped = list(ctx.data.get("skipped") or [])
    extra = f" ({len(skipped)} already done)" if skipped else ""
    took = ctx.now - float(data.get("started_at", ctx.now))
    return done(f"{len(states)} VM(s) done in {took:.1f} s{extra}")


_OPEN_TEST = (FailoverState.STARTING, FailoverState.TEST_RUNNING)


def _already_there(ctx: TaskContext, item: Item, action: FailoverAction) -> bool:
    """A re-run of a plan skips VMs already in the state the action leads to."""
    if item.active_job_id is not None:
        return False
    A = FailoverAction
    if action in (A.TEST_FAILOVER, A.CLEANUP_TEST_FAILOVER):
        states = _OPEN_TEST if action is A.TEST_FAILOVER else \
            (*_OPEN_TEST, FailoverState.FAILED, FailoverState.CANCELLED)  # cleanup: also what failed
        open_test = ctx.s.scalars(select(Failover.id).where(
            Failover.item_id == item.id, Failover.kind == "test",
            Failover.state.in_(states))).first() is not None
        return open_test if action is A.TEST_FAILOVER else not open_test
    want = {A.PLANNED_FAILOVER: (ItemProtection.FAILED_OVER,),
            A.UNPLANNED_FAILOVER: (ItemProtection.FAILED_OVER,),
            A.FAILBACK: (ItemProtection.FAILED_OVER,),
            A.COMMIT: (ItemProtection.COMMITTED, ItemProtection.REPROTECTED),
            A.REPROTECT: (ItemProtection.REPROTECTED,),
            A.CANCEL: (ItemProtection.PROTECTED,)}.get(action, ())
    return item.status in want


def plan_summary(ctx: TaskContext) -> Step:
    tasks = ctx.s.scalars(select(Task).where(Task.job_id == ctx.job.id).order_by(Task.idx)).all()
    start = ctx.job.started_at or ctx.now
    group_end = max((float((t.data or {}).get("ended_at") or 0) for t in tasks if t.name == "plan_group"),
                    default=ctx.now)
    waiting = sum(float((t.data or {}).get("resumed_at") or 0) - float((t.data or {}).get("since") or 0)
                  for t in tasks if t.name == "plan_action" and (t.data or {}).get("resumed_at"))
    rto = max(0.0, group_end - start)
    ctx.put(rto_s=round(rto, 3), waiting_for_operators_s=round(waiting, 3))
    action = _action(ctx)
    if action in FAILOVER_KINDS:
        return done(f"plan {ctx.job.target}: {action.words} done; measured RTO "
                    f"{rto:.1f} s (request → last group's VMs running), of which {waiting:.1f} s "
                    "waiting for operators")
    return done(f"plan {ctx.job.target}: {action.words} done in {rto:.1f} s")


def plan_on_end(ctx: TaskContext, state: JobState) -> None:
    """Cancelling a plan cancels the item jobs it started that are still running."""
    if state == JobState.SUCCEEDED:
        return
    for t in ctx.s.scalars(select(Task).where(Task.job_id == ctx.job.id, Task.name == "plan_group")):
        for jid in dict((t.data or {}).get("jobs") or {}).values():
            job = ctx.s.get(Job, jid)
            if job is not None and job.state in (JobState.QUEUED, JobState.RUNNING) \
                    and state == JobState.CANCELLED:
                try:
                    request_cancel(ctx.s, job, ctx.now)
                except DrsiteError:
                    pass


PLAN_HANDLERS = JobHandlers(tasks={"plan_action": plan_action, "plan_group": plan_group,
                                   "plan_summary": plan_summary}, on_end=plan_on_end)
