"""Who is looking at the dashboard: the API token in an HttpOnly cookie, and CSRF tokens.

Login takes an operator API token (the same tokens as the REST API, roles admin > operator >
reader) and stores it in an ``HttpOnly; SameSite=Strict`` cookie (``Secure`` over HTTPS), so
deleting the token logs its sessions out at once, and the browser's scripts never see it.
Every request re-authenticates the cookie exactly like the API's bearer check
(``vault.auth.authenticate_token``). The CSRF token of a session is an HMAC of a fixed label
keyed by the session's token secret: it survives vault restarts, differs per token, cannot be
turned back into the token, and is checked on every POST (form field ``csrf`` or header
``X-CSRF-Token``) together with the request's ``Origin``. Secrets are never logged or rendered.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from urllib.parse import urlsplit

from fastapi import Request

from drsite.core.errors import AuthError
from drsite.vault.api.deps import set_actor
from drsite.vault.auth import Role, authenticate_token, token_needs_touch, touch_token
from drsite.vault.context import Vault

COOKIE = "drsite_session"
CSRF_FIELD = "csrf"
CSRF_HEADER = "x-csrf-token"
MAX_TOKEN_LEN = 256


@dataclass(frozen=True)
class WebUser:
    """A logged-in token: its name, role and the session's CSRF token (never its secret)."""

    name: str
    role: Role
    csrf: str

    @property
    def can_operate(self) -> bool:
        return self.role.allows(Role.OPERATOR)

    @property
    def is_admin(self) -> bool:
        return self.role.allows(Role.ADMIN)


def csrf_for(secret: str) -> str:
    return hmac.new(secret.encode("utf-8", "surrogatepass"), b"drsite-web-csrf-v1",
                    hashlib.sha256).hexdigest()


def check_token(vault: Vault, secret: str) -> WebUser:
    """The user of a presented token secret; ``AuthError`` when it is unknown."""
    if not secret or len(secret) > MAX_TOKEN_LEN:
        raise AuthError("invalid bearer token", hint="Check the token; it may have been deleted.")
    now = vault.settings.clock.now()
    with vault.db.read() as s:
        tok = authenticate_token(s, secret, now, touch=False)
        user = WebUser(tok.name, Role(tok.role), csrf_for(secret))
        tok_id, stale = tok.id, token_needs_touch(tok, now)
    if stale:
        with vault.db.tx() as s:
            touch_token(s, tok_id, now)
    return user


def current_user(request: Request, vault: Vault) -> WebUser | None:
    """The user of the session cookie, or None (no cookie, or a token that no longer exists)."""
    secret = request.cookies.get(COOKIE)
    if not secret:
        return None
    try:
        user = check_token(vault, secret)
    except AuthError:
        return None
    set_actor(request, "token", user.name)  # who, for the audit trail of a dashboard POST
    return user


def csrf_ok(user: WebUser, presented: str | None) -> bool:
    return bool(presented) and hmac.compare_digest(user.csrf, str(presented))


def same_origin(request: Request) -> bool:
    """False when the browser says the request came from another origin (``Origin``, else
    ``Referer``); True when it says nothing (non-browser clients) or names this host."""
    source = request.headers.get("origin") or request.headers.get("referer")
    if not source or source == "null":
        return source is None
    host = request.headers.get("host", "")
    return urlsplit(source).netloc == host


def cookie_secure(request: Request) -> bool:
    return request.url.scheme == "https"
