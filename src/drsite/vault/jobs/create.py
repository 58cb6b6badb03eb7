"""Starting jobs: one function per kind, each checking what must hold before the job exists.

An item is owned by at most one active job (``items.active_job_id``, claimed by a conditional
update, so two concurrent requests cannot both start one). Responsible for: creating the job and
its task rows and claiming the item. Not responsible for: doing the work (``runner``).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import update
from sqlalchemy.orm import Session

from drsite.core.errors import Conflict, InvalidInput, VmNotFound
from drsite.core.retry import RetryState
from drsite.core.states import ItemProtection, JobState, TaskState
from drsite.replication.report import Health, ItemState
from drsite.vault.audit import record_event
from drsite.vault.db.models import Group, Host, Item, Job, Task, Vm
from drsite.vault.ids import new_id
from drsite.vault.jobs.plan import ASSOCIATE, DISABLE, ENABLE, RESYNC, TASK_PLAN
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
                       hint=f"Associate a policy first: PUT /groups/{group.name} {{\"policy\": …}}.")
    existing = active_item_for_vm(s, host.id, vm.vm_id)
    if existing is not None:
        raise Conflict(f"VM {vm.name} is already protected by item {existing.id} ({existing.status})")
    item_id = new_id("i")
    job = create_job(s, ENABLE, target=vm.name, item_id=item_id,
                     args={"vm_id": vm.vm_id, "host_id": host.id, "group": group.name, "reason": reason},
                     now=now)
    item = Item(id=item_id, host_id=host.id, vm_id=vm.vm_id, vm_name=vm.name, group_id=group.id,
                target_site_id=group.target_site_id, status=ItemProtection.ENABLING,
                vm_ref=vm_ref(host.id, vm.vm_id), state=ItemState.NEW, report=None, acked_seq=0,
                retry=RetryState().to_dict(), critical_error=None, active_job_id=job.id,
                health=Health.NORMAL, health_reasons=[],
                created_at=now, updated_at=now)
    s.add(item)
    vm.auto_protect_blocked = False
    s.flush()
    return job, item


def start_disable_protection(s: Session, item: Item, *, delete_points: bool, now: float) -> Job:
    if item.status not in (ItemProtection.PROTECTED, ItemProtection.ENABLING):
        raise Conflict(f"item {item.id} is {item.status}", hint="Only protected items can be disabled.")
    job = create_job(s, DISABLE, target=item.vm_name, item_id=item.id,
                     args={"delete_points": delete_points}, now=now)
    claim_item(s, item, job.id)
    item.status = ItemProtection.DISABLING
    item.updated_at = now
    return job


def start_resync(s: Session, item: Item, *, now: float) -> Job:
    if item.status != ItemProtection.PROTECTED:
        raise Conflict(f"item {item.id} is {item.status}",
                       hint="A resync needs a protected item with a first recovery point.")
    job = create_job(s, RESYNC, target=item.vm_name, item_id=item.id, args={"by_hand": True}, now=now)
    claim_item(s, item, job.id)
    return job


def start_policy_association(s: Session, group: Group, *, now: float) -> Job:
    """Apply the group's (new) policy to its items and protect its matching VMs. Its tasks are
    idempotent, so two association jobs of one group may overlap harmlessly."""
    return create_job(s, ASSOCIATE, target=group.name, item_id=None,
                      args={"group": group.name}, now=now)
