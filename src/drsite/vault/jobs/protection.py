"""Task bodies of EnableProtection and DisableProtection (the seed's enable-protection job:
prerequisite checks → create replication relationship → initial replication → finalize).

Every body is resumable: it derives what to do from rows (the item, the commands it sent, whose
ids it keeps in its task data) and never repeats a side effect it already recorded, so the
runner can call it again after a vault restart.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import delete, select

from drsite.core.errors import (
    AuthError,
    DrsiteError,
    NetworkError,
    PeerUnavailable,
    PermanentError,
    VmNotFound,
    from_dict,
)
from drsite.core.retry import RetryState
from drsite.core.states import UNSTARTED_COMMAND_STATUSES, CommandStatus, ItemProtection, JobState
from drsite.replication.report import ItemState
from drsite.vault import commands, push, storeacl
from drsite.vault.audit import record_event
from drsite.vault.db.models import Command, Group, Host, Item, Point, Policy, Site, Vm
from drsite.vault.jobs.model import JobHandlers, Step, TaskContext, done, taken_meanwhile, wait
from drsite.vault.policies import agent_settings, parse_initial_start
from drsite.vault.retries import early_retry, store_sites_up
from drsite.vault.stores import CLOUD_STORE_URL, check_encryption, group_store, item_store_spec


def host_up(host: Host, ctx: TaskContext) -> bool:
    return (host.last_heartbeat is not None
            and ctx.now - host.last_heartbeat <= ctx.settings.agent_down_after_s)


def missed_beats(ctx: TaskContext, host: Host) -> float | None:
    """Seconds since ``host`` last beat when that is within ``store_gone_after_s`` — a host
    that missed a few heartbeats (a loaded vault or host), worth waiting for; None when it
    never beat or is silent for longer (gone: an operator must act)."""
    if host.last_heartbeat is None:
        return None
    age = ctx.now - host.last_heartbeat
    return age if age <= ctx.settings.store_gone_after_s else None


def waited_too_long(ctx: TaskContext) -> bool:
    """Prerequisites wait for agents at most max(60 s, 10 heartbeats) (a restarted vault has not
    heard from them yet), then fail."""
    limit = max(60.0, 10 * ctx.settings.heartbeat_interval)
    return ctx.task.started_at is not None and ctx.now - ctx.task.started_at > limit


def _policy(ctx: TaskContext, item: Item) -> Policy:
    group = ctx.s.get(Group, item.group_id)
    policy = ctx.s.get(Policy, group.policy_id) if group and group.policy_id else None
    if group is None or policy is None:
        raise PermanentError(f"group of item {item.id} has no policy any more",
                             hint="Associate a policy with the group, then protect the VM again.")
    return policy


def target_store(ctx: TaskContext, site_id: int) -> Host | None:
    """The host serving ``site_id``'s recovery store: the holder of its store role
    (``storerole``), not revoked and running a store."""
    return storeacl.site_store_host(ctx.s, site_id)


def store_unavailable(ctx: TaskContext, store: Host | None, site_name: str) -> DrsiteError:
    """Why the recovery store of ``site_name`` cannot be used now (``store`` is its host, or
    None: no host holds the site's store role and runs a store). *Transient*
    (``PeerUnavailable``) while its host is registered and was heard from within
    ``store_gone_after_s`` — it missed a few heartbeats (a loaded vault or host): a job keeps
    waiting; *permanent* once it is gone (never heard from, or silent for longer) or there is
    none: an operator must act."""
    if store is None:
        return PermanentError(f"no recovery store is online in target site {site_name}",
                              hint="Run an agent with --store-listen in the target site and "
                                   f"give it the store role: 'drsite sites set-store "
                                   f"{site_name} HOST'.")
    gone_after = ctx.settings.store_gone_after_s
    age = missed_beats(ctx, store)
    if age is not None:
        return PeerUnavailable(
            f"waiting for the recovery store of site {site_name}: its host {store.name} "
            f"missed heartbeats (last {age:.0f} s ago; gone after {gone_after:.0f} s)")
    if store.last_heartbeat is None:
        silent = "has sent no heartbeat since it registered"
    else:
        silent = f"has sent no heartbeat for {ctx.now - store.last_heartbeat:.0f} s"
    return PermanentError(
        f"the recovery store of site {site_name} is gone: its host {store.name} {silent}",
        hint=f"Start the store's agent on {store.name} ('drsite agent run --store-listen ...') "
             f"or give the store role to another host ('drsite sites set-store {site_name} "
             "HOST'), then protect the VM again.")


# --------------------------------------------------------------------------- EnableProtection

def prerequisites(ctx: TaskContext) -> Step:
    item = ctx.item()
    host = ctx.s.get(Host, item.host_id)
    if host is None or host.revoked_at is not None:
        raise AuthError(f"source host of {item.vm_name} is revoked",
                        hint="Register the host again, then protect the VM.")
    vm = ctx.s.scalars(select(Vm).where(Vm.host_id == host.id, Vm.vm_id == item.vm_id)).first()
    if vm is None or not vm.present:
        raise VmNotFound(f"VM {item.vm_name} is not reported by host {host.name}")
    policy = _policy(ctx, item)
    if not host_up(host, ctx):
        # like the store host below: one that missed a few beats under load is waited for
        # (at 5,000 items jobs failed "sends no heartbeats" for sources a few seconds late);
        # the job fails once the host is gone and the task waited its own limit
        # (waited_too_long; a task started before a long vault outage may still fail at the
        # first pass after it, before the host beats again: as before)
        age = missed_beats(ctx, host)
        if age is None and waited_too_long(ctx):
            raise NetworkError(f"host {host.name} sends no heartbeats",
                               hint="Start its agent ('drsite agent run'), then protect the VM again.")
        return wait(10, f"waiting for a heartbeat of host {host.name}" + (
            f" (it missed heartbeats: last {age:.0f} s ago; gone after "
            f"{ctx.settings.store_gone_after_s:.0f} s)" if age is not None else ""))
    site = ctx.s.get(Site, item.target_site_id)
    site_name = site.name if site else str(item.target_site_id)
    group = ctx.s.get(Group, item.group_id)
    cloud = group_store(ctx.s, group)
    if group is not None and cloud is not None:
        # no store agent needed: the source agent writes to the cloud store itself
        check_encryption(ctx.s, group, policy)
        ctx.put(store_url=CLOUD_STORE_URL + cloud.name, store_name=cloud.name,
                target_site=site_name, policy=policy.name)
        return done(f"VM {vm.name} on {host.name}; recovery store {cloud.name} ({cloud.kind}); "
                    f"failover to site {site_name}")
    if policy.encryption:
        raise PermanentError(f"policy {policy.name} asks for encryption; the agent store of "
                             f"site {site_name} does not encrypt at rest",
                             hint="Give the group an encrypted cloud store, or use a policy "
                                  "with encryption false.")
    store = target_store(ctx, item.target_site_id)
    if store is None or not host_up(store, ctx):
        # a store host that missed a few beats (under load) is waited for, however long the
        # job has waited; the job fails once it is gone (or there is none) and the task
        # waited its own limit (waited_too_long)
        why = store_unavailable(ctx, store, site_name)
        if not why.transient and waited_too_long(ctx):
            raise why
        return wait(50, why.message if why.transient
                    else f"waiting for a recovery store in site {site_name}")
    pending = storeacl.grant_pending(ctx.s, item, ctx.now)
    if pending is not None:
        # the store's agent confirms a new list at its next beat: a slow one is waited for; the
        # job fails when it waited store_gone_after_s and no list built in that time (or
        # since) was confirmed — the agent beats but does not take lists
        gone_after = ctx.settings.store_gone_after_s
        confirmed = store.store_acl_confirmed_at
        if (ctx.task.started_at is not None and ctx.now - ctx.task.started_at > gone_after
                and (confirmed is None or ctx.now - confirmed > gone_after)):
            raise PermanentError(f"the store agent of site {site_name} did not confirm the "
                                 "item's access grant", hint="Check that its agent runs and "
                                 "reaches the vault ('drsite hosts list').")
        return wait(60, pending)
    ctx.put(store_url=store.store_url, store_host=store.id, target_site=site_name,
            policy=policy.name)
    return done(f"VM {vm.name} on {host.name}; recovery store of {site_name} at {store.store_url}")


def _protect_args(ctx: TaskContext, item: Item) -> dict[str, Any]:
    pre = ctx.sibling("prerequisites")
    facts = dict(pre.data) if pre is not None else {}
    args = {"vm_id": item.vm_id, "target_site": facts.get("target_site"),
            "store_url": facts.get("store_url"), "settings": agent_settings(_policy(ctx, item))}
    args["point_key"] = storeacl.point_key(ctx.s, item.id, ctx.now)
    spec = item_store_spec(ctx.s, item)  # read now: credentials or keys may have changed
    if spec is not None:
        args["store"] = spec
        args["store_url"] = CLOUD_STORE_URL + str(spec["name"])
    return args


def _fmt(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def create_relationship(ctx: TaskContext) -> Step:
    item = ctx.item()
    data = ctx.data
    if "start_at" not in data:
        policy = _policy(ctx, item)
        start_at = parse_initial_start(policy.initial_replication_start, ctx.now,
                                       ctx.settings.minute_of_day(ctx.now))
        ctx.put(start_at=start_at)
        data["start_at"] = start_at
    if ctx.now < float(data["start_at"]):
        return wait(0, f"initial replication scheduled for {_fmt(float(data['start_at']))}")
    cmd = ctx.s.get(Command, data["command_id"]) if "command_id" in data else None
    if cmd is None:
        cmd = commands.enqueue(ctx.s, host_id=item.host_id, kind="protect", item_id=item.id,
                               args=_protect_args(ctx, item), now=ctx.now, job_id=ctx.job.id)
        ctx.put(command_id=cmd.id)
    if cmd.status in UNSTARTED_COMMAND_STATUSES:
        return wait(50, "waiting for the agent to accept the protect command")
    if cmd.status == CommandStatus.FAILED:
        err = from_dict(cmd.error)
        if not err.transient:
            raise err
        if data.get("failure_recorded_for") != cmd.id:
            retry = RetryState.from_dict(item.retry or {})
            retry.record_failure(err, ctx.now)
            item.retry = retry.to_dict()  # the item's health shows it (warning, with the reason)
            ctx.put(failure_recorded_for=cmd.id)
        return done(f"the agent failed transiently ({err.message}); initial replication retries")
    return done("replication relationship created on the source host")


def initial_replication(ctx: TaskContext) -> Step:
    """Waits for the agent's protect command to end (it ends when the first point is committed)
    or for the item's report to show a committed point. Transient failures are retried on the
    seed's schedule by sending ``protect`` again; a permanent one fails the job."""
    item = ctx.item()
    data = ctx.data
    cmd_id = data.get("command_id")
    if cmd_id is None:
        rel = ctx.sibling("create_relationship")
        cmd_id = rel.data.get("command_id") if rel is not None else None
        ctx.put(command_id=cmd_id)
    cmd = ctx.s.get(Command, cmd_id) if cmd_id else None
    report = item.report or {}
    if item.last_point_time is not None or (cmd is not None and cmd.status == CommandStatus.SUCCEEDED):
        # done when the point is also in the catalogue operators see (it arrives with the
        # agent's next heartbeat), so "protected" never shows an item without a point
        if ctx.s.scalars(select(Point.point_id).where(Point.item_id == item.id)).first():
            return done("first recovery point committed")
        push.want_heartbeat(ctx.s, item.host_id)  # the point comes with it: now
        return wait(99.0, "first point committed; waiting for it to reach the catalogue")
    retry = RetryState.from_dict(data.get("retry") or {})
    if cmd is None or cmd.status == CommandStatus.FAILED:
        if cmd is not None and data.get("failure_recorded_for") != cmd.id:
            err = from_dict(cmd.error)
            if not err.transient:
                raise err
            retry.record_failure(err, ctx.now)
            ctx.put(retry=retry.to_dict(), failure_recorded_for=cmd.id)
            # on the item too: its health says why initial replication does not progress
            item.retry = retry.to_dict()
            item.updated_at = ctx.now
        if early_retry(retry, store_sites_up(ctx.s, ctx.now, ctx.settings.agent_down_after_s)
                       .get(item.target_site_id), ctx.now, ctx.settings.heartbeat_interval):
            retry.next_attempt_at = ctx.now  # the other site's agent is back (vault/retries.py)
        if not retry.due(ctx.now):
            assert retry.next_attempt_at is not None
            last = (retry.last_error or {}).get("message", "")
            return wait(0, f"retry {retry.failures + 1} at {_fmt(retry.next_attempt_at)} after: {last}")
        cmd = commands.enqueue(ctx.s, host_id=item.host_id, kind="protect", item_id=item.id,
                               args=_protect_args(ctx, item), now=ctx.now, job_id=ctx.job.id)
        ctx.put(command_id=cmd.id)
    progress = float(report.get("progress") or cmd.progress or 0.0)
    total, sent = int(report.get("bytes_total") or 0), int(report.get("bytes_done") or 0)
    detail = f"{sent} of {total} bytes copied" if total else f"agent: {cmd.status}"
    return wait(progress, detail)


def finalize(ctx: TaskContext) -> Step:
    item = ctx.locked_item()   # the status is judged and written here
    if item.status != ItemProtection.ENABLING:
        # a break-glass failover recorded while protection was enabled (vault/breakglass.py):
        # the item is failed over; "protected" would hide that and schedule cycles
        raise taken_meanwhile(item, "its protection was enabled")
    item.status = ItemProtection.PROTECTED
    if item.state in (ItemState.NEW, ItemState.INITIAL_REPLICATION):
        item.state = ItemState.PROTECTED
    item.retry = RetryState().to_dict()
    item.critical_error = None
    item.last_cycle_sent_at = item.last_point_time or ctx.now
    item.last_retention_at = ctx.now
    item.updated_at = ctx.now
    record_event(ctx.s, ctx.now, "item", item.id, f"{item.vm_name} is protected")
    return done(f"{item.vm_name} is protected; delta replication follows the policy")


def _protect_sent(ctx: TaskContext) -> bool:
    return ctx.s.scalars(select(Command.id).where(Command.job_id == ctx.job.id,
                                                  Command.kind == "protect")).first() is not None


def _retire_item(ctx: TaskContext, item: Item, status: ItemProtection) -> None:
    item.status = status
    item.vm_ref = None
    item.updated_at = ctx.now
    commands.cancel_open(ctx.s, item.id, ctx.now, f"item {status}")


def enable_rollback(ctx: TaskContext) -> Step:
    """After a cancel: tell the agent to unprotect (deleting the points it made), wait for it
    (at most ``rollback_timeout_s``), and retire the item. An item failed over meanwhile (a
    break-glass failover, ``vault/breakglass.py``) is left as it is: its points are what its
    recovery VM came from."""
    item = ctx.locked_item()
    data = ctx.data
    if item.status != ItemProtection.ENABLING:   # asked again while waiting, too
        cmd = ctx.s.get(Command, data["command_id"]) if "command_id" in data else None
        what = f"{item.vm_name} is {item.status} now" + (
            f" (failover {item.failover_id})" if item.failover_id else "")
        if cmd is not None and cmd.sent_at is not None:
            # delivered before the failover was known: it cannot be recalled
            msg = (f"{what}: nothing more undone; unprotect {cmd.id} had been delivered to "
                   f"its host before: it may have deleted the item's points (check: drsite "
                   f"items points {item.id})")
            record_event(ctx.s, ctx.now, "item", item.id, msg)
            return done(msg)
        return done(f"{what}: nothing undone, its points are kept")
    if not _protect_sent(ctx):
        _retire_item(ctx, item, ItemProtection.REMOVED)
        return done("nothing was sent to the agent; nothing to undo")
    cmd = ctx.s.get(Command, data["command_id"]) if "command_id" in data else None
    if cmd is None:
        commands.cancel_open(ctx.s, item.id, ctx.now, "enable protection cancelled")
        cmd = commands.enqueue(ctx.s, host_id=item.host_id, kind="unprotect", item_id=item.id,
                               args={"delete_points": True}, now=ctx.now, job_id=ctx.job.id)
        storeacl.enqueue_store_purge(ctx.s, item, ctx.now, ctx.job.id)
        ctx.put(command_id=cmd.id, since=ctx.now)
    if cmd.status == CommandStatus.SUCCEEDED:
        _retire_item(ctx, item, ItemProtection.REMOVED)
        return done("the agent stopped protecting the VM and deleted its points")
    timed_out = ctx.now - float(data.get("since", ctx.now)) > ctx.settings.rollback_timeout_s
    if cmd.status == CommandStatus.FAILED or timed_out:
        _retire_item(ctx, item, ItemProtection.REMOVED)
        why = "failed" if cmd.status == CommandStatus.FAILED else "was not confirmed in time"
        return done(f"unprotect {why}; the agent gets it when it returns (command {cmd.id})")
    return wait(50, "waiting for the agent to unprotect the VM")


def enable_on_end(ctx: TaskContext, state: JobState) -> None:
    item = ctx.locked_item_or_none()
    if item is None:
        return
    if item.active_job_id == ctx.job.id:
        item.active_job_id = None
    if state == JobState.FAILED and item.status == ItemProtection.ENABLING:
        if _protect_sent(ctx):
            commands.cancel_open(ctx.s, item.id, ctx.now, "enable protection failed")
            commands.enqueue(ctx.s, host_id=item.host_id, kind="unprotect", item_id=item.id,
                             args={"delete_points": True}, now=ctx.now, job_id=ctx.job.id)
            storeacl.enqueue_store_purge(ctx.s, item, ctx.now, ctx.job.id)
        _retire_item(ctx, item, ItemProtection.FAILED)
    elif state == JobState.CANCELLED and item.status == ItemProtection.ENABLING:
        _retire_item(ctx, item, ItemProtection.REMOVED)


ENABLE_HANDLERS = JobHandlers(
    tasks={"prerequisites": prerequisites, "create_relationship": create_relationship,
           "initial_replication": initial_replication, "finalize": finalize},
    on_end=enable_on_end, rollback=enable_rollback)


# -------------------------------------------------------------------------- DisableProtection

def stop_replication(ctx: TaskContext) -> Step:
    item = ctx.item()
    host = ctx.s.get(Host, item.host_id)
    if host is None or host.revoked_at is not None:
        return done("source host is revoked; nothing to stop there")
    data = ctx.data
    cmd = ctx.s.get(Command, data["command_id"]) if "command_id" in data else None
    if cmd is None:
        commands.cancel_open(ctx.s, item.id, ctx.now, "protection disabled")
        cmd = commands.enqueue(ctx.s, host_id=item.host_id, kind="unprotect", item_id=item.id,
                               args={"delete_points": bool(ctx.job.args.get("delete_points"))},
                               now=ctx.now, job_id=ctx.job.id)
        ctx.put(command_id=cmd.id)
    if cmd.status == CommandStatus.SUCCEEDED:
        if not ctx.job.args.get("delete_points"):
            return done("the agent stopped replicating the VM")
        return _purge_store(ctx, item)
    if cmd.status == CommandStatus.FAILED:
        raise from_dict(cmd.error)
    if not host_up(host, ctx):
        return wait(30, f"waiting for host {host.name} (no heartbeat)")
    return wait(50, f"waiting for the agent ({cmd.status})")


def _purge_store(ctx: TaskContext, item: Item) -> Step:
    """A site-store item's points are deleted by the store's own agent (remote clients may not
    delete committed objects): send it ``retention`` with ``delete_all`` and wait for it."""
    data = ctx.data
    purge = ctx.s.get(Command, data["purge_command_id"]) if "purge_command_id" in data else None
    if purge is None:
        purge = storeacl.enqueue_store_purge(ctx.s, item, ctx.now, ctx.job.id)
        if purge is None:
            return done("the agent stopped replicating the VM and deleted its points")
        ctx.put(purge_command_id=purge.id)
    if purge.status == CommandStatus.SUCCEEDED:
        return done("the agent stopped replicating the VM; the store's agent deleted its points")
    if purge.status == CommandStatus.FAILED:
        raise from_dict(purge.error)
    return wait(80, f"waiting for the store's agent to delete the points ({purge.status})")


def remove_item(ctx: TaskContext) -> Step:
    item = ctx.item()
    _retire_item(ctx, item, ItemProtection.REMOVED)
    ctx.s.execute(delete(Point).where(Point.item_id == item.id))
    vm = ctx.s.scalars(select(Vm).where(Vm.host_id == item.host_id, Vm.vm_id == item.vm_id)).first()
    if vm is not None:
        vm.auto_protect_blocked = True  # the group's policy must not protect it again by itself
    record_event(ctx.s, ctx.now, "item", item.id, f"protection of {item.vm_name} disabled")
    return done("item removed from the vault")


def disable_on_end(ctx: TaskContext, state: JobState) -> None:
    item = ctx.locked_item_or_none()
    if item is None:
        return
    if item.active_job_id == ctx.job.id:
        item.active_job_id = None
    if state in (JobState.FAILED, JobState.CANCELLED) and item.status == ItemProtection.DISABLING:
        item.status = ItemProtection.PROTECTED  # still protected: the operator may try again
        item.updated_at = ctx.now


DISABLE_HANDLERS = JobHandlers(tasks={"stop_replication": stop_replication, "remove_item": remove_item},
                               on_end=disable_on_end)
