"""The controller lease (``vault/controller.py``) on SQLite and PostgreSQL, in one process: two
``Lease`` objects with different identities stand for two vault processes. Election, expiry,
release, the fence (a superseded controller writes nothing), and the FOR SHARE rule (a takeover
cannot commit while the old controller's transaction is open). The same with real processes,
SIGKILL and SIGSTOP: ``tests/integration/test_vault_controller_processes.py``."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.exc import OperationalError

from drsite.vault.controller import (
    LEASE,
    Identity,
    Lease,
    NotController,
    holder_gone,
    this_process,
)
from drsite.vault.db.database import Database, FairLock
from drsite.vault.db.models import ControllerLease, Event


@pytest.fixture
def db(any_db_url: str) -> Iterator[Database]:
    d = Database(any_db_url, idle_in_tx_s=5.0)
    d.migrate()
    try:
        yield d
    finally:
        d.dispose()


def other(name: str) -> Identity:
    """Another process, as far as the lease can tell: a distinct holder, not provably gone."""
    me = this_process()
    return Identity(f"{name}:{me.holder}", {**me.info, "host": f"elsewhere-{name}"})


@dataclass(frozen=True)
class Row:
    epoch: int
    holder: str | None


def row(db: Database) -> Row:
    with db.read() as s:
        r = s.get(ControllerLease, LEASE)
        assert r is not None
        return Row(r.epoch, r.holder)


def write_event(db: Database, what: str) -> None:
    with db.tx() as s:
        s.add(Event(at=time.time(), kind="test", subject="controller", message=what))


def events(db: Database) -> list[str]:
    with db.read() as s:
        return list(s.scalars(select(Event.message).where(Event.kind == "test").order_by(Event.id)))


def test_one_holder_expiry_takeover_and_fence(db: Database) -> None:
    a, b = Lease(db, other("a"), 1.0), Lease(db, other("b"), 1.0)
    assert row(db).epoch == 0 and row(db).holder is None  # seeded by the migration
    a.step()
    assert a.held and a.epoch == 1 and row(db).holder == a.ident.holder
    wait = b.step()  # a holds a live lease: b waits until it expires (plus a little)
    assert not b.held and 0.0 < wait <= 1.1
    a.step()  # a renewal keeps the epoch
    assert a.epoch == 1 and row(db).epoch == 1
    fenced_a = db.guarded(a.guard)
    write_event(fenced_a, "a at epoch 1")
    time.sleep(1.1)  # a stops renewing: its lease expires, b takes over with a new epoch
    b.step()
    assert b.held and b.epoch == 2 and row(db).holder == b.ident.holder
    assert a.held  # a does not know yet ...
    with pytest.raises(NotController) as exc:
        write_event(fenced_a, "a after the takeover")  # ... the fence refuses its write
    assert exc.value.code == "fenced" and "superseded by epoch 2" in exc.value.message
    assert not a.held  # and a stepped down
    with pytest.raises(NotController):
        write_event(fenced_a, "a again")
    write_event(db.guarded(b.guard), "b at epoch 2")
    assert events(db) == ["a at epoch 1", "b at epoch 2"]
    a.step()  # a, back, finds b's live lease: no second controller
    assert not a.held and b.held and row(db).epoch == 2


def test_release_hands_over_at_once_and_epochs_only_grow(db: Database) -> None:
    a, b = Lease(db, other("a"), 30.0), Lease(db, other("b"), 30.0)
    a.step()
    b.step()
    assert a.held and not b.held
    a.release()
    assert not a.held and row(db).holder is None and row(db).epoch == 1
    b.step()
    assert b.held and b.epoch == 2
    a.step()
    assert not a.held
    b.release()
    a.step()
    assert a.held and a.epoch == 3


def test_force_takes_a_live_lease_and_fences_its_holder(db: Database) -> None:
    """A promotion (issue 14) takes the lease from a live holder with a new epoch."""
    a, b = Lease(db, other("a"), 30.0), Lease(db, other("b"), 30.0)
    a.step()
    b.step()
    assert not b.held
    b.step(force=True)
    assert b.held and b.epoch == 2
    with pytest.raises(NotController):
        write_event(db.guarded(a.guard), "the old holder")
    assert events(db) == [] and not a.held


def test_a_holder_that_lost_its_row_takes_it_back_with_a_new_epoch(db: Database) -> None:
    a = Lease(db, other("a"), 30.0)
    a.step()
    with db.tx() as s:  # e.g. a promotion elsewhere bumped the epoch but named no one new
        r = s.get(ControllerLease, LEASE)
        assert r is not None
        r.epoch += 5
    with pytest.raises(NotController):
        write_event(db.guarded(a.guard), "stale")
    a.step()
    assert a.held and a.epoch == 7


def test_not_held_refuses_every_write(db: Database) -> None:
    a = Lease(db, other("a"), 30.0)
    with pytest.raises(NotController):
        write_event(db.guarded(a.guard), "never")
    assert events(db) == []
    with db.read() as s:  # reads are never fenced
        assert s.get(ControllerLease, LEASE) is not None


def open_controller_tx(db: Database, lease: Lease, hold_s: float
                       ) -> tuple[threading.Thread, threading.Event]:
    """A controller transaction of ``lease``'s holder, open on a thread until the returned
    event is set (or ``hold_s`` passed); it then commits the event 'a, slow'. Returns once it
    is open."""
    inside, release = threading.Event(), threading.Event()

    def slow_controller_tx() -> None:
        with db.guarded(lease.guard).tx() as s:
            inside.set()
            release.wait(hold_s)
            s.add(Event(at=time.time(), kind="test", subject="controller", message="a, slow"))

    t = threading.Thread(target=slow_controller_tx)
    t.start()
    assert inside.wait(10)
    return t, release


def test_takeover_waits_for_the_old_controllers_open_transaction(db: Database) -> None:
    """FOR SHARE: while a controller transaction is open, no takeover commits; the old
    controller's transaction commits under its epoch, the takeover comes after it."""
    if db.sqlite:
        pytest.skip("SQLite serialises writers with BEGIN IMMEDIATE (one process)")
    a, b = Lease(db, other("a"), 1.0), Lease(db, other("b"), 1.0)
    a.step()
    t, release = open_controller_tx(db, a, 10)
    time.sleep(1.1)  # a's lease expired while its transaction is open
    t0 = time.monotonic()
    with pytest.raises(OperationalError):  # lock_timeout: the row is share-locked by a
        b.step()
    assert time.monotonic() - t0 >= 1.5 and not b.held
    release.set()
    t.join(10)
    b.step()
    assert b.held and b.epoch == 2
    assert events(db) == ["a, slow"]


def test_a_renewal_does_not_wait_for_the_controllers_open_transaction(db: Database) -> None:
    """The fence is FOR KEY SHARE, a renewal FOR NO KEY UPDATE: the holder renews its lease
    while one of its own transactions is open (before: the renewal waited for it, and every
    new controller transaction queued behind the renewal — 200 ms a renewal at 1,000 items on
    PostgreSQL); another process still cannot take the lease over meanwhile."""
    if db.sqlite:
        pytest.skip("SQLite serialises writers with BEGIN IMMEDIATE (one process)")
    a, b = Lease(db, other("a"), 5.0), Lease(db, other("b"), 5.0)
    a.step()
    t, release = open_controller_tx(db, a, 20)
    try:
        t0 = time.monotonic()
        a.step()   # renewed at once, not after the transaction
        assert time.monotonic() - t0 < 1.0 and a.held
        with db.guarded(a.guard).tx() as s:   # a second controller transaction runs too
            s.add(Event(at=time.time(), kind="test", subject="controller", message="a, quick"))
        with pytest.raises(OperationalError):   # a forced takeover still waits (lock_timeout)
            b.step(force=True)
        assert not b.held
    finally:
        release.set()
        t.join(10)
    assert sorted(events(db)) == ["a, quick", "a, slow"]
    b.step(force=True)
    assert b.held and b.epoch == 2


def test_holder_gone() -> None:
    me = this_process()
    assert not holder_gone(me.info)  # this process runs
    assert not holder_gone({**me.info, "host": "another-host"})  # unknown: wait for expiry
    assert not holder_gone({**me.info, "boot_id": "another-boot"})
    assert not holder_gone({})
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    dead = {**me.info, "pid": proc.pid}
    assert holder_gone(dead)  # that PID no longer exists (or is another process now)
    assert holder_gone({**me.info, "start": "0"})  # this PID, but started at another time
    assert os.getpid() == me.info["pid"]


def test_fair_lock_serves_in_arrival_order() -> None:
    lock = FairLock()
    order: list[int] = []
    lock.acquire()
    lock.acquire()  # re-entrant
    lock.release()
    threads = []
    for i in range(5):
        def take(i: int = i) -> None:
            with lock:
                order.append(i)
        t = threading.Thread(target=take)
        t.start()
        threads.append(t)
        time.sleep(0.05)  # queue them in a known order
    lock.release()
    for t in threads:
        t.join(5)
    assert order == [0, 1, 2, 3, 4]
    with pytest.raises(RuntimeError):
        lock.release()


def test_fair_lock_never_has_two_holders() -> None:
    """A release hands the lock to the oldest waiter; a thread arriving at that moment queues
    behind it instead of taking the lock too."""
    lock = FairLock()
    inside: list[int] = [0]
    errors: list[str] = []

    def work(seed: int) -> None:
        for i in range(2000):
            with lock:
                inside[0] += 1
                if inside[0] != 1:
                    errors.append("two holders")
                if (i + seed) % 97 == 0:
                    with lock:  # re-entrant
                        pass
                inside[0] -= 1

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [] and inside == [0]


def test_two_api_workers_never_hand_out_one_command(tmp_path: Path,
                                                    request: pytest.FixtureRequest) -> None:
    """Two transactions delivering the same host's commands at once (two API workers, or a
    heartbeat beside a command poll): the second skips the rows the first holds
    (``FOR UPDATE SKIP LOCKED``), so a command is handed out once."""
    from drsite.vault import commands
    from drsite.vault.testing import Harness

    h = Harness(tmp_path / "vault", str(request.getfixturevalue("pg_url")))
    try:
        h.site("prim")
        a = h.register("prim", "hv1")
        now = h.clock.now()
        with h.vault.db.tx() as s:
            for _ in range(3):
                commands.enqueue(s, host_id=a.host_id, kind="retention", item_id=None, args={},
                                 now=now)
        first_has_them = threading.Event()
        got: dict[str, list[str]] = {}

        def worker(name: str, hold: bool) -> None:
            with h.vault.db.tx() as s:
                got[name] = [c.id for c in commands.deliver(
                    s, a.host_id, now, resend_after_s=30.0, stale_running_s=900.0)]
                if hold:
                    first_has_them.set()
                    time.sleep(0.5)  # the second delivers while this one is still open

        t1 = threading.Thread(target=worker, args=("one", True))
        t1.start()
        assert first_has_them.wait(10)
        worker("two", False)
        t1.join(10)
        assert len(got["one"]) == 3 and got["two"] == []
    finally:
        h.close()


def test_concurrent_rounds_of_one_process_take_the_lease_once(db: Database) -> None:
    """A promotion's forced step and the election thread's step run in two threads of one
    process: the lease is taken once (a race took it again from itself at a newer epoch, and
    the guard of the first term then fenced the process's own writes)."""
    for _ in range(3):
        lease = Lease(db, Identity(f"race:{os.urandom(4).hex()}", this_process().info), 30.0)
        before = row(db).epoch
        go = threading.Barrier(4)

        def round_(lease: Lease, go: threading.Barrier, force: bool) -> None:
            go.wait()
            lease.step(force=force)

        threads = [threading.Thread(target=round_, args=(lease, go, i == 0)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert lease.epoch == row(db).epoch and row(db).holder == lease.ident.holder
        assert row(db).epoch == before + 1, (before, row(db))
        with db.tx() as s:
            lease.guard(s)  # the process's one term writes
        lease.release()

