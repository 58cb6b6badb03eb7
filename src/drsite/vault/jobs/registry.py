"""Job kind → the bodies of its tasks."""

from __future__ import annotations

from drsite.vault.jobs.maintenance import ASSOCIATE_HANDLERS, RESYNC_HANDLERS
from drsite.vault.jobs.model import JobHandlers
from drsite.vault.jobs.plan import ASSOCIATE, DISABLE, ENABLE, RESYNC
from drsite.vault.jobs.protection import DISABLE_HANDLERS, ENABLE_HANDLERS

HANDLERS: dict[str, JobHandlers] = {
    ENABLE: ENABLE_HANDLERS,
    DISABLE: DISABLE_HANDLERS,
    RESYNC: RESYNC_HANDLERS,
    ASSOCIATE: ASSOCIATE_HANDLERS,
}
