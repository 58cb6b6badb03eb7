"""Job kind → the bodies of its tasks."""

from __future__ import annotations

from drsite.vault.jobs import failover as F
from drsite.vault.jobs import kinds as K
from drsite.vault.jobs.drills import DRILL_HANDLERS
from drsite.vault.jobs.kinds import ASSOCIATE, DISABLE, ENABLE, RESYNC
from drsite.vault.jobs.maintenance import ASSOCIATE_HANDLERS, RESYNC_HANDLERS
from drsite.vault.jobs.model import JobHandlers
from drsite.vault.jobs.plans import PLAN_HANDLERS
from drsite.vault.jobs.protection import DISABLE_HANDLERS, ENABLE_HANDLERS
from drsite.vault.jobs.stores import REKEY_HANDLERS
from drsite.vault.jobs.verify import VERIFY_HANDLERS
from drsite.vault.jobs.vms import VM_HANDLERS

HANDLERS: dict[str, JobHandlers] = {
    ENABLE: ENABLE_HANDLERS,
    DISABLE: DISABLE_HANDLERS,
    RESYNC: RESYNC_HANDLERS,
    ASSOCIATE: ASSOCIATE_HANDLERS,
    K.TEST_FAILOVER: F.TEST_HANDLERS,
    K.CLEANUP_TEST: F.CLEANUP_HANDLERS,
    K.PLANNED: F.PLANNED_HANDLERS,
    K.FAILBACK: F.PLANNED_HANDLERS,
    K.UNPLANNED: F.UNPLANNED_HANDLERS,
    K.COMMIT: F.COMMIT_HANDLERS,
    K.CANCEL: F.CANCEL_HANDLERS,
    K.CHANGE_POINT: F.CHANGE_POINT_HANDLERS,
    K.REPROTECT: F.REPROTECT_HANDLERS,
    K.PLAN: PLAN_HANDLERS,
    K.REKEY: REKEY_HANDLERS,
    K.VERIFY: VERIFY_HANDLERS,
    K.DRILL: DRILL_HANDLERS,
    **dict.fromkeys(K.VM_KINDS, VM_HANDLERS),
}
