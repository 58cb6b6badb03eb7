"""The command channel over real HTTPS (issue 13 part 3): a command committed by the vault
reaches a waiting agent in milliseconds (woken in-process), and one written by another process
on the same database (no in-process wake-up) within the fallback poll; two waiters of one host
never both take a command; heartbeats still re-deliver what the channel's reply lost."""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from drsite import tlsutil
from drsite.agent.link import Command, VaultLink
from drsite.core.errors import Busy
from drsite.pki import make_key_and_csr
from drsite.vault import commands, notify
from drsite.vault.app import create_app
from drsite.vault.context import Vault
from drsite.vault.db.database import Database
from drsite.vault.db.sealed import attach_sealer
from drsite.vault.masterkey import load_keyring
from drsite.vault.settings import VaultSettings
from drsite.vault.testing import HARNESS_IDLE_IN_TX_S


class Served:
    def __init__(self, tmp: Path, db_url: str | None = None) -> None:
        # in this test's process, as the harness's vault (its long idle-in-transaction limit)
        settings = VaultSettings(data_dir=tmp / "vault", loop_interval=0.05, db_url=db_url,
                                 idle_in_tx_limit_s=HARNESS_IDLE_IN_TX_S)
        app = create_app(settings)
        self.vault: Vault = app.state.vault
        v = self.vault
        self.handle = tlsutil.start_in_thread(app, host="127.0.0.1", port=0, certfile=v.tls.cert,
                                              keyfile=v.tls.key, cafile=v.tls.ca,
                                              client_cert="optional")
        url = self.handle.url
        admin = (settings.data_dir / "admin.token").read_text().strip()
        # set-up, not under test: a loaded CI box may take more than httpx's default 5 s
        op = httpx.Client(base_url=url + "/api/v1", verify=tlsutil.client_context(v.tls.ca),
                          headers={"Authorization": f"Bearer {admin}"}, timeout=60.0)
        op.post("/sites", json={"name": "prim"}).raise_for_status()
        key = op.post("/sites/prim/registration-keys", json={"ttl_s": 600}).json()["key"]
        key_pem, csr = make_key_and_csr("hv1")
        r = op.post("/agent/register", json={"key": key, "host_name": "hv1",
                                             "csr_pem": csr.decode()})
        r.raise_for_status()
        self.host_id = r.json()["host_id"]
        (tmp / "agent.key").write_bytes(key_pem)
        (tmp / "agent.pem").write_text(r.json()["cert_pem"])
        ctx = tlsutil.client_context(v.tls.ca, tmp / "agent.pem", tmp / "agent.key")
        self.link = VaultLink(url, ctx)
        for attempt in range(3):
            # as the agent does, a beat the database failed for the moment (503 busy: a
            # loaded CI box stalled this process past PostgreSQL's idle-in-transaction
            # timeout) is sent again
            try:
                self.link.heartbeat({"host_name": "hv1", "version": "1", "vms": [], "items": []})
                break
            except Busy:
                if attempt == 2:
                    raise
                time.sleep(0.5)
        op.close()

    def enqueue(self, db: Database | None = None) -> tuple[str, float]:
        with (db or self.vault.db).tx() as s:
            # an itemless kind: the agent drops commands of no item but these (link.ITEMLESS_KINDS)
            cmd = commands.enqueue(s, host_id=self.host_id, kind="store_rekey", item_id=None,
                                   args={}, now=time.time())
            cid = cmd.id
        return cid, time.monotonic()

    def close(self) -> None:
        self.link.close()
        self.handle.stop()
        self.vault.close()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    s = Served(tmp_path)
    try:
        yield s
    finally:
        s.close()


def _receiver(link: VaultLink, got: dict[str, float], stop: threading.Event,
              taken: list[Command]) -> None:
    while not stop.is_set():
        for c in link.wait_commands(2.0):
            got[c.command_id] = time.monotonic()
            taken.append(c)


def test_commands_reach_a_waiting_agent_in_milliseconds(served: Served) -> None:
    got: dict[str, float] = {}
    taken: list[Command] = []
    stop = threading.Event()
    t = threading.Thread(target=_receiver, args=(served.link, got, stop, taken), daemon=True)
    t.start()
    try:
        time.sleep(0.3)  # the request is waiting
        lat: list[float] = []
        for _ in range(40):
            cid, t0 = served.enqueue()
            deadline = time.monotonic() + 5
            while cid not in got and time.monotonic() < deadline:
                time.sleep(0.001)
            assert cid in got, "the command never arrived"
            lat.append(got[cid] - t0)
            time.sleep(0.02)
        lat.sort()
        p50, p99 = statistics.median(lat), lat[int(len(lat) * 0.99) - 1]
        print(f"command channel latency: p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms")
        # the goal is 100 ms p99 (bench/rto_vault.py holds it); generous here: a busy box
        assert p99 < 0.25, lat
        # delivered once each, and marked sent
        assert len(taken) == len({c.command_id for c in taken}) == 40
    finally:
        stop.set()
        t.join(5)


def another_process(served: Served, url: str) -> Database:
    """The database as another vault process opens it: its own engine and master key, none of
    this process's wake-up hooks."""
    other = Database(url)
    attach_sealer(other.engine, load_keyring(served.vault.settings.master_key_path))
    return other


def test_a_command_written_by_another_process_arrives_by_the_fallback_poll(
        served: Served) -> None:
    other = another_process(served, served.vault.db.url)  # no in-process wake-up hooks
    got: dict[str, float] = {}
    stop = threading.Event()
    t = threading.Thread(target=_receiver, args=(served.link, got, stop, []), daemon=True)
    t.start()
    try:
        time.sleep(0.3)
        cid, t0 = served.enqueue(other)
        deadline = time.monotonic() + served.vault.push_poll_s + 5
        while cid not in got and time.monotonic() < deadline:
            time.sleep(0.005)
        assert cid in got
        assert got[cid] - t0 < served.vault.push_poll_s + 1.0
    finally:
        stop.set()
        t.join(5)
        other.dispose()


def test_another_process_on_postgresql_wakes_the_wait_by_notification(
        pg_url: str, tmp_path: Path) -> None:
    """Several vault processes on PostgreSQL: a command another process commits is announced
    (NOTIFY at commit, ``vault/notify.py``) and reaches the waiting agent at once, not at the
    long poll's next look at the table (every 5 s while notifications work)."""
    served = Served(tmp_path, pg_url)
    other = another_process(served, pg_url)  # another vault process, with the notify hook
    other.listen("after_flush", notify.after_flush)
    got: dict[str, float] = {}
    stop = threading.Event()
    t = threading.Thread(target=_receiver, args=(served.link, got, stop, []), daemon=True)
    t.start()
    try:
        assert served.vault.listener is not None and served.vault.listener.listening.wait(10)
        assert served.vault.push_poll_s == notify.POLL_WITH_NOTIFY_S
        time.sleep(0.3)
        lat = []
        for _ in range(5):
            cid, t0 = served.enqueue(other)
            deadline = time.monotonic() + 10
            while cid not in got and time.monotonic() < deadline:
                time.sleep(0.002)
            assert cid in got
            lat.append(got[cid] - t0)
        assert max(lat) < 1.0, lat  # far below the 5 s poll: the notification woke it
    finally:
        stop.set()
        t.join(5)
        other.dispose()
        served.close()


def test_two_waiters_of_one_host_never_both_take_a_command(served: Served) -> None:
    got1: dict[str, float] = {}
    got2: dict[str, float] = {}
    stop = threading.Event()
    t1 = threading.Thread(target=_receiver, args=(served.link, got1, stop, []), daemon=True)
    t2 = threading.Thread(target=_receiver, args=(served.link, got2, stop, []), daemon=True)
    t1.start()
    t2.start()
    try:
        time.sleep(0.3)
        ids = [served.enqueue()[0] for _ in range(20)]
        deadline = time.monotonic() + 10
        while len(got1) + len(got2) < 20 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sorted([*got1, *got2]) == sorted(ids)
        assert not set(got1) & set(got2)
    finally:
        stop.set()
        t1.join(5)
        t2.join(5)


def test_a_stopping_server_answers_the_long_poll_at_once(tmp_path: Path) -> None:
    """A waiting long poll must not hold a vault's stop for the whole graceful timeout (every
    ``drsite down`` and every vault restart took 10 s more): the stop hook answers it."""
    s = Served(tmp_path)
    got: list[float] = []

    def poll() -> None:
        s.link.wait_commands(30.0)
        got.append(time.monotonic())

    t = threading.Thread(target=poll, daemon=True)
    t.start()
    deadline = time.monotonic() + 10
    while s.vault.waiters.count() == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert s.vault.waiters.count() == 1
    t0 = time.monotonic()
    s.handle.stop(timeout=30)
    stopped = time.monotonic() - t0
    t.join(5)
    try:
        assert stopped < 1.5, f"the stop took {stopped:.1f} s with a long poll waiting"
        assert got and got[0] - t0 < 1.5
        assert s.vault.waiters.closed and s.vault.waiters.count() == 0
    finally:
        s.link.close()
        s.vault.close()



def test_a_job_waiting_for_a_heartbeat_asks_the_agent_for_one_at_once(served: Served) -> None:
    """``push.want_heartbeat`` (a job waits for a store access list to be confirmed or a point
    to reach the catalogue): the host's waiting long poll answers at once with ``heartbeat``,
    a host asked less than ``BEAT_ASK_GAP_S`` ago is not asked again, and a rolled-back
    transaction asks nothing."""
    from drsite.vault import push

    got: list[tuple[float, bool, int]] = []

    def poll(wait_s: float) -> None:
        r = served.link.wait_channel(wait_s)
        got.append((time.monotonic(), r.heartbeat, len(r.commands)))

    def waiting() -> None:
        deadline = time.monotonic() + 10
        while served.vault.waiters.count() == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert served.vault.waiters.count() == 1

    t = threading.Thread(target=poll, args=(20.0,), daemon=True)
    t.start()
    waiting()
    # a rolled-back transaction: nothing
    with pytest.raises(RuntimeError), served.vault.db.tx() as s:
        push.want_heartbeat(s, served.host_id)
        raise RuntimeError("rolled back")
    time.sleep(0.3)
    assert got == []
    t0 = time.monotonic()
    with served.vault.db.tx() as s:
        push.want_heartbeat(s, served.host_id)
    t.join(5)
    assert got and got[0][1] is True and got[0][2] == 0
    assert got[0][0] - t0 < 0.5
    # asked again at once: not within the gap — the next long poll waits
    with served.vault.db.tx() as s:
        push.want_heartbeat(s, served.host_id)
    t0 = time.monotonic()
    poll(0.5)
    assert got[1][1] is False and got[1][0] - t0 >= 0.4
    # after the gap: asked again, and the ask waits for the next long poll if none is open
    time.sleep(push.BEAT_ASK_GAP_S)
    with served.vault.db.tx() as s:
        push.want_heartbeat(s, served.host_id)
    t0 = time.monotonic()
    poll(5.0)
    assert got[2][1] is True and got[2][0] - t0 < 0.5


def test_a_heartbeat_asked_in_another_process_on_postgresql_reaches_the_long_poll(
        pg_url: str, tmp_path: Path) -> None:
    """Several vault processes on PostgreSQL: a job in one (the controller) waits for a host's
    heartbeat while that host's long poll waits in another (an API worker). The ask is
    announced (NOTIFY at commit) and the poll answers ``heartbeat`` at once — before, only the
    asking process's waiters heard it and the heartbeat came at the end of its interval. A
    rolled-back ask announces nothing; an ask no poll answered is dropped after its TTL."""
    from drsite.vault import push

    served = Served(tmp_path, pg_url)
    other = another_process(served, pg_url)  # another vault process, with the announce hook
    other.listen("before_commit", notify.BeatAnnouncer(push.Waiters()))
    got: list[tuple[float, bool]] = []

    def poll(wait_s: float) -> None:
        r = served.link.wait_channel(wait_s)
        got.append((time.monotonic(), r.heartbeat))

    def waiting() -> None:
        deadline = time.monotonic() + 10
        while served.vault.waiters.count() == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert served.vault.waiters.count() == 1

    try:
        assert served.vault.listener is not None and served.vault.listener.listening.wait(10)
        t = threading.Thread(target=poll, args=(20.0,), daemon=True)
        t.start()
        waiting()
        with pytest.raises(RuntimeError), other.tx() as s:
            push.want_heartbeat(s, served.host_id)
            raise RuntimeError("rolled back")
        time.sleep(0.5)
        assert got == []
        t0 = time.monotonic()
        with other.tx() as s:
            push.want_heartbeat(s, served.host_id)
        t.join(10)
        assert got and got[0][1] is True
        assert got[0][0] - t0 < 1.0, got[0][0] - t0  # far below the poll's 20 s
        # an ask that no poll answered in time is dropped: the heartbeat came on time since
        served.vault.waiters.want_beat({"h-gone"})
        with served.vault.waiters._lock:
            served.vault.waiters._asked["h-gone"] -= push.BEAT_ASK_TTL_S + 1
        assert served.vault.waiters.take_beat("h-gone") is False
    finally:
        other.dispose()
        served.close()


def test_a_long_poll_of_a_killed_agent_never_takes_a_command(served: Served,
                                                             tmp_path: Path) -> None:
    """An agent killed while its long poll waits: the kernel closes its socket, but the vault's
    handler still waits beside the restarted agent's new poll. A command must go to the live
    one — taken by the dead one it was marked sent into a closed connection and lost until a
    heartbeat noticed (seconds of a failover). Five rounds: either waiter may wake first."""
    import http.client
    import json as _json
    from urllib.parse import urlparse

    u = urlparse(served.handle.url)
    ctx = tlsutil.client_context(served.vault.tls.ca, tmp_path / "agent.pem",
                                 tmp_path / "agent.key")
    for _ in range(5):
        dead = http.client.HTTPSConnection(u.hostname or "127.0.0.1", u.port, context=ctx,
                                           timeout=30)
        dead.request("POST", "/api/v1/agent/commands/wait",
                      body=_json.dumps({"timeout_s": 30}),
                      headers={"Content-Type": "application/json"})
        deadline = time.monotonic() + 10
        while served.vault.waiters.count() < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        dead.close()   # killed: the socket is closed, the vault's handler still waits
        got: list[Command] = []
        t = threading.Thread(target=lambda out=got: out.extend(served.link.wait_commands(10.0)),
                             daemon=True)
        t.start()
        deadline = time.monotonic() + 10
        while served.vault.waiters.count() < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.05)
        cid, _ = served.enqueue()
        t.join(10)
        assert [c.command_id for c in got] == [cid]
