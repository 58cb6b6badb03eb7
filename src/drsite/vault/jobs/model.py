"""What a task body receives and returns (the runner does the bookkeeping around it)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from drsite.core.errors import Conflict, PermanentError
from drsite.core.states import JobState
from drsite.vault.db.models import Item, Job, Task
from drsite.vault.settings import VaultSettings


@dataclass(frozen=True)
class Step:
    """A task body's answer: ``done`` moves to the next task; otherwise the task waits (is asked
    again at the next tick) with ``progress`` (0-100) and ``message``."""

    done: bool
    progress: float = 0.0
    message: str = ""


def done(message: str = "") -> Step:
    return Step(True, 100.0, message)


def wait(progress: float, message: str) -> Step:
    return Step(False, max(0.0, min(100.0, progress)), message)


@dataclass
class TaskContext:
    """One call of a task body: the open transaction, the job, the task, the time, settings."""

    s: Session
    job: Job
    task: Task
    now: float
    settings: VaultSettings

    @property
    def data(self) -> dict[str, Any]:
        return dict(self.task.data or {})

    def put(self, **values: Any) -> None:
        d = dict(self.task.data or {})
        d.update(values)
        self.task.data = d

    def sibling(self, name: str) -> Task | None:
        return self.s.scalars(select(Task).where(Task.job_id == self.job.id, Task.name == name)).first()

    def item(self) -> Item:
        item = self.s.get(Item, self.job.item_id) if self.job.item_id else None
        if item is None:
            raise PermanentError(f"protected item {self.job.item_id} no longer exists",
                                 hint="Start the operation again if it is still needed.")
        return item

    def locked_item(self) -> Item:
        """The job's item read afresh and locked (``FOR UPDATE``; SQLite: its one writer
        already) until this step commits: for a step that decides on the item's status and
        writes it. Another writer of the status (a break-glass failover reported by a
        heartbeat, ``vault/breakglass.py``) commits before this read or waits for this step;
        an unlocked read could be overwritten with what it saw before that commit.

        Lock order: the runner locks the job row first (``JobRunner.tick``), then a step locks
        items (in id order when more than one: :meth:`lock_items`), then commands and the
        job's task rows (written at the commit). No other transaction locks an item and then
        waits for a job or task row (the API's cancel and resume write only those), and only
        one job transaction runs at a time (the controller's runner)."""
        item = self.locked_item_or_none()
        if item is None:
            raise PermanentError(f"protected item {self.job.item_id} no longer exists",
                                 hint="Start the operation again if it is still needed.")
        return item

    def lock_items(self, *others: str) -> None:
        """Lock the job's item and ``others`` (those that exist), in id order, read afresh."""
        ids = sorted({i for i in (self.job.item_id, *others) if i})
        if ids:
            self.s.scalars(select(Item).where(Item.id.in_(ids)).order_by(Item.id)
                           .with_for_update().execution_options(populate_existing=True)).all()

    def locked_item_or_none(self) -> Item | None:
        """As :meth:`locked_item`; ``None`` when the job has no item or it is gone."""
        if not self.job.item_id:
            return None
        return self.s.get(Item, self.job.item_id, with_for_update=True, populate_existing=True)


def taken_meanwhile(item: Item, doing: str) -> Conflict:
    """What a step raises when the item it was ``doing`` something with changed status under it
    (a break-glass failover recorded meanwhile, ``vault/breakglass.py``)."""
    held = f" (failover {item.failover_id})" if item.failover_id else ""
    return Conflict(f"{item.vm_name} became {item.status} while {doing}{held}",
                    hint=f"See its failovers: drsite failover list {item.id}")


TaskFn = Callable[[TaskContext], Step]
HookFn = Callable[[TaskContext], None]


@dataclass(frozen=True)
class JobHandlers:
    """The bodies of a kind's tasks, plus what happens when a job of the kind ends.

    ``on_end`` runs in every final state (release the item, roll state back after a failure);
    ``rollback`` (if any) runs as an extra task when the job is cancelled.
    """

    tasks: dict[str, TaskFn]
    on_end: Callable[[TaskContext, JobState], None]
    rollback: TaskFn | None = None
