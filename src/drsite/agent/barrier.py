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

from drsite.agent.link import Command
from drsite.core.errors import Busy, Conflict, DrsiteError, InvalidInput
from drsite.hypervisors.contract import HypervisorDriver, WriteHolder
from drsite.replication.driver import ItemReplicator
from drsite.replication.report import ItemState
from drsite.store.format import PointInfo

log = logging.getLogger(__name__)

KINDS = ("group_prepare", "group_seal")


class BarrierHost(Protocol):
    """What these commands need of the agent daemon."""

    hypervisor: HypervisorDriver

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
        Journals the seal's facts only after the guest writes again."""
        bid = str(cmd.args["barrier_id"])
        hv = _holder(self.host.hypervisor)
        _, rep = self.host.live_item(cmd)
        vm_id = rep.rec.vm_id
        if rep.rec.cycle_id is not None or self.host.hypervisor.pending_cycle(vm_id) is not None:
            hv.unhold(vm_id, bid)  # a cycle is in flight: it ships first, no group point
            return
        cycle, info = hv.seal_held(vm_id, bid, app_consistent=bool(cmd.args.get("app_consistent")))
        try:
            latest = rep.target.repo.latest()
            before = latest.seq if latest is not None else 0
        except DrsiteError:
            before = None
        facts: dict[str, Any] = {"barrier": {**info, "cycle_id": cycle.cycle_id}}
        if before is not None:
            facts["before_seq"] = before
        self.host.note_started(cmd, **facts)
        log.info("item %s: sealed for group barrier %s (held %s, writes waited %s s)",
                 cmd.item_id, bid, info.get("held"), info.get("paused_s"))

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
        return {"point": point.to_dict(), "report": rep.report.to_dict(),
                "barrier": {"id": bid, "held": held,
                            "paused_s": float(barrier.get("paused_s") or 0.0)}}
