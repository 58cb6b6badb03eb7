"""The ordered tasks of every job kind (names are stored in the database: never rename one;
a job whose task names are unknown after an upgrade is failed at start-up, not guessed at)."""

from __future__ import annotations

JOB_STATES = ("queued", "running", "cancelling", "succeeded", "failed", "cancelled")
ACTIVE_JOB_STATES = ("queued", "running", "cancelling")
TASK_STATES = ("pending", "running", "succeeded", "failed", "skipped", "cancelled")

ENABLE = "EnableProtection"
DISABLE = "DisableProtection"
RESYNC = "Resync"
ASSOCIATE = "PolicyAssociation"

TASK_PLAN: dict[str, tuple[tuple[str, str], ...]] = {
    ENABLE: (("prerequisites", "Prerequisite checks"),
             ("create_relationship", "Create replication relationship"),
             ("initial_replication", "Initial replication"),
             ("finalize", "Finalize protection")),
    DISABLE: (("stop_replication", "Stop replication on the host"),
              ("remove_item", "Remove the protected item")),
    RESYNC: (("start_resync", "Start resynchronization"),
             ("resync", "Resynchronize by checksums")),
    ASSOCIATE: (("apply_settings", "Apply the policy to protected items"),
                ("protect_vms", "Enable protection of matching VMs")),
}
ROLLBACK_TASK = ("rollback", "Roll back (unprotect)")
# task weights for the job's overall progress (initial replication is the long one)
WEIGHTS: dict[str, float] = {"initial_replication": 8.0, "resync": 6.0}
