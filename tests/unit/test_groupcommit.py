"""Group commit (``vault/db/groupcommit.py``) on a real SQLite file: calls that queue while a
transaction runs share the next one, each call keeps its own outcome (a failing call rolls its
batch back and every call runs again alone), arrival order holds, and nobody waits for ever."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.orm import Session, sessionmaker

from drsite.vault.db.groupcommit import GroupCommit


class Db:
    """One writer at a time (as the vault's SQLite writer queue), commits counted."""

    def __init__(self, path: Path, commit_s: float = 0.0) -> None:
        self.engine = create_engine(f"sqlite:///{path}")
        with self.engine.begin() as c:
            c.execute(text("CREATE TABLE t (k TEXT PRIMARY KEY, n INTEGER)"))
        self.sessions = sessionmaker(self.engine)
        self.lock = threading.Lock()
        self.commits = 0
        self.commit_s = commit_s

    @contextmanager
    def tx(self) -> Iterator[Session]:
        with self.lock, self.sessions() as s, s.begin():
            yield s
            time.sleep(self.commit_s)   # a slow commit (an fsync): others queue meanwhile
            self.commits += 1

    def rows(self) -> dict[str, int]:
        with self.engine.connect() as c:
            return {k: n for k, n in c.execute(text("SELECT k, n FROM t"))}


def insert(k: str, n: int = 1) -> object:
    def fn(s: Session) -> str:
        s.execute(text("INSERT INTO t (k, n) VALUES (:k, :n)"), {"k": k, "n": n})
        return k
    return fn


def run_all(g: GroupCommit, fns: list[object]) -> list[object]:
    """Every fn from its own thread, started together; their outcomes (result or error)."""
    out: list[object] = [None] * len(fns)
    start = threading.Barrier(len(fns))

    def one(i: int) -> None:
        start.wait()
        try:
            out[i] = g.run(fns[i])  # type: ignore[arg-type]
        except Exception as e:
            out[i] = e

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
        assert not t.is_alive(), "a call waits for ever"
    return out


def test_calls_that_queue_share_a_commit_and_each_gets_its_result(tmp_path: Path) -> None:
    db = Db(tmp_path / "db", commit_s=0.02)
    g = GroupCommit(db.tx)
    keys = [f"k{i}" for i in range(40)]
    out = run_all(g, [insert(k) for k in keys])
    assert out == keys
    assert db.rows() == {k: 1 for k in keys}
    assert db.commits < len(keys) and g.batches >= 1   # shared commits


def test_a_failing_call_fails_alone(tmp_path: Path) -> None:
    db = Db(tmp_path / "db", commit_s=0.02)
    g = GroupCommit(db.tx)
    g.run(insert("taken"))
    ran: list[str] = []

    def counted(k: str) -> object:
        inner = insert(k)

        def fn(s: Session) -> object:
            ran.append(k)
            return inner(s)  # type: ignore[operator]
        return fn

    fns = [counted(f"k{i}") for i in range(20)]
    fns[7] = counted("taken")                  # a duplicate key: this call's own error
    out = run_all(g, fns)
    assert [type(o).__name__ for o in out].count("IntegrityError") == 1
    assert type(out[7]).__name__ == "IntegrityError"
    assert db.rows() == {"taken": 1, **{f"k{i}": 1 for i in range(20) if i != 7}}
    assert len(ran) > len(fns)                 # the failing batch ran again, call by call


def test_calls_run_in_arrival_order(tmp_path: Path) -> None:
    db = Db(tmp_path / "db", commit_s=0.05)
    g = GroupCommit(db.tx)
    order: list[int] = []

    def step(i: int) -> object:
        def fn(s: Session) -> int:
            order.append(i)
            s.execute(text("INSERT INTO t (k, n) VALUES ('x', :n) "
                           "ON CONFLICT(k) DO UPDATE SET n = :n"), {"n": i})
            return i
        return fn

    blocker = threading.Thread(target=g.run, args=(step(0),))
    blocker.start()
    time.sleep(0.01)                           # 0 leads and commits slowly; 1..9 queue in order
    threads = []
    for i in range(1, 10):
        t = threading.Thread(target=g.run, args=(step(i),))
        t.start()
        threads.append(t)
        time.sleep(0.002)
    for t in [blocker, *threads]:
        t.join(30)
    assert order == list(range(10))
    assert db.rows() == {"x": 9}


def test_an_interrupted_leader_leaves_no_call_waiting(tmp_path: Path) -> None:
    db = Db(tmp_path / "db")
    g = GroupCommit(db.tx)

    def interrupted(s: Session) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        g.run(interrupted)
    assert g.run(insert("after")) == "after"   # the lead was handed back
