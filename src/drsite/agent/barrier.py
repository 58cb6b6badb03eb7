"""The host's half of a group barrier (multi-VM consistency groups; invariants in
``vault/barrier_design.md``, protocol in ``docs/control-plane.md``).

``group_prepare`` holds the item's guest writes (the driver's :class:`WriteHolder`; the bound
is kept by the guest itself, so this agent being stopped or killed never blocks the guest past
it). ``group_seal`` seals the cycle under the hold and ends it in one driver call, then the
item's lane ships and commits the cycle as an ordinary delta and reports the point with
whether it was sealed under the hold (only such points may form a group point).

Prepare and the seal itself run on the agent's barrier threads, never behind an item lane or
the worker pool: they are short and local (the guest's control socket). Shipping runs in the
item's lane like any cycle.

Responsible for: the hold, the seal, the point. Not responsible for: deciding anything about
the group (the vault does), or keeping the bound (the guest does).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from drsite.agent.link import Command, VaultLink
from drsite.core.clockcut import ClockSample, CutPlan, best_sample
from drsite.core.errors import Busy, Conflict, DrsiteError, InvalidInput
from drsite.core.model import SealedCycle
from drsite.core.states import CommandStatus
from drsite.hypervisors.contract import HypervisorDriver, ScheduledCut, WriteHolder
from drsite.replication.driver import ItemReplicator
from drsite.replication.report import ItemState
from drsite.store.format import PointInfo

log = logging.getLogger(__name__)

KINDS = ("group_prepare", "group_seal")
CUT_SAMPLES = 5  # vault clock readings per cut at most: the shortest round trip bounds it
CUT_GOOD_S = 0.001  # enough: stop sampling once the uncertainty is below this
# the vault's cut clock is read in the background while cuts come (``ClockKeeper``), so a cut
# whose kept readings already bound the offset this well takes no reading of its own: a
# reading on a loaded host takes tens of ms and costs cuts, a few ms of u cost 2u of pause
CUT_FRESH_S = 0.010
CLOCK_EVERY_S = 1.0     # a background reading this often (drift adds DRIFT x age: 1 ms / s)
CLOCK_KEEP = 16         # the last readings kept
CLOCK_MAX_AGE_S = 30.0  # an older reading is never used (its drift term alone is 30 ms)
CLOCK_IDLE_S = 120.0    # no cut for this long: the background readings stop until the next


class BarrierHost(Protocol):
    """What these commands need of the agent daemon."""

    hypervisor: HypervisorDriver
    link: VaultLink

    def live_item(self, cmd: Command) -> tuple[Any, ItemReplicator]: ...

    def lane_idle(self, item_id: str) -> bool:
        """No task queued or running in the item's lane."""
        ...

    def note_started(self, cmd: Command, **facts: Any) -> None:
        """Journal that ``cmd`` started, with ``facts`` (the first call's facts are kept)."""
        ...

    def started_facts(self, command_id: str) -> dict[str, Any] | None: ...

    def already_done(self, cmd: Command, rep: ItemReplicator) -> PointInfo | None:
        """The point the command's cycle committed before a restart cut off its result."""
        ...


def _holder(hv: HypervisorDriver) -> WriteHolder:
    if not isinstance(hv, WriteHolder):
        raise InvalidInput(f"the {type(hv).__name__} driver cannot hold guest writes for a "
                           "group barrier", hint="Members of a consistent group need a driver "
                                                 "with write holds (the file driver); this VM "
                                                 "gets per-VM points.")
    return hv


class ClockKeeper:
    """Readings of the vault's cut clock, kept fresh between barriers: once a cut came, a
    thread takes one reading every ``every`` s until no cut came for ``CLOCK_IDLE_S``. A
    cut then maps its instant with the best kept reading (the shortest round trip, the least
    drift since) and needs no round trip before it holds. A reading is a bound whatever its
    age (``core.clockcut``: radius + DRIFT x age); ``CLOCK_MAX_AGE_S`` keeps stale ones out."""

    def __init__(self, read: Callable[[], ClockSample], stopping: Callable[[], bool], *,
                 every: float = CLOCK_EVERY_S) -> None:
        self._read, self._stopping, self.every = read, stopping, every
        self._lock = threading.Lock()
        self._samples: list[ClockSample] = []
        self._last_cut = float("-inf")
        self._thread: threading.Thread | None = None

    def add(self, sample: ClockSample) -> None:
        with self._lock:
            self._samples = [*self._samples[-(CLOCK_KEEP - 1):], sample]

    def samples(self, clock_id: str, now: float) -> list[ClockSample]:
        """The kept readings of ``clock_id`` not older than ``CLOCK_MAX_AGE_S`` at ``now``."""
        with self._lock:
            return [x for x in self._samples
                    if x.clock_id == clock_id and now - x.received <= CLOCK_MAX_AGE_S]

    def cut_came(self) -> None:
        """A cut came: keep (or start) reading in the background."""
        with self._lock:
            self._last_cut = time.monotonic()
            if self._thread is not None and self._thread.is_alive():
                return
            self._thread = threading.Thread(target=self._run, daemon=True,
                                            name="agent-cut-clock")
            self._thread.start()

    def _run(self) -> None:
        while not self._stopping():
            with self._lock:
                if time.monotonic() - self._last_cut > CLOCK_IDLE_S:
                    self._thread = None
                    return
            try:
                self.add(self._read())
            except DrsiteError as e:
                log.debug("background reading of the vault's cut clock failed: %s", e)
            except Exception:   # the link closed under us (the agent stops): end quietly
                if self._stopping():
                    return
                log.exception("background reading of the vault's cut clock failed")
            time.sleep(self.every)


class BarrierCommands:
    def __init__(self, host: BarrierHost) -> None:
        self.host = host
        self.clock = ClockKeeper(
            lambda: ClockSample(*self.host.link.clock_sample(timeout=1.0)),
            lambda: bool(getattr(self.host, "stopping", False)))  # the agent's property
        # how long each VM's recent hold calls took (a QEMU hold spawns its watchdog before
        # the stop): a cut's hold call starts earlier by the shortest of them (one slow call
        # on a busy host must not lengthen every later pause), at most the margin
        self._hold_took: dict[str, list[float]] = {}

    def prepare(self, cmd: Command) -> dict[str, Any]:
        """Hold the guest's writes until the seal, the barrier's end or ``hold_s``, whichever
        comes first. Refused (the member misses the barrier) when the barrier already ended
        or the item is busy (a cycle in flight, not protected, work queued in its lane)."""
        a = cmd.args
        bid = str(a["barrier_id"])
        left = float(a["deadline"]) - time.time()
        if left <= 0.0:
            raise Conflict(f"group barrier {bid} ended before this host took its prepare",
                           hint="Nothing to do: the vault sends the member a per-VM cycle.")
        hv = _holder(self.host.hypervisor)
        _, rep = self.host.live_item(cmd)
        if rep.rec.phase is not ItemState.PROTECTED or rep.rec.cycle_id is not None \
                or not self.host.lane_idle(cmd.item_id):
            raise Busy(f"{rep.rec.vm_name} is busy ({rep.rec.phase.value}"
                       f"{', cycle in flight' if rep.rec.cycle_id else ''}); it misses "
                       f"group barrier {bid}")
        info = hv.hold(rep.rec.vm_id, bid, timeout_s=min(float(a["hold_s"]), left),
                       app_consistent=bool(a.get("app_consistent")))
        return {"barrier_id": bid, "held_at": info.get("held_at"), "host_time": time.time()}

    def seal(self, cmd: Command) -> None:
        """Seal under the hold and end it (barrier thread); shipping follows in the lane.
        With ``cut_at`` (a clock cut) hold around the cut first (:meth:`_cut`). Journals the
        seal's facts only after the guest writes again."""
        bid = str(cmd.args["barrier_id"])
        hv = _holder(self.host.hypervisor)
        _, rep = self.host.live_item(cmd)
        vm_id = rep.rec.vm_id
        if rep.rec.cycle_id is not None or self.host.hypervisor.pending_cycle(vm_id) is not None:
            hv.unhold(vm_id, bid)  # a cycle is in flight: it ships first, no group point
            if "cut_at" in cmd.args:
                self._took_cut(cmd, held=False)
            return
        app = bool(cmd.args.get("app_consistent"))
        if "cut_at" in cmd.args:
            got = self._cut(cmd, hv, vm_id)
            if isinstance(got, str):
                log.info("item %s: missed the clock cut of group barrier %s: %s",
                         cmd.item_id, bid, got)
                self.host.note_started(cmd, barrier={"id": bid, "held": False, "missed": got})
                self._took_cut(cmd, held=False)
                return  # the lane's cycle is a per-VM point
            cycle, info = got
            self._took_cut(cmd, held=bool(info.get("held")))
        else:
            cycle, info = hv.seal_held(vm_id, bid, app_consistent=app)
        try:
            latest = rep.target.repo.latest()
            before = latest.seq if latest is not None else 0
        except DrsiteError:
            before = None
        facts: dict[str, Any] = {"barrier": {**info, "cycle_id": cycle.cycle_id}}
        if before is not None:
            facts["before_seq"] = before
        self.host.note_started(cmd, **facts)
        log.info("item %s: sealed for group barrier %s (held %s, writes waited %s s%s)",
                 cmd.item_id, bid, info.get("held"), info.get("paused_s"),
                 f"; cut: clock uncertainty {info['uncertainty_s']:.4f} s, hold in place "
                 f"{info['hold_lead_s']:.4f} s before the cut" if "uncertainty_s" in info
                 else "")

    def _took_cut(self, cmd: Command, *, held: bool) -> None:
        """Tell the vault this member took the cut (a ``running`` post; else the vault
        withdraws its seal at the cut's bound, as it would for a stopped agent)."""
        try:
            self.host.link.post_result(cmd.command_id, status=CommandStatus.RUNNING,
                                       progress=50.0, result={"cut": {"held": held}})
        except DrsiteError as e:
            log.info("command %s: the vault did not hear that the cut was taken: %s",
                     cmd.command_id, e)

    def _samples(self, clock_id: str, until: float, cut_at: float, margin: float,
                 took: float) -> list[ClockSample]:
        """The kept readings of the vault's cut clock (:class:`ClockKeeper`) and, unless one
        of them already bounds the cut within ``CUT_FRESH_S``, new ones: until one is good
        enough, ``CUT_SAMPLES`` were taken, local monotonic time ``until`` comes, or another
        round trip like the last would end within one more of when the hold must be asked
        for (a better reading is worth a few milliseconds of pause, not the cut: on a loaded
        host each reading takes a scheduling round of its own)."""
        out = self.clock.samples(clock_id, time.monotonic())
        best = best_sample(out, clock_id, time.monotonic())
        if best is not None:
            if best.uncertainty(cut_at - best.offset) <= CUT_FRESH_S:
                return out
            # a kept reading will do: a new one must not cost the hold it would improve
            until = min(until, CutPlan(best, cut_at, margin).hold_at() - took - 0.01)
        taken = 0
        while taken < CUT_SAMPLES and time.monotonic() < until:
            try:
                got = ClockSample(*self.host.link.clock_sample(
                    timeout=max(0.05, until - time.monotonic())))
            except DrsiteError as e:
                log.info("vault clock reading failed: %s", e)
                break
            taken += 1
            out.append(got)
            self.clock.add(got)
            best = best_sample(out, clock_id, time.monotonic())
            if best is None:
                continue
            if best.radius <= CUT_GOOD_S:
                break
            rtt = got.received - got.sent
            if time.monotonic() + 2 * rtt > CutPlan(best, cut_at, margin).hold_at() - took:
                break
        return out

    def _cut(self, cmd: Command, hv: WriteHolder, vm_id: str
             ) -> tuple[SealedCycle, dict[str, object]] | str:
        """Hold the guest's writes around the vault's cut instant and seal after it: the
        sealed cycle and its barrier facts, or why this member misses the cut (nothing is
        held then). Claims the cut (``held``) only when its own readings prove, within the
        clock bound, that the hold began before the cut and the seal after it
        (``core.clockcut``; the argument is in ``vault/barrier_design.md``). A driver that
        times the cut in the guest (:class:`ScheduledCut`) is given the instants; else this
        thread sleeps until the hold, calls it, then the seal."""
        a = cmd.args
        bid, clock_id = str(a["barrier_id"]), str(a["clock_id"])
        cut_at, margin = float(a["cut_at"]), float(a["margin_s"])
        hold_s = float(a["hold_s"])
        app = bool(a.get("app_consistent"))
        self.clock.cut_came()
        scheduled = isinstance(hv, ScheduledCut) and not app
        if scheduled:  # no call in the pause: only the guest's own wake-up needs a margin
            margin = min(margin, float(a.get("guest_margin_s", margin)))
            took = 0.0
        else:
            took = min(min(self._hold_took.get(vm_id) or [0.0]), margin)
        first = time.monotonic()
        samples = self._samples(clock_id, first + hold_s / 4, cut_at, margin, took)
        sampled = time.monotonic()
        sample = best_sample(samples, clock_id, sampled)
        if sample is None:
            return f"no reading of the vault's cut clock {clock_id} (a vault on another machine?)"
        plan = CutPlan(sample, cut_at, margin)
        u = sample.uncertainty(plan.cut_local)
        if u > hold_s / 4:
            return f"clock uncertainty {u * 1000:.1f} ms is too large"
        taken = sum(1 for x in samples if x.sent >= first)
        late = (f"(command late: here {(plan.cut_local - first) * 1000:.0f} ms before the cut, "
                f"{taken} clock reading(s) in {(sampled - first) * 1000:.0f} ms)")
        if scheduled:
            assert isinstance(hv, ScheduledCut)
            return self._scheduled_cut(hv, vm_id, bid, plan, u, hold_s, late)
        wait = plan.hold_at() - took - time.monotonic()
        if wait < 0:
            return f"the cut came {-wait * 1000:.1f} ms too soon {late}"
        time.sleep(wait)
        calling = time.monotonic()
        hv.hold(vm_id, bid, timeout_s=hold_s, app_consistent=app)
        held_local = time.monotonic()
        self._hold_took[vm_id] = [*self._hold_took.get(vm_id, [])[-4:], held_local - calling]
        if not plan.held_before_cut(held_local):
            hv.unhold(vm_id, bid)
            return (f"the hold was in place {(held_local - plan.hold_at()) * 1000:.1f} ms "
                    "after its planned start, not surely before the cut")
        while (left := plan.seal_from() - time.monotonic()) > 0:
            time.sleep(left)
        sealing = time.monotonic()
        if not plan.sealed_after_cut(sealing):  # by construction; the check is the claim
            hv.unhold(vm_id, bid)
            return "the seal could not be placed surely after the cut"
        cycle, info = hv.seal_held(vm_id, bid, app_consistent=app)
        return cycle, {**info, "uncertainty_s": u,
                       "hold_lead_s": plan.cut_local - held_local}

    @staticmethod
    def _scheduled_cut(hv: ScheduledCut, vm_id: str, bid: str, plan: CutPlan, u: float,
                       hold_s: float, late: str) -> tuple[SealedCycle, dict[str, object]] | str:
        """The cut timed by the guest: the claim rests on the instants it reports (this
        host's monotonic clock), checked here against the plan as a hold of our own is."""
        hold_at, hold_by, seal_at = plan.hold_at(), plan.hold_by(), plan.seal_from()
        now = time.monotonic()
        if hold_by <= now:
            return f"the cut came {(now - hold_at) * 1000:.1f} ms too soon {late}"
        try:
            cycle, info = hv.cut_seal(vm_id, bid, hold_at=max(hold_at, now), hold_by=hold_by,
                                      seal_at=seal_at, timeout_s=hold_s)
        except DrsiteError as e:
            return f"the guest did not take the cut: {e}"
        if cycle is None:
            return str(info.get("missed") or "the guest did not take the cut")
        held_local, sealed_local = info.get("held_local"), info.get("sealed_local")
        facts: dict[str, object] = {**info, "uncertainty_s": u, "hold_lead_s": 0.0}
        if isinstance(held_local, (int, float)):
            facts["hold_lead_s"] = plan.cut_local - float(held_local)
        if info.get("held") and not (
                isinstance(held_local, (int, float)) and plan.held_before_cut(float(held_local))
                and isinstance(sealed_local, (int, float))
                and plan.sealed_after_cut(float(sealed_local))):
            facts["held"] = False   # sealed, but not provably around the cut: a per-VM point
            facts["missed"] = "the guest's hold and seal were not surely around the cut"
        return cycle, facts

    def ship(self, cmd: Command) -> dict[str, Any]:
        """(Item lane) Ship and commit the sealed cycle; seal now when the barrier thread did
        not (a restart: the hold is gone, so the point is per-VM)."""
        bid = str(cmd.args["barrier_id"])
        _, rep = self.host.live_item(cmd)
        facts = self.host.started_facts(cmd.command_id) or {}
        barrier = dict(facts.get("barrier") or {"id": bid, "held": False, "paused_s": 0.0})
        done = self.host.already_done(cmd, rep)
        if "barrier" not in facts and isinstance(self.host.hypervisor, WriteHolder):
            # the barrier thread did not seal (a restart, a failed seal): a hold it left ends
            # now rather than at its bound; this cycle is a per-VM point
            with contextlib.suppress(DrsiteError):
                self.host.hypervisor.unhold(rep.rec.vm_id, bid)
        cut = barrier.get("cycle_id")
        point = done if done is not None else rep.run_cycle(
            app_consistent=bool(cmd.args.get("app_consistent")), wait_transient=False,
            sealed_for_call=str(cut) if cut else None)
        held = bool(barrier.get("held")) and barrier.get("cycle_id") == point.cycle_id
        out: dict[str, Any] = {"id": bid, "held": held,
                               "paused_s": float(barrier.get("paused_s") or 0.0)}
        if barrier.get("missed"):
            out["missed"] = str(barrier["missed"])
        elif "cut_at" in cmd.args and not held:
            out["missed"] = "not sealed under a hold around the cut"
        return {"point": point.to_dict(), "report": rep.report.to_dict(), "barrier": out}
