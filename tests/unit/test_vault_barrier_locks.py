"""A group barrier's row under concurrent writers (``vault/barrier.py``, ``locked``), on SQLite
and PostgreSQL: its ``members`` is one JSON value every member's result and the tick rewrite
whole. Two seals posted at once both count (one used to stay ``sealing`` until the seal
timeout, the barrier ending partial), and a cut's tick that waited for a member's "took the
cut" post neither dead-locks with it nor withdraws that member's seal afterwards."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from tests.unit.test_vault_barrier import MIDNIGHT, setup_group

from drsite.core.states import CommandStatus
from drsite.vault import barrier
from drsite.vault.api.agent import _record_result
from drsite.vault.api.schemas import CommandResultIn
from drsite.vault.auth import verify_agent_cert
from drsite.vault.db.models import Command, GroupBarrier
from drsite.vault.testing import Agent, Harness, point, report


def seals(h: Harness, agents: list[Agent]) -> list[tuple[Agent, dict[str, Any]]]:
    out = []
    for a in agents:
        (c,) = [c for c in a.beat()["commands"] if c["kind"] == "group_seal"]
        out.append((a, c))
    return out


def post(h: Harness, a: Agent, c: dict[str, Any], body: CommandResultIn,
         errors: list[str]) -> None:
    """The result route's transaction, from a thread of its own (an API worker)."""
    try:
        with h.vault.db.tx() as s:
            _record_result(s, verify_agent_cert(h.vault.ca, a.cert_der), c["command_id"], body,
                           h.clock.now())
    except Exception as e:  # the test asserts there is none
        errors.append(repr(e))


def the_barrier(h: Harness) -> tuple[str, dict[str, dict[str, Any]]]:
    """The barrier's state and members."""
    with h.vault.db.read() as s:
        b = s.scalars(select(GroupBarrier)).one()
        return b.state, dict(b.members)


@pytest.fixture
def h(tmp_path: Path, any_db_url: str) -> Any:
    harness = Harness(tmp_path / "vault", any_db_url)
    harness.clock.t = MIDNIGHT + 12 * 3600
    try:
        yield harness
    finally:
        harness.close()


def test_two_seals_posted_at_once_both_count(h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    agents, items = setup_group(h)
    todo = []
    for a, c in seals(h, agents):
        p = point(c["item_id"], 2, h.clock.now())
        a.beat(items=[{"item_id": c["item_id"], "report": report(c["item_id"], "x", "x"),
                       "new_points": [p]}])
        todo.append((a, c, CommandResultIn(status="succeeded", progress=100.0, result={
            "point": p, "barrier": {"id": c["args"]["barrier_id"], "held": True,
                                    "paused_s": 0.01}})))
    real = barrier._set

    def slow(b: GroupBarrier, item_id: str, **v: Any) -> None:
        time.sleep(0.5)  # each post holds its copy of the members a while
        real(b, item_id, **v)

    monkeypatch.setattr(barrier, "_set", slow)
    errors: list[str] = []
    threads = [threading.Thread(target=post, args=(h, a, c, body, errors)) for a, c, body in todo]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    state, members = the_barrier(h)
    assert not errors, errors
    assert {k: v["state"] for k, v in members.items()} == dict.fromkeys(items, "committed")
    assert state == "committed"


@pytest.mark.parametrize("late", [0, 1])
def test_a_cut_tick_waiting_for_a_took_cut_post_keeps_that_seal(
        h: Harness, monkeypatch: pytest.MonkeyPatch, late: int) -> None:
    agents, items = setup_group(h)
    by_item = {c["item_id"]: (a, c) for a, c in seals(h, agents)}
    if not all("cut_at" in c["args"] for _, c in by_item.values()):
        pytest.skip("the barrier is not in cut mode here")
    item = sorted(items)[late]  # the member that says it took the cut, first or second in order
    a, c = by_item[item]
    real = barrier.on_progress

    def slow(s: Any, cmd: Command) -> None:
        real(s, cmd)
        time.sleep(1.5)  # a slow request: its locks are held while the tick runs

    monkeypatch.setattr(barrier, "on_progress", slow)
    errors: list[str] = []
    t = threading.Thread(target=post, args=(h, a, c, CommandResultIn(
        status="running", progress=50.0, result={"cut": {"held": True}}), errors))
    t.start()
    time.sleep(0.3)
    h.clock.advance(0.5)  # past the cut's bound
    h.vault.scheduler.barriers.tick()
    t.join(30)
    assert not errors, errors
    _, members = the_barrier(h)
    assert members[item].get("took_cut") is True, members[item]
    with h.vault.db.read() as s:
        cmd = s.get(Command, c["command_id"])
        assert cmd is not None and cmd.status != CommandStatus.FAILED, cmd.error
