"""Starting the failover actions of one item (:class:`~drsite.core.actions.FailoverAction`):
what must hold before the job exists, which failover it acts on, and the job's arguments.

Rules checked here (each refusal is a ``Conflict`` whose hint names the ``drsite`` command to
run instead):

- a failover (test, planned, unplanned, failback) needs a protected item whose test failover,
  if any, was cleaned up (a running test VM reads the replica a real failover consumes);
- commit, cancel and change-point need a failover pending commit; re-protect a committed one;
- re-protect — also the one a planned failover's commit does — needs a network mapping from the
  recovery site back to the source site for every network of the VM, or asks for them to be
  created (``create_reverse_mapping``) by inverting the forward mappings;
- failback is a planned failover of a re-protected VM's reverse item back to the site it came
  from: asked on the reverse item, or on the item it reverses (then its lineage's live item is
  the one that fails over);
- a planned or unplanned failover (and so a failback) of a reverse item replaces the VM its
  origin item left stopped on the recovery site (``replace_vm``): that VM is an older
  incarnation of this one, never an unrelated VM.

Called by the API, the dashboard and the recovery-plan job inside a transaction.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from drsite.core.actions import FAILOVER_KINDS, ITEM_ACTIONS, POINT_CHOICES, FailoverAction
from drsite.core.errors import Conflict, DrsiteError, NotFound
from drsite.core.model import validate_name
from drsite.core.states import LIVE_ITEM_STATUSES, FailoverState, ItemProtection
from drsite.vault import barrier
from drsite.vault.db.models import Failover, Host, Item, Job
from drsite.vault.ids import new_id
from drsite.vault.jobs import kinds as K
from drsite.vault.jobs.create import claim_item, create_job
from drsite.vault.jobs.failover import check_ready
from drsite.vault.network_mappings import ensure_reverse_mappings
from drsite.vault.scrub import failover_point

A = FailoverAction
# a failover holds the item and may still be committed, cancelled or moved to another point
_HELD = frozenset({ItemProtection.FAILING_OVER, ItemProtection.FAILED_OVER})
_OPEN_TEST = (FailoverState.STARTING, FailoverState.TEST_RUNNING)
_JOB_KIND = {A.TEST_FAILOVER: K.TEST_FAILOVER, A.PLANNED_FAILOVER: K.PLANNED,
             A.UNPLANNED_FAILOVER: K.UNPLANNED, A.FAILBACK: K.FAILBACK,
             A.CLEANUP_TEST_FAILOVER: K.CLEANUP_TEST, A.COMMIT: K.COMMIT, A.CANCEL: K.CANCEL,
             A.CHANGE_POINT: K.CHANGE_POINT, A.REPROTECT: K.REPROTECT}


def latest_failover(s: Session, item: Item, *, kind: str | None = None,
                    states: tuple[FailoverState, ...]) -> Failover | None:
    q = select(Failover).where(Failover.item_id == item.id, Failover.state.in_(states))
    if kind is not None:
        q = q.where(Failover.kind == kind)
    return s.scalars(q.order_by(Failover.created_at.desc())).first()


def get_item(s: Session, item_id: str) -> Item:
    item = s.get(Item, validate_name("item", item_id))
    if item is None:
        raise NotFound(f"no item {item_id!r}",
                       hint="List items with 'drsite items list --include-removed'.")
    return item


def live_item_of_lineage(s: Session, item: Item) -> Item | None:
    """The item that stands for ``item``'s VM now (protected, or held by a failover): the
    newest item of its lineage that is not retired."""
    lineage = item.lineage_id or item.id
    return s.scalars(select(Item).where(Item.lineage_id == lineage,
                                        Item.status.in_(LIVE_ITEM_STATUSES | _HELD
                                                        | {ItemProtection.COMMITTED}))
                     .order_by(Item.created_at.desc(), Item.id.desc())).first()


def point_arg(args: dict[str, Any]) -> str:
    point = str(args.get("point") or "latest")
    if point not in POINT_CHOICES:
        validate_name("point", point)
    return point


def _group_point(s: Session, item: Item, args: dict[str, Any], now: float) -> tuple[str, str]:
    """The item's point in the newest whole group point recorded before the request (a plan's
    request: every item of the plan resolves to the same group point), and a note naming it."""
    plan_job = s.get(Job, str(args["plan_job"])) if args.get("plan_job") else None
    if plan_job is None:
        gp, point = barrier.latest_group_point(s, item, before=now)
    else:
        # the plan's first VM of a group pins the group point in the plan job's args and the
        # others take theirs from it: a member point catalogued between two of the plan's
        # groups must not move a later VM to a newer group point than an earlier one's
        pinned: dict[str, str] = dict(plan_job.args.get("group_points") or {})
        key = str(item.group_id)
        if key in pinned:
            gp, point = barrier.member_point(s, pinned[key], item)
        else:
            gp, point = barrier.latest_group_point(s, item, before=plan_job.created_at)
            plan_job.args = {**plan_job.args, "group_points": {**pinned, key: gp.id}}
    return point, f"latest multi-VM consistent point: group point {gp.id}, point {point}"


def _stale_vm_to_replace(s: Session, item: Item) -> str | None:
    """The VM the item's origin left on the item's target site (stopped by re-protect or by
    failback): a real failover of the item re-creates it under the same name."""
    if not item.origin_item_id:
        return None
    origin = s.get(Item, item.origin_item_id)
    if origin is None:
        return None
    host = s.get(Host, origin.host_id)
    if host is None or host.site_id != item.target_site_id:
        return None
    return origin.vm_id


def _failback_item(s: Session, item: Item) -> Item:
    """The reverse item a failback of ``item`` fails over."""
    if item.status == ItemProtection.REPROTECTED:
        live = live_item_of_lineage(s, item)
        if live is not None and live.id != item.id:
            item = live
    if not item.origin_item_id or item.status != ItemProtection.PROTECTED:
        raise Conflict(f"{item.vm_name} ({item.id}) is {item.status} and does not replicate back "
                       "to the site it failed over from; failback needs a re-protected VM",
                       hint=f"Commit its failover first (it re-protects): drsite failover commit "
                            f"{item.id}")
    return item


def preflight(s: Session, item_id: str, action: str | FailoverAction,
              args: dict[str, Any], *, ready: bool = True) -> tuple[Item, Failover | None, bool]:
    """What :func:`start_item_action` checks before it creates anything, without creating
    anything: the item the action acts on (a failback's reverse item), the failover a follow-up
    acts on, and whether the job re-protects. Raises the refusal (``Conflict`` with its hint;
    ``InvalidInput`` when a failover could not start — no point, an unmapped network:
    ``failover.check_ready``, skipped unless ``ready``) the start would raise — the dashboard
    shows it before an operator presses anything."""
    act = FailoverAction.parse(str(action), ITEM_ACTIONS)
    item = get_item(s, item_id)
    if act is A.FAILBACK:
        item = _failback_item(s, item)
    if item.active_job_id is not None:  # checked before anything is created (claim_item is final)
        raise Conflict(f"item {item.id} is busy with job {item.active_job_id}",
                       hint=f"Wait for it ('drsite jobs show {item.active_job_id}'), or cancel "
                            f"it: drsite jobs cancel {item.active_job_id}")
    if args.get("vm_name") is not None:
        validate_name("VM", str(args["vm_name"]))
    if act in FAILOVER_KINDS:
        _check_failover(s, item, act, args, ready=ready)
        return item, None, False
    found = _follow_up_failover(s, item, act)
    reprotects = act is A.REPROTECT or (act is A.COMMIT and found.kind == "planned"
                                        and bool(args.get("reprotect", True)))
    if reprotects and not args.get("create_reverse_mapping"):
        ensure_reverse_mappings(s, item, create=False, now=0.0)
    if act is A.CHANGE_POINT:
        point = point_arg(args)
        if point not in POINT_CHOICES:
            failover_point(s, item, point)  # a damaged point is refused now
    return item, found, reprotects


def allowed_actions(s: Session, item: Item) -> dict[FailoverAction, DrsiteError | None]:
    """Each failover action of the item: None when it may start now, else the refusal it
    would get (the dashboard enables only the valid ones and shows why the others are not)."""
    out: dict[FailoverAction, DrsiteError | None] = {}
    for act in ITEM_ACTIONS:
        try:
            preflight(s, item.id, act, {"create_reverse_mapping": True})
            out[act] = None
        except DrsiteError as e:
            out[act] = e
    return out


def start_item_action(s: Session, item_id: str, action: str | FailoverAction,
                      args: dict[str, Any], now: float, *, ready: bool = True) -> Job:
    """Start the job of ``action`` on one item (``Conflict`` when the item's state does not
    allow it or another job holds the item, ``InvalidInput`` when a failover could not start:
    :func:`preflight`). ``ready=False`` leaves the failover's readiness to its job's first step
    (a recovery plan starts every VM it can; one that cannot fails its own job)."""
    act = FailoverAction.parse(str(action), ITEM_ACTIONS)
    args = dict(args)
    if args.get("vm_name") is not None:
        args["vm_name"] = validate_name("VM", str(args["vm_name"]))
    item, found, reprotects = preflight(s, item_id, act, args, ready=ready)
    if act in FAILOVER_KINDS:
        job = _start_failover(s, item, act, args, now)
    else:
        assert found is not None
        if reprotects and args.get("create_reverse_mapping"):
            ensure_reverse_mappings(s, item, create=True, now=now)
        job = _start_follow_up(s, item, act, found, reprotects, args, now)
    claim_item(s, item, job.id)
    return job


def _check_failover(s: Session, item: Item, act: FailoverAction, args: dict[str, Any], *,
                    ready: bool) -> None:
    kind = FAILOVER_KINDS[act]
    if item.status != ItemProtection.PROTECTED:
        held = item.status in _HELD
        raise Conflict(f"{item.vm_name} is {item.status}; only a protected item can fail over",
                       hint=f"Commit or cancel the failover in progress first: drsite failover "
                            f"commit {item.id} (or cancel)" if held else
                       "List its failovers: drsite failover list " + item.id)
    test = latest_failover(s, item, kind="test", states=_OPEN_TEST)
    if test is not None:
        what = "a test failover" if kind == "test" else f"a {act.words}"
        raise Conflict(f"{item.vm_name} has a test failover running ({test.id}); {what} has to "
                       "wait until it is cleaned up",
                       hint=f"Clean it up first: drsite failover cleanup {item.id}")
    point = point_arg(args)
    if ready:
        check_ready(s, item, kind, point)
    if point not in POINT_CHOICES:
        failover_point(s, item, point)  # a point known to be damaged is refused now


def _start_failover(s: Session, item: Item, act: FailoverAction, args: dict[str, Any],
                    now: float) -> Job:
    kind = FAILOVER_KINDS[act]
    point = point_arg(args)
    notes: list[str] = []
    if point == "latest_group":
        point, note = _group_point(s, item, args, now)
        failover_point(s, item, point)  # a point known to be damaged is refused now
        notes.append(note)
    fo = Failover(id=new_id("f"), item_id=item.id, kind=kind, state=FailoverState.STARTING,
                  point_id=None, result={"action": act.value}, notes=notes, created_at=now,
                  updated_at=now)
    s.add(fo)
    job_args: dict[str, Any] = {"failover_id": fo.id, "point": point, "action": act.value}
    job_args.update({k: args[k] for k in ("vm_name", "replace_vm", "shutdown_timeout", "plan_job")
                     if k in args})
    if kind in ("planned", "unplanned") and "replace_vm" not in job_args \
            and "vm_name" not in job_args:
        stale = _stale_vm_to_replace(s, item)
        if stale is not None:
            job_args["replace_vm"] = stale
    job = create_job(s, _JOB_KIND[act], target=item.vm_name, item_id=item.id, args=job_args,
                     now=now)
    fo.job_id = job.id
    return job


def _follow_up_failover(s: Session, item: Item, act: FailoverAction) -> Failover:
    """The failover cleanup, commit, cancel, change-point or re-protect acts on."""
    found: Failover | None
    if act is A.CLEANUP_TEST_FAILOVER:
        found = latest_failover(s, item, kind="test", states=(
            *_OPEN_TEST, FailoverState.FAILED, FailoverState.CANCELLED))
        if found is None:
            raise Conflict(f"{item.vm_name} has no test failover to clean up",
                           hint=f"Start one: drsite failover test {item.id}")
    elif act in (A.COMMIT, A.CANCEL, A.CHANGE_POINT):
        found = s.get(Failover, item.failover_id) if item.failover_id else None
        if found is None or item.status not in _HELD:
            raise Conflict(f"{item.vm_name} is {item.status}; there is no failover to "
                           f"{act.words}", hint=f"Fail it over first: drsite failover planned "
                                                f"{item.id} (or unplanned)")
        if act is A.COMMIT and found.state != FailoverState.PENDING_COMMIT:
            raise Conflict(f"failover {found.id} is {found.state}; only a failover pending "
                           "commit can be committed",
                           hint=f"Cancel it instead: drsite failover cancel {item.id}")
        if act is A.CHANGE_POINT and found.state != FailoverState.PENDING_COMMIT:
            raise Conflict(f"failover {found.id} is {found.state}; the point can change only "
                           "while the failover waits for its commit",
                           hint=f"Cancel it instead: drsite failover cancel {item.id}")
    else:  # re-protect
        found = latest_failover(s, item, states=(FailoverState.COMMITTED,))
        if found is None or item.status != ItemProtection.COMMITTED:
            raise Conflict(f"{item.vm_name} is {item.status}; re-protect needs a committed "
                           "failover", hint=f"Commit the failover first: drsite failover commit "
                                            f"{item.id}")
    return found


def _start_follow_up(s: Session, item: Item, act: FailoverAction, found: Failover,
                     reprotects: bool, args: dict[str, Any], now: float) -> Job:
    job_args: dict[str, Any] = {"failover_id": found.id, "action": act.value,
                                "notes": str(args.get("notes") or "")[:2000],
                                **({"plan_job": args["plan_job"]} if "plan_job" in args else {})}
    if act is A.CHANGE_POINT:
        point = point_arg(args)
        if point == "latest_group":
            point, _ = _group_point(s, item, {}, now)
        job_args["point"] = point
    tasks = K.COMMIT_AND_REPROTECT if act is A.COMMIT and reprotects else None
    return create_job(s, _JOB_KIND[act], target=item.vm_name, item_id=item.id, args=job_args,
                      now=now, tasks=tasks)
