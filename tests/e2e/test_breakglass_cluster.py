"""Break-glass failover with real processes (issue 14 part 4): the vault is SIGKILLed and stays
down, the recovery site's agent host fails a protected VM over on its own (``drsite agent
failover``) from its store's catalogue, with the point's MAC checked and the generation
promoted; the vault, restarted, learns it from the agent's heartbeat — the item failed over
with the point used, no second VM, the old primary fenced when it returns and nothing
replicated towards the recovery site. Bad input: an unknown item, a point whose MAC fails,
running it twice, another point after it ran, and running it while the vault answers (refused;
with --force it runs and the vault records it at once, fencing the primary)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from tests.e2e.test_cluster import until
from tests.e2e.test_failover_cluster import (
    cluster,
    equals_point,
    hv,
    make_vm,
    protect,
    setup,
)
from tests.procs import kill9

from drsite.core.model import PowerState
from drsite.up import Cluster, start_agent, start_vault

__all__ = ["cluster"]
pytestmark = pytest.mark.slow
DRSITE = str(Path(sys.executable).parent / "drsite")


def agent_cli(c: Cluster, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([DRSITE, "agent", *args, "--data", str(c.root / "secondary" / "agent")],
                          capture_output=True, text=True, timeout=120)


def err(p: subprocess.CompletedProcess[str]) -> str:
    """stderr with its line wrapping undone."""
    return " ".join(p.stderr.split())


def ok_json(p: subprocess.CompletedProcess[str]) -> Any:
    assert p.returncode == 0, (p.returncode, p.stdout, p.stderr)
    return json.loads(p.stdout)


def test_breakglass_failover_without_vault(cluster: Cluster) -> None:
    vm_id = make_vm(cluster, "bg1", 8, "10.0.0.40")
    vm2 = make_vm(cluster, "bg2", 8, "10.0.0.41")
    prim, sec = hv(cluster, "primary"), hv(cluster, "secondary")
    book = cluster.root / "secondary" / "agent" / "recovery-book.json"
    with cluster.client() as cl:
        setup(cl)
        item = protect(cl, vm_id)["id"]
        item2 = protect(cl, vm2)["id"]
        cl.apply_plans([{"name": "drp", "groups": [{"name": "all", "vms": ["bg1"]}]}])
        until("delta points", lambda: len(cl.points(item)) >= 2, 60)
        until("the recovery book names the item and the plan",
              lambda: book.exists() and item in json.loads(book.read_text())["items"]
              and "drp" in json.loads(book.read_text())["plans"], 30)
    assert book.stat().st_mode & 0o777 == 0o600

    # while the vault answers, break-glass refuses (it would not know of the failover)
    p = agent_cli(cluster, "failover", item)
    assert p.returncode == 2 and "answers" in err(p) and "drsite failover unplanned" in err(p), p
    # --force (a partition: the vault answers, the primary replicates on): the vault records
    # it at the agent's next heartbeat and fences the primary, whose VM goes off
    forced = ok_json(agent_cli(cluster, "failover", item2, "--force", "--json"))
    assert forced["state"] == "pending_commit" and forced["generation"] == 2, forced
    with cluster.client() as cl:
        until("the vault records the forced break-glass failover",
              lambda: cl.item(item2)["protection"] == "failed_over", 30)
        assert [f["id"] for f in cl.failovers(item2)] == [forced["failover_id"]]
        until("the primary fenced",
              lambda: (cl.failovers(item2)[0]["result"].get("fence") or {}).get("state")
              == "done", 30)
    assert prim.get_vm(vm2).power is PowerState.STOPPED
    assert sec.get_vm(forced["vm_id"]).power is PowerState.RUNNING

    # site A and the vault are lost (the primary VM keeps running: a partition)
    kill9(cluster.pids["vault"])
    kill9(cluster.pids["agent-primary"])

    listing = ok_json(agent_cli(cluster, "points", "--json"))
    row = next(r for r in listing["items"] if r["item_id"] == item)
    assert row["vm_name"] == "bg1" and row["points"] >= 2, row
    assert listing["plans"]["drp"]["groups"] == [{"name": "all", "items": [item]}]
    points = ok_json(agent_cli(cluster, "points", item, "--json"))
    assert all(r["ok"] for r in points) and len(points) >= 2, points

    # an unknown item
    p = agent_cli(cluster, "failover", "i-000000000000")
    assert p.returncode == 2 and "not in this host's recovery book" in err(p), p

    # a point whose MAC fails (written by someone without the point key) is refused
    old = points[0]["point_id"]
    manifest = cluster.root / "secondary" / "store" / "items" / item / "points" / old
    original = manifest.read_bytes()
    env = json.loads(original)
    env["mac"] = ("0" if env["mac"][0] != "0" else "1") + env["mac"][1:]
    manifest.write_bytes(json.dumps(env).encode())
    try:
        assert not next(r for r in ok_json(agent_cli(cluster, "points", item, "--json"))
                        if r["point_id"] == old)["ok"]
        p = agent_cli(cluster, "failover", item, "--point", old)
        assert p.returncode == 2 and "point_not_authentic" in err(p), p
        assert not any(v.name == "bg1" for v in sec.list_vms())
    finally:
        manifest.write_bytes(original)

    # the break-glass failover itself: latest point, VM running, its disks equal the point
    t0 = time.monotonic()
    rec = ok_json(agent_cli(cluster, "failover", item, "--json"))
    rto = time.monotonic() - t0
    assert rec["state"] == "pending_commit" and rec["generation"] == 2, rec
    assert rec["point_id"] == points[-1]["point_id"]
    rec_vm = sec.get_vm(rec["vm_id"])
    assert rec_vm.power is PowerState.RUNNING
    assert [(n.network, n.ip) for n in rec_vm.nics] == [("dr", "10.9.0.40")]
    assert equals_point(cluster, sec, rec_vm.vm_id, item, rec["point_id"])
    gen = json.loads((cluster.root / "secondary" / "store" / "items" / item / "generation")
                     .read_bytes())["body"]
    assert gen["generation"] == 2 and gen["primary"] == "secondary" and "mac" in json.loads(
        (cluster.root / "secondary" / "store" / "items" / item / "generation").read_bytes())

    # idempotent: again → the same failover, still one VM; another point → refused
    again = ok_json(agent_cli(cluster, "failover", item, "--json"))
    assert (again["failover_id"], again["vm_id"]) == (rec["failover_id"], rec["vm_id"])
    p = agent_cli(cluster, "failover", item, "--point", old)
    assert p.returncode == 2 and "second VM" in err(p), p
    plan = ok_json(agent_cli(cluster, "failover", "--plan", "drp", "--json"))
    assert [r["failover_id"] for r in plan] == [rec["failover_id"]]
    assert [v.name for v in sec.list_vms()].count("bg1") == 1
    print(f"break-glass failover: {rto:.2f} s wall, RTO {rec['rto_s']:.2f} s")

    # the vault returns and learns it from the recovery agent's heartbeat
    start_vault(cluster)
    with cluster.client() as cl:
        until("the vault records the break-glass failover",
              lambda: cl.item(item)["protection"] == "failed_over", 30)
        fos = cl.failovers(item)
        assert [(f["id"], f["kind"], f["point_id"], f["generation"], f["vm_id"]) for f in fos] \
            == [(rec["failover_id"], "unplanned", rec["point_id"], 2, rec["vm_id"])], fos
        assert "break-glass" in " ".join(fos[0]["notes"])
        bg_file = cluster.root / "secondary" / "agent" / "breakglass" / f"{item}.json"
        until("the agent stops reporting it", lambda: json.loads(bg_file.read_text())["reported"], 15)
        # no second VM: no other failover, the recovery VM is not auto-protected
        time.sleep(3)
        assert [v.name for v in sec.list_vms()].count("bg1") == 1
        assert not [it for it in cl.items() if it["vm_id"] == rec["vm_id"]]
        with pytest.raises(Exception, match="only a protected item"):
            cl.item_action(item, "unplanned-failover")
        until("the item warns that the old primary may still write",
              lambda: any("old primary may still be writing" in r
                          for r in cl.item(item)["health_reasons"]), 15)

        # the old primary returns: fenced (its VM off), and nothing replicates to the store
        assert prim.get_vm(vm_id).power is PowerState.RUNNING
        store_points = sorted((cluster.root / "secondary" / "store" / "items" / item / "points")
                              .iterdir())
        start_agent(cluster, "primary", store=True)
        until("the old primary fenced",
              lambda: (cl.failovers(item)[0]["result"].get("fence") or {}).get("state") == "done",
              30)
        assert prim.get_vm(vm_id).power is PowerState.STOPPED
        time.sleep(12)  # two policy periods (5 s)
        assert sorted((cluster.root / "secondary" / "store" / "items" / item / "points")
                      .iterdir()) == store_points
        assert sec.get_vm(rec["vm_id"]).power is PowerState.RUNNING
        assert cl.item(item)["protection"] == "failed_over"
        assert len(cl.failovers(item)) == 1

        # from here the vault owns it as any unplanned failover: commit, then re-protect (the
        # old primary's disks are the reverse base; both VMs wrote since the point, so how much
        # differs depends on the workloads)
        job = cl.wait_job(cl.item_action(item, "commit")["id"], timeout=120)
        assert job["state"] == "succeeded", job
        assert cl.failovers(item)[0]["state"] == "committed"
        job = cl.wait_job(cl.item_action(item, "reprotect")["id"], timeout=180)
        assert job["state"] == "succeeded", job
        fo = cl.failovers(item)[0]
        assert fo["state"] == "reprotected" and fo["id"] == rec["failover_id"], fo
        rp = fo["result"]["reprotect"]
        assert 0 < rp["bytes_sent"] <= rp["disk_bytes"] == 8 * 1024 * 1024, rp
        rev = cl.item(rp["item_id"])
        assert rev["protection"] == "protected" and rev["site"] == "secondary"
        assert prim.get_vm(vm_id).power is PowerState.STOPPED   # never on both sites
        assert sec.get_vm(rec["vm_id"]).power is PowerState.RUNNING
