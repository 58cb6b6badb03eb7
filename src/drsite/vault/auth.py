"""Secrets of the vault: operator API tokens, registration keys, and agent identities.

Responsible for: making secrets (32 random bytes, URL-safe), storing only their sha256, looking
a presented secret up by its hash, role order (admin > operator > reader), and checking that an
agent's verified client certificate names a known, non-revoked host holding its current
certificate. Not responsible for: TLS verification of the chain (``tlsutil``/uvicorn does it
when the certificate is presented; :meth:`CertificateAuthority.verify_issued` is checked again
here) or HTTP plumbing (``api.deps``). Secrets are never logged or returned except once, by the
call that creates them.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections import OrderedDict
from enum import StrEnum

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from drsite.core.errors import AuthError, InvalidInput
from drsite.pki import CertIdentity, CertificateAuthority
from drsite.vault.db.models import ApiToken, Host, RegistrationKey

TOKEN_PREFIX = "drst_"
REGKEY_PREFIX = "drsk_"
ADMIN_TOKEN_NAME = "admin"
TOKEN_TOUCH_EVERY_S = 60.0


class Role(StrEnum):
    READER = "reader"
    OPERATOR = "operator"
    ADMIN = "admin"

    @property
    def rank(self) -> int:
        return {"reader": 0, "operator": 1, "admin": 2}[self.value]

    def allows(self, needed: Role) -> bool:
        return self.rank >= needed.rank


def parse_role(value: str) -> Role:
    try:
        return Role(value)
    except ValueError:
        raise InvalidInput(f"unknown role {value!r}", hint="Use admin, operator or reader.") from None


def new_secret(prefix: str) -> str:
    """A fresh secret: ``prefix`` + 32 random bytes, URL-safe base64."""
    return prefix + secrets.token_urlsafe(32)


def secret_hash(secret: str) -> str:
    """sha256 (hex) of a secret. Secrets carry 256 random bits, so no salt or stretching is
    needed: the hash is a lookup key that cannot be turned back into the secret."""
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


def create_token(s: Session, name: str, role: Role, now: float) -> str:
    """Store a new token and return its secret (the only time it is available)."""
    secret = new_secret(TOKEN_PREFIX)
    s.add(ApiToken(name=name, role=role.value, secret_hash=secret_hash(secret), created_at=now))
    s.flush()
    return secret


def authenticate_token(s: Session, presented: str | None, now: float, *, touch: bool = True) -> ApiToken:
    """The token row for a presented bearer secret; ``AuthError`` when missing or unknown.
    With ``touch``, a stale ``last_used_at`` is set on the row (the caller's transaction writes
    it); without, the caller writes it (:func:`token_needs_touch`, :func:`touch_token`)."""
    if not presented:
        raise AuthError("missing bearer token",
                        hint="Send 'Authorization: Bearer TOKEN' (see DATA/admin.token).")
    h = secret_hash(presented)
    tok = s.scalars(select(ApiToken).where(ApiToken.secret_hash == h)).first()
    if tok is None or not hmac.compare_digest(tok.secret_hash, h):
        raise AuthError("invalid bearer token", hint="Check the token; it may have been deleted.")
    if touch and token_needs_touch(tok, now):
        tok.last_used_at = now
    return tok


def token_needs_touch(tok: ApiToken, now: float) -> bool:
    """Whether ``last_used_at`` is stale enough to be written (at most once a minute)."""
    return tok.last_used_at is None or now - tok.last_used_at > TOKEN_TOUCH_EVERY_S


def touch_token(s: Session, token_id: int, now: float) -> None:
    """Record a token's use (its own short write; concurrent touches are harmless)."""
    s.execute(update(ApiToken).where(ApiToken.id == token_id).values(last_used_at=now)
              .execution_options(synchronize_session=False))


def create_registration_key(s: Session, site_id: int, ttl_s: float, now: float, *,
                            host_id: str | None = None) -> tuple[str, float]:
    """A one-time key for ``site_id``; returns ``(key, expires_at)``. With ``host_id`` it is a
    re-issue key: it registers that host again (a new certificate replaces its current one)
    and nothing else; without, it registers a new host of the site and never an existing one."""
    key = new_secret(REGKEY_PREFIX)
    expires = now + ttl_s
    s.add(RegistrationKey(site_id=site_id, key_hash=secret_hash(key), created_at=now,
                          expires_at=expires, host_id=host_id))
    s.flush()
    return key, expires


def lookup_registration_key(s: Session, key: str, now: float) -> RegistrationKey:
    """The unused, unexpired key row for ``key``; ``AuthError`` otherwise (one message for
    every case, so a caller learns nothing about which keys exist)."""
    row = s.scalars(select(RegistrationKey).where(RegistrationKey.key_hash == secret_hash(key))).first()
    if row is None or row.used_at is not None or row.expires_at <= now:
        raise AuthError("registration key is unknown, already used or expired",
                        hint="Ask an admin for a new key: 'drsite vault registration-key --site SITE'.")
    return row


def consume_registration_key(s: Session, row: RegistrationKey, host_id: str, now: float) -> None:
    """Mark the key used, atomically: a concurrent use of the same key loses (``AuthError``)."""
    res = s.execute(update(RegistrationKey)
                    .where(RegistrationKey.id == row.id, RegistrationKey.used_at.is_(None))
                    .values(used_at=now, used_by_host=host_id)
                    .execution_options(synchronize_session=False))
    if getattr(res, "rowcount", 0) != 1:
        raise AuthError("registration key is unknown, already used or expired")


class _IdentityCache:
    """Verified agent certificates by (CA, sha256 of the certificate bytes), bounded LRU.

    Verifying a certificate (parse + ECDSA signature) costs far more than the rest of an agent
    call; a certificate's verification cannot change except by expiry, which is re-checked on
    every hit. Revocation and re-registration are *not* cached: :func:`agent_host` reads the
    host row (primary-key lookup) on every call."""

    def __init__(self, size: int = 4096) -> None:
        self.size = size
        self._lock = threading.Lock()
        self._d: OrderedDict[tuple[str, str], CertIdentity] = OrderedDict()

    def get(self, key: tuple[str, str]) -> CertIdentity | None:
        with self._lock:
            ident = self._d.get(key)
            if ident is not None:
                self._d.move_to_end(key)
            return ident

    def put(self, key: tuple[str, str], ident: CertIdentity) -> None:
        with self._lock:
            self._d[key] = ident
            self._d.move_to_end(key)
            while len(self._d) > self.size:
                self._d.popitem(last=False)


_IDENTITIES = _IdentityCache()


def verify_agent_cert(ca: CertificateAuthority, cert: bytes | None) -> CertIdentity:
    """The verified identity of an agent's client certificate (DER or PEM), from the cache when
    this CA verified the same bytes before and they have not expired since; ``AuthError``
    otherwise. Needs no database: call it before opening a transaction."""
    if not cert:
        raise AuthError("agent routes need a client certificate",
                        hint="Register the agent first ('drsite agent register').")
    key = (hashlib.sha256(ca.ca_pem).hexdigest(), hashlib.sha256(cert).hexdigest())
    ident = _IDENTITIES.get(key)
    if ident is not None and time.time() <= ident.not_after:
        return ident
    try:
        ident = ca.verify_issued(cert)
    except InvalidInput as e:
        raise AuthError("client certificate is unreadable") from e
    _IDENTITIES.put(key, ident)
    return ident


def agent_host(s: Session, ident: CertIdentity) -> Host:
    """The host a verified identity stands for; ``AuthError`` when it names no known host, the
    host is revoked, or it is not the host's current certificate (a re-registration replaced
    it). Reads the host row every time (primary key), so a revocation applies at once."""
    host = s.get(Host, ident.common_name)
    if host is None:
        raise AuthError("client certificate names no registered host")
    if host.revoked_at is not None:
        raise AuthError("host was revoked", hint="Register the agent again with a new key.")
    if not hmac.compare_digest(host.cert_fingerprint, ident.fingerprint):
        raise AuthError("client certificate was replaced by a newer registration",
                        hint="Use the agent's current certificate, or register it again.")
    return host


def authenticate_agent(s: Session, ca: CertificateAuthority, cert: bytes | None) -> Host:
    """The host an agent's client certificate (DER or PEM) stands for; ``AuthError`` when there
    is no certificate, it was not issued by this CA, names no known host, the host is revoked,
    or it is not the host's current certificate (a re-registration replaced it).
    (:func:`verify_agent_cert` then :func:`agent_host`.)"""
    return agent_host(s, verify_agent_cert(ca, cert))
