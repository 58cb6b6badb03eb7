"""The agent's command intake and per-item lanes: where a vault command is taken, journaled,
queued, run and answered.

Commands arrive from a heartbeat reply or the command channel (a long poll to the vault); both
go through :meth:`CommandLanes.accept`. Each is journaled (``commands.json``) *before* it is
queued, then runs in its item's **lane**: a FIFO of which at most one task runs at a time, so
an item's ``ItemReplicator`` (not thread-safe) is only ever used by one thread — the lane is
its lock. Lanes are served by a pool of ``max_parallel_items`` workers; a lane whose next task
is a failover or ``unprotect`` starts on an urgent pool so that it never queues behind
replication stuck on a slow or hung peer. A group barrier's prepare and seal, and a failover
fence, run on barrier threads, beside any lane.

Idempotency: a command id runs at most once. Ids queued or running are ignored when re-sent;
finished ones are answered from the journal; after a restart every accepted, unfinished command
is queued again (:meth:`CommandLanes.resume_accepted`). Results are posted to
``/commands/{id}/result``: the final one until the vault has it, ``running`` progress at least
every ``PROGRESS_REPOST_S``.

Responsible for: intake, the journal's command records, lanes and pools, posting results.
Not responsible for: what a command does (the agent's handlers) or when one is sent (the vault).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from drsite.agent import barrier as barriers
from drsite.agent import cloudstores, pointkeys
from drsite.agent.failover import KINDS as FAILOVER_KINDS
from drsite.agent.link import COMMAND_KINDS, Command, VaultLink
from drsite.agent.registration import AgentIdentity
from drsite.agent.state import CommandJournal, Finished
from drsite.agent.vms import lane_of
from drsite.core.errors import (
    CommandInterrupted,
    Conflict,
    DrsiteError,
    Fenced,
    InvalidInput,
    NetworkError,
    NotFound,
    OperationInterrupted,
    PermanentError,
    classify_os_error,
)
from drsite.core.states import CommandStatus

log = logging.getLogger(__name__)

PROGRESS_REPOST_S = 10.0
URGENT_KINDS = frozenset((*FAILOVER_KINDS, "unprotect"))
URGENT_WORKERS = 4
BARRIER_WORKERS = 4  # group barriers' prepare and seal: short, local, never behind a lane
# run beside the item's lane, never queued behind its work: a fence powers the old primary's VM
# off while a cycle may hang on a black-holed store for its whole network timeout
BESIDE_LANE_KINDS = frozenset(("failover_fence",))
CHANNEL_WAIT_S = 20.0  # how long the vault may hold the command channel's request


class Interrupted(Exception):
    """Raised inside an item's work (from its progress callback) to stop it at once: the agent
    is shutting down, or the item is being unprotected. Equivalent to a crash at that place,
    which the engine resumes from."""


@dataclass
class Task:
    kind: str                      # a command kind, or "resume" / "auto" (the agent's own)
    command: Command | None = None


@dataclass
class _Lane:
    """Per-item FIFO of tasks; at most one of them runs at a time."""

    tasks: deque[Task] = field(default_factory=deque)
    active: bool = False
    cancel: threading.Event = field(default_factory=threading.Event)


@dataclass
class _Progress:
    item_id: str
    posted_at: float = 0.0
    posted_progress: float = -1.0


class LaneHost(Protocol):
    """What the lanes need of the agent daemon (:class:`drsite.agent.daemon.Agent` implements
    it; declared here so that this module does not import the daemon)."""

    data_dir: Path
    identity: AgentIdentity
    link: VaultLink
    barriers: barriers.BarrierCommands
    heartbeat_interval: float
    max_backoff_s: float

    def handle_command(self, cmd: Command) -> dict[str, Any]:
        """Run one command to its result (raises its error); called from the command's lane."""
        ...

    def run_own(self, item_id: str, kind: str) -> None:
        """The agent's own work on an item: ``resume`` or ``auto``; never raises."""
        ...

    def reopen(self, item_id: str) -> object:
        """Rebuild an item's engine from its files (after its work was interrupted)."""
        ...

    def fence_on_own(self, item_id: str, e: Fenced) -> None: ...

    def engine_progress(self, item_id: str) -> float | None:
        """The progress its engine reports for an item (None: no engine)."""
        ...

    def latest_seq(self, item_id: str) -> int | None:
        """The seq of the item's latest point (0: none; None: no engine, or unreadable)."""
        ...

    def refresh_catalogue(self, item_id: str) -> None: ...

    def vault_back(self) -> None:
        """The command channel reached the vault after failing: heartbeat now."""
        ...

    def beat_soon(self) -> None:
        """The vault asks for a heartbeat now (its reply on the command channel)."""
        ...


def lane_key(cmd: Command) -> str:
    """The lane a command runs in: its item's, a VM command's VM's (``vms.lane_of``), else
    the lane of commands of no item ("")."""
    return cmd.item_id or (lane_of(cmd) if cmd.kind.startswith("vm_") else "")


class CommandLanes:
    """The command intake, journal records and lanes of one agent.

    ``lock`` is the agent's own (its item table and these lanes are read together);
    ``stop`` is the agent's shutdown flag. :meth:`open` starts the workers, :meth:`close`
    interrupts running work and stops them."""

    def __init__(self, host: LaneHost, journal: CommandJournal, lock: threading.RLock,
                 stop: threading.Event, max_parallel_items: int) -> None:
        self.host = host
        self.journal = journal
        self.max_parallel_items = max(1, max_parallel_items)
        self._lock = lock
        self._stop = stop
        self._lanes: dict[str, _Lane] = {}
        self._inflight: dict[str, _Progress] = {}   # accepted command ids (queued or running)
        self._pool: ThreadPoolExecutor | None = None
        # lanes whose next task is a failover or unprotect command start here, so that they
        # never queue behind replication stuck on a slow or hung peer
        self._urgent_pool: ThreadPoolExecutor | None = None
        self._barrier_pool: ThreadPoolExecutor | None = None

    # ----------------------------------------------------------------------------- workers

    def open(self) -> None:
        """Fresh lanes and workers (at start, again after a shutdown)."""
        with self._lock:
            self._lanes = {}
            self._inflight = {}
            self._pool = ThreadPoolExecutor(self.max_parallel_items,
                                            thread_name_prefix="agent-item")
            self._urgent_pool = ThreadPoolExecutor(URGENT_WORKERS,
                                                   thread_name_prefix="agent-urgent")
            self._barrier_pool = ThreadPoolExecutor(BARRIER_WORKERS,
                                                    thread_name_prefix="agent-barrier")

    def close(self) -> None:
        """Interrupt every lane's running work (set ``stop`` first) and wait for the workers."""
        with self._lock:
            for lane in self._lanes.values():
                lane.cancel.set()
            pool, self._pool = self._pool, None
            urgent, self._urgent_pool = self._urgent_pool, None
            bar, self._barrier_pool = self._barrier_pool, None
        for p in (pool, urgent, bar):
            if p is not None:
                p.shutdown(wait=True, cancel_futures=True)

    def wait_idle(self, timeout: float) -> bool:
        """True once no task is queued or running (tests, orderly shutdown)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if not any(lane.active or lane.tasks for lane in self._lanes.values()):
                    return True
            time.sleep(0.02)
        return False

    def idle(self, item_id: str) -> bool:
        """No task queued or running in the item's lane."""
        with self._lock:
            lane = self._lanes.get(item_id)
            return lane is None or not (lane.active or lane.tasks)

    def waiting(self, item_id: str) -> bool:
        """True while a task waits in the item's lane (a long scrub yields to it)."""
        with self._lock:
            lane = self._lanes.get(item_id)
            return lane is not None and bool(lane.tasks)

    def cancelled(self, item_id: str) -> bool:
        """The item's running work is to stop (an ``unprotect`` or the shutdown asked)."""
        lane = self._lanes.get(item_id)
        return lane is not None and lane.cancel.is_set()

    def held_commands(self) -> list[str]:
        """Ids of the commands this agent holds: queued, running, or finished with a result
        the vault has not confirmed yet. The heartbeat carries them: the vault re-delivers at
        once a command it delivered that is not among them (``docs/control-plane.md``)."""
        with self._lock:
            held = set(self._inflight)
        held.update(f.command_id for f in self.journal.unposted())
        return sorted(held)

    # ----------------------------------------------------------------------------- intake

    def channel_loop(self) -> None:
        """The command channel: a long poll to the vault (same mTLS), so a command reaches the
        agent when the vault commits it, not at the next heartbeat. Heartbeats still carry
        commands too (re-deliveries, a vault without the channel); ids make both paths one."""
        link = self.host.link
        failures = 0
        while not self._stop.is_set():
            try:
                # after a failure, a poll the vault answers at once: its return is seen now,
                # not when a long poll with nothing to deliver ends
                got = link.wait_channel(0.0 if failures else CHANNEL_WAIT_S)
            except NotFound:
                log.info("the vault at %s has no command channel; commands arrive with "
                         "heartbeats", link.vault_url)
                return
            except DrsiteError as e:
                failures += 1
                if failures == 1:
                    log.info("command channel to the vault interrupted (%s); heartbeats carry "
                             "commands meanwhile", e)
                # a vault that is down (refused, unreachable) is probed every interval: a
                # failed connect costs it nothing, and its return is seen within one interval;
                # a vault that answers with errors gets the growing backoff
                backoff = self.host.heartbeat_interval * (
                    1 if isinstance(e, NetworkError) else failures)
                self._stop.wait(min(self.host.max_backoff_s, backoff))
                continue
            except Exception:  # the client was closed under it (shutdown) or a bug
                if self._stop.is_set():
                    return
                log.exception("command channel failed; retrying")
                self._stop.wait(self.host.heartbeat_interval)
                continue
            if failures:
                failures = 0
                self.host.vault_back()
            if got.heartbeat:
                self.host.beat_soon()  # a job of the vault waits for this host's heartbeat
            cmds = got.commands
            # a barrier's steps first, each at once (a clock cut's members of this host are
            # sent together): their journal entries (an fsync each) wait until all started
            later: list[Callable[[], None]] = []
            for cmd in sorted(cmds, key=lambda c: c.kind not in barriers.KINDS):
                if self._stop.is_set():
                    break  # not taken: the vault re-delivers (the next heartbeat lacks it)
                try:
                    self.accept(cmd, journal_later=later)
                except DrsiteError as e:
                    log.warning("command %s not taken: %s", cmd.command_id, e)
            for journal in later:
                journal()

    def accept(self, cmd: Command, *, journal_later: list[Callable[[], None]] | None = None
               ) -> None:
        """Take a command from the vault (heartbeat reply or the command channel): ignore it if
        queued or running, answer it from the journal if finished, else record it in the
        journal (durably, so a restart resumes it) and queue it on its item's lane. A barrier
        step starts before its journal entry; with ``journal_later`` that entry is appended
        there for the caller to write once the batch's other barrier steps started too."""
        if cmd.kind not in COMMAND_KINDS:
            if self.journal.finished(cmd.command_id) is None:
                err = InvalidInput(f"unknown command kind {cmd.kind!r}",
                                   hint="The agent is older than the vault; upgrade it.")
                self._finish(cmd, CommandStatus.FAILED, {}, err.to_dict())
            return
        with self._lock:
            if cmd.command_id in self._inflight:
                log.debug("command %s already queued or running", cmd.command_id)
                return
            if self.journal.finished(cmd.command_id) is not None:
                log.info("command %s was already done; sending its result again", cmd.command_id)
                self.journal.mark_unposted(cmd.command_id)
                return
            log.info("command %s: %s %s accepted", cmd.command_id, cmd.kind, cmd.item_id)
            self._inflight[cmd.command_id] = _Progress(cmd.item_id)
        if cmd.kind in barriers.KINDS and self._barrier_pool is not None:
            # a barrier's step runs at once and is journaled meanwhile: guest writes wait for
            # it, and a crash before the journal is harmless (the vault re-delivers the seal,
            # whose cycle the lane then adopts; a prepare's hold ends at its bound)
            self._barrier_pool.submit(self._barrier_task, cmd)

            def journal() -> None:
                with contextlib.suppress(DrsiteError):
                    self.journal.accept(cmd.command_id, kind=cmd.kind, item_id=cmd.item_id,
                                        args=pointkeys.keep_keys(self.host.data_dir,
                                                                 cmd.item_id, cmd.args))
            if journal_later is not None:
                journal_later.append(journal)
            else:
                journal()
            return
        try:
            self.journal.accept(cmd.command_id, kind=cmd.kind, item_id=cmd.item_id,
                                args=pointkeys.keep_keys(self.host.data_dir, cmd.item_id,
                                                            cmd.args))
        except DrsiteError:
            with self._lock:
                self._inflight.pop(cmd.command_id, None)
            raise  # not taken: the vault re-delivers it (the next heartbeat does not hold it)
        if cmd.kind in BESIDE_LANE_KINDS and self._barrier_pool is not None:
            self._barrier_pool.submit(self._beside_lane, cmd)
            return
        with self._lock:
            if cmd.kind == "unprotect":
                lane = self._lanes.get(cmd.item_id)
                if lane is not None and lane.active:
                    log.info("item %s: interrupting its running work to unprotect it",
                             cmd.item_id)
                    lane.cancel.set()
            self.enqueue(lane_key(cmd), Task(cmd.kind, cmd))

    def resume_accepted(self) -> None:
        """After a restart: every command accepted before it and not finished is queued again
        (commands are idempotent; ``cycle``/``resync`` recognise work already done), or, when
        its arguments carried secrets the journal does not keep and the agent cannot find
        again, reported failed at once as interrupted (transient: the vault sends it again)."""
        for acc in self.journal.unfinished():
            args = dict(acc.args)
            if acc.redacted:
                # a cloud-store protect finds its spec again (nothing else can be restored)
                restored = cloudstores.restore_spec(self.host.data_dir, acc.item_id, acc.args) \
                    if acc.kind == "protect" else None
                if restored is None:
                    log.warning("command %s (%s %s) was interrupted by a restart and carried "
                                "credentials this host does not keep; reporting it interrupted",
                                acc.command_id, acc.kind, acc.item_id)
                    cmd = Command(acc.command_id, acc.kind, acc.item_id, args)
                    self._finish(cmd, CommandStatus.FAILED, {}, CommandInterrupted(
                        f"the agent of host {self.host.identity.host_name} restarted while it "
                        f"held {acc.kind} of {acc.item_id}").to_dict())
                    continue
                args = restored
            log.info("command %s (%s %s): resuming it after a restart", acc.command_id,
                     acc.kind, acc.item_id)
            with self._lock:
                self._inflight[acc.command_id] = _Progress(acc.item_id)
            resumed = Command(acc.command_id, acc.kind, acc.item_id, args)
            self.enqueue(lane_key(resumed), Task(acc.kind, resumed))

    # ----------------------------------------------------------------------------- lanes

    def enqueue(self, item_id: str, task: Task) -> None:
        with self._lock:
            lane = self._lanes.setdefault(item_id, _Lane())
            lane.tasks.append(task)
            pool = self._urgent_pool if task.kind in URGENT_KINDS else self._pool
            if not lane.active and pool is not None and not self._stop.is_set():
                lane.active = True
                pool.submit(self._drain, item_id)

    def _drain(self, item_id: str) -> None:
        while True:
            with self._lock:
                lane = self._lanes[item_id]
                if self._stop.is_set() or not lane.tasks:
                    lane.active = False
                    if self._stop.is_set():
                        for t in lane.tasks:
                            if t.command is not None:
                                self._inflight.pop(t.command.command_id, None)
                        lane.tasks.clear()
                    return
                task = lane.tasks.popleft()
                if task.kind == "unprotect":
                    lane.cancel.clear()
            try:
                self._execute(item_id, task)
            except Exception:
                log.exception("item %s: task %s failed unexpectedly", item_id, task.kind)
            finally:
                self.host.refresh_catalogue(item_id)  # new points reach the next heartbeat
                if task.command is not None:
                    with self._lock:
                        self._inflight.pop(task.command.command_id, None)

    def _beside_lane(self, cmd: Command) -> None:
        """A command of ``BESIDE_LANE_KINDS``, on a barrier thread, concurrently with whatever
        the item's lane runs (a fence is idempotent and only powers the VM off and marks the
        entry failed over; a cycle it overtakes fails on the store's newer generation)."""
        try:
            self._execute(cmd.item_id or "", Task(cmd.kind, cmd))
        except Exception:
            log.exception("command %s (%s %s) failed unexpectedly", cmd.command_id, cmd.kind,
                          cmd.item_id)
        finally:
            with self._lock:
                self._inflight.pop(cmd.command_id, None)

    def _barrier_task(self, cmd: Command) -> None:
        """A group barrier's prepare (answered from here) or seal (then shipped in the item's
        lane), on a barrier thread: neither waits for a lane or a worker."""
        if cmd.kind == "group_seal":
            try:
                self.host.barriers.seal(cmd)
            except DrsiteError as e:  # the lane's cycle seals on its own: a per-VM point
                log.warning("command %s: group seal of %s failed: %s", cmd.command_id,
                            cmd.item_id, e)
            except Exception:
                log.exception("command %s: group seal of %s failed unexpectedly",
                              cmd.command_id, cmd.item_id)
            self.enqueue(cmd.item_id, Task(cmd.kind, cmd))
            return
        try:
            result = self.host.barriers.prepare(cmd)
        except DrsiteError as e:
            log.info("command %s: %s misses the group barrier: %s", cmd.command_id,
                     cmd.item_id, e)
            self._finish(cmd, CommandStatus.FAILED, {}, e.to_dict())
        except Exception as e:
            log.exception("command %s: group prepare of %s failed unexpectedly",
                          cmd.command_id, cmd.item_id)
            self._finish(cmd, CommandStatus.FAILED, {}, PermanentError(
                f"agent error in group_prepare: {type(e).__name__}: {e}").to_dict())
        else:
            self._finish_held(cmd, result)
        finally:
            with self._lock:
                self._inflight.pop(cmd.command_id, None)

    def _execute(self, item_id: str, task: Task) -> None:
        if task.command is None:
            self.host.run_own(item_id, task.kind)
            return
        cmd = task.command
        facts: dict[str, Any] = {}
        if cmd.kind in ("cycle", "resync"):
            seq = self.host.latest_seq(item_id)
            if seq is not None:
                facts["before_seq"] = seq
        self.journal.start(cmd.command_id, kind=cmd.kind, item_id=item_id, **facts)
        started = time.monotonic()
        try:
            result = self.host.handle_command(cmd)
        except Interrupted:
            if self._stop.is_set():
                log.info("command %s (%s %s) interrupted by shutdown; it resumes when the vault "
                         "sends it again", cmd.command_id, cmd.kind, item_id)
                return
            self.host.reopen(item_id)
            self._finish(cmd, CommandStatus.FAILED, {}, OperationInterrupted(
                f"{cmd.kind} of {item_id} was interrupted to unprotect the item").to_dict())
            return
        except DrsiteError as e:
            log.warning("command %s (%s %s) failed (%s): %s", cmd.command_id, cmd.kind, item_id,
                        e.error_class.value, e)
            if isinstance(e, Fenced):
                self.host.fence_on_own(item_id, e)
            self._finish(cmd, CommandStatus.FAILED, {}, e.to_dict())
            return
        except OSError as e:
            # the host's own resources (a full disk, a vanished file): a drsite error naming
            # the file, transient where the seed retries (ENOSPC → low_disk), never "unexpected"
            where = f" ({e.filename})" if e.filename else ""
            err = classify_os_error(e, f"{cmd.kind} of {item_id} on host "
                                       f"{self.host.identity.host_name}{where}")
            log.warning("command %s (%s %s) failed (%s): %s", cmd.command_id, cmd.kind, item_id,
                        err.error_class.value, err)
            self._finish(cmd, CommandStatus.FAILED, {}, err.to_dict())
            return
        except Exception as e:
            log.exception("command %s (%s %s) failed unexpectedly", cmd.command_id, cmd.kind,
                          item_id)
            # a bug, not a fault to wait out: permanent (the item goes Critical), generic code
            self._finish(cmd, CommandStatus.FAILED, {}, PermanentError(
                f"agent error in {cmd.kind}: {type(e).__name__}: {e}",
                hint="See the agent's log; report a bug if it persists.").to_dict())
            return
        log.info("command %s (%s %s) succeeded in %.1f s", cmd.command_id, cmd.kind, item_id,
                 time.monotonic() - started)
        self._finish(cmd, CommandStatus.SUCCEEDED, result, None)

    # ----------------------------------------------------------------------------- results

    def _finish_held(self, cmd: Command, result: dict[str, Any]) -> None:
        """A prepare that holds its guest: the vault hears it before the journal's fsync
        (guest writes wait for the barrier's next step; a lost answer only makes the member
        miss the barrier, and the journal then re-posts it)."""
        fin = Finished(cmd.command_id, cmd.kind, cmd.item_id, CommandStatus.SUCCEEDED, result,
                       None, time.time())
        try:
            self.host.link.post_result(cmd.command_id, status=CommandStatus.SUCCEEDED,
                                       progress=100.0, result=result, error=None)
            fin.posted = True
        except DrsiteError as e:
            log.info("result of command %s not delivered yet (%s); will retry",
                     cmd.command_id, e)
        self.journal.finish(fin)

    def _finish(self, cmd: Command, status: CommandStatus, result: dict[str, Any],
                error: dict[str, Any] | None) -> None:
        fin = Finished(cmd.command_id, cmd.kind, cmd.item_id, status, result, error, time.time())
        self.journal.finish(fin)
        with self._lock:
            # ended: from here the journal holds it until the vault has the result; still
            # "in flight" it was listed as held (and could post "running") after its result
            self._inflight.pop(cmd.command_id, None)
        self._post_final(fin)

    def _post_final(self, fin: Finished) -> None:
        try:
            self.host.link.post_result(
                fin.command_id, status=fin.status,
                progress=100.0 if fin.status == CommandStatus.SUCCEEDED else 0.0,
                result=fin.result, error=fin.error)
        except Conflict as e:
            # the vault already has a different end for it (e.g. withdrawn): nothing to retry
            log.warning("the vault refused the result of command %s: %s", fin.command_id, e)
        except DrsiteError as e:
            log.info("result of command %s not delivered yet (%s); will retry", fin.command_id, e)
            return
        self.journal.mark_posted(fin.command_id)

    def flush_results(self) -> None:
        """Post every final result the vault has not confirmed yet."""
        for fin in self.journal.unposted():
            self._post_final(fin)

    def post_progress(self) -> None:
        """Post ``running`` progress of every accepted command: the first time, when it moved
        by 0.5 points, and at least every ``PROGRESS_REPOST_S`` (the vault re-delivers commands
        that stay silent)."""
        now = time.monotonic()
        with self._lock:
            todo: list[tuple[str, _Progress, float]] = []
            for cid, pr in self._inflight.items():
                prog = 0.0
                if self._is_running(cid):
                    prog = self.host.engine_progress(pr.item_id) or 0.0
                if not pr.item_id and pr.posted_progress >= 0:
                    continue  # a command of no item (store_rekey) posts its own progress
                if pr.posted_progress < 0 or abs(prog - pr.posted_progress) >= 0.5 \
                        or now - pr.posted_at >= PROGRESS_REPOST_S:
                    todo.append((cid, pr, prog))
        for cid, pr, prog in todo:
            try:
                self.host.link.post_result(cid, status=CommandStatus.RUNNING, progress=prog)
            except Conflict:
                continue  # ended meanwhile (our final post won the race)
            except DrsiteError as e:
                log.debug("progress of %s not posted: %s", cid, e)
                return
            pr.posted_at, pr.posted_progress = now, prog

    def _is_running(self, command_id: str) -> bool:
        pr = self._inflight.get(command_id)
        if pr is None:
            return False
        lane = self._lanes.get(pr.item_id)
        return lane is not None and lane.active and not any(
            t.command is not None and t.command.command_id == command_id for t in lane.tasks)
