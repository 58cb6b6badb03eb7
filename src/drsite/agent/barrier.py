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
import time
from typing import Any, Protocol

from drsite.agent.link import Command, VaultLink
from drsite.core.clockcut import ClockSample, CutPlan, best_sample
from drsite.core.errors import Busy, Conflict, DrsiteError, InvalidInput
from drsite.core.model import SealedCycle
from drsite.core.states import CommandStatus
from drsite.hypervisors.contract import HypervisorDriver, WriteHolder
from drsite.replication.driver import ItemReplicator
from drsite.replication.report import ItemState
from drsite.store.format import PointInfo

log = logging.getLogger(__name__)

KINDS = ("group_prepare", "group_seal")
CUT_SAMPLES = 5  # vault clock readings per cut at most: the shortest round trip bounds it
CUT_GOOD_S = 0.001  # enough: stop sampling once the uncertainty is below this


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


class BarrierCommands:
    def __init__(self, host: BarrierHost) -> None:
        self.host = host
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
        """Readings of the vault's cut clock, until one is good enough, ``CUT_SAMPLES`` were
        taken, local monotonic time ``until`` comes, or another round trip like the last
        would end within one more of when the hold must be asked for (a better reading is
        worth a few milliseconds of pause, not the cut: on a loaded host each reading takes
        a scheduling round of its own)."""
        out: list[ClockSample] = []
        while len(out) < CUT_SAMPLES and time.monotonic() < until:
            try:
                out.append(ClockSample(*self.host.link.clock_sample(
                    timeout=max(0.05, until - time.monotonic()))))
            except DrsiteError as e:
                log.info("vault clock reading failed: %s", e)
                break
            best = best_sample(out, clock_id, time.monotonic())
            if best is None:
                continue
            if best.radius <= CUT_GOOD_S:
                break
            rtt = out[-1].received - out[-1].sent
            if time.monotonic() + 2 * rtt > CutPlan(best, cut_at, margin).hold_at() - took:
                break
        return out

    def _cut(self, cmd: Command, hv: WriteHolder, vm_id: str
             ) -> tuple[SealedCycle, dict[str, object]] | str:
        """Hold the guest's writes around the vault's cut instant and seal after it: the
        sealed cycle and its barrier facts, or why this member misses the cut (nothing is
        held then). Claims the cut (``held``) only when its own readings prove, within the
        clock bound, that the hold began before the cut and the seal after it
        (``core.clockcut``; the argument is in ``vault/barrier_design.md``)."""
        a = cmd.args
        bid, clock_id = str(a["barrier_id"]), str(a["clock_id"])
        cut_at, margin = float(a["cut_at"]), float(a["margin_s"])
        hold_s = float(a["hold_s"])
        first = time.monotonic()
        took = min(min(self._hold_took.get(vm_id) or [0.0]), margin)
        samples = self._samples(clock_id, first + hold_s / 4, cut_at, margin, took)
        sampled = time.monotonic()
        sample = best_sample(samples, clock_id, sampled)
        if sample is None:
            return f"no reading of the vault's cut clock {clock_id} (a vault on another machine?)"
        plan = CutPlan(sample, cut_at, margin)
        u = sample.uncertainty(plan.cut_local)
        if u > hold_s / 4:
            return f"clock uncertainty {u * 1000:.1f} ms is too large"
        wait = plan.hold_at() - took - time.monotonic()
        if wait < 0:
            return (f"the cut came {-wait * 1000:.1f} ms too soon (command late: here "
                    f"{(plan.cut_local - first) * 1000:.0f} ms before the cut, "
                    f"{len(samples)} clock reading(s) took {(sampled - first) * 1000:.0f} ms)")
        time.sleep(wait)
        calling = time.monotonic()
        hv.hold(vm_id, bid, timeout_s=hold_s, app_consistent=bool(a.get("app_consistent")))
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
        cycle, info = hv.seal_held(vm_id, bid, app_consistent=bool(a.get("app_consistent")))
        return cycle, {**info, "uncertainty_s": u,
                       "hold_lead_s": plan.cut_local - held_local}

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
        point = done if done is not None else rep.run_cycle(
            app_consistent=bool(cmd.args.get("app_consistent")), wait_transient=False)
        held = bool(barrier.get("held")) and barrier.get("cycle_id") == point.cycle_id
        out: dict[str, Any] = {"id": bid, "held": held,
                               "paused_s": float(barrier.get("paused_s") or 0.0)}
        if barrier.get("missed"):
            out["missed"] = str(barrier["missed"])
        elif "cut_at" in cmd.args and not held:
            out["missed"] = "not sealed under a hold around the cut"
        return {"point": point.to_dict(), "report": rep.report.to_dict(), "barrier": out}
