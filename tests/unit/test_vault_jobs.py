"""Job runner: the enable-protection job end to end, retries of initial replication, failures,
cancel with rollback, and a vault restart in the middle of a job (resume, or fail clearly)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update

from drsite.replication.report import ItemState
from drsite.vault.db.models import Item, Task
from drsite.vault.testing import Agent, Harness, point, report, vm_info

VMS = [vm_info("vm-1", "web1")]


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    hh = Harness(tmp_path / "vault")
    yield hh
    hh.close()


def setup(h: Harness, store: str = "hv2") -> tuple[Agent, Agent]:
    """Sites prim and sec, a source host hv1 with VMS and the store host ``store`` of sec
    (beating), policy p1 and group g1 (prim → sec)."""
    h.site("prim")
    h.site("sec")
    a, b = h.register("prim", "hv1"), h.register("sec", store)
    assert h.set_store("sec", store).status_code == 200
    a.beat(vms=VMS)
    b.beat(store_url="https://127.0.0.1:9443")
    h.ok("POST", "/policies", json={"name": "p1", "frequency_s": 30})
    h.ok("POST", "/groups", json={"name": "g1", "site": "prim", "target_site": "sec", "policy": "p1"})
    return a, b


def start(h: Harness) -> tuple[str, str]:
    out = h.ok("POST", "/items", json={"vm_id": "vm-1", "group": "g1"})
    h.store_beat()  # the store receives and confirms the item's grant
    return out["job_id"], out["item_id"]


def commands(a: Agent, kind: str) -> list[dict[str, Any]]:
    return [c for c in a.beat(vms=VMS)["commands"] if c["kind"] == kind]


def tasks(h: Harness, job_id: str) -> dict[str, str]:
    return {t["name"]: t["state"] for t in h.job(job_id)["tasks"]}


def test_enable_protection_runs_its_tasks_in_order(h: Harness) -> None:
    a, _ = setup(h)
    job_id, item_id = start(h)
    h.tick()
    assert tasks(h, job_id) == {"prerequisites": "succeeded", "create_relationship": "running",
                                "initial_replication": "pending", "finalize": "pending"}
    (cmd,) = commands(a, "protect")
    assert commands(a, "protect") == []  # delivered once (until the resend delay passes)
    a.result(cmd["command_id"], "running", progress=1)
    h.tick()
    assert tasks(h, job_id)["initial_replication"] == "running"
    a.beat(vms=VMS, items=[{"item_id": item_id,
                            "report": report(item_id, "vm-1", "web1", state=ItemState.INITIAL_REPLICATION,
                                             progress=40.0, bytes_total=100, bytes_done=40)}])
    h.tick()
    job = h.job(job_id)
    assert job["state"] == "running" and "40 of 100 bytes" in job["message"]
    assert 0 < job["progress"] < 100
    a.beat(vms=VMS, items=[{"item_id": item_id, "report": report(item_id, "vm-1", "web1"),
                            "new_points": [point(item_id, 1, h.clock.now())]}])
    h.tick()  # the committed point is enough: the agent's result may come later
    job = h.job(job_id)
    assert job["state"] == "succeeded" and job["progress"] == 100
    assert all(t["started_at"] is not None and t["ended_at"] is not None for t in job["tasks"])
    assert h.ok("GET", f"/items/{item_id}")["protection"] == "protected"


def test_unacknowledged_commands_are_delivered_again(h: Harness) -> None:
    a, _ = setup(h)
    start(h)
    h.tick()
    (cmd,) = commands(a, "protect")
    h.clock.advance(h.settings.resend_after_s + 1)
    assert [c["command_id"] for c in commands(a, "protect")] == [cmd["command_id"]]


def test_lost_commands_are_delivered_again_at_the_next_heartbeat(h: Harness) -> None:
    """Issue 19: a command the agent's heartbeat does not hold, although that heartbeat was
    built after the command's delivery, is delivered again at once — not after a timeout."""
    a, _ = setup(h)
    start(h)
    h.tick()
    reply = a.beat(held=[])          # delivered in this reply (the agent may never get it)
    (cmd,) = [c for c in reply["commands"] if c["kind"] == "protect"]
    h.clock.advance(0.5)
    # a heartbeat built after that reply that does not hold it: the reply was lost, or the
    # agent restarted without it → delivered again now
    again = [c["command_id"] for c in a.beat(held=[])["commands"]]
    assert again == [cmd["command_id"]]
    h.clock.advance(0.5)
    # held (queued or running): never re-delivered, however long it runs with progress posts
    assert a.beat(held=[cmd["command_id"]])["commands"] == []
    a.result(cmd["command_id"], "running", progress=10)
    h.clock.advance(0.5)
    assert a.beat(held=[cmd["command_id"]])["commands"] == []
    h.clock.advance(0.5)
    # the agent restarted and lost it while running: its first heartbeat brings it back
    assert [c["command_id"] for c in a.beat(held=[])["commands"]] == [cmd["command_id"]]
    # news after the last heartbeat (a progress post racing the heartbeat): not yet
    h.clock.advance(0.25)
    a.result(cmd["command_id"], "running", progress=20)
    h.clock.advance(0.25)
    assert a.beat(held=[])["commands"] == []
    h.clock.advance(0.5)
    assert [c["command_id"] for c in a.beat(held=[])["commands"]] == [cmd["command_id"]]


def test_a_restarted_agents_first_heartbeat_gets_every_lost_command_back(h: Harness) -> None:
    """An agent killed right after a delivery: its first heartbeat after the restart was built
    after the delivery, yet the previous heartbeat (the old process's) was before it — by the
    ordinary rule that command would come back one heartbeat later. ``restarted`` says the
    agent holds all it will ever run of what was delivered before: the rest comes at once."""
    a, _ = setup(h)
    start(h)
    a.beat(vms=VMS, held=[])
    h.clock.advance(0.5)
    h.tick()
    # delivered after that heartbeat, on the command channel; then the agent was killed
    r = a.post("/commands/wait", {"timeout_s": 0})
    assert r.status_code == 200, r.text
    (cmd,) = [c for c in r.json()["commands"] if c["kind"] == "protect"]
    h.clock.advance(0.5)
    # (without the flag it would not come yet: a channel delivery may cross a heartbeat of a
    # live agent — test_lost_commands_are_delivered_again_at_the_next_heartbeat)
    reply = a.beat(vms=VMS, held=[], restarted=True)
    assert [c["command_id"] for c in reply["commands"]] == [cmd["command_id"]]
    # what it holds is never sent again
    h.clock.advance(0.1)
    assert a.beat(vms=VMS, held=[cmd["command_id"]], restarted=True)["commands"] == []


def test_silent_running_commands_are_delivered_again_after_heartbeats_not_minutes(h: Harness) -> None:
    a, _ = setup(h)
    start(h)
    h.tick()
    (cmd,) = commands(a, "protect")
    a.result(cmd["command_id"], "running", progress=1)
    assert h.settings.stale_running_s <= 60
    h.clock.advance(h.settings.stale_running_s + 1)
    assert [c["command_id"] for c in commands(a, "protect")] == [cmd["command_id"]]


def test_initial_replication_retries_transient_failures_on_the_seed_schedule(h: Harness) -> None:
    a, _ = setup(h)
    job_id, item_id = start(h)
    h.tick()
    (cmd,) = commands(a, "protect")
    a.result(cmd["command_id"], "running")
    h.tick()
    net = {"code": "network", "class": "transient", "message": "store unreachable", "hint": ""}
    waits = []
    for _ in range(6):
        a.result(cmd["command_id"], "failed", error=net)
        t0 = h.clock.now()
        h.tick()
        assert h.job(job_id)["state"] == "running"
        assert "retry" in h.job(job_id)["message"]
        while not (again := commands(a, "protect")):
            h.clock.advance(30)
            h.tick()
        waits.append(h.clock.now() - t0)
        cmd = again[0]
    assert [round(w / 60) for w in waits] == [1, 2, 4, 8, 10, 30]
    # the item is Warning while retrying
    assert h.ok("GET", f"/items/{item_id}")["health"] in ("normal", "warning")


def test_initial_replication_is_retried_at_once_after_each_restart_of_the_store_agent(
        h: Harness) -> None:
    """The copy failed to reach the recovery site because its store agent was killed, and
    again after that agent came back and was killed once more: each restart (its first
    heartbeat says ``restarted``) sends the copy again at once; without a restart since the
    last failure, the seed's schedule."""
    a, b = setup(h)
    job_id, _ = start(h)
    h.tick()
    (cmd,) = commands(a, "protect")
    net = {"code": "network", "class": "transient", "message": "store unreachable", "hint": ""}
    for _ in range(3):
        a.result(cmd["command_id"], "failed", error=net)
        h.tick()
        h.clock.advance(0.5)
        b.beat(store_url="https://127.0.0.1:9443", restarted=True)
        h.tick()
        (cmd,) = commands(a, "protect")
    a.result(cmd["command_id"], "failed", error=net)  # the link: no restart since
    h.tick()
    h.clock.advance(20)
    b.beat(store_url="https://127.0.0.1:9443")
    h.tick()
    assert commands(a, "protect") == []
    assert "retry 5" in h.job(job_id)["message"]


def test_permanent_failure_fails_the_job_with_class_and_hint(h: Harness) -> None:
    a, _ = setup(h)
    job_id, item_id = start(h)
    h.tick()
    (cmd,) = commands(a, "protect")
    a.result(cmd["command_id"], "failed", error={"code": "vm_not_found", "class": "permanent",
                                                 "message": "VM web1 is gone", "hint": "check the host"})
    h.tick()
    job = h.job(job_id)
    assert job["state"] == "failed"
    assert job["error"] == {"code": "vm_not_found", "class": "permanent", "message": "VM web1 is gone",
                            "hint": "check the host"}
    assert [t["state"] for t in job["tasks"]] == ["succeeded", "failed", "skipped", "skipped"]
    assert h.ok("GET", f"/items/{item_id}")["protection"] == "failed"
    assert commands(a, "unprotect")  # what the agent started is undone
    # the VM can be protected again
    assert h.ok("POST", "/items", json={"vm_id": "vm-1", "group": "g1"})["job_id"]


def test_prerequisites_fail_when_no_recovery_store_comes_online(h: Harness) -> None:
    h.site("prim")
    h.site("sec")
    a = h.register("prim", "hv1")
    a.beat(vms=VMS)
    h.ok("POST", "/policies", json={"name": "p1", "frequency_s": 30})
    h.ok("POST", "/groups", json={"name": "g1", "site": "prim", "target_site": "sec", "policy": "p1"})
    job_id, _ = start(h)
    h.tick()
    assert h.job(job_id)["state"] == "running"
    h.clock.advance(61)
    a.beat(vms=VMS)
    h.tick()
    job = h.job(job_id)
    assert job["state"] == "failed" and "no recovery store" in job["error"]["message"]
    assert job["error"]["hint"]


def test_cancel_rolls_back_with_unprotect(h: Harness) -> None:
    a, _ = setup(h)
    job_id, item_id = start(h)
    h.tick()
    (cmd,) = commands(a, "protect")
    a.result(cmd["command_id"], "running")
    h.tick()
    h.ok("POST", f"/jobs/{job_id}/cancel")
    h.tick()
    job = h.job(job_id)
    assert job["state"] == "cancelling"
    assert [t["name"] for t in job["tasks"]][-1] == "rollback"
    (undo,) = commands(a, "unprotect")
    assert undo["args"] == {"delete_points": True} and undo["item_id"] == item_id
    a.result(undo["command_id"], "succeeded")
    h.tick()
    job = h.job(job_id)
    assert job["state"] == "cancelled"
    assert [t["state"] for t in job["tasks"]] == ["succeeded", "succeeded", "cancelled", "cancelled",
                                                  "succeeded"]
    assert h.ok("GET", f"/items/{item_id}")["protection"] == "removed"


def restart(h: Harness) -> Harness:
    """Drop the vault (no goodbye) and start a new one on the same data and clock."""
    data, clock = h.settings.data_dir, h.clock
    h.close()
    h2 = Harness(data)
    h2.clock.t = clock.t
    return h2


def test_restart_mid_job_resumes_it(tmp_path: Path) -> None:
    h = Harness(tmp_path / "vault")
    a, _ = setup(h)
    job_id, item_id = start(h)
    h.tick()
    (cmd,) = commands(a, "protect")
    a.result(cmd["command_id"], "running")
    h.tick()
    h = restart(h)
    try:
        assert h.vault.recovered == {job_id: "resumed"}
        job = h.job(job_id)
        assert job["state"] == "running" and job["message"].startswith("resumed after a vault restart")
        a.h = h
        a.beat(vms=VMS, items=[{"item_id": item_id, "report": report(item_id, "vm-1", "web1"),
                                "new_points": [point(item_id, 1, h.clock.now())]}])
        a.result(cmd["command_id"], "succeeded")
        h.tick()
        assert h.job(job_id)["state"] == "succeeded"
        # the protect command was not sent twice
        assert len([e for e in h.entries("/events?limit=1000") if "resumed" in e["message"]]) == 1
    finally:
        h.close()


def test_restart_fails_jobs_it_cannot_resume(tmp_path: Path) -> None:
    h = Harness(tmp_path / "vault")
    _a, _ = setup(h)
    job_id, _item_id = start(h)
    h.tick()
    with h.vault.db.tx() as s:  # a job written by a vault version with another task
        s.execute(update(Task).where(Task.job_id == job_id, Task.name == "create_relationship")
                  .values(name="create_relationship_v9"))
    h = restart(h)
    try:
        assert h.vault.recovered == {job_id: "failed"}
        job = h.job(job_id)
        assert job["state"] == "failed" and job["ended_at"] is not None
        assert "cannot resume after a vault restart" in job["error"]["message"]
        assert "create_relationship_v9" in job["error"]["message"]
        assert job["error"]["hint"] == "Start the operation again."
        assert h.entries("/jobs?state=active") == []
        # the item does not stay "enabling"
        with h.vault.db.tx() as s:
            assert s.get(Item, _item_id).status == "failed"  # type: ignore[union-attr]
    finally:
        h.close()


def test_policy_applies_to_vms_discovered_later(h: Harness) -> None:
    a, _ = setup(h)
    h.ok("PUT", "/groups/g1", json={"match": {"labels": ["web"]}})
    h.tick()
    assert h.entries("/jobs?kind=EnableProtection") == []
    a.beat(vms=[*VMS, vm_info("vm-7", "web7", labels=["web"])])
    jobs = h.entries("/jobs?kind=EnableProtection")
    assert [j["target"] for j in jobs] == ["web7"]
    a.beat(vms=[*VMS, vm_info("vm-7", "web7", labels=["web"])])
    assert len(h.entries("/jobs?kind=EnableProtection")) == 1  # only when first discovered
