"""A job waiting for the recovery store (issue 13): a store host that missed heartbeats under
load is waited for — the job says why and goes on once the host beats again — and a job fails
only when the store is gone (silent for ``store_gone_after_s``), with what to do. At 5,000 items
283 EnableProtection jobs failed "no recovery store is online" because the store host's last
heartbeat was 6.5 s old when their wait limit (60 s since the task started) came."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.unit.test_vault_jobs import setup as jobs_setup

from drsite.vault.testing import Agent, Harness, point, report, vm_info

VMS = [vm_info("vm-1", "web1")]


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    hh = Harness(tmp_path / "vault")
    yield hh
    hh.close()


def setup(h: Harness) -> tuple[Agent, Agent]:
    return jobs_setup(h, store="dr-store")


def silence(h: Harness, a: Agent, seconds: float) -> None:
    """``seconds`` pass in 2 s steps: the source beats, the store host does not; the runner
    asks the job at every step."""
    end = h.clock.now() + seconds
    while h.clock.now() < end:
        h.clock.advance(2.0)
        a.beat(vms=VMS)
        h.tick()


def test_a_store_host_that_missed_beats_is_waited_for_and_the_job_completes(h: Harness) -> None:
    a, b = setup(h)
    out = h.ok("POST", "/items", json={"vm_id": "vm-1", "group": "g1"})
    job_id, item_id = out["job_id"], out["item_id"]
    h.tick()
    gone_after = h.settings.store_gone_after_s
    assert gone_after >= 10 * h.settings.agent_down_after_s
    # silent well past the prerequisites' wait limit (60 s), not yet gone
    silence(h, a, gone_after - 10)
    job = h.job(job_id)
    assert job["state"] == "running", job
    assert "dr-store missed heartbeats" in job["message"], job["message"]
    assert "gone after" in job["message"]
    # it comes back: the list with the grant, confirmed, then the protect command
    h.store_beat()
    h.tick()
    cmds = [c for c in a.beat(vms=VMS)["commands"] if c["kind"] == "protect"]
    assert len(cmds) == 1, h.job(job_id)
    a.result(cmds[0]["command_id"], "succeeded")
    a.beat(vms=VMS, items=[{"item_id": item_id, "report": report(item_id, "vm-1", "web1"),
                            "new_points": [point(item_id, 1, h.clock.now())]}])
    h.tick()
    assert h.job(job_id)["state"] == "succeeded"
    assert h.ok("GET", f"/items/{item_id}")["protection"] == "protected"
    assert b.store_acl is not None and item_id in b.store_acl["items"]


def test_a_store_host_that_never_comes_back_fails_the_job_clearly(h: Harness) -> None:
    a, _b = setup(h)
    out = h.ok("POST", "/items", json={"vm_id": "vm-1", "group": "g1"})
    job_id, item_id = out["job_id"], out["item_id"]
    h.tick()
    silence(h, a, h.settings.store_gone_after_s + 4)
    job = h.job(job_id)
    assert job["state"] == "failed", job
    err = job["error"]
    assert err["class"] == "permanent"
    assert "the recovery store of site sec is gone: its host dr-store has sent no heartbeat " \
           "for" in err["message"], err
    assert "drsite sites set-store sec HOST" in err["hint"] and "--store-listen" in err["hint"]
    assert h.ok("GET", f"/items/{item_id}")["protection"] == "failed"


def test_no_store_host_at_all_still_fails_after_the_wait_limit(h: Harness) -> None:
    """No host holds the role (nothing to wait for): the old limit and message stand."""
    a, _b = setup(h)
    assert h.set_store("sec", None, force=True).status_code == 200
    out = h.ok("POST", "/items", json={"vm_id": "vm-1", "group": "g1"})
    h.tick()
    assert "waiting for a recovery store in site sec" in h.job(out["job_id"])["message"]
    silence(h, a, 64)
    job = h.job(out["job_id"])
    assert job["state"] == "failed"
    assert job["error"]["message"] == "no recovery store is online in target site sec"


def test_a_source_host_that_missed_beats_is_waited_for(h: Harness) -> None:
    """The same for the item's own host: at 5,000 items jobs failed "host h010 sends no
    heartbeats" for source hosts a few seconds late under load."""
    a, _b = setup(h)
    out = h.ok("POST", "/items", json={"vm_id": "vm-1", "group": "g1"})
    job_id = out["job_id"]
    h.store_beat()
    h.clock.advance(h.settings.agent_down_after_s + 2)   # the source is late, not gone
    end = h.clock.now() + 70
    while h.clock.now() < end:   # past the old 60 s limit, the store beats, the source not
        h.clock.advance(2.0)
        h.store_beat()
        h.tick()
    job = h.job(job_id)
    assert job["state"] == "running", job
    assert "waiting for a heartbeat of host hv1 (it missed heartbeats" in job["message"]
    a.beat(vms=VMS)
    h.tick()
    assert [c for c in a.beat(vms=VMS)["commands"] if c["kind"] == "protect"]


def test_a_source_host_gone_fails_the_job_as_before(h: Harness) -> None:
    _a, _b = setup(h)
    h.clock.advance(h.settings.agent_down_after_s + 2)   # the source is late already
    out = h.ok("POST", "/items", json={"vm_id": "vm-1", "group": "g1"})
    end = h.clock.now() + h.settings.store_gone_after_s
    while h.clock.now() < end:
        h.clock.advance(2.0)
        h.store_beat()
        h.tick()
    job = h.job(out["job_id"])
    assert job["state"] == "failed", job
    assert job["error"]["message"] == "host hv1 sends no heartbeats"
