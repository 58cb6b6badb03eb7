"""The command queue between the vault and its agents.

A command is created ``pending``, handed to its host in the next heartbeat reply (``sent``),
acknowledged by the agent (``running``, with progress) and ended by it (``succeeded`` or
``failed`` with an error dict carrying its class and hint). Commands are idempotent on the agent
side, so the vault delivers a command again when a ``sent`` one was not acknowledged in time
(e.g. the agent restarted) or a ``running`` one went silent for long.

Every transition is a read-check-write of one row, so whoever makes one reads the row with
:func:`locked` (``FOR UPDATE`` on PostgreSQL, where API workers and the controller write at
once): a result, a re-delivery and a withdrawal of one command then follow each other, and
none writes over another's final status (a ``running`` post read before the ``succeeded``
one committed used to put the command back to running: reopened, it held its item's
replication lane until the agent answered it again). SQLite serialises writers anyway.

Responsible for: queue state and its transitions. Not responsible for: what a result means to
a job or to the scheduler (they read the command rows).
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from drsite.core.errors import Conflict, InvalidInput, NotFound, PermanentError
from drsite.core.states import FINAL_COMMAND_STATUSES, OPEN_COMMAND_STATUSES, CommandStatus
from drsite.vault.db.models import Command
from drsite.vault.ids import new_id

log = logging.getLogger(__name__)

KINDS = ("protect", "cycle", "resync", "retention", "unprotect", "update_settings",
         # failover (vault/jobs/failover.py → agent/failover.py)
         "failover", "failover_cleanup", "failover_commit", "failover_cancel",
         "failover_change_point", "reprotect_seed", "failover_prepare", "failover_resume_source",
         "failover_fence", "run_script",
         "store_rekey",   # re-encrypt a cloud store's old objects (jobs/stores.py)
         # store upkeep and drills (vault/scrub.py, vault/jobs/drills.py → agent/scrub.py, drill.py)
         "scrub", "verify", "drill_probe",
         # consistency groups' barrier (vault/barrier.py → agent/barrier.py)
         "group_prepare", "group_seal",
         # the VM lifecycle (vault/jobs/vms.py → agent/vms.py)
         "vm_create", "vm_import", "vm_start", "vm_stop", "vm_delete")
# arguments holding an item's point key (scrubbed when the command ends, sealed at rest)
POINT_KEY_ARGS = ("point_key", "rev_point_key")
# commands that move data for an item: at most one of these is outstanding per item
REPLICATION_KINDS = ("protect", "cycle", "resync", "group_prepare", "group_seal")


def enqueue(s: Session, *, host_id: str, kind: str, item_id: str | None, args: dict[str, Any],
            now: float, job_id: str | None = None) -> Command:
    if kind not in KINDS:
        raise InvalidInput(f"unknown command kind {kind!r}")
    cmd = Command(id=new_id("c"), host_id=host_id, item_id=item_id, job_id=job_id, kind=kind,
                  args=args, status=CommandStatus.PENDING, progress=0.0, deliveries=0, created_at=now,
                  updated_at=now)
    s.add(cmd)
    s.flush()
    return cmd


def locked(s: Session, command_id: str) -> Command | None:
    """The command, read again and locked until this transaction ends (see the module)."""
    return s.get(Command, command_id, with_for_update=True, populate_existing=True)


def of_host(s: Session, host_id: str, command_id: str) -> Command:
    """The host's command, locked (an agent's result); ``NotFound`` for another host's."""
    cmd = locked(s, command_id)
    if cmd is None or cmd.host_id != host_id:
        raise NotFound(f"no command {command_id!r} for this host")
    return cmd


def outstanding(s: Session, item_id: str, kinds: tuple[str, ...]) -> Command | None:
    """The oldest open command of one of ``kinds`` for the item, if any."""
    return s.scalars(select(Command)
                     .where(Command.item_id == item_id, Command.kind.in_(kinds),
                            Command.status.in_(OPEN_COMMAND_STATUSES))
                     .order_by(Command.created_at, Command.id)).first()


def cancel_open(s: Session, item_id: str, now: float, reason: str, *,
                unprotect: bool = False) -> int:
    """Fail every open command of the item that has not reached its agent yet (``pending``),
    except ``unprotect``: that one must reach the agent whenever it comes back — unless
    ``unprotect`` (the item was failed over meanwhile: its points must stay)."""
    n = 0
    which = [Command.item_id == item_id, Command.status == CommandStatus.PENDING]
    if not unprotect:
        which.append(Command.kind != "unprotect")
    for cmd in s.scalars(select(Command).where(*which)
                         .order_by(Command.id).with_for_update()
                         .execution_options(populate_existing=True)):
        cmd.status = CommandStatus.FAILED
        cmd.error = PermanentError(f"withdrawn: {reason}").to_dict()
        scrub_secrets(cmd)
        cmd.updated_at = cmd.finished_at = now
        n += 1
    return n


def to_wire(cmd: Command) -> dict[str, Any]:
    """The ``Command`` object of the heartbeat reply."""
    return {"command_id": cmd.id, "kind": cmd.kind, "item_id": cmd.item_id, "args": dict(cmd.args)}


def deliver(s: Session, host_id: str, now: float, *, resend_after_s: float,
            stale_running_s: float, held: set[str] | None = None,
            prev_beat_at: float | None = None, limit: int = 100) -> list[Command]:
    """Commands to put in this host's heartbeat reply (marked ``sent``), oldest first.

    ``pending`` ones are delivered. A delivered (``sent``/``running``) one is delivered again:

    - **lost** (``held`` given, i.e. the agent lists what it holds): the agent's heartbeat does
      not hold it although it was built after the command's last delivery. The agent builds a
      heartbeat only after it has taken the reply to the previous one, so a command whose last
      delivery or news (``updated_at``) is not after ``prev_beat_at`` (when the previous
      heartbeat was applied) was in the agent's hands when it built this one — unless the
      reply was lost or the agent restarted, which is exactly when it must come again;
    - ``sent`` and not acknowledged within ``resend_after_s``, or ``running`` and silent for
      ``stale_running_s``: the last resort, for agents that do not list what they hold.

    A command delivered twice is harmless (agents ignore ids they hold and answer finished ones
    from their journal); a lost one is never left for a timeout. Rows another transaction is
    delivering right now are skipped (``FOR UPDATE SKIP LOCKED`` on PostgreSQL: two API workers
    serving the same host at once never both hand out one command; SQLite serialises writers).
    """
    due = (Command.status == CommandStatus.PENDING) \
        | ((Command.status == CommandStatus.SENT) & (Command.updated_at <= now - resend_after_s)) \
        | ((Command.status == CommandStatus.RUNNING) & (Command.updated_at <= now - stale_running_s))
    rows = list(s.scalars(select(Command).where(Command.host_id == host_id, due)
                          .order_by(Command.created_at, Command.id).limit(limit)
                          .with_for_update(skip_locked=True)))
    if held is not None and prev_beat_at is not None:
        rows.extend(lost_commands(s, host_id, held, prev_beat_at, {c.id for c in rows}))
        rows.sort(key=lambda c: (c.created_at, c.id))
    for cmd in rows:
        if cmd.status == CommandStatus.PENDING:
            cmd.status = CommandStatus.SENT
            cmd.sent_at = now
        cmd.deliveries += 1
        cmd.updated_at = now
    return rows[:limit]


def lost_commands(s: Session, host_id: str, held: set[str], prev_beat_at: float,
                  skip: set[str]) -> list[Command]:
    """Delivered commands of the host that its agent does not hold although its heartbeat was
    built after their last delivery (see :func:`deliver`)."""
    rows = s.scalars(select(Command).where(
        Command.host_id == host_id,
        Command.status.in_((CommandStatus.SENT, CommandStatus.RUNNING)),
        Command.updated_at <= prev_beat_at).order_by(Command.created_at, Command.id)
        .with_for_update(skip_locked=True))  # see deliver
    lost = [c for c in rows if c.id not in held and c.id not in skip]
    for c in lost:
        log.info("command %s (%s %s) is not held by host %s after its delivery: delivering "
                 "it again", c.id, c.kind, c.item_id, host_id)
    return lost


def has_pending(s: Session, host_id: str) -> bool:
    """Whether the host has a command waiting for delivery (an index lookup)."""
    return s.scalars(select(Command.id).where(Command.host_id == host_id,
                                              Command.status == CommandStatus.PENDING)
                     .limit(1)).first() is not None


def deliver_pending(s: Session, host_id: str, now: float, *, limit: int = 100) -> list[Command]:
    """The push channel's share: only ``pending`` commands (marked ``sent``). Re-delivery of
    lost or silent ones is the heartbeat's (:func:`deliver`), which knows what the agent holds."""
    rows = list(s.scalars(select(Command).where(Command.host_id == host_id,
                                                Command.status == CommandStatus.PENDING)
                          .order_by(Command.created_at, Command.id).limit(limit)
                          .with_for_update(skip_locked=True)))  # see deliver
    for cmd in rows:
        cmd.status = CommandStatus.SENT
        cmd.sent_at = now
        cmd.deliveries += 1
        cmd.updated_at = now
    return rows


def record_result(cmd: Command, *, status: CommandStatus, progress: float | None,
                  result: dict[str, Any] | None, error: dict[str, Any] | None, now: float) -> bool:
    """Apply an agent's result to ``cmd``; returns True when the command just ended.

    Repeating the final result is accepted (agents retry posts); contradicting it is a
    ``Conflict``; a ``failed`` result needs an error.
    """
    if cmd.status in FINAL_COMMAND_STATUSES:
        if status == cmd.status:
            return False
        raise Conflict(f"command {cmd.id} already ended as {cmd.status}")
    if status == CommandStatus.FAILED and not error:
        raise InvalidInput("a failed result needs an error object")
    if progress is not None:
        cmd.progress = max(0.0, min(100.0, progress))
    if result is not None and (result or status != CommandStatus.RUNNING):
        cmd.result = result  # a running post without a result keeps the last one (a cursor)
    cmd.updated_at = now
    if status == CommandStatus.RUNNING:
        cmd.status = CommandStatus.RUNNING
        return False
    cmd.status = status
    cmd.finished_at = now
    scrub_secrets(cmd)
    if status == CommandStatus.SUCCEEDED:
        cmd.progress = 100.0
    else:
        cmd.error = error
    return True


def scrub_secrets(cmd: Command) -> None:
    """A command that ended is never delivered again: the cloud store credentials and keys in
    its arguments are dropped (the names of what was set stay, for the record), and so are
    point keys (``point_key``, ``rev_point_key``: replaced by ``"redacted"``)."""
    keys = [k for k in POINT_KEY_ARGS if (cmd.args or {}).get(k) not in (None, "redacted")]
    if keys:
        cmd.args = {**cmd.args, **dict.fromkeys(keys, "redacted")}
    spec = (cmd.args or {}).get("store")
    if not isinstance(spec, dict) or spec.get("redacted"):
        return
    kept = {k: v for k, v in spec.items() if k not in ("secret", "keys")}
    kept.update(redacted=True, secret_fields=sorted(dict(spec.get("secret") or {})),
                key_ids=sorted(dict(spec.get("keys") or {})))
    cmd.args = {**cmd.args, "store": kept}
