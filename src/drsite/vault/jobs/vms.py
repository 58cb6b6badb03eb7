"""Task bodies of the VM lifecycle jobs (CreateVm, ImportVm, StartVm, StopVm, DeleteVm): one
command to the VM's host (``vm_create`` …, ``agent/vms.py``) through the command queue, then the
inventory brought in step.

The task sends its command once (its id in the task's data), waits for the result, and then
for the host's inventory to show what the command did (the VM reported, its new power state,
or gone), so that when the job ends ``drsite vms list`` and the dashboard agree with it, and a
new VM is discovered by the heartbeat like any other (a protection group that names it
protects it). If the inventory has not caught up after ``INVENTORY_WAIT_S``, the command's own
result is written to it. A transient failure is sent again (``TRANSIENT_RETRIES``); a host that
does not heartbeat keeps the job waiting (the command stays queued for it) until it is
cancelled, which withdraws a command no agent took yet.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from drsite.core.errors import PermanentError, from_dict
from drsite.core.states import OPEN_COMMAND_STATUSES, CommandStatus, JobState
from drsite.vault import commands
from drsite.vault.audit import record_event
from drsite.vault.db.models import Command, Host, Vm
from drsite.vault.jobs.model import JobHandlers, Step, TaskContext, done, wait
from drsite.vault.jobs.protection import host_up
from drsite.vault.vmrows import vm_row

TRANSIENT_RETRIES = 3
INVENTORY_WAIT_S = 30.0


def _host(ctx: TaskContext) -> Host:
    host = ctx.s.get(Host, str(ctx.job.args.get("host_id")))
    if host is None or host.revoked_at is not None:
        raise PermanentError(f"host of VM {ctx.job.target} is gone or revoked",
                             hint="List hosts with 'drsite hosts list'.")
    return host


def _send(ctx: TaskContext, host: Host) -> Command | Step:
    """The job's command: sent once (again after a transient failure); the succeeded
    command, or a ``wait`` step."""
    kind = str(ctx.job.args["command"])
    data = ctx.data
    cmd = ctx.s.get(Command, data["command_id"]) if "command_id" in data else None
    if cmd is not None and cmd.status == CommandStatus.FAILED:
        err = from_dict(cmd.error)
        tries = int(data.get("tries") or 0)
        if not err.transient or tries >= TRANSIENT_RETRIES:
            raise err
        ctx.put(tries=tries + 1)
        cmd = None
    if cmd is None:
        cmd = commands.enqueue(ctx.s, host_id=host.id, kind=kind, item_id=None,
                               args=dict(ctx.job.args.get("command_args") or {}), now=ctx.now,
                               job_id=ctx.job.id)
        ctx.put(command_id=cmd.id)
    if cmd.status == CommandStatus.SUCCEEDED:
        return cmd
    if not host_up(host, ctx):
        return wait(10, f"waiting for host {host.name} (no heartbeat); {kind} is queued for it "
                        "(cancel the job to give up)")
    return wait(max(30.0, cmd.progress), f"{kind} on host {host.name}: {cmd.status}")


def _row(ctx: TaskContext, host: Host, vm_id: str) -> Vm | None:
    return ctx.s.scalars(select(Vm).where(Vm.host_id == host.id, Vm.vm_id == vm_id)).first()


def _inventory_shows(row: Vm | None, kind: str, vm: dict[str, Any] | None) -> bool:
    if kind == "vm_delete":
        return row is None or not row.present
    if row is None or not row.present or vm is None:
        return False
    return kind in ("vm_create", "vm_import") or (row.info or {}).get("power") == vm.get("power")


def vm_command(ctx: TaskContext) -> Step:
    host = _host(ctx)
    got = _send(ctx, host)
    if isinstance(got, Step):
        return got
    kind = str(ctx.job.args["command"])
    result = dict(got.result or {})
    vm = result.get("vm") if isinstance(result.get("vm"), dict) else None
    vm_id = str((vm or {}).get("vm_id") or result.get("deleted") or ctx.job.args.get("vm_id"))
    row = _row(ctx, host, vm_id)
    if not _inventory_shows(row, kind, vm):
        first = float(ctx.data.get("succeeded_at") or ctx.now)
        if "succeeded_at" not in ctx.data:
            ctx.put(succeeded_at=ctx.now, vm_id=vm_id)
        if ctx.now - first < INVENTORY_WAIT_S:
            return wait(90, f"{kind} done on host {host.name}; waiting for its inventory")
        _write_inventory(ctx, host, row, vm, vm_id)
    ctx.put(vm_id=vm_id)
    what = {"vm_create": "created", "vm_import": "imported", "vm_start": "started",
            "vm_stop": "stopped", "vm_delete": "deleted"}.get(kind, kind)
    power = f", {vm.get('power')}" if vm else ""
    record_event(ctx.s, ctx.now, "vm", ctx.job.target, f"{what} on host {host.name}")
    return done(f"VM {ctx.job.target} {what} on host {host.name} ({vm_id}{power})")


def _write_inventory(ctx: TaskContext, host: Host, row: Vm | None, vm: dict[str, Any] | None,
                     vm_id: str) -> None:
    """The heartbeat did not bring the change in time: the command's result goes in."""
    if vm is None:
        if row is not None:
            row.present = False
        return
    if row is None:
        row, new = vm_row(ctx.s, host.id, vm_id, lambda: Vm(
            host_id=host.id, vm_id=vm_id, name=str(vm.get("name"))[:64], info=vm, present=True,
            first_seen=ctx.now, last_seen=ctx.now, auto_protect_blocked=False))
        if new:
            return
    row.info, row.present, row.last_seen = vm, True, ctx.now


def vm_on_end(ctx: TaskContext, state: JobState) -> None:
    """A VM job that failed or was cancelled withdraws its command if no agent took it yet."""
    if state == JobState.SUCCEEDED:
        return
    for cmd in ctx.s.scalars(select(Command).where(Command.job_id == ctx.job.id,
                                                   Command.status.in_(OPEN_COMMAND_STATUSES))
                             .order_by(Command.id).with_for_update()
                             .execution_options(populate_existing=True)):
        if cmd.status == CommandStatus.PENDING:
            cmd.status = CommandStatus.FAILED
            cmd.error = PermanentError(f"withdrawn: job {ctx.job.id} {state}").to_dict()
            cmd.updated_at = cmd.finished_at = ctx.now


VM_HANDLERS = JobHandlers(tasks={name: vm_command for name in
                                 ("create_vm", "import_vm", "start_vm", "stop_vm", "delete_vm")},
                          on_end=vm_on_end)
