"""Multi-VM consistency groups: the vault runs a two-phase barrier over a consistent group's
members and records a group point when every member's point, sealed under the barrier's hold,
is committed. Invariants in ``vault/barrier_design.md``; protocol in ``docs/control-plane.md``.

One barrier per group at a time, at the group policy's frequency (anchored like cycles):

1. **prepare**: ``group_prepare {barrier_id, hold_s, deadline, app_consistent}`` to every
   eligible member (protected, not critical, no replication command open). Each agent holds
   its guest's writes (bounded by the guest itself: ``hold_s``, never past ``deadline``).
2. when every member answered ``held`` before ``prepare_deadline`` (half the bound):
   ``group_seal {barrier_id}`` to all of them, in the transaction that records the last
   answer (the command channel delivers it in milliseconds). Each seals under its hold, ends
   it, ships and commits an ordinary delta point, and answers with it and ``held``.
3. every seal answered: ``committed`` (a group point) only if every member was held when it
   sealed and its point is committed; otherwise ``partial``.

By default the barrier is a **clock cut** instead: ``group_seal {barrier_id, cut_at,
clock_id, margin_s, hold_s, app_consistent}`` to every member at once, ``cut_at`` an instant
of this process's cut clock (:func:`cut_clock`, read by agents through ``POST
/agent/clock``) ``barrier_cut_lead`` of the bound ahead; each agent holds around it, seals and answers as in
step 2 (``missed`` when it could not prove its hold around the cut). A cut a member missed is
``partial``; after two such in a row the group's next barrier is two-phase (``_cut_mode``).

A member that misses the prepare (refused, failed, or silent at ``prepare_deadline``: a
stopped or dead agent) makes the barrier ``partial`` at once: its open prepare is withdrawn,
it gets a plain ``cycle`` (a per-VM point whenever its agent answers), and the held members
are sealed at once (per-VM points; their guests write again now, not at the bound).
A ``partial`` barrier is a warning alert ``group_barrier:GROUP`` until a later one commits.

Retention: :func:`kept_member_points` names the member points that group points within the
policy's retention keep (the ``keep`` of every ``retention`` command; a removal of one is
refused by ``trust``). A group point one of whose member points is gone is not offered
(:func:`latest_group_point`, :func:`member_point`; listed with ``complete: false``).

Responsible for: when a barrier runs, its commands, its outcome, which member points group
points keep. Not responsible for: the bound on guest writes (the guest keeps it), shipping
(agents), applying retention (agents).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from drsite.core.errors import InvalidInput, PermanentError
from drsite.core.retention import PointStamp, RetentionRule, points_to_keep
from drsite.core.states import FINAL_COMMAND_STATUSES, OPEN_COMMAND_STATUSES, CommandStatus, ItemProtection
from drsite.fsutil import monotonic_clock_id
from drsite.replication.planner import app_consistent_due, next_cycle_at
from drsite.replication.report import ItemState
from drsite.vault import commands
from drsite.vault.audit import record_event
from drsite.vault.db.database import Database
from drsite.vault.db.models import Command, Group, GroupBarrier, Item, Point, Policy
from drsite.vault.ids import new_id
from drsite.vault.settings import VaultSettings

log = logging.getLogger(__name__)

MAX_MEMBERS = 16  # as Azure Site Recovery's multi-VM consistency groups
MIN_TIMEOUT_MS, MAX_TIMEOUT_MS = 50, 10_000
OPEN_STATES = ("preparing", "sealing")
SEAL_TIMEOUT_MIN_S = 60.0  # a member whose seal does not answer in max(this, 3 periods) fails
KINDS = ("group_prepare", "group_seal")
CUT_MISSES_TO_FALL_BACK = 2  # missed cuts in a row before one two-phase barrier


# the clock a clock cut is named in: the machine's monotonic clock (never stepped), which
# agents sample through POST /agent/clock; an agent whose samples come from another clock
# (another machine's vault) cannot map the cut and misses it
CLOCK_ID = monotonic_clock_id()


def cut_clock() -> float:
    """The clock of :data:`CLOCK_ID` (seconds)."""
    return time.monotonic()


def check_timeout_ms(ms: int) -> int:
    if not MIN_TIMEOUT_MS <= ms <= MAX_TIMEOUT_MS:
        raise InvalidInput(f"barrier_timeout_ms must be {MIN_TIMEOUT_MS} to {MAX_TIMEOUT_MS}",
                           hint="It bounds how long guest writes may wait per group point; "
                                "500 (the default) suits hosts on one LAN.")
    return ms


def member_count(s: Session, group_id: int) -> int:
    """Items that count against the group's 16 members (every live protection)."""
    return len(s.scalars(select(Item.id).where(
        Item.group_id == group_id,
        Item.status.in_((ItemProtection.ENABLING, ItemProtection.PROTECTED)))).all())


def check_members(s: Session, group: Group, adding: int = 0) -> None:
    """``InvalidInput`` when a consistent group would hold more than 16 VMs."""
    n = member_count(s, group.id) + adding
    if group.consistent and n > MAX_MEMBERS:
        raise InvalidInput(f"a consistent group holds at most {MAX_MEMBERS} VMs; group "
                           f"{group.name} would hold {n}",
                           hint=f"Split the VMs over several groups, or make {group.name} not "
                                f"consistent: drsite groups update {group.name} --no-consistent")


def locked(s: Session, barrier_id: str) -> GroupBarrier | None:
    """The barrier, read again and locked until this transaction ends (``FOR UPDATE`` on
    PostgreSQL): its ``members`` is one JSON value that every member's result and the tick
    rewrite whole, so two writers that read it unlocked lose each other's member (two seals
    posted at once: one member stayed ``sealing`` until the seal timeout). Lock order: a
    result takes its item, this barrier, then its command (``lock_for_result``); the tick
    takes the barrier, then its members' commands."""
    return s.get(GroupBarrier, barrier_id, with_for_update=True, populate_existing=True)


def lock_for_result(s: Session, kind: str, args: dict[str, Any] | None) -> None:
    """Before a ``group_*`` command's row is locked for its result: its barrier (see
    :func:`locked`)."""
    if kind in KINDS:
        locked(s, str((args or {}).get("barrier_id") or ""))


def _set(b: GroupBarrier, item_id: str, **values: Any) -> None:
    members = {k: dict(v) for k, v in (b.members or {}).items()}
    members[item_id] = {**members.get(item_id, {}), **values}
    b.members = members  # a new object: JSON columns do not track mutation


def on_result(s: Session, cmd: Command, now: float) -> None:
    """Digest a final ``group_prepare``/``group_seal`` result (in the result's transaction)."""
    if cmd.kind not in KINDS or cmd.status not in FINAL_COMMAND_STATUSES or cmd.item_id is None:
        return
    b = locked(s, str((cmd.args or {}).get("barrier_id") or ""))
    if b is None or cmd.item_id not in (b.members or {}):
        return
    m = b.members[cmd.item_id]
    ok = cmd.status == CommandStatus.SUCCEEDED
    if cmd.kind == "group_prepare":
        if m.get("prepare") != cmd.id or m.get("state") != "pending":
            return
        if ok and b.state == "preparing" and now < b.prepare_deadline:
            _set(b, cmd.item_id, state="held", held_at=(cmd.result or {}).get("held_at"))
            if all(v.get("state") == "held" for v in b.members.values()):
                _seal_all(s, b, now)
        elif ok:  # held, but after the prepare's bound: sealed at once (per-VM point)
            _set(b, cmd.item_id, state="held", error="held after the prepare's bound")
            if b.state == "preparing":
                _give_up(s, b, now)
        else:
            why = str((cmd.error or {}).get("message") or "prepare failed")
            _set(b, cmd.item_id, state="missed", error=why)
            if b.state == "preparing":
                _give_up(s, b, now)
        return
    if m.get("seal") != cmd.id:
        return
    res = dict(cmd.result or {})
    point = dict(res.get("point") or {})
    barrier = dict(res.get("barrier") or {})
    if ok:
        _set(b, cmd.item_id, state="committed", point_id=point.get("point_id"),
             point_created_at=point.get("created_at"), held=bool(barrier.get("held")),
             paused_s=barrier.get("paused_s"),
             **({"error": str(barrier["missed"])} if barrier.get("missed") else {}))
    else:
        _set(b, cmd.item_id, state="failed", held=False,
             error=str((cmd.error or {}).get("message") or "seal failed"))
    _maybe_end(s, b, now)


def _is_cut(b: GroupBarrier) -> bool:
    """A clock-cut barrier (its members were sent ``group_seal`` with ``cut_at``)."""
    return any("cut_at" in m for m in (b.members or {}).values())


def on_progress(s: Session, cmd: Command) -> None:
    """A ``running`` post of a cut's ``group_seal``: the agent took the cut (held and
    sealed, or missed it) and ships; it is no longer withdrawn at the cut's bound."""
    if cmd.kind != "group_seal" or cmd.item_id is None or "cut" not in (cmd.result or {}):
        return  # the agent's periodic progress posts carry no ``cut``
    b = locked(s, str((cmd.args or {}).get("barrier_id") or ""))
    if b is None or cmd.item_id not in (b.members or {}) or not _is_cut(b):
        return
    if b.members[cmd.item_id].get("seal") == cmd.id:
        _set(b, cmd.item_id, took_cut=True)


def _cut_bound(s: Session, b: GroupBarrier, now: float) -> None:
    """The cut's bound passed: members that did not say they took the cut (a stopped or dead
    agent, a lost command) miss it, as a silent member misses a prepare: their seal is
    withdrawn (a late answer is refused), they get a plain cycle; the others' points are
    per-VM (the barrier is ``partial``)."""
    late: list[str] = []
    for item_id in sorted(b.members):
        m = b.members[item_id]
        if m.get("took_cut") or m.get("state") != "sealing":
            continue
        cmd = commands.locked(s, str(m.get("seal")))
        if cmd is None or cmd.status not in OPEN_COMMAND_STATUSES:
            continue
        cmd.status = CommandStatus.FAILED
        cmd.error = PermanentError(
            f"withdrawn: group barrier {b.id} passed its cut's bound without this member",
            hint="Nothing to do; the member gets a per-VM point.").to_dict()
        cmd.updated_at = cmd.finished_at = now
        _set(b, item_id, state="missed", held=False,
             error="did not take the cut within the barrier's bound")
        late.append(str(m.get("vm_name") or item_id))
        if commands.outstanding(s, item_id, ("protect", "cycle", "resync")) is None:
            commands.enqueue(s, host_id=str(m["host_id"]), kind="cycle", item_id=item_id,
                             args={"app_consistent": False}, now=now)
    if late:
        b.message = f"missed the barrier: {', '.join(late)} (per-VM points)"
        log.warning("group barrier %s: %s", b.id, b.message)
    _maybe_end(s, b, now)


def _seal_all(s: Session, b: GroupBarrier, now: float) -> None:
    b.state = "sealing"
    for item_id in sorted(b.members):
        _seal_one(s, b, item_id, now)


def _seal_one(s: Session, b: GroupBarrier, item_id: str, now: float) -> None:
    m = b.members[item_id]
    if m.get("seal"):
        return
    cmd = commands.enqueue(s, host_id=str(m["host_id"]), kind="group_seal", item_id=item_id,
                           args={"barrier_id": b.id, "app_consistent": b.app_consistent}, now=now)
    _set(b, item_id, seal=cmd.id, state="sealing" if m.get("state") == "held" else m.get("state"))


def _give_up(s: Session, b: GroupBarrier, now: float) -> None:
    """A member missed the prepare: no group point from this barrier. Withdraw the open
    prepares, seal the held members now (per-VM points; their writes resume at once) and give
    the members that missed a plain cycle."""
    b.state = "sealing"
    missed: list[str] = []
    for item_id in sorted(b.members):
        m = b.members[item_id]
        if m.get("state") == "held":
            _seal_one(s, b, item_id, now)
            continue
        if m.get("state") == "pending":
            prep = commands.locked(s, str(m.get("prepare")))
            if prep is not None and prep.status in OPEN_COMMAND_STATUSES:
                prep.status = CommandStatus.FAILED
                prep.error = PermanentError(
                    f"withdrawn: group barrier {b.id} passed its bound without this member",
                    hint="Nothing to do; the member gets a per-VM point.").to_dict()
                prep.updated_at = prep.finished_at = now
            _set(b, item_id, state="missed", error="no answer within the barrier's bound")
        missed.append(str(b.members[item_id].get("vm_name") or item_id))
        if commands.outstanding(s, item_id, ("protect", "cycle", "resync")) is None:
            commands.enqueue(s, host_id=str(m["host_id"]), kind="cycle", item_id=item_id,
                             args={"app_consistent": False}, now=now)
    b.message = f"missed the barrier: {', '.join(missed)} (per-VM points)"
    log.warning("group barrier %s: %s", b.id, b.message)
    _maybe_end(s, b, now)


def _seal_timeout(s: Session, b: GroupBarrier, now: float) -> None:
    """Members whose seal did not answer in time (an agent stopped or gone after it held):
    the barrier ends without a group point, so the group's other members are not left without
    points; a late answer still commits that member's per-VM point."""
    late = []
    for item_id, m in sorted(b.members.items()):
        if m.get("state") in ("pending", "held", "sealing"):
            _set(b, item_id, state="failed", held=False, error="no seal answer in time")
            late.append(str(m.get("vm_name") or item_id))
    if late:
        b.message = f"no seal answer in time: {', '.join(late)} (per-VM points)"
    _maybe_end(s, b, now)


def _maybe_end(s: Session, b: GroupBarrier, now: float) -> None:
    if b.state != "sealing":
        return
    ms = b.members.values()
    if any(m.get("state") in ("pending", "held", "sealing") for m in ms):
        return
    b.ended_at = now
    group = s.get(Group, b.group_id)
    name = group.name if group is not None else str(b.group_id)
    if all(m.get("state") == "committed" and m.get("held") for m in ms):
        b.state = "committed"
        b.point_time = min(float(m.get("point_created_at") or now) for m in ms)
        b.message = f"group point of {len(b.members)} VM(s)"
        record_event(s, now, "group", name, f"group point {b.id} of {len(b.members)} VM(s)")
        return
    b.state = "partial"
    if not b.message:
        unheld = sorted(str(m.get("vm_name")) + (f" ({m['error']})" if m.get("error") else "")
                        for m in ms if not m.get("held"))
        what = "missed the clock cut" if _is_cut(b) else "not held when sealed"
        b.message = (f"{what}: {', '.join(unheld)} (per-VM points)" if unheld
                     else "a member's point failed")
    record_event(s, now, "group", name, f"barrier {b.id} without a group point: {b.message}")


class BarrierRunner:
    """Starts barriers when due and ends those whose prepare passed its bound. ``tick()`` is
    called by the scheduler's tick (clock injected)."""

    def __init__(self, db: Database, settings: VaultSettings) -> None:
        self.db = db
        self.settings = settings

    def tick(self) -> list[GroupBarrier]:
        now = self.settings.clock.now()
        started: list[GroupBarrier] = []
        with self.db.read() as s:
            groups = [g.id for g in s.scalars(select(Group).where(Group.consistent.is_(True),
                                                                 Group.policy_id.is_not(None)))]
        for gid in groups:
            with self.db.tx() as s:
                b = self._group(s, gid, now)
                if b is not None:
                    started.append(b)
        return started

    def _group(self, s: Session, gid: int, now: float) -> GroupBarrier | None:
        group = s.get(Group, gid)
        if group is None or not group.consistent or group.policy_id is None:
            return None
        policy = s.get(Policy, group.policy_id)
        if policy is None:
            return None
        open_b = s.scalars(select(GroupBarrier).where(GroupBarrier.group_id == gid,
                                                      GroupBarrier.state.in_(OPEN_STATES))
                           .order_by(GroupBarrier.id).with_for_update()  # see locked()
                           .execution_options(populate_existing=True)).all()
        for b in open_b:
            if b.state == "preparing" and now >= b.prepare_deadline:
                _give_up(s, b, now)
            elif _is_cut(b) and now >= b.prepare_deadline and b.state == "sealing" \
                    and not b.message:
                _cut_bound(s, b, now)
            elif now - b.started_at >= max(SEAL_TIMEOUT_MIN_S, 3 * policy.frequency_s):
                _seal_timeout(s, b, now)
            else:
                _maybe_end(s, b, now)
        open_b = [b for b in open_b if b.state in OPEN_STATES]
        if open_b:
            return None
        if next_cycle_at(group.last_barrier_at, policy.frequency_s, now) > now:
            return None
        return self._start(s, group, policy, now)

    def _cut_mode(self, s: Session, group: Group) -> bool:
        """A clock cut unless disabled, or unless the group's last ``CUT_MISSES_TO_FALL_BACK``
        barriers were all cuts that a member missed: then one two-phase barrier, so a member
        that cannot take cuts (its clock readings too uncertain, its commands or holds too
        slow) still lets the group make group points, while a miss now and then (a busy
        host) costs one per-VM round, not a two-phase pause."""
        if not self.settings.barrier_clock_cut:
            return False
        last = s.scalars(select(GroupBarrier)
                         .where(GroupBarrier.group_id == group.id,
                                GroupBarrier.state.in_(("committed", "partial")))
                         .order_by(GroupBarrier.started_at.desc())
                         .limit(CUT_MISSES_TO_FALL_BACK)).all()
        return len(last) < CUT_MISSES_TO_FALL_BACK or not all(
            _is_cut(b) and b.state == "partial" for b in last)

    def _start(self, s: Session, group: Group, policy: Policy, now: float) -> GroupBarrier | None:
        items = s.scalars(select(Item).where(Item.group_id == group.id,
                                             Item.status == ItemProtection.PROTECTED,
                                             Item.active_job_id.is_(None))
                          .order_by(Item.id)).all()
        if not items:
            return None
        open_rep = {i for (i,) in s.execute(select(Command.item_id).where(
            Command.item_id.in_([it.id for it in items]),
            Command.kind.in_(commands.REPLICATION_KINDS),
            Command.status.in_(OPEN_COMMAND_STATUSES)))}
        members = [it for it in items[:MAX_MEMBERS]
                   if it.id not in open_rep and it.critical_error is None
                   and it.state == ItemState.PROTECTED.value]
        # anchored on the due time, as cycles: lateness does not accumulate
        nxt = next_cycle_at(group.last_barrier_at, policy.frequency_s, now)
        group.last_barrier_at = min(nxt, now)
        if not members:
            return None
        app = app_consistent_due(group.last_app_barrier_at, policy.app_consistent_every_s, now)
        if app:
            group.last_app_barrier_at = now
        bound = group.barrier_timeout_ms / 1000.0
        b = GroupBarrier(id=new_id("gb"), group_id=group.id, state="preparing",
                         app_consistent=app, started_at=now,
                         prepare_deadline=now + bound / 2, hold_deadline=now + bound,
                         members={}, message="")
        s.add(b)
        left_out = [it.vm_name for it in items if it not in members]
        if left_out:
            # busy, resyncing or critical: a group point needs every member, so this round
            # gives the eligible members plain cycles (per-VM points) and says why
            b.state, b.ended_at = "partial", now
            b.message = f"not eligible now: {', '.join(left_out)} (per-VM points)"
            b.members = {it.id: {"host_id": it.host_id, "vm_name": it.vm_name, "prepare": None,
                                 "seal": None, "state": "missed", "error": "group not eligible"}
                         for it in members}
            for it in members:
                commands.enqueue(s, host_id=it.host_id, kind="cycle", item_id=it.id,
                                 args={"app_consistent": app}, now=now)
            return b
        ms: dict[str, Any] = {}
        # app-consistent: two-phase (a freeze hook runs inside the hold and takes longer
        # than a cut's window; the cut would be missed and the app point lost)
        if not app and self._cut_mode(s, group):
            # the cut: every member holds around one instant of this vault's clock, ``lead``
            # ahead (the command channel delivers in milliseconds, but hundreds on a loaded
            # host: a command that comes after the cut is a miss)
            lead = bound * self.settings.barrier_cut_lead
            cut_at = cut_clock() + lead
            b.state = "sealing"
            # a member that has not said it took the cut by then (a stopped or dead agent)
            # misses it: its seal is withdrawn and it gets a plain cycle (``_cut_bound``)
            b.prepare_deadline = now + lead + bound / 2
            for it in members:
                cmd = commands.enqueue(s, host_id=it.host_id, kind="group_seal", item_id=it.id,
                                       args={"barrier_id": b.id, "app_consistent": app,
                                             "cut_at": cut_at, "clock_id": CLOCK_ID,
                                             "margin_s": self.settings.barrier_cut_margin_s,
                                             "guest_margin_s":
                                                 self.settings.barrier_cut_guest_margin_s,
                                             "hold_s": bound},
                                       now=now)
                ms[it.id] = {"host_id": it.host_id, "vm_name": it.vm_name, "prepare": None,
                             "state": "sealing", "seal": cmd.id, "cut_at": cut_at}
            b.members = ms
            return b
        for it in members:
            cmd = commands.enqueue(s, host_id=it.host_id, kind="group_prepare", item_id=it.id,
                                   args={"barrier_id": b.id, "hold_s": bound,
                                         "deadline": now + bound, "app_consistent": app},
                                   now=now)
            ms[it.id] = {"host_id": it.host_id, "vm_name": it.vm_name, "prepare": cmd.id,
                         "state": "pending", "seal": None}
        b.members = ms
        return b


def _point_time(b: GroupBarrier) -> float:
    return b.point_time if b.point_time is not None else b.started_at


def kept_member_points(s: Session, item_id: str, group_id: int, rule: RetentionRule,
                       now: float) -> set[str]:
    """The item's points that group points keep: the retention rule applied to the group's
    committed group points as if each were one point stamped at its point time (every group
    point of the rule's keep-all window, one per thinning bucket, the newest always), and the
    item's member point of each group point the rule keeps. Retention must keep these on top
    of what the rule keeps of the item's own points, else a thinning that picks a different
    point per bucket for each member would break every older group point."""
    q = select(GroupBarrier).where(GroupBarrier.group_id == group_id,
                                   GroupBarrier.state == "committed")
    rows = {b.id: b for b in s.scalars(q.where(
        GroupBarrier.started_at >= now - rule.retention_s - 3600.0))}
    # the newest group point holding the item is kept however old (as the newest point is)
    for b in s.scalars(q.order_by(GroupBarrier.started_at.desc()).limit(200)):
        if item_id in (b.members or {}):
            rows.setdefault(b.id, b)
            break
    mine = [b for b in rows.values() if item_id in (b.members or {})]
    stamps = [PointStamp(b.id, _point_time(b), b.app_consistent, seq=i)
              for i, b in enumerate(sorted(mine, key=lambda b: (b.started_at, b.id)), 1)]
    keep = points_to_keep(stamps, rule, now)
    return {str(b.members[item_id].get("point_id")) for b in mine
            if b.id in keep and b.members[item_id].get("point_id")}


def _complete(s: Session, b: GroupBarrier) -> bool:
    """Every member point of the group point is catalogued and not damaged."""
    wanted = {(i, str(m.get("point_id"))) for i, m in (b.members or {}).items()}
    have = {(p.item_id, p.point_id) for p in s.scalars(select(Point).where(
        Point.item_id.in_([i for i, _ in wanted]),
        Point.point_id.in_([p for _, p in wanted]), Point.damage.is_(None)))}
    return bool(wanted) and wanted <= have


def group_points(s: Session, group: Group, *, include_partial: bool = False,
                 limit: int = 100) -> list[GroupBarrier]:
    """The group's points (committed barriers), newest first; with ``include_partial`` every
    barrier. A group point one of whose member points is gone (or not catalogued yet) is
    listed with ``complete: false`` by :func:`view` and is not offered to failover."""
    q = select(GroupBarrier).where(GroupBarrier.group_id == group.id)
    if not include_partial:
        q = q.where(GroupBarrier.state == "committed")
    return list(s.scalars(q.order_by(GroupBarrier.started_at.desc()).limit(limit)))


def latest_group_point(s: Session, item: Item, *, before: float | None = None
                       ) -> tuple[GroupBarrier, str]:
    """The newest group point of the item's group that holds the item and whose every member
    point is still catalogued and not damaged, recorded (ended) at or before ``before``
    (a plan's request time: all of its items resolve to the same group point). Returns it and
    the item's point id; ``InvalidInput`` when there is none."""
    q = select(GroupBarrier).where(GroupBarrier.group_id == item.group_id,
                                   GroupBarrier.state == "committed")
    if before is not None:
        q = q.where(GroupBarrier.ended_at <= before)
    for b in s.scalars(q.order_by(GroupBarrier.started_at.desc()).limit(200)):
        if item.id in b.members and _complete(s, b):
            return b, str(b.members[item.id]["point_id"])
    raise InvalidInput(f"{item.vm_name} has no multi-VM consistent (group) point",
                       hint="Its group must be consistent (drsite groups update GROUP "
                            "--consistent) and have committed a group point; see drsite "
                            "groups points GROUP.")


def member_point(s: Session, barrier_id: str, item: Item) -> tuple[GroupBarrier, str]:
    """The item's point in the group point ``barrier_id`` (a plan pinned it for the item's
    group); ``InvalidInput`` when that group point is gone, does not hold the item, or the
    item's point in it is no longer catalogued undamaged."""
    b = s.get(GroupBarrier, barrier_id)
    m = (b.members or {}).get(item.id) if b is not None and b.state == "committed" else None
    pid = str(m.get("point_id")) if m else ""
    if b is None or not pid or s.scalars(select(Point.point_id).where(
            Point.item_id == item.id, Point.point_id == pid,
            Point.damage.is_(None))).first() is None:
        raise InvalidInput(f"{item.vm_name} has no point in group point {barrier_id}, which "
                           "the plan chose for its group's other VMs",
                           hint="Run the plan again: it chooses the newest group point that "
                                "holds every VM; see drsite groups points GROUP.")
    return b, pid


def view(b: GroupBarrier, group_name: str, s: Session | None = None) -> dict[str, Any]:
    """The barrier as the API shows it; with a session, ``complete``: a committed group point
    every member point of which is still catalogued undamaged (one failover can use)."""
    out = {"id": b.id, "group": group_name, "state": b.state, "app_consistent": b.app_consistent,
           "started_at": b.started_at, "ended_at": b.ended_at, "point_time": b.point_time,
           "message": b.message, "mode": "cut" if _is_cut(b) else "two_phase",
            "members": {i: {k: m.get(k) for k in ("vm_name", "state", "point_id",
                                                   "point_created_at", "held", "paused_s",
                                                   "error")}
                        for i, m in sorted((b.members or {}).items())}}
    if s is not None:
        out["complete"] = b.state == "committed" and _complete(s, b)
    return out


def missed_barriers(s: Session) -> dict[str, GroupBarrier]:
    """Consistent groups whose last ended barrier made no group point (a warning alert until
    one does): group name → that barrier."""
    out: dict[str, GroupBarrier] = {}
    for g in s.scalars(select(Group).where(Group.consistent.is_(True))):
        last = s.scalars(select(GroupBarrier)
                         .where(GroupBarrier.group_id == g.id,
                                GroupBarrier.state.in_(("committed", "partial")))
                         .order_by(GroupBarrier.started_at.desc()).limit(1)).first()
        if last is not None and last.state == "partial":
            out[g.name] = last
    return out
