"""Job kind → the bodies of its tasks."""

from __future__ import annotations

from drsite.vault.jobs import failover as F
from drsite.vault.jobs import plan as P
from drsite.vault.jobs.drills import DRILL_HANDLERS
from drsite.vault.jobs.maintenance import ASSOCIATE_HANDLERS, RESYNC_HANDLERS
from drsite.vault.jobs.model import JobHandlers
from drsite.vault.jobs.plan import ASSOCIATE, DISABLE, ENABLE, RESYNC
from drsite.vault.jobs.plans import PLAN_HANDLERS
from drsite.vault.jobs.protection import DISABLE_HANDLERS, ENABLE_HANDLERS
from drsite.vault.jobs.stores import REKEY_HANDLERS
from drsite.vault.jobs.verify import VERIFY_HANDLERS

HANDLERS: dict[str, JobHandlers] = {
    ENABLE: ENABLE_HANDLERS,
    DISABLE: DISABLE_HANDLERS,
    RESYNC: RESYNC_HANDLERS,
    ASSOCIATE: ASSOCIATE_HANDLERS,
    P.TEST_FAILOVER: F.TEST_HANDLERS,
    P.CLEANUP_TEST: F.CLEANUP_HANDLERS,
    P.PLANNED: F.PLANNED_HANDLERS,
    P.UNPLANNED: F.UNPLANNED_HANDLERS,
    P.COMMIT: F.COMMIT_HANDLERS,
    P.CANCEL: F.CANCEL_HANDLERS,
    P.CHANGE_POINT: F.CHANGE_POINT_HANDLERS,
    P.REPROTECT: F.REPROTECT_HANDLERS,
    P.PLAN: PLAN_HANDLERS,
    P.REKEY: REKEY_HANDLERS,
    P.VERIFY: VERIFY_HANDLERS,
    P.DRILL: DRILL_HANDLERS,
}
