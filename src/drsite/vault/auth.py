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
from enum import StrEnum

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from drsite.core.errors import AuthError, InvalidInput
from drsite.pki import CertificateAuthority
from drsite.vault.db.models import ApiToken, Host, RegistrationKey

TOKEN_PREFIX = "drst_"
REGKEY_PREFIX = "drsk_"
ADMIN_TOKEN_NAME = "admin"


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


def authenticate_token(s: Session, presented: str | None, now: float) -> ApiToken:
    """The token row for a presented bearer secret; ``AuthError`` when missing or unknown."""
    if not presented:
        raise AuthError("missing bearer token",
                        hint="Send 'Authorization: Bearer TOKEN' (see DATA/admin.token).")
    h = secret_hash(presented)
    tok = s.scalars(select(ApiToken).where(ApiToken.secret_hash == h)).first()
    if tok is None or not hmac.compare_digest(tok.secret_hash, h):
        raise AuthError("invalid bearer token", hint="Check the token; it may have been deleted.")
    if tok.last_used_at is None or now - tok.last_used_at > 60:
        tok.last_used_at = now
    return tok


def create_registration_key(s: Session, site_id: int, ttl_s: float, now: float) -> tuple[str, float]:
    """A one-time key for ``site_id``; returns ``(key, expires_at)``."""
    key = new_secret(REGKEY_PREFIX)
    expires = now + ttl_s
    s.add(RegistrationKey(site_id=site_id, key_hash=secret_hash(key), created_at=now,
                          expires_at=expires))
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


def authenticate_agent(s: Session, ca: CertificateAuthority, cert: bytes | None) -> Host:
    """The host an agent's client certificate (DER or PEM) stands for; ``AuthError`` when there
    is no certificate, it was not issued by this CA, names no known host, the host is revoked,
    or it is not the host's current certificate (a re-registration replaced it)."""
    if not cert:
        raise AuthError("agent routes need a client certificate",
                        hint="Register the agent first ('drsite agent register').")
    try:
        ident = ca.verify_issued(cert)
    except InvalidInput as e:
        raise AuthError("client certificate is unreadable") from e
    host = s.get(Host, ident.common_name)
    if host is None:
        raise AuthError("client certificate names no registered host")
    if host.revoked_at is not None:
        raise AuthError("host was revoked", hint="Register the agent again with a new key.")
    if not hmac.compare_digest(host.cert_fingerprint, ident.fingerprint):
        raise AuthError("client certificate was replaced by a newer registration",
                        hint="Use the agent's current certificate, or register it again.")
    return host
