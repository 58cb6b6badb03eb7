"""The state enums of ``drsite.core.states``: their values are what databases, agents' records
and the API already hold (no migration), the vault's columns store and load them as members
(SQLite and PostgreSQL), refuse values no member has, and the vault and ``failover`` share one
``FailoverState``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import select, text
from sqlalchemy.exc import StatementError

from drsite.core import states as S
from drsite.core.errors import InvalidInput
from drsite.failover import actions
from drsite.vault.db.database import Database, sqlite_url
from drsite.vault.db.models import Command, Failover, Host, Item, Job, Site, Task
from drsite.vault.db.sealed import attach_sealer
from drsite.vault.jobs.failover import apply_failover_result
from drsite.vault.masterkey import Keyring, MasterKey

# the stored strings, written out: renaming one would need a migration
VALUES = {
    S.JobState: ["queued", "running", "cancelling", "succeeded", "failed", "cancelled"],
    S.TaskState: ["pending", "running", "succeeded", "failed", "skipped", "cancelled"],
    S.CommandStatus: ["pending", "sent", "running", "succeeded", "failed"],
    S.ItemProtection: ["enabling", "protected", "disabling", "removed", "failed", "failing_over",
                       "failed_over", "committed", "reprotected"],
    S.FailoverState: ["starting", "test_running", "cleaned_up", "pending_commit", "committed",
                      "cancelled", "failed", "reprotected"],
}


def test_values_are_the_stored_strings() -> None:
    for enum, values in VALUES.items():
        assert [m.value for m in enum] == values, enum.__name__
        for m in enum:  # rows read as str, JSON bodies and members compare and hash alike
            assert m == m.value and hash(m) == hash(m.value) and f"{m}" == m.value
            assert json.loads(json.dumps({"s": m})) == {"s": m.value}
    assert set(S.JobState) == S.ACTIVE_JOB_STATES | S.TERMINAL_JOB_STATES
    assert not S.ACTIVE_JOB_STATES & S.TERMINAL_JOB_STATES
    assert set(S.CommandStatus) == S.OPEN_COMMAND_STATUSES | S.FINAL_COMMAND_STATUSES
    assert S.UNSTARTED_COMMAND_STATUSES < S.OPEN_COMMAND_STATUSES
    assert set(S.TaskState) > S.OPEN_TASK_STATES | S.PASSED_TASK_STATES
    assert not (S.LIVE_ITEM_STATUSES & S.FAILOVER_ITEM_STATUSES
                or S.LIVE_ITEM_STATUSES & S.RETIRED_ITEM_STATUSES
                or S.FAILOVER_ITEM_STATUSES & S.RETIRED_ITEM_STATUSES)
    assert S.NOT_PROTECTED not in set(S.ItemProtection)
    assert S.JOB_FILTER_ACTIVE not in set(S.JobState)


def test_failover_and_vault_share_one_failover_state() -> None:
    assert actions.FailoverState is S.FailoverState
    rec = actions.FailoverResult("f1", "test", "i1", S.FailoverState.TEST_RUNNING, 1.0)
    back = actions.FailoverResult.from_dict(json.loads(json.dumps(rec.to_dict())))
    assert back.state is S.FailoverState.TEST_RUNNING


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Database:
    url = (str(request.getfixturevalue("pg_url")) if request.param == "postgresql"
           else sqlite_url(tmp_path / "vault.db"))
    d = Database(url)
    attach_sealer(d.engine, Keyring(MasterKey.generate()))  # Command.args has sealed paths
    d.migrate()
    return d


def _job(state: S.JobState | str) -> Job:
    return Job(id="j1", kind="Resync", state=state, target="vm", item_id=None, args={},
               progress=0.0, message="", cancel_requested=False, created_at=1.0, updated_at=1.0)


def test_columns_store_values_and_load_members(db: Database) -> None:
    try:
        with db.tx() as s:
            s.add(_job(S.JobState.QUEUED))
            s.add(Task(job_id="j1", idx=0, name="resync", title="t", state=S.TaskState.PENDING,
                       progress=0.0, message="", data={}))
        with db.tx() as s:  # what an older vault wrote: plain strings
            s.execute(text("UPDATE jobs SET state = 'running'"))
            assert s.execute(text("SELECT state FROM tasks")).scalar_one() == "pending"
        with db.read() as s:
            job = s.scalars(select(Job).where(Job.state.in_(S.ACTIVE_JOB_STATES))).one()
            assert job.state is S.JobState.RUNNING
            task = s.scalars(select(Task)).one()
            assert task.state is S.TaskState.PENDING
            assert s.scalars(select(Job).where(Job.state == "running")).one() is job
        with db.tx() as s:
            s.get(Job, "j1").state = "succeeded"  # type: ignore[union-attr,assignment]
        with db.read() as s:
            assert s.execute(text("SELECT state FROM jobs")).scalar_one() == "succeeded"
            assert s.get(Job, "j1").state is S.JobState.SUCCEEDED  # type: ignore[union-attr]
    finally:
        db.dispose()


def test_values_no_member_has_are_refused(db: Database) -> None:
    try:
        with pytest.raises(StatementError, match="'runing' is not a valid JobState"), \
                db.tx() as s:
            s.add(_job("runing"))
        with db.read() as s:
            assert s.scalars(select(Job)).all() == []
        with db.tx() as s:
            s.add(_job(S.JobState.QUEUED))
        with db.tx() as s:  # a damaged row fails loading loudly, never passes as a string
            s.execute(text("UPDATE jobs SET state = 'exploded'"))
        with pytest.raises(ValueError, match="'exploded' is not a valid JobState"), db.read() as s:
            s.scalars(select(Job)).all()
    finally:
        db.dispose()


def test_every_state_column_round_trips(db: Database) -> None:
    """Each member of each enum through its column, on both databases."""
    try:
        with db.tx() as s:
            s.add(_job(S.JobState.QUEUED))
            site = Site(name="prim", description="", created_at=1.0)
            s.add(site)
            s.flush()
            s.add(Host(id="h1", name="hv1", site_id=site.id, cert_fingerprint="x", cert_serial="1",
                       registered_at=1.0))
            s.flush()
            for i, st in enumerate(S.CommandStatus):
                s.add(Command(id=f"c{i}", host_id="h1", item_id=None, job_id=None, kind="cycle",
                              args={}, status=st, progress=0.0, deliveries=0, created_at=1.0,
                              updated_at=1.0))
            for i, fs in enumerate(S.FailoverState):
                s.add(Failover(id=f"f{i}", item_id="i1", kind="test", state=fs, result={},
                               notes=[], created_at=1.0, updated_at=1.0))
        with db.read() as s:
            assert [c.status for c in s.scalars(select(Command).order_by(Command.id))] == \
                list(S.CommandStatus)
            assert [f.state for f in s.scalars(select(Failover).order_by(Failover.id))] == \
                list(S.FailoverState)
        assert Item.status.type.python_type is S.ItemProtection
    finally:
        db.dispose()


def test_agent_reported_failover_states_are_parsed() -> None:
    fo = Failover(id="f1", item_id="i1", kind="test", state=S.FailoverState.STARTING, result={},
                  notes=[], created_at=1.0, updated_at=1.0)
    apply_failover_result(fo, {"failover": {"state": "test_running", "vm_name": "web-test"}}, 2.0)
    assert fo.state is S.FailoverState.TEST_RUNNING and fo.vm_name == "web-test"
    with pytest.raises(InvalidInput, match="unknown state"):
        apply_failover_result(fo, {"failover": {"state": "on_fire"}}, 3.0)
    assert fo.state is S.FailoverState.TEST_RUNNING
