"""What the controller's loop spends per round at scale (issue 13): with thousands of items
and jobs, the health pass (a read of every item) and the job runner's listing of the active
jobs took most of each round (5,000 items: half and a fifth of the controller's time), and
protecting the fleet crawled. A budgeted runner pass lists the active jobs only when woken or
every ``ACTIVE_IDS_MAX_AGE_S``; the health pass takes at most a quarter of the loop."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event

from drsite.core.states import JobState
from drsite.vault import context, notify
from drsite.vault.db.database import Database
from drsite.vault.db.models import Job
from drsite.vault.jobs import runner as runner_mod
from drsite.vault.testing import Harness, vm_info


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    hh = Harness(tmp_path / "vault")
    yield hh
    hh.close()


def listings(h: Harness, fn: Any) -> int:
    """How many times ``fn()`` listed the active jobs."""
    seen: list[str] = []

    def count(_conn: Any, _cur: Any, stmt: str, *_a: Any) -> None:
        if stmt.lstrip().startswith("SELECT jobs.id") and "ORDER BY jobs.created_at" in stmt:
            seen.append(stmt)

    event.listen(h.vault.db.engine, "before_cursor_execute", count)
    try:
        fn()
    finally:
        event.remove(h.vault.db.engine, "before_cursor_execute", count)
    return len(seen)


def jobs_waiting(h: Harness, n: int) -> None:
    """``n`` EnableProtection jobs waiting for their source host's agent (down)."""
    h.site("prim")
    h.site("sec")
    a = h.register("prim", "hv1")
    a.beat(vms=[vm_info(f"vm-{i}", f"web{i}") for i in range(n)])
    h.ok("POST", "/policies", json={"name": "p1", "frequency_s": 30})
    h.ok("POST", "/groups", json={"name": "g1", "site": "prim", "target_site": "sec",
                                   "policy": "p1"})
    for i in range(n):
        h.ok("POST", "/items", json={"vm_id": f"vm-{i}", "group": "g1"})


def test_a_budgeted_pass_lists_the_active_jobs_when_woken_or_stale(
        h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    jobs_waiting(h, 3)
    runner = h.vault.runner
    budgeted = lambda: runner.tick(budget_s=10.0)   # noqa: E731 - the background loop's call
    assert listings(h, budgeted) == 1
    assert listings(h, budgeted) == 0            # listed a moment ago, nothing new
    runner.wake()                                 # a command ended: ask, do not list
    assert listings(h, budgeted) == 0
    runner.wake(new_job=True)                     # a job was created
    assert listings(h, budgeted) == 1
    monkeypatch.setattr(runner_mod, "ACTIVE_IDS_MAX_AGE_S", 0.0)
    assert listings(h, budgeted) >= 1            # stale: listed again
    assert listings(h, runner.tick) >= 1         # tests' unbudgeted passes always list
    # a job created by the API wakes the runner: the next pass asks it at once
    monkeypatch.setattr(runner_mod, "ACTIVE_IDS_MAX_AGE_S", 3600.0)
    assert listings(h, budgeted) == 0            # listed by the pass before
    h.register("prim", "hv2").beat(vms=[vm_info("vm-new", "new1")])
    job = h.ok("POST", "/items", json={"vm_id": "vm-new", "group": "g1"})["job_id"]
    budgeted()
    assert h.job(job)["state"] == "running"


def test_the_health_pass_takes_a_quarter_of_the_loop_at_most(
        h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    vault = h.vault
    monkeypatch.setattr(vault.settings, "health_interval", 0.0)
    passes: list[float] = []

    def slow_pass() -> None:
        passes.append(time.monotonic())
        time.sleep(0.2)

    monkeypatch.setattr(vault.monitor, "tick", slow_pass)
    vault.tick()   # takes the controller lease, as the background loop does
    passes.clear()
    vault._last_health = 0.0
    vault._round()
    assert len(passes) == 1
    assert vault._health_every >= context.HEALTH_REST_FACTOR * 0.2
    vault._round()
    assert len(passes) == 1   # rests three times its duration
    time.sleep(context.HEALTH_REST_FACTOR * 0.2 + 0.05)
    vault._round()
    assert len(passes) == 2


def test_another_process_announces_a_new_job_apart_from_an_ended_command(
        pg_url: str, tmp_path: Path) -> None:
    """PostgreSQL, several vault processes: a job created in another process is announced as
    ``n`` (the controller lists the active jobs again), an ended command as ``j`` (its waiting
    jobs are asked, the list is kept)."""
    h = Harness(tmp_path / "vault", pg_url)   # migrates the database
    other = Database(pg_url)
    other.listen("after_flush", notify.after_flush)
    got: list[str] = []
    listener = notify.Listener(pg_url, lambda _hosts: None, lambda: got.append("j"),
                               lambda: got.append("n"))
    listener.start()
    try:
        assert listener.listening.wait(10)
        now = time.time()
        with other.tx() as s:
            s.add(Job(id="j-other", kind="EnableProtection", state=JobState.QUEUED, target="x",
                      item_id=None, args={}, created_at=now, updated_at=now))
        deadline = time.monotonic() + 10
        while not got and time.monotonic() < deadline:
            time.sleep(0.01)
        assert got == ["n"]
    finally:
        listener.stop()
        other.dispose()
        h.close()
