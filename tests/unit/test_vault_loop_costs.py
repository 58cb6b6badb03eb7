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

from drsite.core.states import CommandStatus, JobState
from drsite.vault import context, notify
from drsite.vault.db.models import Command, Job
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
    # (measured: on a loaded box the 0.2 s sleep takes longer, and so does the rest)
    time.sleep(max(0.0, vault._last_health + vault._health_every - time.monotonic()) + 0.05)
    vault._round()
    assert len(passes) == 2


def test_another_process_announces_a_new_job_apart_from_an_ended_command(
        pg_url: str, tmp_path: Path) -> None:
    """PostgreSQL, several vault processes: a job created in another process is announced as
    ``n`` (the controller lists the active jobs again), an ended command as ``j`` (its waiting
    jobs are asked, the list is kept)."""
    h = Harness(tmp_path / "vault", pg_url)
    h.site("prim")
    host_id = h.register("prim", "hv1").host_id
    other = h.vault.db   # its write sessions send the NOTIFYs (as in every vault process)
    got: list[str] = []
    listener = notify.Listener(pg_url, lambda _hosts: None,
                               lambda ended: got.append(f"e {ended}"), lambda: got.append("n"))
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
        with other.tx() as s:   # a command of that job, queued then ended
            s.add(Command(id="c-other", host_id=host_id, item_id=None, job_id="j-other",
                          kind="protect", args={}, status=CommandStatus.PENDING, progress=0.0,
                          deliveries=0, created_at=now, updated_at=now))
        with other.tx() as s:
            cmd = s.get(Command, "c-other")
            assert cmd is not None
            cmd.status = CommandStatus.SUCCEEDED
        deadline = time.monotonic() + 10
        while len(got) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert got == ["n", f"e {(frozenset({'j-other'}), frozenset())}"]
    finally:
        listener.stop()
        h.close()


def test_an_ended_command_asks_its_own_jobs_not_every_job(
        h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """At scale (more than ``BACKOFF_ABOVE`` active jobs) a waiting job is asked again after a
    growing delay; an ended command asks again at once only its own job and its item's jobs
    (before: every job, at every ended cycle — at 5,000 items no job ever backed off and each
    pass asked all of them)."""
    monkeypatch.setattr(runner_mod, "BACKOFF_ABOVE", 1)
    monkeypatch.setattr(runner_mod, "BACKOFF_MAX_S", 600.0)
    monkeypatch.setattr(h.vault.settings, "loop_interval", 600.0)   # a long back-off
    jobs_waiting(h, 3)
    runner = h.vault.runner
    asked: list[str] = []
    real = runner._advance

    def counted(s: Any, job: Any) -> bool:
        asked.append(job.id)
        return real(s, job)

    monkeypatch.setattr(runner, "_advance", counted)
    active = [j for j in h.entries("/jobs") if j["kind"] == "EnableProtection"]
    jobs = [j["id"] for j in active]
    items = {j["id"]: j["item_id"] for j in active}
    assert len(jobs) == 3
    runner.tick(budget_s=10.0)   # the group's PolicyAssociation job ends in it too
    assert set(jobs) <= set(asked)
    asked.clear()
    runner.tick(budget_s=10.0)
    assert asked == []                               # backing off
    runner.wake(jobs=[jobs[0]])                      # its command ended
    runner.tick(budget_s=10.0)
    assert asked == [jobs[0]]
    asked.clear()
    runner.wake(jobs=[], items=[items[jobs[1]]])     # a command of its item (a cycle) ended
    runner.tick(budget_s=10.0)
    assert asked == [jobs[1]]
    asked.clear()
    runner.wake()                                    # anything: every job
    runner.tick(budget_s=10.0)
    assert sorted(asked) == sorted(jobs)
    # a pass whose budget allows one job asks a woken one first, even when the others are
    # due too (every job asked again, then the last job's command ended)
    asked.clear()
    runner.wake()
    runner.wake(jobs=[jobs[2]])

    def slow(s: Any, job: Any) -> bool:
        asked.append(job.id)
        time.sleep(0.05)
        return real(s, job)

    monkeypatch.setattr(runner, "_advance", slow)
    runner.tick(budget_s=0.01)
    assert asked == [jobs[2]]
    runner.tick(budget_s=0.01)                       # then the round robin
    assert len(asked) == 2 and asked[1] != jobs[2]
