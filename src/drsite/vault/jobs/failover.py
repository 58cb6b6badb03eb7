"""Task bodies of the failover jobs: test failover and its cleanup, planned and unplanned
failover, commit, cancel, change of recovery point, re-protect.

A failover has two halves on two hosts: the **primary** host (the item's source agent: shut the
VM down and ship the last changes; after a cancel, take the item back) and the **recovery**
host (the target site's agent that serves the item's store and holds its replica: everything
else). Each task sends one command (its id kept in the task's data, so calling the body again
re-reads it instead of sending again) and waits for its result; the agent side is idempotent
per ``failover_id`` (``agent/failover.py``), so a command delivered twice resumes or repeats
its result. The vault's ``failovers`` row mirrors the agent's record (state, point, VM, RTO).

Item ``status`` through a failover: ``protected`` → (planned/unplanned) ``failed_over`` →
``committed`` (unprotected; after an unplanned failover until re-protected) → ``reprotected``
(a reverse item, ``origin_item_id`` = this one, replicates the failed-over VM back); cancel →
``protected`` again with a new generation. A test failover leaves the item ``protected``.

No VM of an item runs on both sites: the primary's VM is off before the recovery VM starts
(planned), or the promotion is written before it starts (unplanned: the old primary's engine is
fenced by generation); re-protect powers the old primary's VM off before using its disks.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from drsite.core.actions import POINT_CHOICES
from drsite.core.errors import (
    Conflict,
    DrsiteError,
    InvalidInput,
    NetworkError,
    PermanentError,
    from_dict,
)
from drsite.core.model import VmSpec
from drsite.core.retry import RetryState
from drsite.core.states import (
    FINAL_COMMAND_STATUSES,
    OPEN_COMMAND_STATUSES,
    CommandStatus,
    FailoverState,
    ItemProtection,
    JobState,
)
from drsite.failover.wire import network_map_from_args, vm_spec_from_dict
from drsite.replication.report import Health, ItemState
from drsite.vault import commands, fencing, push, storeacl
from drsite.vault.audit import record_event
from drsite.vault.db.models import (
    Command,
    Failover,
    Group,
    Host,
    Item,
    Job,
    NetworkMapping,
    Point,
    Site,
    Vm,
)
from drsite.vault.ids import new_id
from drsite.vault.jobs.model import JobHandlers, Step, TaskContext, done, taken_meanwhile, wait
from drsite.vault.jobs.protection import _policy, host_up, target_store, waited_too_long
from drsite.vault.membership import vm_ref
from drsite.vault.policies import agent_settings
from drsite.vault.retries import EARLY_RETRY_CODES, store_came_back
from drsite.vault.scrub import failover_point
from drsite.vault.stores import store_spec
from drsite.vault.vmrows import vm_row

TRANSIENT_RETRIES = 3


# ------------------------------------------------------------------------------ helpers

def failover_row(ctx: TaskContext) -> Failover:
    fid = ctx.job.args.get("failover_id")
    fo = ctx.s.get(Failover, fid) if fid else None
    if fo is None:
        raise PermanentError(f"job {ctx.job.id} names no known failover ({fid})")
    return fo


def site_name(ctx: TaskContext, site_id: int) -> str:
    site = ctx.s.get(Site, site_id)
    return site.name if site else str(site_id)


def recovery_host(ctx: TaskContext, item: Item) -> Host | None:
    """The host that runs the item's recovery side: the target site's store host, or (cloud
    store groups) the most recently heard host of the target site."""
    group = ctx.s.get(Group, item.group_id)
    if group is not None and group.store_id is not None:
        return ctx.s.scalars(select(Host).where(Host.site_id == item.target_site_id,
                                                Host.revoked_at.is_(None))
                             .order_by(Host.last_heartbeat.desc())).first()
    return target_store(ctx, item.target_site_id)


def network_rows(ctx: TaskContext, source_site_id: int, recovery_site_id: int) -> list[dict[str, Any]]:
    return _network_rows(ctx.s, source_site_id, recovery_site_id)


def _network_rows(s: Session, source_site_id: int, recovery_site_id: int) -> list[dict[str, Any]]:
    rows = s.scalars(select(NetworkMapping).where(
        NetworkMapping.source_site_id == source_site_id,
        NetworkMapping.recovery_site_id == recovery_site_id).order_by(NetworkMapping.source_network))
    return [{"source": r.source_network, "recovery": r.recovery_network, "test": r.test_network,
             "ip_rule": dict(r.ip_rule)} for r in rows]


def vm_spec_of(ctx: TaskContext, item: Item) -> dict[str, Any]:
    """The protected VM's configuration: the inventory's last report (kept when the host is
    gone: an unplanned failover must not need the source), snapshotted into the item."""
    return _vm_spec(ctx.s, item, keep=True)


def _vm_spec(s: Session, item: Item, *, keep: bool) -> dict[str, Any]:
    """:func:`vm_spec_of`; ``keep``: snapshot it into the item (else nothing is written)."""
    vm = s.scalars(select(Vm).where(Vm.host_id == item.host_id, Vm.vm_id == item.vm_id)).first()
    if vm is not None:
        info = vm.info or {}
        spec = {"name": vm.name, "vcpus": info.get("vcpus") or 1,
                "memory_mib": info.get("memory_mib") or 512,
                "nics": [{"network": n.get("network"), "mac": n.get("mac"), "ip": n.get("ip")}
                         for n in info.get("nics") or []],
                "disks": [{"disk_id": d.get("disk_id"), "size": d.get("size")}
                          for d in info.get("disks") or []]}
        if keep and spec != item.vm_spec:
            item.vm_spec = spec
        return spec
    if item.vm_spec:
        return dict(item.vm_spec)
    raise PermanentError(f"the vault has no configuration of VM {item.vm_name}",
                         hint="Wait for its host to report its inventory once.")


def _source_site_id(s: Session, item: Item) -> int:
    """The site the item's VM is protected from (its host's; the recovery site when the host
    row is gone, as an unplanned failover must not need it)."""
    src = s.get(Host, item.host_id)
    return src.site_id if src is not None else item.target_site_id


def item_context(ctx: TaskContext, item: Item, fo: Failover) -> dict[str, Any]:
    """The arguments every recovery-side command carries: what the item is, without asking
    the source."""
    src_site = _source_site_id(ctx.s, item)
    args: dict[str, Any] = {
        "failover_id": fo.id, "vm_id": item.vm_id, "vm_spec": vm_spec_of(ctx, item),
        "source_site": site_name(ctx, src_site), "recovery_site": site_name(ctx, item.target_site_id),
        "network_map": network_rows(ctx, src_site, item.target_site_id)}
    store = store_spec_for(ctx, item)
    if store is not None:
        args["store"] = store
    return args


def store_spec_for(ctx: TaskContext, item: Item) -> dict[str, Any] | None:
    """The cloud store spec (with credentials) when the item's group replicates to one."""
    group = ctx.s.get(Group, item.group_id)
    if group is None or group.store_id is None:
        return None
    return store_spec(ctx.s, group.store_id)


def run_command(ctx: TaskContext, host: Host | None, kind: str, args: dict[str, Any], *,
                item_id: str, key: str = "command_id", progress: float = 30.0) -> Command | Step:
    """Send ``kind`` once (its id in the task's data under ``key``) and report where it is: the
    succeeded command, or a ``wait`` step. A permanent failure raises its error. A transient
    one is sent again (same arguments: the agent resumes): ``TRANSIENT_RETRIES`` times at
    once, two and four heartbeat intervals later (an agent being restarted is back by then;
    a failure to reach the item's store is sent again as soon as the store's host heartbeats
    after it: ``_store_back``), then on the seed's schedule (1, 2, 4, 8, 10 min, then every
    30 min; ``core.retry``), the job's message naming the error and the next attempt — a full
    disk is retried once space exists, never waited out in silence."""
    if host is None or host.revoked_at is not None:
        raise NetworkError(f"no host to run {kind} of item {item_id}",
                           hint="Start (or register) the agent of that site, then try again.")
    data = ctx.data
    cmd = ctx.s.get(Command, data[key]) if key in data else None
    if cmd is not None and cmd.status == CommandStatus.FAILED:
        err = from_dict(cmd.error)
        if not err.transient:
            raise err
        tries = int(data.get(f"{key}_tries") or 0)
        spacing = 2 * ctx.settings.heartbeat_interval * tries   # 0, 2, 4 heartbeats: a
        since = ctx.now - (cmd.finished_at or ctx.now)            # restarting agent is back
        if tries < TRANSIENT_RETRIES and since < spacing and not _store_back(ctx, item_id, err,
                                                                               cmd):
            return wait(max(progress, cmd.progress),
                        f"{kind} on host {host.name} failed ({err.code}): {err.message}; sending "
                        f"it again in {spacing - since:.0f} s")
        if tries >= TRANSIENT_RETRIES:
            retry = RetryState.from_dict(dict(data.get(f"{key}_retry") or {}))
            if data.get(f"{key}_retry_for") != cmd.id:  # count each failed command once
                retry.record_failure(err, ctx.now)
                ctx.put(**{f"{key}_retry": retry.to_dict(), f"{key}_retry_for": cmd.id})
            if not retry.due(ctx.now):
                left = (retry.next_attempt_at or ctx.now) - ctx.now
                return wait(max(progress, cmd.progress),
                            f"{kind} on host {host.name} failed ({err.code}): {err.message}; "
                            f"next attempt in {left:.0f} s ({err.hint or 'cancel the job to give up'})")
        ctx.put(**{f"{key}_tries": tries + 1})
        cmd = None
    if cmd is None:
        if kind != "run_script":  # the item's point key (scrubbed when the command ends)
            args = {**args, "point_key": storeacl.point_key(ctx.s, item_id, ctx.now)}
        if kind == "reprotect_seed":
            args["rev_point_key"] = storeacl.point_key(ctx.s, str(args["rev_item_id"]), ctx.now)
        cmd = commands.enqueue(ctx.s, host_id=host.id, kind=kind, item_id=item_id, args=args,
                               now=ctx.now, job_id=ctx.job.id)
        ctx.put(**{key: cmd.id})
    if cmd.status == CommandStatus.SUCCEEDED:
        return cmd
    if not host_up(host, ctx):
        if cmd.status == CommandStatus.PENDING:
            return wait(progress * 0.5, f"waiting for host {host.name} (no heartbeat); {kind} "
                                        "is queued for it (cancel the job to give up)")
        # delivered: the host may be doing it — a cancel of this job does not stop it, and
        # what it did is recorded when it answers (``apply_late_result``)
        return wait(max(progress, cmd.progress) * 0.5,
                    f"waiting for host {host.name} (no heartbeat): it took {kind} "
                    f"({cmd.status}) and has not answered since; if this job is cancelled, what "
                    "the host did is recorded once it is back")
    return wait(max(progress, cmd.progress), f"{kind} on host {host.name}: {cmd.status}")


def _store_back(ctx: TaskContext, item_id: str, err: DrsiteError, cmd: Command) -> bool:
    """A command that could not reach the item's recovery store, whose host has heartbeated
    since: it is back (the usual cause: that agent was restarting) — send it again now rather
    than after the spacing (still at most ``TRANSIENT_RETRIES`` times)."""
    if err.code not in EARLY_RETRY_CODES:  # (store_came_back checks it too) no query for others
        return False
    item = ctx.s.get(Item, item_id)
    store = storeacl.store_host(ctx.s, item) if item is not None else None
    return store is not None and store_came_back(err.code, cmd.finished_at, store.last_heartbeat)


def register_recovery_vm(ctx: TaskContext, fo: Failover) -> None:
    _register_recovery_vm(ctx.s, fo, ctx.now)


def _register_recovery_vm(s: Session, fo: Failover, now: float) -> None:
    """Known to the inventory before its host reports it, and never auto-protected by a group
    (its protection is the failover's re-protect)."""
    if not fo.recovery_host_id or not fo.vm_id:
        return
    host_id, vm_id = fo.recovery_host_id, fo.vm_id
    row, _new = vm_row(s, host_id, vm_id, lambda: Vm(
        host_id=host_id, vm_id=vm_id, name=(fo.vm_name or vm_id)[:64], info={}, present=False,
        first_seen=now, last_seen=now, auto_protect_blocked=True))
    row.auto_protect_blocked = True


def apply_late_result(s: Session, cmd: Command, now: float) -> None:
    """A ``failover`` command that ended *after* its job did: the job was cancelled (or failed)
    while the recovery host held the command — hung, partitioned — and the host then went on
    and started the recovery VM. The vault records what happened instead of a cancelled
    failover with no VM: the failover takes the state the host reports (pending commit, or a
    test VM running) with its VM, the item is failed over as after a success (an unplanned
    failover's old primary is fenced), and the item's health is critical until an operator
    commits or cancels it (``health.failover_health``). When another job already holds the
    item (a cancel that will delete that VM), only the fact is recorded."""
    if cmd.kind != "failover" or cmd.status != CommandStatus.SUCCEEDED or cmd.job_id is None:
        return
    job = s.get(Job, cmd.job_id)
    if job is None or job.state not in (JobState.CANCELLED, JobState.FAILED):
        return  # a running job reads the result itself; a cancelling one in its end hook
    _adopt_late_start(s, cmd, job, JobState(job.state), now)


def _adopt_late_start(s: Session, cmd: Command, job: Job, ended_as: JobState,
                      now: float) -> None:
    fid = str((cmd.args or {}).get("failover_id") or "")
    fo = s.get(Failover, fid) if fid else None
    item = s.get(Item, cmd.item_id) if cmd.item_id else None
    if fo is None or item is None or fo.state not in (FailoverState.CANCELLED,
                                                      FailoverState.FAILED):
        return
    rec = dict((cmd.result or {}).get("failover") or {})
    late = {"job_id": job.id, "job_state": str(ended_as), "at": now,
            "vm_id": rec.get("vm_id"), "state": rec.get("state")}
    where = s.get(Host, cmd.host_id)
    host = where.name if where is not None else cmd.host_id
    if item.active_job_id is not None and item.active_job_id != job.id:
        fo.result = {**dict(fo.result or {}), "late_start": {**late, "superseded_by":
                                                               item.active_job_id}}
        fo.updated_at = now
        record_event(s, now, "item", item.id,
                     f"the recovery VM of failover {fo.id} started on host {host} after its job "
                     f"was {ended_as}; job {item.active_job_id}, now running, decides its fate")
        return
    apply_failover_result(fo, cmd.result, now)
    fo.result = {**dict(fo.result or {}), "late_start": late}
    _register_recovery_vm(s, fo, now)
    if fo.kind != "test":
        storeacl.set_status(item, ItemProtection.FAILED_OVER, now)
        item.failover_id = fo.id
        item.updated_at = now
        commands.cancel_open(s, item.id, now, "item failed over")
        if fo.kind == "unplanned":
            site = s.get(Site, item.target_site_id)
            fencing.request_fence(s, item, fo, site.name if site else str(item.target_site_id),
                                  now)
    record_event(s, now, "item", item.id,
                 f"the recovery VM {fo.vm_name} of {fo.kind} failover {fo.id} started on host "
                 f"{host} after its job was {ended_as}: the failover is {fo.state} (commit or "
                 "cancel it)")


def apply_failover_result(fo: Failover, result: dict[str, Any] | None, now: float) -> None:
    rec = dict((result or {}).get("failover") or {})
    if not rec:
        return
    if rec.get("state") is not None:
        try:
            fo.state = FailoverState(rec["state"])
        except ValueError:
            raise InvalidInput(f"failover {fo.id}: the agent reported an unknown state "
                               f"{str(rec['state'])[:40]!r}") from None
    fo.point_id = rec.get("point_id") or fo.point_id
    fo.point_created_at = rec.get("point_created_at") or fo.point_created_at
    fo.vm_name = rec.get("vm_name") or fo.vm_name
    fo.vm_id = rec.get("vm_id") or fo.vm_id
    fo.generation = int(rec.get("generation") or 0) or fo.generation
    fo.rto_s = rec.get("rto_s") if rec.get("rto_s") is not None else fo.rto_s
    fo.notes = list(rec.get("notes") or fo.notes or [])
    fo.result = {**dict(fo.result or {}), "agent": rec}
    fo.updated_at = now


def record_wall_time(fo: Failover, now: float) -> float:
    """What the operator waited: request (the failover row's creation) → recovery VM running,
    kept next to the agent's own RTO (``rto_s``: the recovery host's part only)."""
    wall = round(max(0.0, now - fo.created_at), 3)
    fo.result = {**dict(fo.result or {}), "wall_s": wall}
    return wall


def _rto_text(fo: Failover) -> str:
    wall = (fo.result or {}).get("wall_s")
    return (f"RTO {fo.rto_s or 0:.2f} s on the recovery host"
            + (f", {wall:.2f} s since the request" if wall is not None else ""))


def _point_choice(ctx: TaskContext) -> str:
    return str(ctx.job.args.get("point") or "latest")


# ------------------------------------------------------------------------------ checks

def failover_checks(ctx: TaskContext) -> Step:
    """The recovery host is up, the item has a point to fail over to (the point chosen exists
    in the catalogue), every NIC's network is mapped (to a test network for a test failover);
    for a planned failover the source host must be up too."""
    item = ctx.item()
    fo = failover_row(ctx)
    host = recovery_host(ctx, item)
    target = site_name(ctx, item.target_site_id)
    if host is None or not host_up(host, ctx):
        if waited_too_long(ctx):
            raise NetworkError(f"no agent is online in recovery site {target}",
                               hint="Start the recovery site's agent, then fail over again.")
        return wait(20, f"waiting for an agent of recovery site {target}")
    if fo.kind == "planned":
        src = ctx.s.get(Host, item.host_id)
        if src is None or not host_up(src, ctx):
            if waited_too_long(ctx):
                raise NetworkError(f"source host of {item.vm_name} is not reachable; a planned "
                                   "failover needs it",
                                   hint=f"Use an unplanned failover: drsite failover unplanned "
                                        f"{item.id}")
            return wait(40, "waiting for the source host")
    choice = _point_choice(ctx)
    # checked when the job was created (item_actions.preflight); again now, the catalogue and
    # the mappings may have changed since (a plan's items start without them)
    spec = check_ready(ctx.s, item, fo.kind, choice, keep=True)
    # a point the scrub or a verify found damaged is refused; latest falls back to an intact one
    usable, note = failover_point(ctx.s, item, choice)
    if usable != choice:
        ctx.job.args = {**dict(ctx.job.args), "point": usable}
        fo.notes = [*list(fo.notes or []), note]
        ctx.put(point_note=note)
    fo.recovery_host_id = host.id
    fo.updated_at = ctx.now
    ctx.put(recovery_host=host.id, recovery_site=target)
    return done(f"recovery on host {host.name} (site {target}); networks mapped for "
                f"{len(spec.nics)} NIC(s)")


def check_ready(s: Session, item: Item, kind: str, choice: str, *,
                keep: bool = False) -> VmSpec:
    """The checks of a failover of ``kind`` to point ``choice`` that need no agent: the item
    has a point (an app-consistent one for ``latest_app``; the one named, if named), the vault
    knows the VM's configuration, and every NIC's network is mapped to the recovery site (to a
    test network for a test failover). Raises ``InvalidInput`` with what to do; returns the
    VM's configuration, and writes nothing unless ``keep`` (it is then snapshotted into the
    item: :func:`vm_spec_of`). Run before a failover job is created (a refusal, not a failed
    job) and again by its first step."""
    points = s.execute(select(Point.point_id, Point.consistency)
                       .where(Point.item_id == item.id)).all()
    if not points:
        raise InvalidInput(f"{item.vm_name} has no recovery point yet",
                           hint="Wait for its initial replication to finish "
                                f"('drsite items show {item.id}' shows its progress).")
    if choice == "latest_app" and not any(c == "app" for _, c in points):
        raise InvalidInput(f"{item.vm_name} has no app-consistent recovery point",
                           hint=f"Choose 'latest' or a point id ('drsite items points "
                                f"{item.id}' lists them).")
    if choice not in POINT_CHOICES and not any(p == choice for p, _ in points):
        raise InvalidInput(f"recovery point {choice} of {item.vm_name} is not in the catalogue",
                           hint=f"List its points: drsite items points {item.id}")
    try:
        spec = vm_spec_from_dict(_vm_spec(s, item, keep=keep))
    except PermanentError as e:
        raise InvalidInput(e.message, hint=e.hint) from None
    network_map_from_args(_network_rows(s, _source_site_id(s, item), item.target_site_id)).check(
        spec, test=kind == "test")
    return spec


def _recovery(ctx: TaskContext, fo: Failover) -> Host | None:
    return ctx.s.get(Host, fo.recovery_host_id) if fo.recovery_host_id else None


# ------------------------------------------------------------------------------ test failover

def start_test_vm(ctx: TaskContext) -> Step:
    item = ctx.item()
    fo = failover_row(ctx)
    args = {**item_context(ctx, item, fo), "kind": "test", "point": _point_choice(ctx)}
    if ctx.job.args.get("vm_name"):
        args["vm_name"] = ctx.job.args["vm_name"]
    got = run_command(ctx, _recovery(ctx, fo), "failover", args, item_id=item.id)
    if isinstance(got, Step):
        return got
    apply_failover_result(fo, got.result, ctx.now)
    record_wall_time(fo, ctx.now)
    register_recovery_vm(ctx, fo)
    record_event(ctx.s, ctx.now, "item", item.id,
                 f"test failover {fo.id}: VM {fo.vm_name} runs from point {fo.point_id}")
    return done(f"test VM {fo.vm_name} runs from point {fo.point_id} in the test network "
                f"({_rto_text(fo)}); replication goes on")


def cleanup_test_vm(ctx: TaskContext) -> Step:
    item = ctx.item()
    fo = failover_row(ctx)
    args = {**item_context(ctx, item, fo), "notes": str(ctx.job.args.get("notes") or "")}
    got = run_command(ctx, _recovery(ctx, fo), "failover_cleanup", args, item_id=item.id)
    if isinstance(got, Step):
        return got
    apply_failover_result(fo, got.result, ctx.now)
    return done(f"test VM {fo.vm_name} removed")


# ------------------------------------------------------------------------- planned / unplanned

def shutdown_source(ctx: TaskContext) -> Step:
    item = ctx.locked_item()   # the status is judged and written here
    fo = failover_row(ctx)
    _taken_by_another(item, fo)
    src = ctx.s.get(Host, item.host_id)
    item.status = ItemProtection.FAILING_OVER  # the source VM goes off: no cycles; a failure needs a cancel
    args = {"failover_id": fo.id,
            "shutdown_timeout": float(ctx.job.args.get("shutdown_timeout") or 60.0)}
    got = run_command(ctx, src, "failover_prepare", args, item_id=item.id)
    if isinstance(got, Step):
        return got
    res = dict(got.result or {})
    fo.point_id = str(res.get("point_id"))
    fo.result = {**dict(fo.result or {}), "source": res}
    fo.updated_at = ctx.now
    item.status = ItemProtection.FAILING_OVER
    return done(f"source VM off; last changes shipped as point {fo.point_id}")


def _taken_by_another(item: Item, fo: Failover) -> None:
    """A failover this job did not run holds the item (a break-glass failover recorded while
    this job waited, ``vault/breakglass.py``): this one must not start a second VM."""
    if item.status in (ItemProtection.FAILED_OVER, ItemProtection.COMMITTED) \
            and item.failover_id not in (None, fo.id):
        raise Conflict(f"{item.vm_name} was failed over by failover {item.failover_id} "
                       "meanwhile (a break-glass failover on the recovery site)",
                       hint=f"Commit or cancel that one: drsite failover list {item.id}")


def start_replica(ctx: TaskContext) -> Step:
    item = ctx.locked_item()   # the status is judged and written here
    fo = failover_row(ctx)
    _taken_by_another(item, fo)
    # from the moment the recovery side may promote, the item is not plainly protected: no
    # cycles are scheduled, and a failure leaves it 'failed_over' for cancel (see on_end)
    item.status = ItemProtection.FAILING_OVER
    args = {**item_context(ctx, item, fo), "kind": fo.kind, "point": _point_choice(ctx)}
    if fo.kind == "planned":
        src = dict((fo.result or {}).get("source") or {})
        args.update(point_id=src.get("point_id"), fingerprints=src.get("fingerprints") or {})
        if ctx.job.args.get("vm_name"):
            args["vm_name"] = ctx.job.args["vm_name"]
    if ctx.job.args.get("replace_vm"):  # the stale VM of the item's origin (item_actions)
        args["replace_vm"] = ctx.job.args["replace_vm"]
    got = run_command(ctx, _recovery(ctx, fo), "failover", args, item_id=item.id)
    if isinstance(got, Step):
        return got
    apply_failover_result(fo, got.result, ctx.now)
    record_wall_time(fo, ctx.now)
    register_recovery_vm(ctx, fo)
    storeacl.set_status(item, ItemProtection.FAILED_OVER, ctx.now)
    item.failover_id = fo.id
    item.updated_at = ctx.now
    commands.cancel_open(ctx.s, item.id, ctx.now, "item failed over")
    if fo.kind == "unplanned":
        # the source was not asked: fence it (now, or whenever its agent is back)
        fencing.request_fence(ctx.s, item, fo, site_name(ctx, item.target_site_id), ctx.now)
    record_event(ctx.s, ctx.now, "item", item.id,
                 f"{fo.kind} failover {fo.id}: {fo.vm_name} runs on the recovery site from point "
                 f"{fo.point_id} (generation {fo.generation}); commit or cancel it")
    proof = "; replica equals the stopped source (no data lost)" if fo.kind == "planned" else ""
    return done(f"{fo.vm_name} runs on the recovery site from point {fo.point_id}, "
                f"{_rto_text(fo)}{proof}")


# ------------------------------------------------------------------------------ after failover

def commit(ctx: TaskContext) -> Step:
    item = ctx.item()
    fo = failover_row(ctx)
    got = run_command(ctx, _recovery(ctx, fo), "failover_commit", item_context(ctx, item, fo),
                      item_id=item.id)
    if isinstance(got, Step):
        return got
    apply_failover_result(fo, got.result, ctx.now)
    storeacl.set_status(item, ItemProtection.COMMITTED, ctx.now)
    item.updated_at = ctx.now
    ctx.s.query(Point).filter(Point.item_id == item.id, Point.point_id != fo.point_id).delete()
    record_event(ctx.s, ctx.now, "item", item.id, f"failover {fo.id} committed")
    return done(f"failover committed; {fo.vm_name} is the primary (other points discarded)")


def cancel(ctx: TaskContext) -> Step:
    item = ctx.locked_item()   # before the fence command (lock order)
    fo = failover_row(ctx)
    fencing.withdraw(ctx.s, fo, ctx.now)
    host = _recovery(ctx, fo)
    if "command_id" not in ctx.data and host is not None and not host_up(host, ctx) \
            and not _recovery_host_took(ctx, fo):
        # the recovery host never received this failover (its command was withdrawn before
        # delivery): nothing of it to undo there, and the source must not wait for a host
        # that is down (a failback cancelled while the old primary's site is lost left the VM
        # off on both sites until that site came back)
        return done(f"recovery host {host.name} is down and never received failover {fo.id}: "
                    "nothing to undo there")
    got = run_command(ctx, host, "failover_cancel", item_context(ctx, item, fo),
                      item_id=item.id)
    if isinstance(got, Step):
        return got
    apply_failover_result(fo, got.result, ctx.now)
    return done(f"recovery VM deleted; generation {fo.generation} names the source again")


def _recovery_host_took(ctx: TaskContext, fo: Failover) -> bool:
    """Whether any ``failover`` command of ``fo`` was ever delivered to its recovery host."""
    return ctx.s.scalars(select(Command.id).where(
        Command.kind == "failover", Command.args["failover_id"].as_string() == fo.id,
        Command.sent_at.is_not(None))).first() is not None


def resume_source(ctx: TaskContext) -> Step:
    """Tell the source agent its new generation (and to power its VM on after a planned
    failover), then replicate once — a resync when the source's engine had been fenced — so
    that the job says "the source replicates again" only once a new point proves it. The source
    may be down (unplanned): then the commands stay queued for it and the job ends saying so;
    the item is protected again either way (the scheduler drives it when its agent is back).
    Asked again while it waits: a break-glass failover recorded meanwhile (after the item was
    protected again) holds the item then, and is not overwritten."""
    item = ctx.locked_item()
    fo = failover_row(ctx)
    _taken_by_another(item, fo)
    src = ctx.s.get(Host, item.host_id)
    prepared = ctx.s.scalars(select(Command.id).where(
        Command.item_id == item.id, Command.kind == "failover_prepare",
        Command.args["failover_id"].as_string() == fo.id)).first() is not None
    args = {"generation": fo.generation or 0, "power_on": fo.kind == "planned" and prepared}
    got = run_command(ctx, src, "failover_resume_source", args, item_id=item.id)
    if isinstance(got, Step):
        if src is not None and not host_up(src, ctx):
            _back_to_protected(ctx, item)
            return done(f"source host {src.name} is down: it takes the item back (and powers "
                        "its VM on) when it returns; replication resumes then")
        return got
    powered = " (VM powered on)" if args["power_on"] else ""
    res = dict(got.result or {})
    # the source may write again: the item is protected (the job still holds it, so the
    # scheduler does not drive it yet) and its site store must grant the source's writes
    # before the first one (an old primary only reads a failed-over item); once the
    # replication is sent the grant was confirmed, and a later list does not hold it back
    _back_to_protected(ctx, item)
    pending = None if "replicate_id" in ctx.data else storeacl.grant_pending(ctx.s, item, ctx.now)
    if pending is not None:
        store = storeacl.store_host(ctx.s, item)
        if store is not None and not host_up(store, ctx):
            return done(f"the source took the item back{powered}; the recovery store's host "
                        f"{store.name} is down: replication resumes when it returns")
        return wait(75.0, pending)
    # one replication now: a resync (only differing blocks travel) when the source's engine
    # was fenced or must repair, else a delta cycle
    kind, rargs = ("resync", {"by_hand": True}) if res.get("resync") else ("cycle", {})
    rep = run_command(ctx, src, kind, rargs, item_id=item.id, key="replicate_id", progress=80.0)
    if isinstance(rep, Step):
        if src is not None and not host_up(src, ctx):
            _back_to_protected(ctx, item)
            return done(f"the source took the item back{powered}; its host {src.name} went "
                        f"down before the first {kind}: replication resumes when it returns")
        return rep
    _back_to_protected(ctx, item)
    item.retry = RetryState().to_dict()  # a point just proved it: no retry wait left over
    report = (rep.result or {}).get("report")
    if isinstance(report, dict) and report.get("state"):
        # the agent's report after that point: the scheduler acts on it now, not at the next
        # heartbeat (before it, the item still read `critical` from the fenced report)
        item.report = report
        item.state = str(report["state"])
    point = dict((rep.result or {}).get("point") or {})
    return done(f"the source replicates again{powered}: {kind} committed point "
                f"{point.get('point_id', '?')}")


def _back_to_protected(ctx: TaskContext, item: Item) -> None:
    storeacl.set_status(item, ItemProtection.PROTECTED, ctx.now)
    item.failover_id = None
    item.critical_error = None
    item.updated_at = ctx.now


def change_point(ctx: TaskContext) -> Step:
    item = ctx.item()
    fo = failover_row(ctx)
    args = {**item_context(ctx, item, fo), "point": _point_choice(ctx)}
    got = run_command(ctx, _recovery(ctx, fo), "failover_change_point", args, item_id=item.id)
    if isinstance(got, Step):
        return got
    apply_failover_result(fo, got.result, ctx.now)
    return done(f"{fo.vm_name} restarted from point {fo.point_id}")


def reverse_group(ctx: TaskContext, item: Item) -> Group:
    """The group of the item's reverse item: the item's group mirrored (recovery site → source
    site). A reverse group's own reverse is the group it mirrors (a failback's item goes back
    home), so names never grow (``web`` ↔ ``web-reverse``)."""
    group = ctx.s.get(Group, item.group_id)
    if group is None:
        raise PermanentError(f"the group of {item.vm_name} no longer exists",
                             hint="Create a protection group for its site, then protect the "
                                  "VM again: drsite groups create")
    src = ctx.s.get(Host, item.host_id)
    source_site = src.site_id if src is not None else group.site_id

    def mirrors(g: Group | None) -> bool:
        return g is not None and g.site_id == item.target_site_id \
            and g.target_site_id == source_site

    home = ctx.s.get(Group, group.reverse_of_id) if group.reverse_of_id is not None else None
    if home is not None and mirrors(home):
        return home
    rev = ctx.s.scalars(select(Group).where(Group.reverse_of_id == group.id)
                        .order_by(Group.id)).first()
    if rev is not None and mirrors(rev):
        return rev
    base = f"{group.name[:56]}-reverse"
    taken = set(ctx.s.scalars(select(Group.name).where(Group.name.like(f"{base}%"))))
    legacy = ctx.s.scalars(select(Group).where(Group.name == base)).first()
    if legacy is not None and legacy.reverse_of_id is None and mirrors(legacy):
        legacy.reverse_of_id = group.id  # made before groups recorded what they mirror
        return legacy
    name = base if base not in taken else next(f"{base}-{i}" for i in range(2, 10_000)
                                               if f"{base}-{i}" not in taken)
    rev = Group(name=name, site_id=item.target_site_id, target_site_id=source_site,
                policy_id=group.policy_id, match={}, created_at=ctx.now, reverse_of_id=group.id)
    ctx.s.add(rev)
    ctx.s.flush()
    record_event(ctx.s, ctx.now, "group", name, f"created for the reverse items of group "
                                                f"{group.name}")
    return rev


def reprotect_seed(ctx: TaskContext) -> Step:
    item = ctx.item()
    fo = failover_row(ctx)
    if fo.state != FailoverState.COMMITTED:
        raise InvalidInput(f"failover {fo.id} is {fo.state}; commit it before re-protecting",
                           hint=f"Commit the failover first: drsite failover commit {item.id}")
    data = ctx.data
    rev_id = data.get("rev_item_id") or new_id("i")
    ctx.put(rev_item_id=rev_id)
    old = ctx.s.get(Host, item.host_id)
    args = {"failover_id": fo.id, "rev_item_id": rev_id, "vm_id": item.vm_id,
            "new_primary_site": site_name(ctx, item.target_site_id),
            "generation": fo.generation or 1}
    got = run_command(ctx, old, "reprotect_seed", args, item_id=item.id)
    if isinstance(got, Step):
        return got
    res = dict(got.result or {})
    fo.result = {**dict(fo.result or {}), "reprotect_seed": res}
    return done(f"old primary's disks written as the reverse base ({res.get('base_bytes_local', 0)} "
                "bytes, locally: nothing crossed the network)")


def reverse_replication(ctx: TaskContext) -> Step:
    fo = failover_row(ctx)
    seed = ctx.sibling("reprotect_seed")
    rev_id = str((seed.data if seed is not None else {}).get("rev_item_id"))
    # both items' statuses are judged and written here: locked, in id order
    ctx.lock_items(rev_id)
    item = ctx.item()
    rec_host = _recovery(ctx, fo)
    src = ctx.s.get(Host, item.host_id)
    if rec_host is None or src is None or fo.vm_id is None:
        raise PermanentError(f"failover {fo.id} lacks its recovery host or VM")
    store = target_store(ctx, src.site_id)
    if store is None or store.store_url is None:
        raise PermanentError("no recovery store is online in the old primary's site",
                             hint="Run the old primary's agent with --store-listen and give it "
                                  "the site's store role ('drsite sites set-store SITE HOST').")
    rev = ctx.s.get(Item, rev_id)
    if rev is None:
        group = reverse_group(ctx, item)
        rev = Item(id=rev_id, host_id=rec_host.id, vm_id=fo.vm_id, vm_name=fo.vm_name or item.vm_name,
                   group_id=group.id, target_site_id=src.site_id, status=ItemProtection.ENABLING,
                   vm_ref=vm_ref(rec_host.id, fo.vm_id), state=ItemState.RESYNCING, report=None,
                   acked_seq=0, retry=dict(item.retry or {}), critical_error=None,
                   active_job_id=None, health=Health.NORMAL, health_reasons=[], created_at=ctx.now,
                   updated_at=ctx.now, origin_item_id=item.id, vm_spec=item.vm_spec,
                   lineage_id=item.lineage_id or item.id)
        ctx.s.add(rev)
        ctx.s.flush()
    pending = storeacl.grant_pending(ctx.s, rev, ctx.now)
    if pending is not None and "command_id" not in ctx.data:
        return wait(60, pending)
    args = {"vm_id": fo.vm_id, "target_site": site_name(ctx, src.site_id),
            "store_url": store.store_url, "settings": agent_settings(_policy(ctx, item)),
            "generation": fo.generation or 1, "resync_from_base": True}
    got = run_command(ctx, rec_host, "protect", args, item_id=rev.id, progress=20.0)
    if isinstance(got, Step):
        return got
    # done when the reverse item's first point is also in the catalogue operators see (it
    # arrives with the agent's next heartbeat): a failback asked right after must find it
    if ctx.s.scalars(select(Point.point_id).where(Point.item_id == rev.id)).first() is None:
        push.want_heartbeat(ctx.s, rec_host.id)  # the point comes with it: now
        return wait(95, "the reverse item's first point is committed; waiting for it to reach "
                        "the catalogue")
    res = dict(got.result or {})
    report = dict(res.get("report") or {})
    sent = int(report.get("bytes_sent") or 0)
    seed_res = dict((fo.result or {}).get("reprotect_seed") or {})
    disk = int(seed_res.get("disk_bytes") or 0)
    if rev.status != ItemProtection.ENABLING:
        # a break-glass failover of the reverse item recorded meanwhile (vault/breakglass.py)
        raise taken_meanwhile(rev, f"it was being protected as reverse item {rev.id}")
    rev.status = ItemProtection.PROTECTED
    rev.state = ItemState.PROTECTED
    rev.last_cycle_sent_at = ctx.now
    rev.last_retention_at = ctx.now
    rev.updated_at = ctx.now
    storeacl.set_status(item, ItemProtection.REPROTECTED, ctx.now)
    item.vm_ref = None
    item.failover_id = None
    item.updated_at = ctx.now
    fo.state = FailoverState.REPROTECTED
    fo.result = {**dict(fo.result or {}), "reprotect": {"item_id": rev.id, "bytes_sent": sent,
                                                       "disk_bytes": disk}}
    record_event(ctx.s, ctx.now, "item", rev.id,
                 f"{rev.vm_name} re-protected in the reverse direction ({sent} of {disk} bytes sent)")
    return done(f"reverse item {rev.id} protected: {sent} bytes sent for {disk} bytes of disks "
                "(only differences travelled)")


# ------------------------------------------------------------------------------ end hooks

def failover_on_end(ctx: TaskContext, state: JobState) -> None:
    """After a failed or cancelled job: commands it queued that no agent took yet are
    withdrawn; if one reached an agent (it may still promote and start a VM there), the item is
    left ``failed_over`` so that a cancel can undo whatever happened."""
    item = ctx.locked_item_or_none()
    if item is not None and item.active_job_id == ctx.job.id:
        item.active_job_id = None
    fid = ctx.job.args.get("failover_id")
    fo = ctx.s.get(Failover, fid) if fid else None
    if state != JobState.SUCCEEDED:
        reached = _recovery_side_ran(ctx)  # before withdrawing: a withdrawn one has 'failed' too
        for cmd in ctx.s.scalars(select(Command).where(Command.job_id == ctx.job.id,
                                                       Command.status.in_(OPEN_COMMAND_STATUSES))
                                 .order_by(Command.id).with_for_update()
                                 .execution_options(populate_existing=True)):
            if cmd.status == CommandStatus.PENDING:
                cmd.status = CommandStatus.FAILED
                cmd.error = PermanentError(f"withdrawn: job {ctx.job.id} {state}").to_dict()
                commands.scrub_secrets(cmd)
                cmd.updated_at = cmd.finished_at = ctx.now
            elif cmd.kind in ("failover", "failover_prepare"):
                reached = True
        if fo is not None and item is not None and item.status == ItemProtection.FAILING_OVER \
                and item.failover_id in (None, fo.id):
            if reached or fo.kind == "planned":
                storeacl.set_status(item, ItemProtection.FAILED_OVER, ctx.now)  # a cancel undoes it
                item.failover_id = fo.id
            else:
                item.status = ItemProtection.PROTECTED  # nothing reached an agent: nothing to undo
    if fo is None:
        return
    if state != JobState.SUCCEEDED and fo.state == FailoverState.STARTING:
        fo.state = FailoverState.FAILED if state == JobState.FAILED else FailoverState.CANCELLED
        # whether the recovery host took its command (it may start the VM): the item's health
        # says so (health.failover_health)
        fo.result = {**dict(fo.result or {}), "recovery_took": _recovery_host_took(ctx, fo)}
        fo.updated_at = ctx.now
    if fo.job_id is None:
        fo.job_id = ctx.job.id
    if state != JobState.SUCCEEDED:
        # the recovery host's success that came while the job was being cancelled (after
        # this, ``apply_late_result`` takes one that comes later)
        late = ctx.s.scalars(select(Command).where(
            Command.job_id == ctx.job.id, Command.kind == "failover",
            Command.status == CommandStatus.SUCCEEDED)).first()
        if late is not None:
            _adopt_late_start(ctx.s, late, ctx.job, state, ctx.now)


def _recovery_side_ran(ctx: TaskContext) -> bool:
    """A ``failover`` command of this job ended (succeeded or failed) on the recovery host."""
    return ctx.s.scalars(select(Command.id).where(
        Command.job_id == ctx.job.id, Command.kind == "failover",
        Command.status.in_(FINAL_COMMAND_STATUSES))).first() is not None


def _handlers(**tasks: Any) -> JobHandlers:
    return JobHandlers(tasks=tasks, on_end=failover_on_end)


TEST_HANDLERS = _handlers(failover_checks=failover_checks, start_test_vm=start_test_vm)
CLEANUP_HANDLERS = _handlers(cleanup_test_vm=cleanup_test_vm)
PLANNED_HANDLERS = _handlers(failover_checks=failover_checks, shutdown_source=shutdown_source,
                             start_replica=start_replica)
UNPLANNED_HANDLERS = _handlers(failover_checks=failover_checks, start_replica=start_replica)
COMMIT_HANDLERS = _handlers(commit=commit, reprotect_seed=reprotect_seed,
                            reverse_replication=reverse_replication)
CANCEL_HANDLERS = _handlers(cancel=cancel, resume_source=resume_source)
CHANGE_POINT_HANDLERS = _handlers(change_point=change_point)
REPROTECT_HANDLERS = _handlers(reprotect_seed=reprotect_seed,
                               reverse_replication=reverse_replication)
