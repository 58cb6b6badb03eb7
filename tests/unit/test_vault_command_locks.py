"""A command's transitions never write over each other (``vault/commands.py``, "locked"), on
SQLite and PostgreSQL: a ``running`` post that read the row before the ``succeeded`` one
committed must not put the command back to running (bench/scale.py on PostgreSQL with two API
workers: one item's protect command reopened that way, was delivered again every 2 s and its
item got no cycle for the whole window)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from drsite.core.errors import Conflict, NotFound
from drsite.core.states import CommandStatus
from drsite.vault import commands
from drsite.vault.db.database import Database
from drsite.vault.db.models import Command, Host, Site
from drsite.vault.db.sealed import attach_sealer
from drsite.vault.masterkey import Keyring, MasterKey


@pytest.fixture
def db(any_db_url: str) -> Iterator[Database]:
    d = Database(any_db_url, idle_in_tx_s=10.0)
    d.migrate()
    attach_sealer(d.engine, Keyring(MasterKey.generate()))  # Command.args has sealed paths
    with d.tx() as s:
        site = Site(name="prim", description="", created_at=1.0)
        s.add(site)
        s.flush()
        s.add(Host(id="h1", name="hv1", site_id=site.id, cert_fingerprint="x", cert_serial="1",
                   registered_at=1.0))
        s.flush()
        commands.enqueue(s, host_id="h1", kind="cycle", item_id=None, args={}, now=1.0).id = "c1"
    with d.tx() as s:
        assert commands.deliver_pending(s, "h1", 2.0)[0].id == "c1"
    try:
        yield d
    finally:
        d.dispose()


def post(db: Database, status: CommandStatus, pause_s: float = 0.0,
         out: list[Any] | None = None) -> None:
    """What the result route does: read the host's command, apply the result, commit."""
    try:
        with db.tx() as s:
            cmd = commands.of_host(s, "h1", "c1")
            time.sleep(pause_s)  # a slow request: others arrive meanwhile
            commands.record_result(cmd, status=status, progress=50.0, result={}, error=None,
                                   now=time.time())
    except Conflict as e:
        if out is not None:
            out.append(e)
        return


def status(db: Database) -> str:
    with db.read() as s:
        cmd = s.get(Command, "c1")
        assert cmd is not None
        return str(cmd.status)


def test_a_slow_running_post_never_reopens_a_finished_command(db: Database) -> None:
    refused: list[Any] = []
    slow = threading.Thread(target=post, args=(db, CommandStatus.RUNNING, 0.8, refused))
    slow.start()
    time.sleep(0.2)  # the running post has read the row (sent) and waits before its write
    post(db, CommandStatus.SUCCEEDED)
    slow.join(10)
    # PostgreSQL: the final post waited for the running one, then ended the command; SQLite:
    # the writers never overlapped. Either way the command ends succeeded.
    assert status(db) == CommandStatus.SUCCEEDED.value
    post(db, CommandStatus.RUNNING, 0.0, refused)  # a running post after the end: refused
    assert status(db) == CommandStatus.SUCCEEDED.value and len(refused) == 1


def test_another_hosts_command_is_not_found(db: Database) -> None:
    with db.tx() as s, pytest.raises(NotFound):
        commands.of_host(s, "h2", "c1")
    with db.tx() as s:
        assert commands.locked(s, "nope") is None
