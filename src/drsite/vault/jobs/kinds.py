"""Job kinds and the ordered tasks of each (names are stored in the database: never rename one;
a job whose task names are unknown after an upgrade is failed at start-up, not guessed at).
The states of jobs and tasks are :class:`~drsite.core.states.JobState` and ``TaskState``."""

from __future__ import annotations

ENABLE = "EnableProtection"
DISABLE = "DisableProtection"
RESYNC = "Resync"
ASSOCIATE = "PolicyAssociation"
TEST_FAILOVER = "TestFailover"
CLEANUP_TEST = "CleanupTestFailover"
PLANNED = "PlannedFailover"
UNPLANNED = "UnplannedFailover"
COMMIT = "CommitFailover"
CANCEL = "CancelFailover"
CHANGE_POINT = "ChangeRecoveryPoint"
REPROTECT = "Reprotect"
FAILBACK = "Failback"  # a planned failover of a reverse item back to its original site
PLAN = "RecoveryPlan"
REKEY = "RekeyStore"
VERIFY = "Verify"
DRILL = "Drill"
# the VM lifecycle on a host (vault/jobs/vms.py): one command to the host's agent each
CREATE_VM = "CreateVm"
IMPORT_VM = "ImportVm"
START_VM = "StartVm"
STOP_VM = "StopVm"
DELETE_VM = "DeleteVm"
VM_KINDS = (CREATE_VM, IMPORT_VM, START_VM, STOP_VM, DELETE_VM)

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
    TEST_FAILOVER: (("failover_checks", "Prerequisite checks"),
                    ("start_test_vm", "Start the test VM from the recovery point")),
    CLEANUP_TEST: (("cleanup_test_vm", "Remove the test VM and its images"),),
    PLANNED: (("failover_checks", "Prerequisite checks"),
              ("shutdown_source", "Shut down the source VM and ship the last changes"),
              ("start_replica", "Start the replica VM (no data lost)")),
    FAILBACK: (("failover_checks", "Prerequisite checks"),
               ("shutdown_source", "Shut down the failed-over VM and ship the last changes"),
               ("start_replica", "Start the VM on its original site (no data lost)")),
    UNPLANNED: (("failover_checks", "Prerequisite checks"),
                ("start_replica", "Start the replica VM from the recovery point")),
    COMMIT: (("commit", "Commit the failover"),),
    CANCEL: (("cancel", "Cancel the failover (delete the recovery VM)"),
             ("resume_source", "Hand the item back to the source")),
    CHANGE_POINT: (("change_point", "Restart the recovery VM from another point"),),
    VERIFY: (("verify_points", "Read and check every recovery point asked for"),),
    # a Drill's tasks are built from its plan (vault/drills.py): the plan's test failover
    # tasks, then these two around the cleanup groups
    DRILL: (("drill_probe", "Boot each test VM and run the probe"),
            ("drill_report", "Record the drill report (RPO, RTO, checks)")),
    REPROTECT: (("reprotect_seed", "Write the old primary's disks as the reverse base"),
                ("reverse_replication", "Resync from the failed-over VM (only differences travel)")),
    REKEY: (("rekey", "Re-encrypt old objects under the active key"),),
    CREATE_VM: (("create_vm", "Create the VM on its host"),),
    IMPORT_VM: (("import_vm", "Create the VM on its host from disk images"),),
    START_VM: (("start_vm", "Start the VM"),),
    STOP_VM: (("stop_vm", "Stop the VM"),),
    DELETE_VM: (("delete_vm", "Delete the VM and its disks"),),
}
# a planned failover's commit re-protects at once (the seed: protected in the reverse direction)
COMMIT_AND_REPROTECT = TASK_PLAN[COMMIT] + TASK_PLAN[REPROTECT]
ROLLBACK_TASK = ("rollback", "Roll back (unprotect)")
# task weights for the job's overall progress (initial replication is the long one)
WEIGHTS: dict[str, float] = {"initial_replication": 8.0, "resync": 6.0, "start_replica": 4.0,
                             "start_test_vm": 4.0, "reverse_replication": 6.0,
                             "shutdown_source": 3.0, "rekey": 1.0}
