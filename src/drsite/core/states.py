"""The life cycles of drsite's persisted objects as enums: jobs and their tasks, agent commands,
protected items, failovers.

The values are what the vault's database, the API and the agents' records hold: never rename
one (a stored value that no member has fails loading loudly). ``StrEnum`` members compare and
hash as their values, so rows read back and JSON bodies parsed compare equal to them.
"""

from __future__ import annotations

from enum import StrEnum


class JobState(StrEnum):
    """``queued → running → succeeded | failed``, or ``running → cancelling → cancelled`` (a
    cancel of a queued or running job)."""

    QUEUED = "queued"
    RUNNING = "running"
    CANCELLING = "cancelling"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


ACTIVE_JOB_STATES = frozenset({JobState.QUEUED, JobState.RUNNING, JobState.CANCELLING})
TERMINAL_JOB_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})
JOB_FILTER_ACTIVE = "active"  # the job-list filter for ACTIVE_JOB_STATES (not a state)


class TaskState(StrEnum):
    """One ordered step of a job: ``pending → running → succeeded | failed | skipped |
    cancelled``."""

    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    SKIPPED = "skipped"
    CANCELLED = "cancelled"


OPEN_TASK_STATES = frozenset({TaskState.PENDING, TaskState.RUNNING})
PASSED_TASK_STATES = frozenset({TaskState.SUCCEEDED, TaskState.SKIPPED})  # the job goes on


class CommandStatus(StrEnum):
    """A command for an agent: ``pending → sent → running → succeeded | failed``. Agents post
    ``running`` (progress) and the two final ones."""

    PENDING = "pending"
    SENT = "sent"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


OPEN_COMMAND_STATUSES = frozenset({CommandStatus.PENDING, CommandStatus.SENT,
                                   CommandStatus.RUNNING})
UNSTARTED_COMMAND_STATUSES = frozenset({CommandStatus.PENDING, CommandStatus.SENT})
FINAL_COMMAND_STATUSES = frozenset({CommandStatus.SUCCEEDED, CommandStatus.FAILED})


class ItemProtection(StrEnum):
    """The vault's life cycle of a protected item (its ``status``; the API's ``protection``).

    Protection: ``enabling → protected → disabling → removed``, or ``failed`` (enabling
    failed). Failover: ``protected → failing_over`` (before the first command that can stop
    the source or promote the replica) ``→ failed_over`` (pending commit) ``→ committed``
    (unprotected) ``→ reprotected`` (a reverse item replicates the recovery VM back); a cancel
    goes back to ``protected``. Only ``protected`` items are scheduled.
    """

    ENABLING = "enabling"
    PROTECTED = "protected"
    DISABLING = "disabling"
    REMOVED = "removed"
    FAILED = "failed"
    FAILING_OVER = "failing_over"
    FAILED_OVER = "failed_over"
    COMMITTED = "committed"
    REPROTECTED = "reprotected"


# replicating, or about to be / still being taken apart: the VM has this item
LIVE_ITEM_STATUSES = frozenset({ItemProtection.ENABLING, ItemProtection.PROTECTED,
                                ItemProtection.DISABLING})
# held by a failover that is not over (no cycles; the VM's item until commit + re-protect)
FAILOVER_ITEM_STATUSES = frozenset({ItemProtection.FAILING_OVER, ItemProtection.FAILED_OVER,
                                    ItemProtection.COMMITTED})
RETIRED_ITEM_STATUSES = frozenset({ItemProtection.REMOVED, ItemProtection.FAILED})
NOT_PROTECTED = "not protected"  # shown for a plan's VM that has no item (not a stored status)


class FailoverState(StrEnum):
    """One failover of one item, as the recovery agent's record and the vault's row hold it."""

    STARTING = "starting"              # steps in progress (a crash resumes from the record)
    TEST_RUNNING = "test_running"      # test failover VM runs
    CLEANED_UP = "cleaned_up"          # test failover removed
    PENDING_COMMIT = "pending_commit"  # failed over; point may change; may be cancelled
    COMMITTED = "committed"
    CANCELLED = "cancelled"
    FAILED = "failed"                  # vault: its job failed before anything started
    REPROTECTED = "reprotected"        # vault: committed, then re-protected (reverse item)


__all__ = [
    "ACTIVE_JOB_STATES", "FAILOVER_ITEM_STATUSES", "FINAL_COMMAND_STATUSES", "JOB_FILTER_ACTIVE",
    "LIVE_ITEM_STATUSES", "NOT_PROTECTED", "OPEN_COMMAND_STATUSES", "OPEN_TASK_STATES", "PASSED_TASK_STATES",
    "RETIRED_ITEM_STATUSES", "TERMINAL_JOB_STATES", "UNSTARTED_COMMAND_STATUSES",
    "CommandStatus", "FailoverState", "ItemProtection", "JobState", "TaskState",
]
