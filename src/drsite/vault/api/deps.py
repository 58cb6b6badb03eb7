"""FastAPI dependencies: the running vault, operator roles, the agent's client certificate.

Tests override :func:`peer_cert` (``app.dependency_overrides``) to act as an agent without TLS;
in production it returns the verified client certificate that ``tlsutil`` puts in the scope.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request, Response

from drsite import tlsutil
from drsite.core.errors import Forbidden, InvalidInput
from drsite.core.model import validate_name
from drsite.vault.auth import Role, authenticate_token, token_needs_touch, touch_token
from drsite.vault.context import Vault


async def get_vault(request: Request) -> Vault:
    # async: FastAPI runs a sync dependency in the thread pool (a thread hop per request for
    # an attribute read); the same for peer_cert below
    vault: Vault = request.app.state.vault
    return vault


VaultDep = Annotated[Vault, Depends(get_vault)]


@dataclass(frozen=True)
class Principal:
    """Who made an operator call (token name and role)."""

    name: str
    role: Role


STATE_ACTOR = "audit_actor"
STATE_DETAIL = "audit_detail"


def set_actor(request: Request, kind: str, name: str) -> None:
    """Who made this call, for the audit trail (``token`` + token name, ``host`` + host id)."""
    setattr(request.state, STATE_ACTOR, (kind, name))


def note(request: Request) -> dict[str, Any]:
    """This call's audit detail (a dict the route fills; never put a secret in it)."""
    d: dict[str, Any] | None = getattr(request.state, STATE_DETAIL, None)
    if d is None:
        d = {}
        setattr(request.state, STATE_DETAIL, d)
    return d


def ensure_role(p: Principal, role: Role) -> None:
    """``Forbidden`` unless ``p`` has at least ``role`` (for route functions also called
    directly, e.g. by the dashboard, where the dependency does not run)."""
    if not p.role.allows(role):
        raise Forbidden(f"token {p.name!r} ({p.role.value}) may not do this; it needs the "
                        f"{role.value} role")


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


def authorize(request: Request, vault: Vault, role: Role) -> Principal:
    """The caller's bearer token checked for ``role`` (``AuthError`` → 401, ``Forbidden`` →
    403) and named for the audit trail: what :func:`require`'s dependency does, callable from
    inside a route's own thread (the hot reads, ``GET /items`` and ``GET /health``, check the
    token there: a thread hop fewer, each a wait for the GIL when the process is busy)."""
    now = vault.settings.clock.now()
    with vault.db.read_loose() as s:  # one statement: no write lock, no transaction
        tok = authenticate_token(s, _bearer(request), now, touch=False)
        principal = Principal(tok.name, Role(tok.role))
        set_actor(request, "token", principal.name)
        tok_id, stale = tok.id, token_needs_touch(tok, now)
    if stale and not vault.passive:  # off the request path: a GET never waits for the write lock
        def touch() -> None:
            with vault.db.tx() as s:
                touch_token(s, tok_id, now)

        vault.later(touch)
    ensure_role(principal, role)
    return principal


def require(role: Role) -> Callable[[Request, Vault], Principal]:
    """A dependency admitting tokens whose role is at least ``role`` (401 / 403 otherwise)."""

    def dependency(request: Request, vault: VaultDep) -> Principal:
        return authorize(request, vault, role)

    return dependency


Reader = Annotated[Principal, Depends(require(Role.READER))]
Operator = Annotated[Principal, Depends(require(Role.OPERATOR))]
Admin = Annotated[Principal, Depends(require(Role.ADMIN))]


async def peer_cert(request: Request) -> bytes | None:
    """DER of the verified client certificate of this connection, or None."""
    return tlsutil.peer_certificate(request)


PeerCert = Annotated[bytes | None, Depends(peer_cert)]


def json_response(content: Any) -> Response:
    """``content`` rendered to JSON here, in the route's thread, as Starlette's
    ``JSONResponse`` renders it (the same bytes). A route returning a ``Response`` skips
    FastAPI's response validation and encoding — another thread hop and a walk of the whole
    body — so only views of plain JSON types (``views``) may be returned this way."""
    return Response(json.dumps(content, ensure_ascii=False, allow_nan=False, indent=None,
                               separators=(",", ":")).encode("utf-8"),
                    media_type="application/json")


def name(kind: str, value: str) -> str:
    """A name from a path or body, checked (``InvalidInput`` → 400)."""
    return validate_name(kind, value)


def text(kind: str, value: str, *, limit: int = 1000) -> str:
    """Free text (descriptions): bounded, no control characters except newline and tab."""
    if len(value) > limit or any((ord(c) < 32 and c not in "\n\t") or ord(c) == 127 for c in value):
        raise InvalidInput(f"invalid {kind}: at most {limit} characters, no control characters")
    return value
