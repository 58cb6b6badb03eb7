"""The vault's two trails: events and the audit trail.

Events (:func:`record_event`): one row per thing an operator may want to find later
(registrations, job transitions, alerts).

Audit (:func:`record_audit`): who did what, from where, when, and how it ended — every
mutating API call and every refused call (``vault/api/audit.py`` records them), registrations
and certificate issue/re-issue/revocation (the register, reissue and revoke calls, with the
certificate's serial in ``detail``), agent claims the vault refused (``agent.*``, see
``trust``), store deletes and overwrites agents report (``store.*``), and local admin actions
(``vault.*``: the master-key rotation). Each row is logged at INFO on the
``drsite.vault.audit`` logger.

Neither trail ever holds a secret: callers pass names, ids and codes, never request bodies,
tokens, keys or credentials; :func:`clean_detail` keeps ``detail`` to short scalars.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.orm import Session

from drsite.vault.db.models import Audit, Event

log = logging.getLogger("drsite.vault.events")
audit_log = logging.getLogger("drsite.vault.audit")

OUTCOMES = ("ok", "refused", "failed")
ACTOR_KINDS = ("token", "host", "anonymous", "local", "vault")
MAX_DETAIL_KEYS = 16
MAX_TEXT = 256


def record_event(s: Session, now: float, kind: str, subject: str, message: str) -> None:
    s.add(Event(at=now, kind=kind, subject=subject[:128], message=message))
    log.info("%s %s: %s", kind, subject, message)


def _short(v: Any) -> Any:
    if v is None or isinstance(v, bool | int | float):
        return v
    if isinstance(v, list | tuple):
        return [_short(x) for x in list(v)[:20]]
    return "".join(c if c.isprintable() else "?" for c in str(v))[:MAX_TEXT]


def clean_detail(detail: dict[str, Any] | None) -> dict[str, Any]:
    """``detail`` bounded: at most 16 keys, values short scalars (or short lists of them)."""
    return {str(k)[:64]: _short(v) for k, v in list((detail or {}).items())[:MAX_DETAIL_KEYS]}


@dataclass
class AuditEntry:
    """One audit row before it is written."""

    at: float
    actor_kind: str
    actor: str
    action: str
    target: str = ""
    outcome: str = "ok"
    client: str | None = None
    status: int | None = None
    error_code: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)

    def row(self) -> Audit:
        return Audit(at=self.at, actor_kind=self.actor_kind[:16], actor=_short(self.actor)[:128],
                     client=_short(self.client)[:64] if self.client else None,
                     action=_short(self.action)[:128], target=_short(self.target)[:256],
                     outcome=self.outcome if self.outcome in OUTCOMES else "failed",
                     status=self.status, error_code=_short(self.error_code)[:64] if self.error_code else None,
                     detail=clean_detail(self.detail))


def record_audit(s: Session, entry: AuditEntry) -> Audit:
    """Add ``entry`` to the audit trail (in the caller's transaction) and log it at INFO."""
    row = entry.row()
    s.add(row)
    audit_log.info("audit %s %s:%s from %s: %s %s -> %s%s", row.at, row.actor_kind, row.actor or "-",
                   row.client or "-", row.action, row.target or "-", row.outcome,
                   f" ({row.status} {row.error_code})" if row.error_code else
                   (f" ({row.status})" if row.status else ""))
    return row


def audit_view(a: Audit) -> dict[str, Any]:
    return {"id": a.id, "at": a.at, "actor_kind": a.actor_kind, "actor": a.actor,
            "client": a.client, "action": a.action, "target": a.target, "outcome": a.outcome,
            "status": a.status, "error_code": a.error_code, "detail": dict(a.detail or {})}
