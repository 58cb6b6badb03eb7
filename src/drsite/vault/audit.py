"""The event trail: one row per thing an operator may want to find later (registrations, job
transitions, alerts). Never holds secrets."""

from __future__ import annotations

import logging

from sqlalchemy.orm import Session

from drsite.vault.db.models import Event

log = logging.getLogger("drsite.vault.events")


def record_event(s: Session, now: float, kind: str, subject: str, message: str) -> None:
    s.add(Event(at=now, kind=kind, subject=subject[:128], message=message))
    log.info("%s %s: %s", kind, subject, message)
