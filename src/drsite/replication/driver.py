"""The replication driver: runs one protected item's steps (initial copy, delta cycle, resync),
records attempts, applies the seed's retry rules and keeps the item's report.

Invariants:
- a step is resumable from facts in the driver (sealed cycle), the store (staged cycle, committed
  points) and the item record; re-running any step after a crash never corrupts a point;
- a cycle's extents are written to its point writer at most once each (no overlapping writes
  within a cycle), so resuming from what the store already holds is exact;
- the sealed cycle is released only after its point is committed, so a crash never loses the
  changes of a cycle;
- a resync starts a new tracking epoch and freezes the whole disk, so the resync point is an
  exact image of the source at that instant.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import xxhash

from drsite import failpoints
from drsite.core.clock import Clock, SystemClock
from drsite.core.compression import compression_mode
from drsite.core.errors import (
    Conflict,
    CorruptData,
    DrsiteError,
    ErrorClass,
    Fenced,
    Forbidden,
    InvalidInput,
    TrackingLost,
    classify_os_error,
    from_dict,
)
from drsite.core.extents import ExtentList
from drsite.core.model import Consistency, SealedCycle, TrackingState
from drsite.core.retention import RetentionRule
from drsite.core.throttle import TokenBucket
from drsite.hypervisors.contract import HypervisorDriver
from drsite.replication import allocator
from drsite.replication.batches import SlabPool, read_batches
from drsite.replication.planner import (
    Action,
    Decision,
    PlanInput,
    ResyncWindow,
    app_consistent_due,
    next_cycle_at,
    plan,
    validate_frequency,
)
from drsite.replication.report import CYCLE_PHASES, Health, ItemReport, ItemState
from drsite.replication.resync import RESYNC_BLOCK, block_digests, differing_extents
from drsite.replication.state import ItemRecord, RecordFile
from drsite.replication.target import RecoveryTarget, StreamingTarget
from drsite.store.compaction import plan_rehome
from drsite.store.format import PointInfo
from drsite.store.generation import check_not_fenced
from drsite.store.maintenance import VerifyReport
from drsite.store.writer import PointWriter

log = logging.getLogger(__name__)

IO_SIZE = 4 * 1024 * 1024
REHOME_MIN_BYTES = 32 * 1024 * 1024
# planning reads every segment map of the base point; beyond this many segments (256 GiB of
# disks at 64 MiB) it is skipped (an incremental liveness index would be needed)
REHOME_MAX_SEGMENTS = 4096
REHOME_RETENTION_CYCLES = 16
# re-homing yields to the RPO: a cycle re-homes only as much as fits, by the last cycles'
# timings, before this share of the policy's frequency has passed since its seal (at capacity
# nothing fits and the store grows as it did before)
REHOME_SLACK = 0.6
# less than this fits: not worth a pass over the base's packs
REHOME_MIN_STEP = 4 * 1024 * 1024


def local_minute_of_day(t: float) -> int:
    lt = time.localtime(t)
    return lt.tm_hour * 60 + lt.tm_min


@dataclass(frozen=True)
class ReplicationSettings:
    """What a policy says about one item (the vault turns a policy into this)."""

    frequency_s: float = 300.0
    app_consistent_every_s: float | None = 3600.0
    rpo_threshold_s: float = 1800.0
    retention: RetentionRule = field(default_factory=RetentionRule)
    resync_window: ResyncWindow = field(default_factory=ResyncWindow)
    # "zstd": level 1 on every data frame; "off": stored as is; "auto": compressed unless the
    # compressors, not the store, are the bottleneck (``PointWriter.adaptive``). A bool is the
    # old form: True = "zstd", False = "off"
    compression: str | bool = "zstd"
    bandwidth_limit_bps: int | None = None  # cap on data read and shipped (None: no cap)
    io_size: int = IO_SIZE
    resync_block: int = RESYNC_BLOCK
    save_every_bytes: int = 64 * 1024 * 1024
    # GC sweeps (listing and deleting objects: many requests on a remote store) run at most
    # this often; retention still deletes expired points after every cycle
    gc_every_s: float = 300.0
    # re-homing (store/compaction.py): a delta cycle also stores again the base point's live
    # data that sits in sparse packs, so GC can delete those packs once older points expire;
    # at most ``rehome_share`` of the cycle's changed bytes (at least ``REHOME_MIN_BYTES``) per
    # cycle, planned at most every ``rehome_every_s``. 0: never. Only while the retention
    # keeps points for at most ``REHOME_RETENTION_CYCLES`` cycles: a longer one keeps the
    # old packs alive anyway, and the copies would only add to the store
    rehome_share: float = 0.25
    rehome_every_s: float = 60.0

    def __post_init__(self) -> None:
        validate_frequency(self.frequency_s)
        if not 0.0 <= self.rehome_share <= 1.0 or not self.rehome_every_s >= 0.0:
            raise InvalidInput(f"re-homing: share {self.rehome_share} must be in [0, 1] and "
                               f"every_s {self.rehome_every_s} at least 0")
        object.__setattr__(self, "compression", compression_mode(self.compression))


ProgressFn = Callable[[ItemReport], None]


def _changed_digest(cycle: SealedCycle) -> str:
    """A digest of a sealed cycle's changed extents (all disks)."""
    h = xxhash.xxh3_128()
    for d in sorted(cycle.changed):
        e = cycle.changed[d]
        h.update(d.encode() + b"\0")
        h.update(np.ascontiguousarray(e.starts, np.int64).tobytes())
        h.update(np.ascontiguousarray(e.lengths, np.int64).tobytes())
    return h.hexdigest()


class ItemReplicator:
    """Replication of one VM to one recovery target. One instance per item; not thread-safe.

    ``generation`` is the split-brain guard (:mod:`drsite.store.generation`): when set, every
    step first checks that the item's generation in the recovery store is not newer, and the
    check runs again right before a point is committed; a newer generation (a failover promoted
    the other side) makes the step fail with ``Fenced`` (permanent: the item goes Critical and
    nothing is committed). ``None`` (the default) checks nothing, as before failover existed.
    Callers update ``generation`` after a cancelled failover hands the item back.
    """

    def __init__(self, *, item_id: str, vm_id: str, driver: HypervisorDriver,
                 target: RecoveryTarget, state_dir: Path,
                 settings: ReplicationSettings | None = None, clock: Clock | None = None,
                 on_progress: ProgressFn | None = None,
                 minute_of_day: Callable[[float], int] = local_minute_of_day,
                 generation: int | None = None) -> None:
        self.generation = generation
        allocator.limit_retention()  # freed cycle buffers go back to the system (engine RSS)
        self.driver = driver
        self.target = target
        self.settings = settings or ReplicationSettings()
        self.clock = clock or SystemClock()
        self.on_progress = on_progress
        self.minute_of_day = minute_of_day
        self._file = RecordFile(state_dir / f"{item_id}.json")
        rec = self._file.load()
        if rec is None:
            vm = driver.get_vm(vm_id)
            rec = ItemRecord(item_id=item_id, vm_id=vm_id, vm_name=vm.name)
            rec.report = ItemReport(item_id=item_id, vm_id=vm_id, vm_name=vm.name)
            self._file.save(rec)
        self.rec = rec
        self._force_app: bool | None = None
        self._post_commit_issue: str | None = None
        self._last_gc: float | None = None  # None: the first commit of this process sweeps
        # re-homing planned and not yet done (in memory: a restart plans again), and when
        self._rehome: dict[str, ExtentList] = {}
        self._rehome_planned: float | None = None
        # re-homing's time budget (_rehome_take): the last delta cycle's time without its
        # re-homing (seal to done: shipping, commit, replica, retention; minus the time from
        # its changes stored — the "flush" mark — to its commit when it re-homed) and its
        # shipping rate, and the last re-homing's rate (bytes read from the base, verified,
        # compressed, stored, and the commit), for which the shipping rate stands in before
        # the first re-homing
        self._last_ship_s: float | None = None
        self._last_ship_rate: float | None = None
        self._rehome_rate: float | None = None
        # when each phase of the fresh delta cycle under way ended (report.CYCLE_PHASES)
        self._marks: dict[str, float] = {}
        # called after a point is committed and before its frozen view is released (a drill
        # can compare the point with the source as it was at that instant)
        self.before_release: Callable[[SealedCycle, PointInfo], None] | None = None

    # ----------------------------------------------------------------------------- public API

    def settle_replica(self) -> None:
        """Settle a replica stream whose settling a cycle deferred (it overran its frequency):
        what a caller that stops running cycles, or needs the replica now (a failover's
        final cycle), calls; nothing to do otherwise. Raises what settling met."""
        if isinstance(self.target, StreamingTarget):
            self.target.settle()

    def _settle_quietly(self) -> None:
        """:meth:`settle_replica` for a step about to use the replica or start a stream: a
        failure is logged; the replica keeps its marker and the step's catch-up settles it."""
        try:
            self.settle_replica()
        except DrsiteError as e:
            log.warning("%s: the replica's last point was not settled (the next catch-up "
                        "settles it from the store): %s", self.rec.vm_name, e)

    @property
    def report(self) -> ItemReport:
        assert self.rec.report is not None
        return self.rec.report

    def request_resync(self, reason: str = "started by hand", *, from_store: bool = False) -> None:
        """Ask for a resync now, inside or outside the window (also clears Critical: the error
        that made the item Critical is what the resync repairs). ``from_store``: compare the
        source with what the store can restore (read the point from the store, not a hydrated
        replica), so damage in the store is found and re-sent. The report follows at once, so
        whoever reads it (the agent's heartbeat) sees ``resync_required``, not the old
        Critical."""
        self.rec.resync_by_hand = True
        if from_store:
            self.rec.resync_from_store = True
        self.rec.resync_reason = reason
        if self.rec.phase is ItemState.CRITICAL:
            self.rec.phase = ItemState.RESYNC_REQUIRED
            self.report.last_error = None
        self.rec.retry.record_success()
        self._refresh_report()
        self._save()

    def mark_fenced(self, message: str) -> None:
        """A failover promoted the other site (the vault or the store's generation record says
        so): the item is Critical with ``fenced`` until a cancel hands it back
        (:meth:`request_resync`), and its report says so at once."""
        self.report.last_error = Fenced(message).to_dict()
        self.rec.phase = ItemState.CRITICAL
        self._refresh_report()
        self._save()

    def scrub(self) -> VerifyReport | None:
        """Read back every object the latest point needs and check its hash. Damage is
        quarantined and repaired by a resync against the store (at the next step)."""
        latest = self.target.repo.latest()
        if latest is None:
            return None
        report = self.target.repo.verify(latest.point_id)
        if not report.ok:
            for key in report.damaged_keys:
                self.target.repo.quarantine(key)
            self._store_damaged(CorruptData(
                f"{len(report.damaged_keys)} damaged object(s) in the recovery store of "
                f"{self.rec.vm_name}: {', '.join(report.damaged_keys[:3])}"))
            self._refresh_report()
            self._save()
        return report

    def next_due(self) -> float:
        """When :meth:`step` has something to do next (for a scheduler loop)."""
        r = self.rec
        if r.retry.next_attempt_at is not None:
            return r.retry.next_attempt_at
        if r.phase in (ItemState.NEW, ItemState.INITIAL_REPLICATION, ItemState.RESYNCING) \
                or r.resync_by_hand or r.cycle_id:
            return self.clock.now()
        return next_cycle_at(r.last_cycle_started, self.settings.frequency_s, self.clock.now())

    def step(self) -> Decision:
        """Do the next thing this item needs; a drsite error of the step is recorded, not
        raised — only a failure to save the record itself is raised (classified, e.g.
        ``LowDiskSpace``)."""
        now = self.clock.now()
        try:
            self._check_fence()
            decision = plan(self._plan_input(now))
            if decision.action is Action.INITIAL:
                self._initial()
            elif decision.action is Action.DELTA:
                self._delta()
            elif decision.action is Action.RESYNC:
                self._resync(decision.reason)
            elif decision.action is Action.MARK_RESYNC:
                self._mark_resync(decision.reason)
            if decision.action in (Action.INITIAL, Action.DELTA, Action.RESYNC):
                self.rec.retry.record_success()
                self.report.last_error = None
        except DrsiteError as e:
            decision = Decision(Action.NOTHING, f"failed: {e}")
            self._fail(e)
        except OSError as e:
            decision = Decision(Action.NOTHING, f"failed: {e}")
            self._fail(classify_os_error(e, "replication"))
        self._refresh_report()
        try:
            self._save()
        except OSError as e:
            # the outcome cannot be recorded (a full disk): raised as what it is (transient,
            # "no space left"), not as a crash; nothing is lost — the store, not the record,
            # says what is committed, and the next step saves again
            raise classify_os_error(e, f"saving the replication record of {self.rec.item_id}") \
                from e
        return decision

    def run_initial(self, *, wait_transient: bool = True) -> PointInfo:
        """Run steps until the item has its first committed point (raises on permanent error).

        ``wait_transient=False`` (a caller that owns the retry schedule, e.g. the agent run by
        the vault's scheduler): a pending retry wait is skipped and a transient failure is
        raised as :class:`TransientError` instead of being waited out."""
        self._run_now(wait_transient)
        while self.target.repo.latest() is None:
            self._step_or_raise(wait_transient)
        latest = self.target.repo.latest()
        assert latest is not None
        return latest

    def run_cycle(self, *, app_consistent: bool | None = None, wait_transient: bool = True,
                  sealed_for_call: str | None = None) -> PointInfo:
        """Run one delta cycle now (or the pending resync) and return the new point: a point
        whose frozen view was taken by this call, so it holds every write acknowledged before
        the call (a planned failover's final cycle relies on it). A cycle sealed earlier and
        not yet committed (interrupted by a crash or a store outage) is finished first, as its
        own point, then a fresh one runs. A retry wait pending from an earlier failure does
        not hold the call back (it runs now); ``wait_transient``: as in :meth:`run_initial`
        for failures during the call. ``sealed_for_call``: the id of a cycle the caller sealed
        for this call (a group barrier's cut), which is the point to return, not a stale one."""
        self._run_now(False)
        before = self.target.repo.latest()
        stale = {c for c in (self.rec.cycle_id, self._pending_cycle_id())
                 if c and c != sealed_for_call}
        self.rec.last_cycle_started = None  # make the cycle due
        self._force_app = app_consistent
        try:
            while True:
                self._step_or_raise(wait_transient)
                latest = self.target.repo.latest()
                if latest is not None and (before is None or latest.seq > before.seq):
                    if latest.cycle_id not in stale:
                        return latest
                    # the old frozen view is committed; the caller's writes are in the next
                    before = latest
                    self.rec.last_cycle_started = None
        finally:
            self._force_app = None

    def run_resync(self, reason: str = "started by hand", *, wait_transient: bool = True,
                   from_store: bool = False) -> PointInfo:
        """Resync now and return the resync's point. ``wait_transient``: as in
        :meth:`run_initial`; ``from_store``: as in :meth:`request_resync`."""
        self.request_resync(reason, from_store=from_store)
        before = self.target.repo.latest()
        while True:
            self._step_or_raise(wait_transient)
            latest = self.target.repo.latest()
            if latest is not None and (before is None or latest.seq > before.seq) \
                    and self.rec.phase is ItemState.PROTECTED:
                return latest

    def _pending_cycle_id(self) -> str | None:
        """The driver's sealed, unreleased cycle, if any (None when the driver cannot say: the
        step that follows meets the same failure and records it)."""
        try:
            pending = self.driver.pending_cycle(self.rec.vm_id)
        except DrsiteError:
            return None
        return pending.cycle_id if pending is not None else None

    def _run_now(self, wait_transient: bool) -> None:
        """The caller decided to run now: a pending retry wait does not hold it back."""
        if not wait_transient and not self.rec.retry.gave_up:
            self.rec.retry.next_attempt_at = None

    def _step_or_raise(self, wait_transient: bool = True) -> None:
        decision = self.step()
        err = self.report.last_error
        if err is None and decision.action in (Action.WAIT, Action.NOTHING):
            if self.rec.phase is ItemState.RESYNC_REQUIRED:
                # not a failure an operator must fix: the resync runs in its window (or by hand)
                raise TrackingLost(f"{self.rec.vm_name}: resync required "
                                   f"({self.rec.resync_reason}); it runs in the resync window")
            raise Conflict(f"{self.rec.vm_name}: nothing can run now: {decision.reason}",
                           hint="Start a resync by hand, or wait for the resync window.")
        if err is not None:
            # the recorded error again, with the code and the class the vault acts on
            again = {**err, "message": f"{self.rec.vm_name}: {err.get('message')}"}
            if err.get("code") == Fenced.code:
                raise from_dict(again)
            if self.rec.phase is ItemState.CRITICAL or self.rec.retry.gave_up:
                raise from_dict({**again, "class": ErrorClass.PERMANENT.value})
            if not wait_transient and self.rec.retry.next_attempt_at is not None:
                raise from_dict({**again, "class": ErrorClass.TRANSIENT.value})
            # transient: wait out the schedule (the clock may be fake in tests); a repair
            # (resync required) has no wait and runs on the next step
            nxt = self.rec.retry.next_attempt_at
            if nxt is not None:
                self.clock.sleep(max(0.0, nxt - self.clock.now()))

    # ----------------------------------------------------------------------------- planning

    def _plan_input(self, now: float) -> PlanInput:
        r = self.rec
        vm = self.driver.get_vm(r.vm_id)
        status = self.driver.tracking_status(r.vm_id)
        tracking = status.state
        if r.epoch is not None and status.epoch not in (None, r.epoch):
            tracking = TrackingState.UNTRUSTED  # someone restarted tracking behind our back
        frac = 0.0
        for d in vm.disks:
            if d.size:
                frac = max(frac, status.pending_bytes.get(d.disk_id, 0) / d.size)
        in_window = self.settings.resync_window.contains(self.minute_of_day(now)) \
            or r.resync_from_store
        return PlanInput(
            state=r.phase, now=now,
            next_cycle_at=next_cycle_at(r.last_cycle_started, self.settings.frequency_s, now),
            retry_due=r.retry.due(now), resync_by_hand=r.resync_by_hand,
            in_resync_window=in_window, tracking=tracking, largest_log_fraction=frac,
            has_point=self.target.repo.latest() is not None,
            cycle_in_flight=r.cycle_id is not None and r.cycle_kind == "delta",
        )

    # ----------------------------------------------------------------------------- steps

    def _initial(self) -> None:
        r = self.rec
        self._settle_quietly()
        r.phase = ItemState.INITIAL_REPLICATION
        self._refresh_report()
        cycle = self._own_cycle("initial")
        if cycle is None:
            self._drop_pending()
            r.epoch = self.driver.start_tracking(r.vm_id)
            cycle = self.driver.seal(r.vm_id, app_consistent=self._app_due())
            self._adopt(cycle, "initial")
        assert cycle is not None
        if not cycle.trusted:
            raise TrackingLost(f"tracking of {r.vm_name} failed during initial replication: {cycle.note}")
        todo: dict[str, ExtentList] = {}
        for disk_id, size in cycle.disk_sizes.items():
            reader = self.driver.open_cycle_reader(cycle, disk_id)
            try:
                todo[disk_id] = cycle.changed[disk_id].clip(size).intersect(reader.data_extents())
            finally:
                reader.close()
        self._ship(cycle, "initial", None, todo, step="initial replication")

    def _delta(self) -> None:
        r = self.rec
        cycle = self._own_cycle("delta")
        sealed_now = cycle is None
        self._marks = {}
        if cycle is None:
            r.last_cycle_started = self.clock.now()
            self._mark("start")
            app = self._force_app if self._force_app is not None else self._app_due()
            cycle = self.driver.seal(r.vm_id, app_consistent=app)
            self._adopt(cycle, "delta")
            self._mark("seal")
            self._settle_quietly()   # the last cycle's replica, if it deferred that: now
            self._mark("settle")
        elif r.cycle_changed is not None and \
                r.cycle_changed != (digest := _changed_digest(cycle)):
            # what was staged may hold re-homed base bytes where this changed list now has a
            # change: stage the cycle again from its frozen view
            log.warning("%s: cycle %s resumed with another changed list; staging it again",
                        r.vm_name, cycle.cycle_id)
            self.target.repo.abort(cycle.cycle_id)
            r.cycle_changed = digest
            self._save()
        assert cycle is not None
        if not cycle.trusted:
            self._mark_resync(f"change tracking untrusted: {cycle.note or 'log damaged'}")
            return
        latest = self.target.repo.latest()
        assert latest is not None
        todo = {d: cycle.changed[d].clip(size) for d, size in cycle.disk_sizes.items()}
        rehome = self._rehome_take(latest, cycle, todo) if sealed_now else {}
        self._ship(cycle, "delta", latest.point_id, todo, step="delta cycle", rehome=rehome)
        if sealed_now and r.last_cycle_started is not None:
            took = self.clock.now() - r.last_cycle_started
            self._last_ship_s = max(0.0, took - self._rehome_seconds())
            changed = sum(e.total for e in todo.values())
            if self._last_ship_s > 0 and changed >= REHOME_MIN_STEP:
                self._last_ship_rate = changed / self._last_ship_s
            self.report.last_cycle = self._phases()

    def _rehome_seconds(self) -> float:
        """The fresh delta cycle's time from its changes stored to its commit when it
        re-homed (re-homing's share of it, the commit included), else 0."""
        m = self._marks
        return m["commit"] - m["flush"] if "flush" in m and "commit" in m else 0.0

    def _mark(self, phase: str) -> None:
        """Note that ``phase`` of the fresh delta cycle under way ended now."""
        self._marks[phase] = self.clock.now()

    def _phases(self) -> dict[str, float] | None:
        """The marked phases' durations (each from the previous mark), and the total."""
        if "start" not in self._marks:
            return None
        out: dict[str, float] = {}
        prev = self._marks["start"]
        for phase in CYCLE_PHASES:
            if phase in self._marks:
                out[phase] = round(max(0.0, self._marks[phase] - prev), 3)
                prev = self._marks[phase]
        out["total"] = round(max(0.0, prev - self._marks["start"]), 3)
        return out

    def _rehome_take(self, latest: PointInfo, cycle: SealedCycle,
                     todo: dict[str, ExtentList]) -> dict[str, ExtentList]:
        """This cycle's share of re-homing (``store/compaction.py``): extents of the base
        point ``latest`` to store again, none of them in ``todo`` (what the guest changed wins:
        it is shipped from the frozen view) nor past the end of a disk in the base or the
        cycle (a resize). Planned from the base when nothing planned is left and the last plan
        is ``rehome_every_s`` old; a planning error only skips re-homing. Only as much as fits
        before ``REHOME_SLACK`` of the frequency has passed since the seal, if the rest of this
        cycle takes as long as the last one's did and it re-homes at the last re-homing's rate:
        nothing after a cycle that took that long without re-homing (the RPO first)."""
        s = self.settings
        if s.rehome_share <= 0 or s.retention.retention_s > REHOME_RETENTION_CYCLES * s.frequency_s:
            return {}
        slack_s = REHOME_SLACK * s.frequency_s
        spent = self._last_ship_s
        if spent is not None and spent >= slack_s:
            return {}   # no slack: the RPO first (what is planned waits)
        base = latest.point_id
        sizes = {d: min(n, latest.disk_sizes[d]) for d, n in cycle.disk_sizes.items()
                 if d in latest.disk_sizes}

        def usable(plan: dict[str, ExtentList]) -> dict[str, ExtentList]:
            return {d: (e.subtract(todo[d]) if d in todo else e).clip(sizes[d])
                    for d, e in plan.items() if d in sizes}

        changed = sum(e.total for e in todo.values())
        pending = usable(self._rehome)
        now = self.clock.now()
        if not any(len(e) for e in pending.values()) and (
                self._rehome_planned is None or now - self._rehome_planned >= s.rehome_every_s):
            self._rehome_planned = now
            repo = self.target.repo
            nseg = sum(-(-size // repo.segment_size) for size in cycle.disk_sizes.values())
            if nseg <= REHOME_MAX_SEGMENTS:
                budget = max(REHOME_MIN_BYTES, int(changed * s.rehome_share)) \
                    * max(1, int(s.rehome_every_s // max(s.frequency_s, 1.0)))
                try:
                    plan = plan_rehome(repo, base, budget=budget)
                except (DrsiteError, OSError) as exc:
                    log.warning("%s: re-homing not planned: %s", self.rec.vm_name, exc)
                    plan = None
                except Exception:   # a plan only saves space: never the cycle's failure
                    log.exception("%s: re-homing not planned", self.rec.vm_name)
                    plan = None
                if plan is not None and not plan.empty:
                    log.info("%s: re-homing %d bytes of %d sparse packs (%d stored bytes)",
                             self.rec.vm_name, plan.live_bytes, len(plan.packs),
                             plan.pack_bytes)
                    pending = usable(plan.ranges)
        cap = max(REHOME_MIN_BYTES, int(changed * s.rehome_share))
        rate = self._rehome_rate or self._last_ship_rate
        if spent is not None and rate:
            cap = min(cap, int((slack_s - spent) * rate))   # what fits in time
            if cap < REHOME_MIN_STEP:
                cap = 0   # all of it waits
        take: dict[str, ExtentList] = {}
        rest: dict[str, ExtentList] = {}
        for d in sorted(pending):
            e = pending[d]
            if cap <= 0 or len(e) == 0:
                if len(e):
                    rest[d] = e
                continue
            k = int(np.searchsorted(np.cumsum(e.lengths), cap, "right"))
            if k == 0:   # the first extent alone is over the cap: its first part
                take[d] = ExtentList(e.starts[:1].copy(), np.array([cap], np.int64))
                rest[d] = ExtentList(np.concatenate([[e.starts[0] + cap], e.starts[1:]]),
                                     np.concatenate([[e.lengths[0] - cap], e.lengths[1:]]))
                cap = 0
                continue
            take[d] = ExtentList(e.starts[:k], e.lengths[:k])
            cap -= take[d].total
            if k < len(e):
                rest[d] = ExtentList(e.starts[k:], e.lengths[k:])
        self._rehome = rest
        return take

    def _resync(self, reason: str) -> None:
        r = self.rec
        self._settle_quietly()   # its digests come from the replica only when it is settled
        r.phase = ItemState.RESYNCING
        r.resync_reason = reason
        self._refresh_report()
        self._save()
        cycle = self._own_cycle("resync")
        if cycle is None:
            self._drop_pending()
            r.epoch = self.driver.start_tracking(r.vm_id)
            cycle = self.driver.seal(r.vm_id, app_consistent=False)
            self._adopt(cycle, "resync")
        assert cycle is not None
        latest = self.target.repo.latest()
        assert latest is not None
        rep = self.report
        rep.step = "resync: comparing checksums"
        total = sum(cycle.disk_sizes.values())
        rep.bytes_total, rep.bytes_done, rep.progress = total, 0, 0.0
        todo: dict[str, ExtentList] = {}
        block = self.settings.resync_block

        def count(n: int) -> None:
            rep.bytes_done += n
            rep.bytes_compared += n

        with ThreadPoolExecutor(max_workers=2, thread_name_prefix="resync") as pool:
            for disk_id, size in cycle.disk_sizes.items():
                src_reader = self.driver.open_cycle_reader(cycle, disk_id)
                try:
                    fs = pool.submit(block_digests, src_reader, block=block, progress=count)
                    ft = pool.submit(self.target.digests, disk_id, from_store=r.resync_from_store,
                                     block=block, progress=count)
                    src, tgt = fs.result(), ft.result()
                finally:
                    src_reader.close()
                todo[disk_id] = differing_extents(src, tgt, block, size)
                self._emit()
        self._ship(cycle, "resync", latest.point_id, todo, step="resync: sending differences")
        r.resync_by_hand = False
        r.resync_from_store = False
        r.resync_reason = ""
        rep.resyncs += 1

    def _rehome_into(self, writer: PointWriter, base: str, todo: dict[str, ExtentList],
                     rehome: dict[str, ExtentList], bucket: TokenBucket | None) -> int:
        """Store ``rehome``'s extents of ``base`` again in this cycle (read from ``base``:
        verified, the bytes the new point holds there anyway), minus anything in ``todo``,
        within the bandwidth cap. Bytes written. A read that fails (damage in the base, an
        unreachable store) ends re-homing for this cycle, not the cycle: what it skips the
        point takes from its base as it would have."""
        repo = self.target.repo
        io = self.settings.io_size
        done = 0
        for disk_id in sorted(rehome):
            ext = rehome[disk_id]
            if disk_id in todo:
                ext = ext.subtract(todo[disk_id])   # the guest's writes win, always
            ext = ext.split(io)
            if len(ext) == 0:
                continue
            reader = repo.reader(base, disk_id)
            try:
                ends = np.cumsum(ext.lengths)
                a = 0
                while a < len(ext):
                    start = int(ends[a - 1]) if a else 0
                    b = max(a + 1, int(np.searchsorted(ends, start + io, "right")))
                    offs, lens = ext.starts[a:b], ext.lengths[a:b]
                    buf = bytearray(int(lens.sum()))
                    if bucket is not None:
                        bucket.consume(len(buf))
                    try:
                        reader.readv(offs, lens, memoryview(buf))
                    except (DrsiteError, OSError) as exc:
                        log.warning("%s: re-homing stopped (%d bytes done): reading point %s "
                                    "failed: %s", self.rec.vm_name, done, base, exc)
                        return done
                    failpoints.hit("engine.rehome-batch")  # a kill here: part re-homed
                    # not the cycle's change: no tee (the replica, at the base, holds these
                    # bytes) and not in the point's changed list
                    writer.write_many(disk_id, offs, lens, buf, owner=buf, rehomed=True)
                    done += len(buf)
                    a = b
            finally:
                reader.close()
        return done

    def _mark_resync(self, reason: str) -> None:
        self.rec.phase = ItemState.RESYNC_REQUIRED
        self.rec.resync_reason = reason
        log.warning("%s: resync required: %s", self.rec.vm_name, reason)

    # ----------------------------------------------------------------------------- shipping

    def _ship(self, cycle: SealedCycle, kind: str, base: str | None,
              todo: dict[str, ExtentList], *, step: str,
              rehome: dict[str, ExtentList] | None = None) -> None:
        """Write the ``todo`` extents of the frozen view into the cycle's point and commit it.

        Extents already durably in the store for this cycle (a resumed cycle) are skipped.
        ``rehome``: extents of ``base``, disjoint from ``todo``, stored again from ``base``
        itself (``store/compaction.py``) — not in a resumed cycle."""
        repo = self.target.repo
        done = repo.committed_cycle(cycle.cycle_id)
        if done is None:
            writer = repo.begin(cycle.cycle_id, base=base, disk_sizes=dict(cycle.disk_sizes),
                                kind=kind)
            mode = self.settings.compression  # normalised by __post_init__
            if mode == "off":
                writer.zstd_level = 0
            writer.adaptive = mode == "auto"
            streaming = False
            # progress saves (the record only: what is stored is the store's to say) run in
            # this thread, off the feeding thread: its fsyncs no longer stall reading and
            # compressing. One at a time; every one has landed before _ship returns or raises,
            # so none can overwrite a later synchronous save.
            saver = ThreadPoolExecutor(1, thread_name_prefix=f"drsite-save-{self.rec.item_id}")
            saving: Future[None] | None = None
            try:
                rep = self.report
                resumed = 0
                remaining: dict[str, ExtentList] = {}
                fresh = True
                for disk_id in sorted(todo):
                    covered = writer.covered(disk_id)
                    fresh = fresh and len(covered) == 0
                    resumed += todo[disk_id].intersect(covered).total
                    remaining[disk_id] = todo[disk_id].subtract(covered)
                if fresh and isinstance(self.target, StreamingTarget):
                    # the replica is written from the buffers we ship (a resumed cycle is not:
                    # its replica catches up from the store after the commit)
                    writer.tee = self.target.open_stream(cycle.cycle_id, base,
                                                         dict(cycle.disk_sizes))
                    streaming = writer.tee is not None
                if kind == "initial" and resumed:
                    rep.initial_resumed_from = resumed
                    log.info("%s: resuming initial replication, %d bytes already stored",
                             self.rec.vm_name, resumed)
                rep.step = step
                rep.bytes_total = resumed + sum(e.total for e in remaining.values())
                rep.bytes_done = resumed
                self._emit()
                since_save = 0
                io = self.settings.io_size
                bucket: TokenBucket | None = None
                if self.settings.bandwidth_limit_bps:
                    rate = self.settings.bandwidth_limit_bps
                    bucket = TokenBucket(rate, self.clock)
                    io = max(64 * 1024, min(io, rate // 4))  # small pieces: a smooth rate
                slabs = SlabPool(io)  # read buffers, reused across the cycle's disks
                for disk_id in sorted(remaining):
                    ext = remaining[disk_id].split(io)
                    if len(ext) == 0:
                        continue
                    reader = self.driver.open_cycle_reader(cycle, disk_id)
                    try:
                        for offs, lens, data, slab in read_batches(reader, ext, io, slabs):
                            if bucket is not None:
                                bucket.consume(len(data))
                            writer.write_many(disk_id, offs, lens, data, owner=slab)
                            rep.bytes_done += len(data)
                            since_save += len(data)
                            if since_save >= self.settings.save_every_bytes and (
                                    saving is None or saving.done()):
                                # progress only: packs are stored as they fill (the writer
                                # keeps a few in flight), so no flush here, which would
                                # stall reading and compressing until every upload landed
                                since_save = 0
                                if saving is not None:
                                    saving.result()  # its error fails the cycle, as before
                                saving = saver.submit(self._file.save_dict, self.rec.to_dict())
                            self._emit()
                    finally:
                        reader.close()
                if saving is not None:
                    saving.result()
                self._mark("ship")
                rehomed = 0
                if rehome and fresh and base is not None:
                    # the changes stored first: the time from here to the commit is
                    # re-homing's (the writer pipelines: what is handed over is not yet stored)
                    writer.flush()
                    self._mark("flush")
                    rehomed = self._rehome_into(writer, base, todo, rehome, bucket)
                    self._mark("rehome")
                self._check_fence()  # a promotion while we shipped: commit nothing
                point = writer.commit(created_at=cycle.sealed_at, consistency=cycle.consistency,
                                      meta={"vm_id": self.rec.vm_id, "vm_name": self.rec.vm_name,
                                            "epoch": cycle.epoch, "note": cycle.note,
                                            **({"sync": cycle.sync_mark} if cycle.sync_mark
                                               else {}),
                                            **({"rehomed": rehomed} if rehomed else {})})
                self._mark("commit")
                rep.bytes_sent += writer.bytes_written - writer.zero_bytes
                rep.bytes_stored += writer.bytes_stored
                took = self._rehome_seconds()   # read, verified, compressed, stored, committed
                if took > 0 and rehomed >= REHOME_MIN_STEP:
                    self._rehome_rate = rehomed / took
                streaming = False  # committed: after_commit settles the stream
            finally:
                saver.shutdown(wait=True)
                writer.close()
                if streaming:
                    assert isinstance(self.target, StreamingTarget)
                    self.target.close_stream()
        else:
            point = done
        self._finish(cycle, point)

    def _finish(self, cycle: SealedCycle, point: PointInfo) -> None:
        r = self.rec
        # a delta cycle that overran its frequency: the next one is due now, and its seal
        # should not wait for the replica's fsync (the target settles it after that seal)
        overran = (r.cycle_kind == "delta" and point.cycle_id == cycle.cycle_id
                   and r.last_cycle_started is not None
                   and self.clock.now() - r.last_cycle_started >= self.settings.frequency_s)
        if r.cycle_kind == "resync" and point.cycle_id == cycle.cycle_id:
            # the repair is committed: a failure below must not make it run again in full
            r.resync_by_hand = False
            r.resync_from_store = False
            r.resync_reason = ""
        failpoints.hit("engine.after-commit")
        if self.before_release is not None and point.cycle_id == cycle.cycle_id:
            self.before_release(cycle, point)
        self.driver.release(cycle)
        self._mark("release")
        r.cycle_id = None
        r.cycle_kind = None
        r.phase = ItemState.PROTECTED
        rep = self.report
        rep.cycles += 1
        rep.last_point_id = point.point_id
        rep.last_point_time = point.created_at
        if point.consistency is Consistency.APP:
            rep.last_app_point_time = point.created_at
        rep.step = ""
        rep.progress = 100.0
        self._save()
        self._mark("record")
        # the point is committed: what follows must not turn the cycle into a failure, except
        # damage found while hydrating (that starts the repair)
        self._post_commit_issue = None
        try:
            if overran and isinstance(self.target, StreamingTarget):
                self.target.after_commit(point, defer=True)
            else:
                self.target.after_commit(point)
        except CorruptData:
            raise
        except DrsiteError as e:
            log.warning("%s: point %s committed, but the replica did not catch up: %s",
                        r.vm_name, point.point_id, e)
            self._post_commit_issue = f"replica behind the latest point: {e.message}"
        self._mark("replica")
        try:
            if self.target.runs_retention:
                pinned = {p for p in (self.target.replica_point(),) if p}
                if isinstance(self.target, StreamingTarget):
                    # also what a deferred (unsettled) stream came from: a crash before it is
                    # settled is caught up from there
                    pinned |= self.target.pinned_points()
                now = self.clock.now()
                sweep = (self._last_gc is None
                         or now - self._last_gc >= self.settings.gc_every_s)
                self.target.repo.apply_retention(self.settings.retention, now, pinned,
                                                 sweep=sweep)
                if sweep:
                    self._last_gc = now
        except DrsiteError as e:
            log.warning("%s: retention failed: %s", r.vm_name, e)
            self._post_commit_issue = f"retention failed: {e.message}"
        self._mark("retention")

    # ----------------------------------------------------------------------------- helpers

    def _check_fence(self) -> None:
        if self.generation is not None:
            check_not_fenced(self.target.repo.store, self.rec.item_id, self.generation,
                             self.target.repo.auth)

    def _own_cycle(self, kind: str) -> SealedCycle | None:
        """The sealed cycle this item was working on, if it is still there and of ``kind``."""
        r = self.rec
        pending = self.driver.pending_cycle(r.vm_id)
        if r.cycle_id is not None and r.cycle_kind != kind:
            # a cycle of another kind (e.g. the initial copy) committed just before a crash:
            # finish it (release, hydrate) before anything new is sealed
            done = self.target.repo.committed_cycle(r.cycle_id)
            if done is not None:
                if pending is not None and pending.cycle_id == r.cycle_id:
                    self._finish(pending, done)
                    pending = self.driver.pending_cycle(r.vm_id)
                else:
                    r.cycle_id, r.cycle_kind = None, None
        if r.cycle_id is not None and r.cycle_kind == kind:
            if pending is not None and pending.cycle_id == r.cycle_id:
                return pending
            done = self.target.repo.committed_cycle(r.cycle_id)
            if done is not None and pending is None:
                # committed and released, but the record was not saved: just record it
                r.cycle_id, r.cycle_kind = None, None
                return None
            # our frozen view is gone: staged data belongs to a lost instant
            self.target.repo.abort(r.cycle_id)
            r.cycle_id, r.cycle_kind = None, None
            return None
        if kind == "delta" and pending is not None and r.cycle_id is None:
            # sealed, then crashed before the record was saved
            self._adopt(pending, kind)
            return pending
        return None

    def _adopt(self, cycle: SealedCycle, kind: str) -> None:
        self.rec.cycle_id = cycle.cycle_id
        self.rec.cycle_kind = kind
        self.rec.cycle_changed = _changed_digest(cycle)
        self._save()

    def _drop_pending(self) -> None:
        """Before a new epoch: release any sealed cycle and drop staged data of other cycles."""
        pending = self.driver.pending_cycle(self.rec.vm_id)
        if pending is not None:
            self.driver.release(pending)
        for c in self.target.repo.staged_cycles():
            self.target.repo.abort(c)
        self.rec.cycle_id, self.rec.cycle_kind = None, None

    def _app_due(self) -> bool:
        return app_consistent_due(self.report.last_app_point_time,
                                  self.settings.app_consistent_every_s, self.clock.now())

    def _fail(self, e: DrsiteError) -> None:
        r = self.rec
        now = self.clock.now()
        log.warning("%s: %s error: %s", r.vm_name, e.error_class.value, e)
        self.report.last_error = e.to_dict()
        if isinstance(e, CorruptData):
            self._quarantine_damage()
            self._store_damaged(e)
            return
        if isinstance(e, TrackingLost):
            self._mark_resync(e.message)
            r.retry.record_success()
            return
        if e.code == Forbidden.code:
            # the recovery store refused this host: its access list may lag a writer change
            # the vault made (a cancelled failover; the list comes with the store agent's next
            # heartbeat). The vault knows the grant and decides whether that is Critical
            # (``vault/scheduler.apply_result``); the engine retries rather than stop for good
            e = from_dict({**e.to_dict(), "class": ErrorClass.TRANSIENT.value})
            self.report.last_error = e.to_dict()
        r.retry.record_failure(e, now)
        if not e.transient:
            r.phase = ItemState.CRITICAL

    def _store_damaged(self, e: CorruptData) -> None:
        """Repair plan for damaged store data: resync at once against the store itself, so the
        damaged (quarantined, now unreadable) ranges always differ and are sent again."""
        r = self.rec
        log.warning("%s: %s", r.vm_name, e)
        self.report.last_error = e.to_dict()
        r.phase = ItemState.RESYNC_REQUIRED
        r.resync_from_store = True
        r.resync_reason = f"recovery store damaged: {e.message}"
        r.retry.record_success()

    def _quarantine_damage(self) -> None:
        repo = self.target.repo
        latest = repo.latest()
        if latest is None:
            return
        try:
            report = repo.verify(latest.point_id)
        except DrsiteError as e:  # verification itself failed: the resync still repairs
            log.warning("verify of %s failed: %s", latest.point_id, e)
            return
        for key in report.damaged_keys:
            repo.quarantine(key)

    def _refresh_report(self) -> None:
        r, rep = self.rec, self.report
        now = self.clock.now()
        rep.state = r.phase
        rep.resync_reason = r.resync_reason
        rep.next_attempt_at = r.retry.next_attempt_at
        rep.rpo_s = (now - rep.last_point_time) if rep.last_point_time is not None else None
        reasons: list[str] = []
        health = Health.NORMAL
        if r.phase is ItemState.CRITICAL:
            health = Health.CRITICAL
            reasons.append(rep.last_error["message"] if rep.last_error else "critical")
        else:
            if rep.rpo_s is not None and rep.rpo_s > self.settings.rpo_threshold_s:
                health = Health.WARNING
                reasons.append(f"RPO {rep.rpo_s:.0f}s exceeds threshold "
                               f"{self.settings.rpo_threshold_s:.0f}s")
            if r.phase in (ItemState.RESYNC_REQUIRED, ItemState.RESYNCING):
                health = Health.WARNING
                reasons.append(f"resync {'pending' if r.phase is ItemState.RESYNC_REQUIRED else 'running'}"
                               f": {r.resync_reason}")
            if r.retry.failures:
                health = Health.WARNING
                reasons.append(f"retrying after {r.retry.failures} failure(s)")
            if self._post_commit_issue:
                health = Health.WARNING
                reasons.append(self._post_commit_issue)
        rep.health = health
        rep.health_reasons = reasons
        rep.updated_at = now

    def _emit(self) -> None:
        rep = self.report
        rep.progress = 100.0 * rep.bytes_done / rep.bytes_total if rep.bytes_total else 100.0
        if self.on_progress is not None:
            self.on_progress(rep)

    def _save(self) -> None:
        self._file.save(self.rec)


def new_item_id() -> str:
    return "item-" + uuid.uuid4().hex[:12]
