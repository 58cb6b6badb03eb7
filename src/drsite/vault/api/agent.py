"""Agent routes (``/api/v1/agent``): registration with a one-time key, heartbeats, command
results. Every route but ``register`` needs the agent's client certificate (see
:func:`drsite.vault.auth.authenticate_agent`)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import anyio
from fastapi import APIRouter, Request, status
from sqlalchemy import select
from sqlalchemy.orm import Session

from drsite.core.errors import Conflict, InvalidInput, NotFound
from drsite.core.states import CommandStatus
from drsite.pki import CertIdentity, cert_identity
from drsite.vault import barrier, commands, fencing
from drsite.vault.api.deps import PeerCert, VaultDep, name, note, set_actor
from drsite.vault.api.schemas import CommandResultIn, CommandWaitIn, HeartbeatIn, RegisterIn
from drsite.vault.audit import record_event
from drsite.vault.auth import agent_host, consume_registration_key, lookup_registration_key, verify_agent_cert
from drsite.vault.context import Vault
from drsite.vault.db.models import Command, Host, Item, RegistrationKey, Site
from drsite.vault.heartbeat import Beat, ItemBeat, apply_heartbeat
from drsite.vault.ids import new_id
from drsite.vault.jobs.failover import apply_late_result
from drsite.vault.scheduler import apply_result
from drsite.vault.trust import StoreAudit, alert_not_authentic

router = APIRouter(prefix="/agent")

MAX_CSR = 16 * 1024


def _registered_host(s: Session, key: RegistrationKey, site: Site, host_name: str,
                     expected: str | None) -> Host | None:
    """The existing host this registration replaces the certificate of, or None for a new
    host. A site key never takes over an existing, non-revoked host (409); a re-issue key
    registers its own host and nothing else; ``expected`` (an agent re-registering sends its
    host id) must be the host the key replaces."""
    if key.host_id is not None:
        host = s.get(Host, key.host_id)
        if host is None:
            raise NotFound("the host this key was issued for no longer exists")
        if host.name != host_name:
            raise InvalidInput(f"this key replaces the certificate of host {host.name}, not of "
                               f"{host_name}",
                               hint=f"Register with the host's name: 'drsite agent register "
                                    f"--name {host.name} --key KEY ...'.")
    else:
        host = s.query(Host).filter(Host.site_id == site.id, Host.name == host_name).first()
        if host is not None and host.revoked_at is None:
            raise Conflict(f"host {host_name} is already registered in site {site.name} (as "
                           f"{host.id}): a site registration key cannot take it over",
                           hint=f"To replace its certificate, an admin runs 'drsite hosts "
                                f"reissue {host_name}' and the host registers with that key.")
    if expected is not None and (host is None or host.id != expected):
        raise Conflict(f"this key does not re-register host {expected}",
                       hint="Ask an admin for a key for this host: 'drsite hosts reissue HOST'.")
    return host


@router.post("/register", status_code=status.HTTP_201_CREATED,
             summary="Join a site with a one-time registration key; the CSR is signed")
def register(body: RegisterIn, vault: VaultDep, request: Request) -> dict[str, Any]:
    detail = note(request)  # the audit row's detail: names and ids only, never the key or CSR
    host_name = name("host", body.host_name)
    detail["host_name"] = host_name
    expected = name("host id", body.host_id) if body.host_id is not None else None
    if len(body.csr_pem) > MAX_CSR or len(body.key) > 200:
        raise InvalidInput("csr_pem or key too long")
    now = vault.settings.clock.now()
    with vault.db.tx() as s:
        key = lookup_registration_key(s, body.key, now)
        site = s.get(Site, key.site_id)
        if site is None:
            raise NotFound("the key's site no longer exists")
        detail.update(site=site.name, via="re-issue key" if key.host_id else "site key")
        host = _registered_host(s, key, site, host_name, expected)
        host_id = host.id if host is not None else new_id("h")
        cert_pem = vault.ca.sign_csr(body.csr_pem.encode("utf-8", "replace"), common_name=host_id,
                                     site=site.name)
        ident = cert_identity(cert_pem)
        consume_registration_key(s, key, host_id, now)
        set_actor(request, "host", host_id)
        detail.update(host_id=host_id, cert_serial=f"{ident.serial:x}",
                      replaced=host is not None)
        if host is None:
            host = Host(id=host_id, name=host_name, site_id=site.id, registered_at=now,
                        cert_fingerprint=ident.fingerprint, cert_serial=f"{ident.serial:x}")
            s.add(host)
            record_event(s, now, "host", host_name, f"registered in site {site.name} as {host_id}")
        else:
            how = "with a re-issue key" if key.host_id is not None else "after its revocation"
            host.cert_fingerprint = ident.fingerprint
            host.cert_serial = f"{ident.serial:x}"
            host.registered_at = now
            host.revoked_at = None
            record_event(s, now, "host", host_name, f"registered again in site {site.name} {how}; "
                                                    "its previous certificate no longer works")
        return {"host_id": host_id, "site": site.name, "cert_pem": cert_pem.decode(),
                "ca_pem": vault.ca.ca_pem.decode()}


def _store_url(url: str | None) -> str | None:
    if url is None:
        return None
    if (len(url) > 256 or not url.startswith(("https://", "http://"))
            or any(ord(c) <= 32 or ord(c) == 127 for c in url)):
        raise InvalidInput("store_url must be an http(s) URL of at most 256 characters")
    return url


@router.post("/heartbeat", summary="Report inventory, items and points; receive commands")
async def heartbeat(body: HeartbeatIn, vault: VaultDep, cert: PeerCert,
                    request: Request) -> dict[str, Any]:
    # agent requests run in threads of their own (vault.agent_limiter), never all of the API's
    return await anyio.to_thread.run_sync(_heartbeat, body, vault, cert, request,
                                          limiter=vault.agent_limiter)


def _heartbeat(body: HeartbeatIn, vault: Vault, cert: bytes | None,
               request: Request) -> dict[str, Any]:
    store_url = _store_url(body.store_url)
    beat = Beat(host_name=body.host_name, version=body.version, store_url=store_url, vms=body.vms,
                items=[ItemBeat(item_id=i.item_id, report=i.report, new_points=i.new_points,
                                removed_points=i.removed_points) for i in body.items],
                audit=[StoreAudit(op=a.op, key=a.key, item_id=a.item_id, caller=a.caller,
                                  outcome=a.outcome, at=a.at) for a in body.audit],
                store_acl_digest=body.store_acl_digest, held=body.held,
                restarted=body.restarted,
                recovery_book_digest=body.recovery_book_digest,
                recovery_book_patches=body.recovery_book_patches, breakglass=body.breakglass)
    ident = verify_agent_cert(vault.ca, cert)  # before the transaction (cached)
    set_actor(request, "host", ident.common_name)

    def apply(s: Session) -> dict[str, Any]:
        # group-committed with other beats and results (db/groupcommit.py): runs again alone
        # if its batch is rolled back
        return apply_heartbeat(s, agent_host(s, ident), beat, vault.settings)

    return vault.db.batched(apply)


def _take_pending(vault: Vault, ident: CertIdentity) -> tuple[str, list[dict[str, Any]]]:
    """The host's pending commands, marked sent (a read first: no write transaction — on
    SQLite the database-wide write lock — when there is nothing to take)."""
    now = vault.settings.clock.now()
    with vault.db.read() as s:
        host_id = agent_host(s, ident).id
        if not commands.has_pending(s, host_id):
            return host_id, []
    # not group-committed: a batch answers all its calls at its end, so a delivery would wait
    # for the beats queued after it — a group barrier's cut command arrived hundreds of ms late
    # (CI: the cuts were missed); in the writer queue it waits only for those before it
    with vault.db.tx() as s:
        host = agent_host(s, ident)
        return host.id, [commands.to_wire(c) for c in commands.deliver_pending(s, host.id, now)]


@router.post("/clock", summary="The vault's cut clock, for an agent's offset estimate")
async def clock(vault: VaultDep, cert: PeerCert) -> dict[str, Any]:
    """``{clock_id, t}``: the clock group barriers' cuts are named in (``barrier.cut_clock``,
    this process's monotonic clock). Answered on the event loop without a thread hop or the
    database (a cached certificate check), so its round trip, which bounds the agent's
    offset uncertainty, stays short."""
    verify_agent_cert(vault.ca, cert)
    return {"clock_id": barrier.CLOCK_ID, "t": barrier.cut_clock()}


@router.post("/commands/wait", summary="Long poll: this host's commands as soon as they exist")
async def wait_commands(body: CommandWaitIn, vault: VaultDep, cert: PeerCert,
                        request: Request) -> dict[str, Any]:
    """The command channel (``docs/control-plane.md``): answers at once with the host's pending
    commands, or holds the request until one is committed (woken in-process, or found by a
    look at the table every ``vault.push_poll_s`` — commands written by another vault process
    also wake it by notification on PostgreSQL, ``vault/notify.py``),
    at most ``timeout_s``; then ``{"commands": []}``. It waits for the database only, never
    for an agent."""
    ident = await anyio.to_thread.run_sync(verify_agent_cert, vault.ca, cert,
                                           limiter=vault.agent_limiter)
    set_actor(request, "host", ident.common_name)  # a refused or failed poll names its host
    deadline = time.monotonic() + body.timeout_s
    # registered before the first look (the certificate names the host id): a command
    # committed between that look and the wait still wakes it
    host_id = ident.common_name
    ev = vault.waiters.register(host_id)
    try:
        _, cmds = await anyio.to_thread.run_sync(_take_pending, vault, ident,
                                                  limiter=vault.agent_limiter)
        beat = vault.waiters.take_beat(host_id)
        if cmds or beat or body.timeout_s <= 0:
            return _channel_reply(cmds, beat)
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or vault.waiters.closed:  # timed out, or the server stops
                return {"commands": []}
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ev.wait(), timeout=min(left, vault.push_poll_s))
            ev.clear()
            if await request.is_disconnected():
                # its agent is gone (killed: the kernel closed the socket): a command taken
                # here would be marked sent into a dead connection while the restarted agent's
                # own long poll waits beside this one — lost until a heartbeat noticed
                return {"commands": []}
            beat = vault.waiters.take_beat(host_id)
            _, cmds = await anyio.to_thread.run_sync(_take_pending, vault, ident,
                                                      limiter=vault.agent_limiter)
            if cmds or beat:
                return _channel_reply(cmds, beat)
    finally:
        vault.waiters.unregister(host_id, ev)


def _channel_reply(cmds: list[dict[str, Any]], beat: bool) -> dict[str, Any]:
    """The long poll's answer; ``heartbeat``: a job waits for this host's next heartbeat
    (``push.want_heartbeat``), send it now."""
    return {"commands": cmds, **({"heartbeat": True} if beat else {})}


@router.post("/commands/{command_id}/result", summary="Post a command's progress or result")
async def command_result(command_id: str, body: CommandResultIn, vault: VaultDep,
                         cert: PeerCert, request: Request) -> dict[str, Any]:
    return await anyio.to_thread.run_sync(_command_result, command_id, body, vault, cert, request,
                                          limiter=vault.agent_limiter)


def _command_result(command_id: str, body: CommandResultIn, vault: Vault, cert: bytes | None,
                    request: Request) -> dict[str, Any]:
    now = vault.settings.clock.now()
    ident = verify_agent_cert(vault.ca, cert)  # before the transaction (cached)
    set_actor(request, "host", ident.common_name)
    cid = name("command id", command_id)

    def record(s: Session) -> dict[str, Any]:
        # group-committed with other results and beats (db/groupcommit.py): runs again alone
        # if its batch is rolled back
        return _record_result(s, ident, cid, body, now)

    return vault.db.batched(record)


def _record_result(s: Session, ident: CertIdentity, command_id: str, body: CommandResultIn,
                   now: float) -> dict[str, Any]:
    host = agent_host(s, ident)
    # locks in the order jobs and the barrier tick take them: the item, a group command's
    # barrier, then the command (the other way round, a result could dead-lock with a job
    # ending on the same item, or with the tick); another host's command is not touched
    peek = s.execute(select(Command.item_id, Command.kind, Command.args)
                     .where(Command.id == command_id, Command.host_id == host.id)).first()
    if peek is not None:
        if peek.item_id is not None:
            s.get(Item, peek.item_id, with_for_update=True)
        barrier.lock_for_result(s, peek.kind, peek.args)
    cmd = commands.of_host(s, host.id, command_id)  # locked: see commands
    ended = commands.record_result(cmd, status=body.status, progress=body.progress,
                                   result=body.result, error=body.error, now=now)
    if not ended and cmd.status == CommandStatus.RUNNING:
        barrier.on_progress(s, cmd)
    if ended:
        apply_result(s, cmd, now)
        barrier.on_result(s, cmd, now)
        alert_not_authentic(s, host, cmd, now)
        if cmd.kind == "failover_fence":
            fencing.apply_result(s, cmd, now)
        elif cmd.kind == "failover":
            apply_late_result(s, cmd, now)  # its job ended before it did
    return {"command_id": cmd.id, "status": cmd.status}
