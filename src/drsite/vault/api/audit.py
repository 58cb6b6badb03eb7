"""The audit trail over HTTP: the middleware that records calls, and ``GET /audit`` (admin).

:class:`AuditMiddleware` records, once the route has answered and before the answer's last byte is
sent (in its own transaction, so a refused call whose transaction rolled back is recorded too; a
client that has its response finds the call in ``GET /audit``):
- every mutating call (POST/PUT/PATCH/DELETE) under ``/api/v1`` and every dashboard POST
  (``/ui``), whatever its outcome — except an agent's accepted heartbeat, command result or
  command-channel poll (agent facts, recorded as the host's liveness and the command's state;
  what a heartbeat carries that the vault refuses is audited by ``trust``);
- every refused read under ``/api/v1`` (401/403).
Who: the token name or host id the route authenticated (``deps.set_actor``; routes that know
more add ``deps.note(request)`` detail), else the host of a valid agent certificate on an agent
route (a body refused before the route ran), else ``anonymous``. What: the route's template and target (its
path parameters and a few naming fields of a JSON body: ``name``, ``host_name``, ``vm_id``, …,
never anything else of a body). From where: the client address. Outcome: ok (< 400), refused
(4xx, with the error code) or failed (5xx). Unauthenticated refusals (401) repeat (an agent
with a revoked certificate retries every few seconds): the same one from the same client is
recorded once a minute.

Not responsible for: deciding anything (the routes do), or what other code audits itself.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from fastapi import APIRouter
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from drsite.core.errors import DrsiteError, InvalidInput
from drsite.tlsutil import peer_certificate
from drsite.vault.api.deps import STATE_ACTOR, STATE_DETAIL, Admin, VaultDep, ensure_role
from drsite.vault.api.paging import DEFAULT_LIMIT, Key, page
from drsite.vault.audit import AuditEntry, audit_view, record_audit
from drsite.vault.auth import Role, verify_agent_cert
from drsite.vault.db.models import Audit

router = APIRouter()
log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# an agent's accepted heartbeats, command results and command-channel polls: facts recorded as
# the host's liveness and the commands' states (a long poll answers every command at scale:
# auditing each cost a write transaction and a log line per delivery)
AGENT_FACTS = ("/api/v1/agent/heartbeat", "/api/v1/agent/commands/{command_id}/result",
               "/api/v1/agent/commands/wait")
BODY_FIELDS = ("name", "host_name", "vm_id", "group", "site", "target_site", "role", "kind",
               "store", "policy")
MAX_BODY = 64 * 1024
MAX_ERROR_BODY = 4096
REPEAT_WINDOW_S = 60.0


def _target(scope: Scope, body: bytes, complete: bool) -> str:
    parts = [f"{k}={v}" for k, v in sorted((scope.get("path_params") or {}).items())]
    ctype = dict(scope.get("headers") or []).get(b"content-type", b"").decode("latin-1")
    if body and complete and "json" in ctype:
        try:
            parsed = json.loads(body)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict):
            for k in BODY_FIELDS:
                v = parsed.get(k)
                if isinstance(v, str | int) and not isinstance(v, bool):
                    parts.append(f"{k}={v}")
    return ", ".join(parts)


STATUS_CODES = {400: "invalid_input", 401: "auth_failed", 403: "forbidden", 404: "not_found",
                409: "conflict", 422: "invalid_input"}


def _error_code(body: bytes, status: int) -> str | None:
    """The error's code from its JSON body, else (dashboard pages are HTML) from its status."""
    try:
        parsed = json.loads(body)
    except ValueError:
        parsed = None
    code = parsed.get("code") if isinstance(parsed, dict) else None
    return str(code) if code else STATUS_CODES.get(status, "internal" if status >= 500 else None)


async def _cert_actor(scope: Scope, vault: Any, path: str) -> tuple[str, str] | None:
    """The host of a valid agent certificate on a request refused before its route named it (a
    malformed body is refused while the request is read): such a probe is the host's, never
    ``anonymous``. None without a certificate the vault's CA signed."""
    if not path.startswith("/api/v1/agent/"):
        return None
    cert = peer_certificate(scope)
    if cert is None:
        return None
    try:
        ident = await run_in_threadpool(verify_agent_cert, vault.ca, cert)
    except DrsiteError:
        return None
    return ("host", ident.common_name)


class AuditMiddleware:
    """Pure ASGI middleware (see the module's docstring)."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.app = app
        self._lock = threading.Lock()
        self._recent: OrderedDict[tuple[str, ...], float] = OrderedDict()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method, path = scope["method"], scope["path"]
        api = path.startswith("/api/v1/")
        ui = path == "/ui" or path.startswith("/ui/")
        if not (api or (ui and method in MUTATING)):
            await self.app(scope, receive, send)
            return
        state: dict[str, Any] = scope.setdefault("state", {})
        body = bytearray()
        err = bytearray()
        seen: dict[str, Any] = {"status": None, "body_done": False}

        async def recv() -> Message:
            msg = await receive()
            if msg.get("type") == "http.request" and api:
                chunk = msg.get("body", b"")
                if len(body) + len(chunk) <= MAX_BODY:
                    body.extend(chunk)
                else:
                    seen["overflow"] = True
                if not msg.get("more_body", False):
                    seen["body_done"] = True
            return msg

        async def snd(msg: Message) -> None:
            if msg["type"] == "http.response.start":
                seen["status"] = int(msg["status"])
            elif msg["type"] == "http.response.body":
                if (seen["status"] or 0) >= 400 and len(err) < MAX_ERROR_BODY:
                    err.extend(msg.get("body", b"")[:MAX_ERROR_BODY - len(err)])
                if not msg.get("more_body", False):
                    # the row is written before the client can have its answer: an operator who
                    # was refused finds the refusal in the trail at once, never a moment later
                    await record()
            await send(msg)

        vault = scope["app"].state.vault
        at = vault.settings.clock.now()

        async def record() -> None:
            if seen.get("recorded"):
                return
            seen["recorded"] = True
            status = seen["status"] or 500
            template = getattr(scope.get("route"), "path", None) or path
            if api and not template.startswith("/api/v1/"):  # routes of an included router
                template = "/api/v1" + template
            action = f"{method} {template}"
            if not self._wanted(method, action, status):
                return
            actor = state.get(STATE_ACTOR) or await _cert_actor(scope, vault, path) \
                or ("anonymous", "")
            client = scope.get("client")
            entry = AuditEntry(
                at=at, actor_kind=actor[0], actor=actor[1],
                client=str(client[0]) if client else None, action=action,
                target=_target(scope, bytes(body), seen["body_done"] and "overflow" not in seen),
                outcome="ok" if status < 400 else "refused" if status < 500 else "failed",
                status=status, error_code=_error_code(bytes(err), status) if status >= 400 else None,
                detail=dict(state.get(STATE_DETAIL) or {}))
            if not self._repeated(entry):
                await run_in_threadpool(_write, vault, entry)

        try:
            await self.app(scope, recv, snd)
        finally:  # no complete answer was sent (the route raised, the client went away): a 500
            await record()

    def _wanted(self, method: str, action: str, status: int) -> bool:
        if method not in MUTATING:
            return status in (401, 403)
        return not (status < 400 and action.split(" ", 1)[1] in AGENT_FACTS)

    def _repeated(self, e: AuditEntry) -> bool:
        """An unauthenticated refusal already recorded within the last minute."""
        if e.status != 401:
            return False
        key = (e.client or "", e.actor_kind, e.actor, e.action, e.error_code or "")
        now = time.monotonic()
        with self._lock:
            last = self._recent.get(key)
            if last is not None and now - last < REPEAT_WINDOW_S:
                return True
            self._recent[key] = now
            self._recent.move_to_end(key)
            while len(self._recent) > 4096:
                self._recent.popitem(last=False)
        return False


def _write(vault: Any, entry: AuditEntry) -> None:
    if vault.passive:  # a standby or fenced vault writes nothing; the active one audits its own
        log.info("%s vault: not recorded in the audit trail: %s %s by %s %s",
                 "fenced" if vault.fenced is not None else "standby", entry.action,
                 entry.outcome, entry.actor_kind, entry.actor)
        return
    try:
        with vault.db.tx() as s:
            record_audit(s, entry)
    except Exception:  # the call itself is done; losing its row must not turn it into a 500
        log.exception("could not record an audit row for %s", entry.action)


AUDIT_ORDER = (Key(Audit.id, descending=True),)


@router.get("/audit", summary="The audit trail, newest first, a page at a time (admin; filters: "
                              "since, actor, outcome)")
def list_audit(vault: VaultDep, p: Admin, limit: int = DEFAULT_LIMIT, since: float | None = None,
               actor: str | None = None, outcome: str | None = None, before: int | None = None,
               cursor: str | None = None) -> dict[str, Any]:
    """Like every list: ``{"entries", "total", "limit", "next_cursor"}``; also ``before=ID``
    (entries older than that id) and ``next_before``, the same cursor as an id."""
    ensure_role(p, Role.ADMIN)
    q = select(Audit)
    if since is not None:
        q = q.where(Audit.at >= since)
    if actor:
        if len(actor) > 128:
            raise InvalidInput("actor must be at most 128 characters")
        q = q.where(Audit.actor == actor)
    if outcome is not None:
        if outcome not in ("ok", "refused", "failed"):
            raise InvalidInput(f"unknown outcome {outcome!r}", hint="Use ok, refused or failed.")
        q = q.where(Audit.outcome == outcome)
    if before is not None:
        q = q.where(Audit.id < before)
    with vault.db.read() as s:
        out = page(s, q, AUDIT_ORDER, limit=limit, cursor=cursor, view=audit_view)
    out["next_before"] = out["entries"][-1]["id"] if out["next_cursor"] else None
    return out
