"""The failover actions an operator can ask for, spelled one way everywhere.

The value of a :class:`FailoverAction` is the action's one spelling: the API path
(``POST /items/{id}/failover/test-failover``), the recovery-plan action (``drsite plan run shop
test-failover``), the dashboard's URLs and the ``action`` a plan job records. Where a name must
differ — the CLI's ``drsite failover test`` (the group already says "failover"), the job kind a
job row stores (``TestFailover``), the failover kind a failover row stores (``test``) — the
table in ``docs/control-plane.md`` ("One spelling per action") maps them.
"""

from __future__ import annotations

from enum import StrEnum

from drsite.core.errors import InvalidInput

# the named point choices of a failover (or else a point id): the newest point, the newest
# app-consistent one, the item's point in the newest whole multi-VM consistent group point
POINT_CHOICES = ("latest", "latest_app", "latest_group")


class FailoverAction(StrEnum):
    TEST_FAILOVER = "test-failover"
    CLEANUP_TEST_FAILOVER = "cleanup-test-failover"
    PLANNED_FAILOVER = "planned-failover"
    UNPLANNED_FAILOVER = "unplanned-failover"
    COMMIT = "commit"
    CANCEL = "cancel"
    CHANGE_POINT = "change-point"
    REPROTECT = "reprotect"
    FAILBACK = "failback"

    @classmethod
    def parse(cls, value: str, allowed: tuple[FailoverAction, ...] | None = None) -> FailoverAction:
        """The action ``value`` names. Plan jobs and task data written before the spellings
        were unified hold ``test_failover``: underscores are read as hyphens. ``InvalidInput``
        (naming the known actions) for anything else or outside ``allowed``."""
        known = allowed if allowed is not None else tuple(cls)
        try:
            action = cls(str(value).replace("_", "-"))
        except ValueError:
            action = None
        if action is None or action not in known:
            raise InvalidInput(f"unknown action {str(value)[:40]!r}",
                               hint=f"Use one of {', '.join(known)}.")
        return action

    @property
    def words(self) -> str:
        """The action in prose: ``test failover``."""
        return self.value.replace("-", " ")


# an item's actions (all), a recovery plan's (not change-point: a point is per VM)
ITEM_ACTIONS: tuple[FailoverAction, ...] = tuple(FailoverAction)
PLAN_ACTIONS: tuple[FailoverAction, ...] = tuple(a for a in FailoverAction
                                                 if a is not FailoverAction.CHANGE_POINT)
# the actions that start a failover, and the failover kind each records
FAILOVER_KINDS: dict[FailoverAction, str] = {FailoverAction.TEST_FAILOVER: "test",
                                             FailoverAction.PLANNED_FAILOVER: "planned",
                                             FailoverAction.UNPLANNED_FAILOVER: "unplanned",
                                             FailoverAction.FAILBACK: "planned"}
# the actions that take a recovery point
POINT_ACTIONS = (FailoverAction.TEST_FAILOVER, FailoverAction.UNPLANNED_FAILOVER,
                 FailoverAction.CHANGE_POINT)
