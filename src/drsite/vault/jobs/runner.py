"""The job runner: advances every active job by calling its current task's body.

Each tick handles each active job in its own transaction: a task body either finishes (the next
task starts in the same tick) or waits (asked again next tick). A ``DrsiteError`` fails the task
and the job, keeping its class and hint. Cancellation is honoured at task boundaries (before a
task body is called; a waiting task's every call is one); a kind with a rollback (EnableProtection)
then runs it as an extra task, in state ``cancelling``.

At start-up (:meth:`JobRunner.recover`) the runner looks at every job a previous vault left
active: it resumes those whose kind and current task it knows (task bodies derive everything
from rows, so calling them again is safe), and fails the others with a reason that says why.

A step that meets the database failing for the moment (a deadlock, a serialization failure, a
connection the server ended: :func:`transient_db_error`) wrote nothing — its transaction rolled
back — and is simply asked again, up to ``DB_RETRIES`` times in a row; any other exception is a
bug and fails that job alone ("internal error in the vault").

Responsible for: job/task bookkeeping (states, times, progress, errors, events). Not
responsible for: what tasks do (``protection``, ``maintenance``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable

from sqlalchemy import select
from sqlalchemy.orm import Session

from drsite.core.errors import DrsiteError, PermanentError
from drsite.core.states import (
    ACTIVE_JOB_STATES,
    OPEN_TASK_STATES,
    PASSED_TASK_STATES,
    JobState,
    TaskState,
)
from drsite.vault.audit import record_event
from drsite.vault.controller import NotController
from drsite.vault.db.database import Database, transient_db_error
from drsite.vault.db.models import Item, Job, Task
from drsite.vault.jobs.kinds import ROLLBACK_TASK, WEIGHTS
from drsite.vault.jobs.model import JobHandlers, TaskContext
from drsite.vault.jobs.registry import HANDLERS
from drsite.vault.settings import VaultSettings

log = logging.getLogger(__name__)

MAX_STEPS_PER_TICK = 16
BACKOFF_ABOVE = 64  # active jobs beyond which waiting jobs are asked less often
BACKOFF_MAX_S = 1.0
ACTIVE_IDS_MAX_AGE_S = 2.0  # a budgeted pass lists the active jobs at least this often
DB_RETRIES = 8  # a step's transient database failures in a row before its job fails


def ordered_tasks(s: Session, job_id: str) -> list[Task]:
    return list(s.scalars(select(Task).where(Task.job_id == job_id).order_by(Task.idx)))


def job_progress(tasks: list[Task]) -> float:
    real = [t for t in tasks if t.name != ROLLBACK_TASK[0]]
    total = sum(WEIGHTS.get(t.name, 1.0) for t in real) or 1.0
    got = 0.0
    for t in real:
        w = WEIGHTS.get(t.name, 1.0)
        if t.state in PASSED_TASK_STATES:
            got += w
        elif t.state == TaskState.RUNNING:
            got += w * t.progress / 100.0
    return round(100.0 * got / total, 1)


class JobRunner:
    """Runs the vault's jobs. ``tick()`` is called by the vault's loop (or by tests)."""

    def __init__(self, db: Database, settings: VaultSettings) -> None:
        self.db = db
        self.settings = settings
        self._resume_after = ""  # the job a budgeted pass stopped after
        self._next_ask: dict[str, tuple[float, float]] = {}  # job -> (monotonic due, delay)
        self._db_failures: dict[str, int] = {}  # job -> transient database failures in a row
        # the active jobs' ids as last listed (monotonic time): a budgeted pass lists them
        # again only when woken or after ACTIVE_IDS_MAX_AGE_S (listing 5,000 ids each round was
        # a fifth of the controller's time)
        self._active: tuple[list[str], float] | None = None
        self._ended: set[str] = set()  # jobs ended here since the ids were listed
        self._of_item: dict[str, set[str]] = {}  # item -> its active jobs, as last listed
        # jobs whose commands ended since the last pass: a budgeted pass asks them first (a
        # job whose protect command succeeded waited for the round robin to come back to it
        # while the pass started thousands of queued jobs: none of 5,000 finished in 13 min)
        self._woken: set[str] = set()
        self._woken_lock = threading.Lock()

    def wake(self, *, jobs: Iterable[str] | None = None, items: Iterable[str] = (),
             new_job: bool = False) -> None:
        """Something jobs wait for happened: the next pass asks them again, however long they
        have been waiting. ``jobs``/``items``: commands of these jobs and items ended — only
        those jobs (and the items' jobs) are asked (at scale every ended cycle asked all
        5,000 jobs again: no job ever backed off); None: every job. ``new_job``: a job was
        created — every job is asked and the active jobs are listed again."""
        if jobs is None or new_job:
            self._next_ask.clear()
        else:
            woken = set(jobs)
            for item_id in items:
                woken.update(self._of_item.get(item_id, ()))
            for job_id in woken:
                self._next_ask.pop(job_id, None)
            with self._woken_lock:
                self._woken |= woken
        if new_job:
            self._active = None

    def _active_ids(self, s: Session, cached: bool) -> list[str]:
        """The active jobs' ids in creation order: listed now, or (``cached``) as listed by a
        pass at most ``ACTIVE_IDS_MAX_AGE_S`` ago with no job created since (this process's
        commits and other processes' notifications say so: :meth:`wake`); jobs that ended
        here are dropped from it, a job ended elsewhere is found ended by its advance."""
        now = time.monotonic()
        if cached and self._active is not None and now - self._active[1] < ACTIVE_IDS_MAX_AGE_S:
            return [i for i in self._active[0] if i not in self._ended]
        rows = s.execute(select(Job.id, Job.item_id).where(Job.state.in_(ACTIVE_JOB_STATES))
                         .order_by(Job.created_at, Job.id)).all()
        ids = [r[0] for r in rows]
        of_item: dict[str, set[str]] = {}
        for job_id, item_id in rows:
            if item_id is not None:
                of_item.setdefault(item_id, set()).add(job_id)
        self._active = (ids, now)
        self._of_item = of_item
        self._ended = set()
        return list(ids)

    # ------------------------------------------------------------------------------ start-up

    def recover(self) -> dict[str, str]:
        """Decide the fate of every job a previous vault process left active: ``{job_id:
        "resumed" | JobState.FAILED}``."""
        out: dict[str, str] = {}
        with self.db.tx() as s:
            now = self.settings.clock.now()
            active = select(Job).where(Job.state.in_(ACTIVE_JOB_STATES)).order_by(Job.created_at)
            for job in s.scalars(active):
                why = self._why_not_resumable(s, job)
                if why is None:
                    job.message = f"resumed after a vault restart; {job.message}"
                    job.updated_at = now
                    record_event(s, now, "job", job.id, f"{job.kind} of {job.target} resumed after restart")
                    out[job.id] = "resumed"
                    continue
                err = PermanentError(f"cannot resume after a vault restart: {why}",
                                     hint="Start the operation again.")
                handlers = HANDLERS.get(job.kind)
                self._end(s, job, ordered_tasks(s, job.id), JobState.FAILED, now, handlers, err)
                out[job.id] = JobState.FAILED
        return out

    def _why_not_resumable(self, s: Session, job: Job) -> str | None:
        handlers = HANDLERS.get(job.kind)
        if handlers is None:
            return f"this vault version does not know job kind {job.kind!r}"
        known = set(handlers.tasks) | ({ROLLBACK_TASK[0]} if handlers.rollback else set())
        for t in ordered_tasks(s, job.id):
            if t.state in OPEN_TASK_STATES and t.name not in known:
                return f"this vault version does not know task {t.name!r} of {job.kind}"
        if job.item_id is not None and s.get(Item, job.item_id) is None:
            return f"its item {job.item_id} no longer exists"
        return None

    # ---------------------------------------------------------------------------------- ticks

    def tick(self, budget_s: float | None = None) -> int:
        """Advance active jobs once each; returns how many are still active.

        Without ``budget_s`` (tests) every active job is advanced. The background loop passes a
        budget: the pass stops when it is spent and the next one resumes after the last job
        advanced (round robin), so a burst of thousands of jobs (a policy applied to a large
        group) never holds up the scheduler; and while more than ``BACKOFF_ABOVE`` jobs are
        active, a job that is still waiting after its advance is next asked after a delay
        doubling from one loop interval to ``BACKOFF_MAX_S`` (a few jobs are asked every
        round, as before)."""
        deadline = None if budget_s is None else time.monotonic() + budget_s
        seen: set[str] = set()
        active = 0
        for _ in range(3):  # jobs started by jobs (PolicyAssociation) get their first step now
            with self.db.read() as s:
                ids = [i for i in self._active_ids(s, cached=deadline is not None)
                       if i not in seen]
            if not ids:
                break
            backoff = deadline is not None and len(ids) > BACKOFF_ABOVE
            if deadline is not None and self._resume_after in ids:  # round robin
                k = ids.index(self._resume_after) + 1
                ids = ids[k:] + ids[:k]
            first: list[str] = []
            if deadline is not None:   # the woken jobs first, then the round robin
                with self._woken_lock:
                    woken, self._woken = self._woken, set()
                first = [i for i in ids if i in woken]
                if first:
                    ids = first + [i for i in ids if i not in woken]
            for n, job_id in enumerate(ids):
                if deadline is not None and time.monotonic() > deadline:
                    if n > len(first):   # the round robin goes on after the last one asked
                        self._resume_after = ids[n - 1]
                    with self._woken_lock:   # woken ones not reached: first next time
                        self._woken.update(ids[n:len(first)])
                    return active + len(ids) - n
                seen.add(job_id)
                now = time.monotonic()
                if backoff and self._next_ask.get(job_id, (0.0, 0.0))[0] > now:
                    active += 1
                    continue
                try:
                    with self.db.tx() as s:
                        # the job row first (the lock order: jobs/model.py locked_item)
                        job = s.get(Job, job_id, with_for_update=True)
                        still = job is not None and self._advance(s, job)
                    self._db_failures.pop(job_id, None)
                except NotController:
                    raise  # fenced: nothing was written; the new controller carries the job on
                except Exception as exc:  # a bug must not stop the other jobs: fail this one
                    failures = self._db_failures.get(job_id, 0) + 1
                    if transient_db_error(exc) and failures <= DB_RETRIES:
                        # rolled back: the step runs again (after the usual backoff)
                        self._db_failures[job_id] = failures
                        log.warning("job %s: the database failed for the moment (%s: %s); "
                                    "the step runs again (%d/%d)", job_id, type(exc).__name__,
                                    str(exc).splitlines()[0] if str(exc) else "", failures,
                                    DB_RETRIES)
                        still = True
                    else:
                        self._db_failures.pop(job_id, None)
                        log.exception("job %s: internal error", job_id)
                        self._fail_internal(job_id, exc)
                        still = False
                if still:
                    active += 1
                    delay = self._next_ask.get(job_id, (0.0, self.settings.loop_interval / 2))[1]
                    delay = min(BACKOFF_MAX_S, delay * 2)
                    self._next_ask[job_id] = (now + delay, delay)
                else:
                    self._next_ask.pop(job_id, None)
                    self._ended.add(job_id)
            if deadline is not None:
                self._resume_after = ""
        if len(self._next_ask) > 4 * max(active, BACKOFF_ABOVE):
            self._next_ask.clear()  # forget jobs that ended elsewhere
        return active

    def _fail_internal(self, job_id: str, exc: Exception) -> None:
        with self.db.tx() as s:
            job = s.get(Job, job_id)
            if job is None or job.state not in ACTIVE_JOB_STATES:
                return
            err = PermanentError(f"internal error in the vault: {type(exc).__name__}: {exc}",
                                 hint="Report this with the vault's log; start the operation again.")
            self._end(s, job, ordered_tasks(s, job.id), JobState.FAILED, self.settings.clock.now(),
                      HANDLERS.get(job.kind), err)

    def _advance(self, s: Session, job: Job) -> bool:
        now = self.settings.clock.now()
        handlers = HANDLERS.get(job.kind)
        tasks = ordered_tasks(s, job.id)
        if handlers is None:
            self._end(s, job, tasks, JobState.FAILED, now, None,
                      PermanentError(f"unknown job kind {job.kind!r}"))
            return False
        if job.state == JobState.QUEUED:
            job.state = JobState.RUNNING
            job.started_at = now
            record_event(s, now, "job", job.id, f"{job.kind} of {job.target} started")
        for _ in range(MAX_STEPS_PER_TICK):
            if job.cancel_requested and job.state == JobState.RUNNING:
                self._begin_cancel(s, job, tasks, handlers, now)
                tasks = ordered_tasks(s, job.id)
            current = next((t for t in tasks if t.state in OPEN_TASK_STATES), None)
            if current is None:
                self._end(s, job, tasks, JobState.CANCELLED if job.state == JobState.CANCELLING
                          else JobState.SUCCEEDED, now, handlers, None)
                return False
            fn = handlers.rollback if current.name == ROLLBACK_TASK[0] else handlers.tasks.get(current.name)
            if fn is None:
                self._end(s, job, tasks, JobState.FAILED, now, handlers,
                          PermanentError(f"unknown task {current.name!r} of {job.kind}"))
                return False
            if current.state == TaskState.PENDING:
                current.state = TaskState.RUNNING
                current.started_at = now
            ctx = TaskContext(s=s, job=job, task=current, now=now, settings=self.settings)
            try:
                step = fn(ctx)
            except DrsiteError as err:
                current.state = TaskState.FAILED
                current.ended_at = now
                current.message = err.message
                if job.state == JobState.CANCELLING:
                    self._end(s, job, tasks, JobState.CANCELLED, now, handlers, err)
                else:
                    self._end(s, job, tasks, JobState.FAILED, now, handlers, err)
                return False
            current.message = step.message
            if step.done:
                current.state = TaskState.SUCCEEDED
                current.progress = 100.0
                current.ended_at = now
                continue
            current.progress = step.progress
            job.progress = job_progress(tasks)
            job.message = f"{current.title}: {step.message}"
            job.updated_at = now
            return True
        job.updated_at = now
        return True

    def _begin_cancel(self, s: Session, job: Job, tasks: list[Task], handlers: JobHandlers,
                      now: float) -> None:
        for t in tasks:
            if t.state in OPEN_TASK_STATES:
                t.state = TaskState.CANCELLED
                t.ended_at = now
                t.message = t.message or TaskState.CANCELLED.value
        record_event(s, now, "job", job.id, f"{job.kind} of {job.target}: cancelling")
        if handlers.rollback is not None:
            name, title = ROLLBACK_TASK
            s.add(Task(job_id=job.id, idx=len(tasks), name=name, title=title,
                       state=TaskState.PENDING, progress=0.0, message="", data={}))
            s.flush()
        job.state = JobState.CANCELLING

    def _end(self, s: Session, job: Job, tasks: list[Task], state: JobState, now: float,
             handlers: JobHandlers | None, err: DrsiteError | None) -> None:
        for t in tasks:
            if t.state == TaskState.PENDING:
                t.state = TaskState.CANCELLED if state == JobState.CANCELLED else TaskState.SKIPPED
            elif t.state == TaskState.RUNNING:
                t.state = TaskState.FAILED if state == JobState.FAILED else TaskState.CANCELLED
                t.ended_at = now
        job.state = state
        job.ended_at = now
        job.updated_at = now
        if job.started_at is None:
            job.started_at = now
        if err is not None:
            job.error = err.to_dict()
            job.message = err.message
        elif state == JobState.SUCCEEDED:
            job.progress = 100.0
            done_msgs = [t.message for t in tasks if t.message]
            job.message = done_msgs[-1] if done_msgs else "done"
        else:
            job.message = JobState.CANCELLED.value
        if handlers is not None:
            last = tasks[-1] if tasks else Task(job_id=job.id, idx=0, name="", title="",
                                                state=TaskState.PENDING, progress=0.0, message="",
                                                data={})
            handlers.on_end(TaskContext(s=s, job=job, task=last, now=now, settings=self.settings),
                            state)
        record_event(s, now, "job", job.id, f"{job.kind} of {job.target} {state}"
                     + (f": {err.message}" if err is not None else ""))
