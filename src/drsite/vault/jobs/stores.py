"""Task body of RekeyStore (``drsite stores rekey STORE``): re-encrypt a cloud store's old
objects under its active key, resumably.

The vault has no store client of its own (it never reads recovery data), so the pass runs on
an agent that holds the store's spec: the source host (up, not revoked) of a protected item
whose group uses the store. It gets ``store_rekey {store: full spec, start_after: cursor}``
(the spec sealed at rest and scrubbed when the command ends). The agent posts its report with
``running`` results; the task keeps the report's ``last_key`` as the cursor, so after a
transient failure (agent restart, network) a new command resumes after it, possibly on another
host. What is rewritten and what is left alone: ``drsite.store.rekey``.
"""

from __future__ import annotations

from sqlalchemy import select

from drsite.core.errors import Conflict, NetworkError, from_dict
from drsite.core.states import RETIRED_ITEM_STATUSES, CommandStatus
from drsite.vault import commands
from drsite.vault.db.models import Command, Group, Host, Item
from drsite.vault.jobs.model import JobHandlers, Step, TaskContext, done, wait
from drsite.vault.jobs.protection import host_up, waited_too_long
from drsite.vault.stores import get_store, row_spec

RETRIES = 5


def _holder(ctx: TaskContext, store_id: int) -> Host | None:
    """An up, non-revoked source host of an active item on the store (it was sent the spec)."""
    hosts = ctx.s.scalars(select(Host).join(Item, Item.host_id == Host.id)
                          .join(Group, Group.id == Item.group_id)
                          .where(Group.store_id == store_id, Host.revoked_at.is_(None),
                                 Item.status.not_in(RETIRED_ITEM_STATUSES))
                          .order_by(Host.last_heartbeat.desc())).all()
    return next((h for h in hosts if host_up(h, ctx)), None)


def rekey(ctx: TaskContext) -> Step:
    row = get_store(ctx.s, str(ctx.job.args["store"]))
    if not (row.keys or {}).get("keys"):
        raise Conflict(f"store {row.name} is not encrypted; there is nothing to re-encrypt")
    data = ctx.data
    cmd = ctx.s.get(Command, data["command_id"]) if "command_id" in data else None
    cursor = (cmd.result or {}).get("last_key") if cmd is not None else None
    if cursor and data.get("cursor") != cursor:
        ctx.put(cursor=cursor)   # where a new command resumes
    if cmd is not None and cmd.status == CommandStatus.SUCCEEDED:
        r = dict(cmd.result or {})
        return done(f"{r.get('rewritten', 0)} object(s) re-encrypted under key "
                    f"{r.get('active_key_id')}, {r.get('already', 0)} already were; "
                    f"{r.get('mutable_old', 0)} mutable record(s) are rewritten by their owners")
    if cmd is not None and cmd.status == CommandStatus.FAILED:
        err = from_dict(cmd.error)
        tries = int(data.get("tries") or 0)
        if not err.transient or tries >= RETRIES:
            raise err
        ctx.put(tries=tries + 1)
        cmd = None
    if cmd is None:
        host = _holder(ctx, row.id)
        if host is None:
            if waited_too_long(ctx):
                raise NetworkError(f"no agent holding store {row.name}'s spec is up",
                                   hint="Start the agent of a host with a VM protected to this "
                                        "store, then run 'drsite stores rekey' again.")
            return wait(0, f"waiting for an agent that holds store {row.name}")
        args = {"store": row_spec(row).to_dict(), "start_after": ctx.data.get("cursor")}
        cmd = commands.enqueue(ctx.s, host_id=host.id, kind="store_rekey", item_id=None,
                               args=args, now=ctx.now, job_id=ctx.job.id)
        ctx.put(command_id=cmd.id, host=host.name)
    r = dict(cmd.result or {})
    at = f", at {r['last_key']}" if r.get("last_key") else ""
    return wait(cmd.progress, f"{r.get('rewritten', 0)} rewritten of {r.get('total', '?')} "
                              f"on {ctx.data.get('host')} ({cmd.status}){at}")


REKEY_HANDLERS = JobHandlers(tasks={"rekey": rekey}, on_end=lambda ctx, state: None)
