"""Starting jobs — one function per kind (protection, resync, verify, policy association, store
re-key; the failover actions of one item are in ``item_actions``), each checking what must hold
before the job exists — resuming a job that waits for an operator, and asking one to stop
(``request_cancel``).

An item is owned by at most one active job (``items.active_job_id``, claimed by a conditional
update, so two concurrent requests cannot both start one). Called by the API, the dashboard and
the recovery-plan job inside a transaction. Responsible for: creating the job and its task rows
and claiming the item. Not responsible for: doing the work (``runner`` and the task modules).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from drsite.core.errors import Conflict, InvalidInput, NotFound, VmNotFound
from drsite.core.model import validate_name
from drsite.core.retry import RetryState
from drsite.core.states import ACTIVE_JOB_STATES, ItemProtection, JobState, TaskState
from drsite.replication.report import Health, ItemState
from drsite.vault import barrier
from drsite.vault.audit import record_event
from drsite.vault.db.models import Group, Host, Item, Job, Task, Vm
from drsite.vault.ids import new_id
from drsite.vault.jobs import kinds as K
from drsite.vault.jobs.kinds import ASSOCIATE, DISABLE, ENABLE, RESYNC, TASK_PLAN
from drsite.vault.membership import active_item_for_vm, vm_ref


def create_job(s: Session, kind: str, *, target: str, item_id: str | None,
               args: dict[str, Any], now: float,
               tasks: tuple[tuple[str, str], ...] | None = None) -> Job:
    """A queued job of ``kind`` with the kind's tasks (or ``tasks``: recovery plans build
    theirs from the plan)."""
    job = Job(id=new_id("j"), kind=kind, state=JobState.QUEUED, target=target, item_id=item_id,
              args=args, progress=0.0, message=JobState.QUEUED.value, cancel_requested=False,
              created_at=now, updated_at=now)
    s.add(job)
    for idx, (name, title) in enumerate(tasks if tasks is not None else TASK_PLAN[kind]):
        s.add(Task(job_id=job.id, idx=idx, name=name, title=title, state=TaskState.PENDING,
                   progress=0.0, message="", data={}))
    s.flush()
    record_event(s, now, "job", job.id, f"{kind} of {target} queued")
    return job


def claim_item(s: Session, item: Item, job_id: str) -> None:
    """Make ``job_id`` the item's active job; ``Conflict`` if another job holds it."""
    res = s.execute(update(Item).where(Item.id == item.id, Item.active_job_id.is_(None))
                    .values(active_job_id=job_id).execution_options(synchronize_session=False))
    if getattr(res, "rowcount", 0) != 1:
        s.refresh(item)
        raise Conflict(f"item {item.id} is busy with job {item.active_job_id}",
                       hint=f"Wait for job {item.active_job_id} to end, or cancel it.")
    item.active_job_id = job_id


def start_enable_protection(s: Session, *, vm: Vm, host: Host, group: Group, now: float,
                            reason: str) -> tuple[Job, Item]:
    """An EnableProtection job and its new item (status ``enabling``) for ``vm``."""
    if not vm.present:
        raise VmNotFound(f"VM {vm.name} ({vm.vm_id}) is no longer reported by host {host.name}")
    if host.revoked_at is not None:
        raise Conflict(f"host {host.name} was revoked", hint="Register the host again.")
    if host.site_id != group.site_id:
        raise InvalidInput(f"VM {vm.name} is not in site of group {group.name}",
                           hint="Use a group whose site is the VM's host's site.")
    if group.policy_id is None:
        raise Conflict(f"group {group.name} has no policy",
                       hint=f"Give it a policy first: drsite groups update {group.name} "
                            "--policy POLICY")
    existing = active_item_for_vm(s, host.id, vm.vm_id)
    if existing is not None:
        raise Conflict(f"VM {vm.name} is already protected by item {existing.id} ({existing.status})")
    barrier.check_members(s, group, adding=1)  # a consistent group: at most 16 VMs
    item_id = new_id("i")
    # another transaction (the heartbeat's auto-protection, a second request) may be
    # protecting the same VM at this moment: on PostgreSQL the later insert waits, then fails
    # the item's unique vm_ref. The job and the item go in one savepoint, so that loser leaves
    # nothing behind and says why (on SQLite writers are serialized: the check above sees it)
    s.flush()
    try:
        with s.begin_nested():
            job = create_job(s, ENABLE, target=vm.name, item_id=item_id,
                             args={"vm_id": vm.vm_id, "host_id": host.id, "group": group.name,
                                   "reason": reason}, now=now)
            item = Item(id=item_id, host_id=host.id, vm_id=vm.vm_id, vm_name=vm.name,
                        group_id=group.id, target_site_id=group.target_site_id,
                        status=ItemProtection.ENABLING, vm_ref=vm_ref(host.id, vm.vm_id),
                        state=ItemState.NEW, report=None, acked_seq=0,
                        retry=RetryState().to_dict(), critical_error=None, active_job_id=job.id,
                        health=Health.NORMAL, health_reasons=[],
                        created_at=now, updated_at=now, lineage_id=item_id)
            s.add(item)
    except IntegrityError:
        raise Conflict(f"VM {vm.name} is already being protected (another request or the "
                       "group's auto-protection took it at the same moment)",
                       hint="List its item: drsite items list") from None
    vm.auto_protect_blocked = False
    s.flush()
    return job, item


def start_disable_protection(s: Session, item: Item, *, delete_points: bool, now: float) -> Job:
    # the status is judged and written here: read afresh and locked (a break-glass failover
    # committed since the caller read it must not be overwritten with "disabling")
    s.refresh(item, with_for_update=True)
    if item.status not in (ItemProtection.PROTECTED, ItemProtection.ENABLING):
        raise Conflict(f"item {item.id} is {item.status}", hint="Only protected items can be disabled.")
    job = create_job(s, DISABLE, target=item.vm_name, item_id=item.id,
                     args={"delete_points": delete_points}, now=now)
    claim_item(s, item, job.id)
    item.status = ItemProtection.DISABLING
    item.updated_at = now
    return job


def check_resync(item: Item) -> None:
    """``Conflict`` unless a resync of ``item`` may start now."""
    if item.status != ItemProtection.PROTECTED:
        raise Conflict(f"item {item.id} is {item.status}",
                       hint="A resync needs a protected item with a first recovery point "
                            "('drsite items list' shows the item's status).")
    if item.active_job_id is not None:
        raise Conflict(f"item {item.id} is busy with job {item.active_job_id}",
                       hint=f"Wait for it: drsite jobs show {item.active_job_id}")


def start_resync(s: Session, item: Item, *, now: float) -> Job:
    check_resync(item)
    job = create_job(s, RESYNC, target=item.vm_name, item_id=item.id, args={"by_hand": True}, now=now)
    claim_item(s, item, job.id)
    return job


def check_verify(item: Item) -> None:
    """``Conflict`` unless the item's points may be verified now."""
    if item.status in (ItemProtection.REMOVED, ItemProtection.FAILED):
        raise Conflict(f"item {item.id} is {item.status}; its store is not verified any more",
                       hint="Verify the VM's current item ('drsite items history ITEM' names it).")


def start_verify(s: Session, item: Item, *, point: str | None, all_points: bool,
                 now: float) -> Job:
    """A Verify job of the item's latest point, of ``point``, or of every point. It does not
    hold the item (it only reads its store)."""
    check_verify(item)
    if point is not None and all_points:
        raise InvalidInput("give a point or ask for all points, not both")
    points: str | list[str] = "all" if all_points else \
        [validate_name("point", point)] if point else "latest"
    return create_job(s, K.VERIFY, target=item.vm_name, item_id=item.id,
                      args={"points": points}, now=now)


def start_policy_association(s: Session, group: Group, *, now: float) -> Job:
    """Apply the group's (new) policy to its items and protect its matching VMs. Its tasks are
    idempotent, so two association jobs of one group may overlap harmlessly."""
    return create_job(s, ASSOCIATE, target=group.name, item_id=None,
                      args={"group": group.name}, now=now)


def start_store_rekey(s: Session, store_name: str, *, now: float) -> Job:
    """Re-encrypt the store's old objects (one such job per store at a time)."""
    running = s.scalars(select(Job.id).where(Job.kind == K.REKEY, Job.target == store_name,
                                             Job.state.in_(ACTIVE_JOB_STATES))).first()
    if running is not None:
        raise Conflict(f"store {store_name} is already being re-encrypted (job {running})",
                       hint=f"Follow it with 'drsite jobs show {running}', or cancel it.")
    return create_job(s, K.REKEY, target=store_name, item_id=None, args={"store": store_name},
                      now=now)


def request_cancel(s: Session, job: Job, now: float) -> None:
    """Ask for a job to stop at its next task boundary (``Conflict`` if it already ended)."""
    if job.state not in ACTIVE_JOB_STATES:
        raise Conflict(f"job {job.id} already {job.state}")
    if not job.cancel_requested:
        job.cancel_requested = True
        job.updated_at = now
        record_event(s, now, "job", job.id, f"{job.kind} of {job.target}: cancel requested")


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
