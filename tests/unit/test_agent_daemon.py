"""The agent daemon against a fake vault over mTLS: heartbeat payload, command execution and
results, idempotency, restart behaviour, an unreachable vault. Items replicate to a local
store (``target_factory``) so these tests need no store server."""

from __future__ import annotations

import base64
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from drsite.agent import pointkeys
from drsite.agent.daemon import Agent
from drsite.agent.link import VaultLink
from drsite.agent.process import agent_register
from drsite.agent.state import CommandJournal, settings_from_args
from drsite.agent.testing import FakeVault
from drsite.core.errors import (
    AuthError,
    CommandInterrupted,
    DrsiteError,
    InvalidInput,
    NetworkError,
    OperationInterrupted,
    from_dict,
)
from drsite.core.model import DiskSpec, VmSpec
from drsite.hypervisors.file.driver import FileHypervisor
from drsite.replication.target import LocalTarget, RecoveryTarget
from drsite.store.digest import file_digest, image_digest
from drsite.store.local.backend import LocalObjectStore
from drsite.store.repository import Repository

MiB = 1 << 20
SIZE = 4 * MiB
ITEM = "item-web"
SETTINGS = {"frequency_s": 5, "app_consistent_every_s": None, "rpo_threshold_s": 600,
            "retention_hours": 24, "resync_window": "always"}


class Env:
    def __init__(self, tmp: Path, vault: FakeVault) -> None:
        self.tmp = tmp
        self.vault = vault
        self.data = tmp / "agent"
        ident = agent_register(vault.url, vault.registration_key("site-a"), self.data, "pri",
                               ca_file=vault.ca_file)
        self.host_id = ident.host_id
        self.hv = FileHypervisor(tmp / "vms")
        vm = self.hv.create_blank(VmSpec(name="web", disks=(DiskSpec("d0", SIZE),)))
        self.vm_id = vm.vm_id
        self.write(0, b"boot" * 4096)
        self.write(3 * MiB, os.urandom(64 * 1024))
        self.store = tmp / "store"

    def write(self, off: int, data: bytes) -> None:
        self.hv.write(self.vm_id, "d0", off, data)

    def target(self, store_url: str, item_id: str) -> RecoveryTarget:
        assert store_url == "https://store.invalid"
        return LocalTarget(Repository(LocalObjectStore(self.store), item_id))

    def repo(self) -> Repository:
        return Repository(LocalObjectStore(self.store), ITEM)

    def agent(self, **kw: Any) -> Agent:
        a = Agent(self.data, hypervisor=self.hv, heartbeat_interval=0.1,
                  target_factory=self.target, **kw)
        a.start()
        return a

    def protect_args(self) -> dict[str, Any]:
        return {"vm_id": self.vm_id, "target_site": "site-b", "store_url": "https://store.invalid",
                "settings": dict(SETTINGS)}

    def run(self, agent: Agent, cid: str, timeout: float = 20.0) -> dict[str, Any]:
        """Heartbeat until the command has a final result."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            agent.heartbeat_once()
            r = self.vault.final(cid)
            if r is not None:
                return r
            time.sleep(0.05)
        raise TimeoutError(f"{cid}: {self.vault.status(cid)}")


@pytest.fixture
def vault(tmp_path: Path) -> Iterator[FakeVault]:
    v = FakeVault(tmp_path / "vault")
    v.start()
    yield v
    v.stop()


@pytest.fixture
def env(tmp_path: Path, vault: FakeVault) -> Env:
    return Env(tmp_path, vault)


def test_heartbeat_payload_shape(env: Env) -> None:
    a = env.agent()
    try:
        a.heartbeat_once()
        hb = env.vault.hosts[env.host_id].last
        assert hb["host_name"] == "pri" and hb["version"] and hb["store_url"] is None
        assert [v["name"] for v in hb["vms"]] == ["web"]
        assert hb["vms"][0]["disks"][0]["disk_id"] == "d0" and hb["vms"][0]["power"] == "stopped"
        assert hb["items"] == []
        r = env.run(a, env.vault.send(env.host_id, "protect", ITEM, env.protect_args()))
        assert r["status"] == "succeeded", r
        a.heartbeat_once()
        # the last heartbeat that listed the item (later ones list it only when it changes)
        item = [b for b in env.vault.heartbeat_log if b["items"]][-1]["items"][0]
        assert set(item) == {"item_id", "report", "new_points", "removed_points"}
        assert item["report"]["state"] == "protected" and item["report"]["vm_name"] == "web"
        # the point went out once and was acked: the next heartbeat does not repeat it
        assert env.vault.points[ITEM].keys() == {"p000000000001"}
        assert item["new_points"] == [] or [p["seq"] for p in item["new_points"]] == [1]
        a.heartbeat_once()
        # only what changed: nothing did (the inventory is null, the item is not listed)
        hb = env.vault.hosts[env.host_id].last
        assert hb["items"] == [] and hb["vms"] is None
        env.write(MiB, b"\x01" * 4096)
        env.run(a, env.vault.send(env.host_id, "cycle", ITEM, {}))
        a.heartbeat_once()
        # the new point made the item listed again (in some heartbeat since)
        assert env.vault.points[ITEM].keys() == {"p000000000001", "p000000000002"}
    finally:
        a.shutdown()


def beat_until(agent: Agent, cond: Callable[[], bool], timeout: float = 10.0) -> None:
    """Heartbeat until ``cond()`` holds (the lane refreshes its catalogue, which the beats
    read, just after it posts a command's result: a beat in between misses a new point)."""
    deadline = time.monotonic() + timeout
    while True:
        agent.heartbeat_once()
        if cond():
            return
        assert time.monotonic() < deadline, "the beats never showed it"
        time.sleep(0.05)


def test_commands_run_and_results_are_posted(env: Env) -> None:
    a = env.agent()
    try:
        r = env.run(a, env.vault.send(env.host_id, "protect", ITEM, env.protect_args()))
        assert r["status"] == "succeeded" and r["result"]["point"]["kind"] == "initial"
        assert r["error"] is None and r["progress"] == 100.0
        env.write(MiB, b"\x07" * 8192)
        r = env.run(a, env.vault.send(env.host_id, "cycle", ITEM, {"app_consistent": False}))
        assert r["status"] == "succeeded"
        point = r["result"]["point"]
        assert point["seq"] == 2 and point["kind"] == "delta" and point["bytes_written"] == 8192
        # the lane refreshes the catalogue the beats read after it posted the result
        beat_until(a, lambda: set(env.vault.points[ITEM]) == {"p000000000001", "p000000000002"})
        # the point equals the source
        repo = env.repo()
        assert image_digest(repo.reader(point["point_id"], "d0")) == \
            file_digest(env.hv.disk_path(env.vm_id, "d0"), SIZE)

        r = env.run(a, env.vault.send(env.host_id, "update_settings", ITEM,
                                      {"settings": {**SETTINGS, "retention_hours": 0.0001}}))
        assert r["status"] == "succeeded"
        time.sleep(0.5)
        r = env.run(a, env.vault.send(env.host_id, "retention", ITEM))
        assert r["status"] == "succeeded"
        assert r["result"]["deleted_points"] == ["p000000000001"]
        beat_until(a, lambda: env.vault.removed.get(ITEM) == {"p000000000001"})
        assert set(env.vault.points[ITEM]) == {"p000000000002"}

        r = env.run(a, env.vault.send(env.host_id, "resync", ITEM, {"by_hand": True}))
        assert r["status"] == "succeeded" and r["result"]["point"]["kind"] == "resync"
        assert r["result"]["report"]["resyncs"] == 1
    finally:
        a.shutdown()


def test_failures_are_reported_with_their_class(env: Env) -> None:
    a = env.agent()
    try:
        r = env.run(a, env.vault.send(env.host_id, "cycle", "item-nope", {}))
        assert r["status"] == "failed" and r["error"]["code"] == "not_found"
        r = env.run(a, env.vault.send(env.host_id, "reboot", ITEM, {}))
        assert r["status"] == "failed" and r["error"]["code"] == "invalid_input"
        args = {**env.protect_args(), "vm_id": "no-such-vm"}
        r = env.run(a, env.vault.send(env.host_id, "protect", "item-ghost", args))
        assert r["status"] == "failed" and r["error"]["code"] == "vm_not_found"
        assert r["error"]["class"] == "permanent" and r["error"]["hint"]
        a.heartbeat_once()
        assert env.vault.hosts[env.host_id].last["items"] == []  # nothing was recorded
    finally:
        a.shutdown()


def test_same_command_id_runs_once(env: Env) -> None:
    a = env.agent()
    try:
        env.run(a, env.vault.send(env.host_id, "protect", ITEM, env.protect_args()))
        env.write(0, b"\x01" * 4096)
        cycle = {"command_id": "c-once", "kind": "cycle", "item_id": ITEM,
                 "args": {"app_consistent": False}}
        # delivered twice in one reply and again while it may still run
        env.vault.resend(env.host_id, cycle)
        env.vault.resend(env.host_id, cycle)
        a.heartbeat_once()
        env.vault.resend(env.host_id, cycle)
        r = env.run(a, "c-once")
        assert r["status"] == "succeeded"
        assert a.wait_idle(10)
        # and again after it finished: answered from the journal, not run
        env.vault.resend(env.host_id, cycle)
        a.heartbeat_once()
        a.heartbeat_once()
        assert a.wait_idle(10)
        assert [p.seq for p in env.repo().points()] == [1, 2]
        finals = env.vault.finals("c-once")
        assert len(finals) >= 2 and all(f["result"] == finals[0]["result"] for f in finals)
    finally:
        a.shutdown()


def test_restart_rebuilds_items_and_answers_from_journal(env: Env) -> None:
    a = env.agent()
    cid = env.vault.send(env.host_id, "protect", ITEM, env.protect_args())
    env.run(a, cid)
    a.shutdown()

    b = env.agent()
    try:
        assert set(b.reports()) == {ITEM}
        assert b.reports()[ITEM]["state"] == "protected"
        env.vault.resend(env.host_id, {"command_id": cid, "kind": "protect", "item_id": ITEM,
                                       "args": env.protect_args()})
        b.heartbeat_once()
        b.heartbeat_once()
        # re-answered from the journal (perhaps more than once if a heartbeat re-delivered it
        # before the answer arrived), never re-run: same point, no new point
        finals = env.vault.finals(cid)
        assert len(finals) >= 2
        assert {f["result"]["point"]["seq"] for f in finals} == {1}
        assert len(env.repo().points()) == 1
        env.write(2 * MiB, b"\x09" * 4096)
        r = env.run(b, env.vault.send(env.host_id, "cycle", ITEM, {}))
        assert r["status"] == "succeeded" and r["result"]["point"]["seq"] == 2
    finally:
        b.shutdown()


def test_restart_resumes_an_interrupted_initial_replication_on_its_own(env: Env) -> None:
    # the agent accepted `protect`, recorded the item, then died before any copy
    items = {"items": [{"item_id": ITEM, "vm_id": env.vm_id, "target_site": "site-b",
                        "store_url": "https://store.invalid", "settings": SETTINGS,
                        "phase": "initial", "created_at": time.time()}]}
    (env.data / "items.json").write_text(json.dumps(items))
    key = base64.b64encode(os.urandom(32)).decode()
    pointkeys.save_key(env.data, ITEM, key)   # kept before the item was recorded
    a = env.agent()
    try:
        assert a.wait_idle(20)
        assert [p.kind for p in env.repo().points()] == ["initial"]
        assert json.loads((env.data / "items.json").read_text())["items"][0]["phase"] == \
            "protected"
        # the vault re-sends the protect it never got a result for: it completes at once
        r = env.run(a, env.vault.send(env.host_id, "protect", ITEM,
                                      {**env.protect_args(), "point_key": key}))
        assert r["status"] == "succeeded" and r["result"]["point"]["seq"] == 1
    finally:
        a.shutdown()


def test_cycle_committed_before_a_crash_is_not_run_again(env: Env) -> None:
    a = env.agent()
    env.run(a, env.vault.send(env.host_id, "protect", ITEM, env.protect_args()))
    env.write(0, b"\x02" * 4096)
    r = env.run(a, env.vault.send(env.host_id, "cycle", ITEM, {}, command_id="c-crash"))
    assert r["result"]["point"]["seq"] == 2
    a.shutdown()
    # rewrite history: the agent died after the commit, before it journaled the result
    path = env.data / "commands.json"
    raw = json.loads(path.read_text())
    raw["finished"].pop("c-crash")
    raw["started"]["c-crash"] = {"kind": "cycle", "item_id": ITEM, "before_seq": 1,
                                 "started_at": time.time()}
    path.write_text(json.dumps(raw))
    assert CommandJournal(path).started("c-crash") is not None

    b = env.agent()
    try:
        env.vault.resend(env.host_id, {"command_id": "c-crash", "kind": "cycle",
                                       "item_id": ITEM, "args": {}})
        b.heartbeat_once()
        assert b.wait_idle(10)
        b.heartbeat_once()
        finals = env.vault.finals("c-crash")
        assert finals[-1]["status"] == "succeeded"
        assert finals[-1]["result"]["point"]["seq"] == 2
        assert [p.seq for p in env.repo().points()] == [1, 2]
    finally:
        b.shutdown()


def test_unprotect_deletes_points_and_is_idempotent(env: Env) -> None:
    a = env.agent()
    try:
        env.run(a, env.vault.send(env.host_id, "protect", ITEM, env.protect_args()))
        r = env.run(a, env.vault.send(env.host_id, "unprotect", ITEM, {"delete_points": True}))
        assert r["status"] == "succeeded" and r["result"]["deleted_points"] == ["p000000000001"]
        assert env.repo().points() == []
        assert not (env.data / "items" / f"{ITEM}.json").exists()
        a.heartbeat_once()
        assert env.vault.hosts[env.host_id].last["items"] == []
        r = env.run(a, env.vault.send(env.host_id, "unprotect", ITEM, {"delete_points": True}))
        assert r["status"] == "succeeded" and r["result"]["already_unprotected"] is True
    finally:
        a.shutdown()


def test_vault_unreachable_backs_off_and_keeps_replicating(env: Env) -> None:
    a = env.agent(offline_after_s=0.0, max_backoff_s=1.0)
    try:
        env.run(a, env.vault.send(env.host_id, "protect", ITEM, env.protect_args()))
        env.vault.refuse_heartbeats = True
        env.write(0, b"\x03" * 4096)
        delays = [a.tick() for _ in range(4)]
        assert delays == sorted(delays) and delays[0] == pytest.approx(0.1)
        assert delays[-1] == pytest.approx(0.8)
        assert a.wait_idle(20)
        pts = env.repo().points()
        assert [p.seq for p in pts] == [1, 2], "offline mode did not run the due cycle"
        env.vault.refuse_heartbeats = False
        assert a.tick() == pytest.approx(0.1)
        assert set(env.vault.points[ITEM]) == {"p000000000001", "p000000000002"}
    finally:
        a.shutdown()


def test_the_vault_back_ends_the_heartbeat_backoff_at_once(env: Env) -> None:
    """Issue 19: after the vault was away long enough for the heartbeat backoff to grow, the
    command channel's first answer (``vault_back``) makes the next heartbeat go now — results
    held meanwhile reach the vault then — not at the end of the backoff (up to
    ``max_backoff_s``); while heartbeats succeed it changes nothing."""
    a = Agent(env.data, hypervisor=env.hv, heartbeat_interval=0.1, target_factory=env.target,
              max_backoff_s=30.0)
    t = threading.Thread(target=a.run, daemon=True)
    t.start()
    try:
        env.vault.refuse_heartbeats = True
        before = env.vault.hosts[env.host_id].heartbeats
        time.sleep(3.5)  # failures 0.1, 0.2, 0.4, 0.8, 1.6 s apart: the next ≈ 2.8 s later
        env.vault.refuse_heartbeats = False
        t0 = time.monotonic()
        a.vault_back()
        env.vault.wait_heartbeat(env.host_id, before, 5)
        took = time.monotonic() - t0
        assert took < 1.5, f"the heartbeat waited {took:.2f} s for its backoff"
    finally:
        a.stop()
        t.join(30)


def test_vault_link_maps_errors() -> None:
    import ssl

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/heartbeat"):
            return httpx.Response(200, json={"commands": [
                {"command_id": "c1", "kind": "cycle", "item_id": "i", "args": {}},
                {"kind": "cycle"}], "ack": {"i": 3, "j": "x"}})
        if "/c401/" in request.url.path:
            return httpx.Response(401, json={"code": "auth_failed", "class": "permanent",
                                             "message": "no", "hint": ""})
        if "/c503/" in request.url.path:
            return httpx.Response(503)
        raise httpx.ConnectError("refused", request=request)

    link = VaultLink("https://vault.invalid", ssl.create_default_context(),
                     transport=httpx.MockTransport(handler))
    reply = link.heartbeat({})
    assert [c.command_id for c in reply.commands] == ["c1"] and reply.malformed == 1
    assert reply.ack == {"i": 3}
    with pytest.raises(AuthError):
        link.post_result("c401", status="running", progress=1)
    with pytest.raises(NetworkError):
        link.post_result("c503", status="running", progress=1)
    with pytest.raises(NetworkError):
        link.post_result("other", status="running", progress=1)


def test_settings_from_args() -> None:
    s = settings_from_args(SETTINGS)
    assert s.frequency_s == 5 and s.app_consistent_every_s is None
    assert s.retention.retention_s == 24 * 3600 and s.resync_window.contains(720)
    s = settings_from_args({"resync_window": "18:00-08:00", "app_consistent_every_s": 600})
    assert not s.resync_window.contains(12 * 60) and s.app_consistent_every_s == 600
    for bad in ({"frequency_s": 1}, {"resync_window": "noon"}, {"retention_hours": -1}):
        with pytest.raises(InvalidInput):
            settings_from_args(bad)


def test_unprotect_interrupts_running_work_with_its_own_code(env: Env) -> None:
    """A protect still copying when unprotect arrives ends failed with ``interrupted`` (the
    class the codec names: permanent, a conflict), and the unprotect then runs."""
    gate = threading.Event()
    started = threading.Event()

    class GatedStore(LocalObjectStore):
        def put(self, key: str, data: bytes | memoryview, *, overwrite: bool = False) -> None:
            started.set()
            assert gate.wait(20), "the test never opened the gate"
            super().put(key, data, overwrite=overwrite)

    env.target = lambda url, item: LocalTarget(  # type: ignore[method-assign]
        Repository(GatedStore(env.store), item))
    a = env.agent()
    try:
        protect = env.vault.send(env.host_id, "protect", ITEM, env.protect_args())
        a.heartbeat_once()
        assert started.wait(20), "protect did not start writing"
        unprotect = env.vault.send(env.host_id, "unprotect", ITEM, {"delete_points": True})
        a.heartbeat_once()  # accepted: the running work is told to stop
        gate.set()
        r = env.run(a, protect)
        assert r["status"] == "failed", r
        assert r["error"]["code"] == OperationInterrupted.code == "interrupted"
        assert r["error"]["class"] == "permanent" and r["error"]["hint"]
        assert type(from_dict(r["error"])) is OperationInterrupted
        assert env.run(a, unprotect)["status"] == "succeeded"
    finally:
        gate.set()
        a.shutdown()


def test_restart_resumes_accepted_commands_and_reports_them_at_once(env: Env) -> None:
    """Issue 19, finding 1 (agent side): a command accepted before a crash is run after the
    restart without the vault sending it again; one whose secrets the journal does not keep is
    reported interrupted (transient) on first contact; heartbeats list what the agent holds."""
    a = env.agent()
    env.run(a, env.vault.send(env.host_id, "protect", ITEM, env.protect_args()))
    a.shutdown()
    env.write(MiB, b"\x05" * 8192)
    # the agent took a cycle and a cloud failover command, then died before running them
    path = env.data / "commands.json"
    j = CommandJournal(path)
    j.accept("c-cyc", kind="cycle", item_id=ITEM, args={"app_consistent": False})
    j.accept("c-fo", kind="failover_cancel", item_id=ITEM,
             args={"failover_id": "f1", "store": {"name": "s3a", "kind": "s3",
                                                   "secret": {"key": "TOPSECRET"}}})
    raw = path.read_text()
    assert "TOPSECRET" not in raw and "c-fo" in raw  # never a secret in the journal
    assert [u.command_id for u in CommandJournal(path).unfinished()] == ["c-cyc", "c-fo"]
    b = env.agent()   # start() re-queues; no command is sent by the vault
    try:
        assert b.wait_idle(20)
        b.heartbeat_once()
        cyc = env.vault.final("c-cyc")
        assert cyc is not None and cyc["status"] == "succeeded", cyc
        assert cyc["result"]["point"]["seq"] == 2
        fo = env.vault.final("c-fo")
        assert fo is not None and fo["status"] == "failed"
        err = from_dict(fo["error"])
        assert isinstance(err, CommandInterrupted) and err.transient
        assert CommandJournal(path).unfinished() == []
        hb = env.vault.hosts[env.host_id].last
        assert hb["held"] == []
    finally:
        b.shutdown()


def test_heartbeat_holds_queued_and_running_commands(env: Env) -> None:
    a = env.agent()
    try:
        env.run(a, env.vault.send(env.host_id, "protect", ITEM, env.protect_args()))
        gate = threading.Event()
        orig = a.hypervisor.seal

        def slow_seal(*args: Any, **kw: Any) -> Any:
            gate.wait(10)
            return orig(*args, **kw)

        a.hypervisor.seal = slow_seal  # type: ignore[method-assign]
        cid = env.vault.send(env.host_id, "cycle", ITEM, {})
        a.heartbeat_once()      # takes it
        a.heartbeat_once()      # lists it
        assert cid in env.vault.hosts[env.host_id].last["held"]
        gate.set()
        env.run(a, cid)
        # no longer held once its result is posted and marked so (the mark follows the
        # vault's answer, which the test may see first)
        deadline = time.monotonic() + 10
        while True:
            a.heartbeat_once()
            if cid not in env.vault.hosts[env.host_id].last["held"]:
                break
            assert time.monotonic() < deadline, "still held 10 s after its result"
            time.sleep(0.05)
    finally:
        a.shutdown()


def test_a_command_with_a_final_result_is_not_held_while_its_lane_finishes(env: Env) -> None:
    """Its lane refreshes the catalogue after the command ends (slow on a big store): the
    command is no longer in flight from its result on, so beats do not list it as held and
    no "running" progress can follow its final result."""
    a = env.agent()
    try:
        env.run(a, env.vault.send(env.host_id, "protect", ITEM, env.protect_args()))
        gate = threading.Event()
        orig = a.refresh_catalogue

        def slow_refresh(*args: Any, **kw: Any) -> Any:
            gate.wait(10)
            return orig(*args, **kw)

        a.refresh_catalogue = slow_refresh  # type: ignore[method-assign]
        cid = env.vault.send(env.host_id, "cycle", ITEM, {})
        env.run(a, cid)
        deadline = time.monotonic() + 5
        while cid in a.lanes.held_commands():
            assert time.monotonic() < deadline, "held while its lane finishes"
            time.sleep(0.02)
        a.lanes.post_progress()
        assert [r["status"] for r in env.vault.results[cid]][-1] == "succeeded"
        assert not gate.is_set()        # the lane was still in its refresh throughout
        gate.set()
    finally:
        a.shutdown()


def test_only_the_first_answered_heartbeat_of_a_process_says_restarted(env: Env) -> None:
    """``restarted``: the vault re-sends at once every command delivered before it that the
    beat does not hold (they died with the old process); later beats do not say it."""
    a = env.agent()
    try:
        env.vault.refuse_heartbeats = True
        with pytest.raises(DrsiteError):   # refused (503): not answered
            a.heartbeat_once()
        env.vault.refuse_heartbeats = False
        a.heartbeat_once()   # the first one answered
        assert env.vault.hosts[env.host_id].last.get("restarted") is True
        a.heartbeat_once()
        assert "restarted" not in env.vault.hosts[env.host_id].last
    finally:
        a.shutdown()
    b = env.agent()   # a new process (of the same host)
    try:
        b.heartbeat_once()
        assert env.vault.hosts[env.host_id].last.get("restarted") is True
    finally:
        b.shutdown()


def test_beat_soon_sends_the_next_heartbeat_now_and_a_burst_is_one_beat(env: Env) -> None:
    """The vault asked for a heartbeat (its long poll said ``heartbeat``: a job waits for a
    store access list to be confirmed, or a point to reach the catalogue): the next beat goes
    now, not at the end of the interval; a burst of asks is one beat (``soon_gap_s`` apart)."""
    a = Agent(env.data, hypervisor=env.hv, heartbeat_interval=30.0, target_factory=env.target)
    t = threading.Thread(target=a.run, daemon=True)
    t.start()
    try:
        env.vault.wait_heartbeat(env.host_id, 0, 10)
        time.sleep(0.6)
        before = env.vault.hosts[env.host_id].heartbeats
        t0 = time.monotonic()
        for _ in range(20):
            a.beat_soon()
        env.vault.wait_heartbeat(env.host_id, before, 5)
        assert time.monotonic() - t0 < 1.5
        time.sleep(1.5)
        assert env.vault.hosts[env.host_id].heartbeats == before + 1
    finally:
        a.stop()
        t.join(30)
