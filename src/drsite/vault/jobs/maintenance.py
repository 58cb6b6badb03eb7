"""Task bodies of Resync (by hand) and PolicyAssociation."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from drsite.core.errors import DrsiteError, NotFound, from_dict
from drsite.core.retry import RetryState
from drsite.core.states import UNSTARTED_COMMAND_STATUSES, CommandStatus, ItemProtection, JobState
from drsite.replication.report import ItemState
from drsite.vault import commands
from drsite.vault.db.models import Command, Group, Host, Item, Policy, Vm
from drsite.vault.jobs.create import start_enable_protection
from drsite.vault.jobs.model import JobHandlers, Step, TaskContext, done, wait
from drsite.vault.membership import active_item_for_vm, vm_matches
from drsite.vault.policies import agent_settings

# ------------------------------------------------------------------------------------- Resync


def start_resync(ctx: TaskContext) -> Step:
    """Clears Critical (an operator acted), withdraws queued cycles and sends ``resync``
    (``by_hand``: the agent runs it now, whatever the window)."""
    item = ctx.item()
    data = ctx.data
    cmd = ctx.s.get(Command, data["command_id"]) if "command_id" in data else None
    if cmd is None:
        item.critical_error = None
        item.retry = RetryState().to_dict()
        if item.state == ItemState.CRITICAL:
            item.state = ItemState.RESYNC_REQUIRED
        commands.cancel_open(ctx.s, item.id, ctx.now, "a resync was started by hand")
        # compared with what the store can restore, not with the hydrated replica: damage in
        # the store is found and re-sent
        cmd = commands.enqueue(ctx.s, host_id=item.host_id, kind="resync", item_id=item.id,
                               args={"by_hand": True, "from_store": True}, now=ctx.now,
                               job_id=ctx.job.id)
        ctx.put(command_id=cmd.id)
    if cmd.status in UNSTARTED_COMMAND_STATUSES:
        return wait(30, "waiting for the agent to accept the resync")
    return done("resync started on the source host")


def resync(ctx: TaskContext) -> Step:
    item = ctx.item()
    first = ctx.sibling("start_resync")
    cmd_id = first.data.get("command_id") if first is not None else None
    cmd = ctx.s.get(Command, cmd_id) if cmd_id else None
    if cmd is None:
        raise NotFound("the resync command of this job is missing",
                       hint="Start the resync again.")
    if cmd.status == CommandStatus.SUCCEEDED:
        item.retry = RetryState().to_dict()
        point = dict((cmd.result or {}).get("point") or {})
        sent = int(point.get("bytes_written") or 0)
        pid = point.get("point_id") or "?"
        if sent:
            return done(f"resynchronized against what the store restores: {sent} bytes differed "
                        f"and were sent again (new point {pid})")
        return done(f"resynchronized: the source equals what the store restores (point {pid})")
    if cmd.status == CommandStatus.FAILED:
        err = from_dict(cmd.error)
        retry = RetryState.from_dict(item.retry or {})
        retry.record_failure(err, ctx.now)
        item.retry = retry.to_dict()
        if not err.transient:
            item.critical_error = err.to_dict()
            item.state = ItemState.CRITICAL
        raise err
    report = item.report or {}
    progress = float(report.get("progress") or cmd.progress or 0.0)
    return wait(progress, f"agent: {cmd.status}, {int(report.get('bytes_compared') or 0)} bytes compared")


def resync_on_end(ctx: TaskContext, state: JobState) -> None:
    item = ctx.s.get(Item, ctx.job.item_id) if ctx.job.item_id else None
    if item is not None and item.active_job_id == ctx.job.id:
        item.active_job_id = None


RESYNC_HANDLERS = JobHandlers(tasks={"start_resync": start_resync, "resync": resync},
                              on_end=resync_on_end)


# -------------------------------------------------------------------------- PolicyAssociation

def _group(s: Session, name: str) -> Group:
    group = s.scalars(select(Group).where(Group.name == name)).first()
    if group is None:
        raise NotFound(f"group {name} no longer exists")
    return group


def apply_settings(ctx: TaskContext) -> Step:
    """Sends ``update_settings`` with the group's policy to each protected item of the group
    (each item once per job: the ids are kept in the task's data)."""
    group = _group(ctx.s, str(ctx.job.args["group"]))
    policy = ctx.s.get(Policy, group.policy_id) if group.policy_id else None
    if policy is None:
        return done("the group has no policy; nothing to apply")
    sent = set(ctx.data.get("sent") or [])
    items = ctx.s.scalars(select(Item).where(Item.group_id == group.id,
                                             Item.status == ItemProtection.PROTECTED)).all()
    for item in items:
        if item.id in sent:
            continue
        commands.enqueue(ctx.s, host_id=item.host_id, kind="update_settings", item_id=item.id,
                         args={"settings": agent_settings(policy)}, now=ctx.now)
        sent.add(item.id)
    ctx.put(sent=sorted(sent), policy=policy.name)
    return done(f"policy {policy.name} sent to {len(sent)} protected item(s)")


def protect_vms(ctx: TaskContext) -> Step:
    """Starts an EnableProtection job for each present VM the group matches that has no item
    (and whose protection an operator did not disable)."""
    group = _group(ctx.s, str(ctx.job.args["group"]))
    if group.policy_id is None:
        return done("the group has no policy; no VM is protected by it")
    started: list[str] = list(ctx.data.get("started") or [])
    skipped: list[str] = []
    rows = ctx.s.execute(select(Vm, Host).join(Host, Host.id == Vm.host_id)
                         .where(Vm.present.is_(True), Vm.auto_protect_blocked.is_(False),
                                Host.revoked_at.is_(None), Host.site_id == group.site_id)
                         .order_by(Vm.id)).all()
    for vm, host in rows:
        if not vm_matches(group, vm, host) or active_item_for_vm(ctx.s, host.id, vm.vm_id):
            continue
        try:
            job, _item = start_enable_protection(ctx.s, vm=vm, host=host, group=group, now=ctx.now,
                                                 reason=f"policy association of group {group.name}")
        except DrsiteError as e:
            skipped.append(f"{vm.name}: {e.message}")
            continue
        started.append(job.id)
    ctx.put(started=started)
    msg = f"{len(started)} EnableProtection job(s) started"
    if skipped:
        msg += f"; skipped {'; '.join(skipped)}"
    return done(msg)


def associate_on_end(ctx: TaskContext, state: JobState) -> None:
    return None


ASSOCIATE_HANDLERS = JobHandlers(tasks={"apply_settings": apply_settings, "protect_vms": protect_vms},
                                 on_end=associate_on_end)
