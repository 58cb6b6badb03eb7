"""Site disaster with a vault pair (issue 14), real processes: ``drsite up --ha`` (a vault per
site, each on its own PostgreSQL, site B's a hot standby by streaming replication; agents
registered with both), three VMs in a recovery plan, replicating. Then every process of site A
is SIGKILLed at once — vault A, every process of PostgreSQL A, agent A, its VM guests — and:

- ``drsite vault promote`` at B; the plan's unplanned failover through vault B; every recovery
  VM equals its failover point (digests); the RTO from the kill to all VMs running, split into
  promote and failover, is printed; break-glass on site B is refused while vault B answers,
  naming both vaults;
- site A returns: its vault is fenced (a write refused, naming B), its agent follows B and its
  VMs are fenced (never running on both sites);
- ``drsite vault rejoin``: vault A comes back as B's standby with B's data;
- ``drsite up``'s summary shows each vault's role as the vaults say it, at each stage;
- re-protect towards A through vault B, then a planned failback to A: digests equal.

And the active vault alone SIGKILLed in the middle of a plan: after the promotion the plan
finishes or fails with a hint; no VM ever runs on both sites.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from tests.e2e.test_cluster import until
from tests.e2e.test_failover_cluster import (
    disks_digest,
    equals_point,
    hv,
    make_vm,
    protect,
    setup,
)
from tests.hacluster import ha_cluster
from tests.integration.test_vault_pair import cluster_pids

from drsite import tlsutil
from drsite.cli.up_cmd import summary
from drsite.client.api import VaultClient, VaultConfig
from drsite.core.model import PowerState
from drsite.up import Cluster, start_agent, start_vault

pytestmark = pytest.mark.slow
DRSITE = str(Path(sys.executable).parent / "drsite")
VMS = ("web", "app", "db")


@pytest.fixture
def ha() -> Iterator[Cluster]:
    with ha_cluster("drsite-ha-") as c:
        yield c


def client(c: Cluster, url: str) -> VaultClient:
    return VaultClient(VaultConfig(url, c.admin_token, c.ca_file))


def guest_pids(c: Cluster, site: str) -> list[int]:
    out = []
    for pidfile in (c.root / site / "vms").glob("*/guest.pid"):
        with contextlib.suppress(OSError, ValueError):
            out.append(int(pidfile.read_text().strip()))
    return out


def gone(pid: int) -> bool:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"


def job_said(job: dict[str, object]) -> str:
    """A failed job for an assertion: the whole job, then its error and failed task again at
    the end (a CI log keeps the head and the tail of a long failure; the middle is cut)."""
    tasks = job.get("tasks")
    failed = [t for t in tasks if isinstance(t, dict) and t.get("state") == "failed"] \
        if isinstance(tasks, list) else []
    return (json.dumps(job, indent=1, default=str) + "\nERROR: " + json.dumps(job.get("error"))
            + "\nFAILED TASK: " + json.dumps(failed))


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([DRSITE, *args], capture_output=True, text=True, timeout=180)


def test_site_a_lost_promote_failover_fence_rejoin(ha: Cluster) -> None:
    c = ha
    vms = {n: make_vm(c, n, 8, f"10.0.0.{50 + i}") for i, n in enumerate(VMS)}
    prim, sec = hv(c, "primary"), hv(c, "secondary")
    with c.client() as cl:
        setup(cl)
        items = {n: protect(cl, v)["id"] for n, v in vms.items()}
        cl.apply_plans([{"name": "shop", "groups": [{"name": "all", "vms": list(VMS)}]}])
        for n, item in items.items():
            until(f"{n} has delta points", lambda item=item: len(cl.points(item)) >= 2, 90)
    # vault B, a standby, sees all of it (streaming replication) and refuses writes; up gave
    # each site's store role to its host through the active vault (A)
    assert c.active_url() == c.vault_url
    said = summary(c, c.vault_states(), data=c.root, detach=True)  # drsite up --ha's
    assert f"vault A {c.vault_url}  (pid {c.pids['vault']}, active)" in said, said
    assert f"vault B {c.vault_b_url}  (pid {c.pids['vault-secondary']}, standby;" in said, said
    with client(c, c.vault_b_url) as cb:
        until("the plan on the standby", lambda: any(p["name"] == "shop" for p in cb.plans()), 30)
        assert cb.controller()["role"] == "standby"
        hosts = {h["id"]: h["name"] for h in cb.hosts()}
        assert {s["name"]: hosts.get(s["store_host"]) for s in cb.sites()} \
            == {"primary": "primary-host", "secondary": "secondary-host"}
    r = httpx.post(c.vault_b_url + "/api/v1/sites", json={"name": "x"},
                   headers={"Authorization": f"Bearer {c.admin_token}"},
                   verify=tlsutil.client_context(c.ca_file), timeout=30)
    assert r.status_code == 503 and r.json()["code"] == "standby", r.text
    assert c.vault_url in r.json()["message"]

    # site A is lost: every one of its processes at once
    pg_a = c.pg("primary")
    victims = [c.pids["vault"], c.pids["agent-primary"], *cluster_pids(pg_a),
               *guest_pids(c, "primary")]
    t_kill = time.monotonic()
    for pid in victims:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    until("site A dead", lambda: all(gone(p) for p in victims), 20)

    out = cli("vault", "promote", "--vault", c.vault_b_url, "--token", c.admin_token,
              "--ca-file", str(c.ca_file), "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    promoted = json.loads(out.stdout)
    assert promoted["role"] == "active" and promoted["database_promoted"] is True
    t_promoted = time.monotonic()
    with client(c, c.vault_b_url) as cb:
        job = cb.plan_action("shop", "unplanned-failover")
        final = cb.wait_job(job["id"], timeout=180)
        assert final["state"] == "succeeded", job_said(final)
        t_done = time.monotonic()
        for n, item in items.items():
            rec = sec.find_vm(n)
            assert rec.power is PowerState.RUNNING, n
            fo = cb.failovers(item)[0]
            assert fo["kind"] == "unplanned" and fo["generation"] >= 2, fo
            assert equals_point(c, sec, rec.vm_id, item, fo["point_id"]), n
            assert cb.item(item)["protection"] == "failed_over"
    print(f"\nsite disaster, 3 VMs: promote {t_promoted - t_kill:.1f} s, failover "
          f"{t_done - t_promoted:.1f} s, RTO {t_done - t_kill:.1f} s (kill to all VMs running)")
    # break-glass on site B is refused while vault B answers; the refusal names both vaults
    # the agent follows, the one that answered and the one that did not
    p = cli("agent", "failover", items["web"], "--data", str(c.root / "secondary" / "agent"))
    said = " ".join(p.stderr.split())
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    assert f"the vault at {c.vault_b_url} answers ({c.vault_url} did not)" in said, said

    # site A returns: its database and vault first — fenced, a write refused naming B
    pg_a.start()
    start_vault(c)
    r = httpx.post(c.vault_url + "/api/v1/sites", json={"name": "split"},
                   headers={"Authorization": f"Bearer {c.admin_token}"},
                   verify=tlsutil.client_context(c.ca_file), timeout=30)
    assert r.status_code == 503 and r.json()["code"] == "standby", r.text
    assert c.vault_b_url in r.json()["message"] and "fenced" in r.json()["message"]
    # its agent follows B by itself; vault B fences the old primaries (VMs off). Its store
    # role is granted again (idempotent) through B, the active vault now: A, fenced, refuses
    assert c.active_url() == c.vault_b_url
    said = summary(c, c.vault_states(), data=c.root, detach=True)
    assert f"vault A {c.vault_url}  (pid {c.pids['vault']}, fenced:" in said, said
    assert f"vault B {c.vault_b_url}  (pid {c.pids['vault-secondary']}, active)" in said, said
    start_agent(c, "primary", store=True)
    with client(c, c.vault_b_url) as cb:
        for n, item in items.items():
            until(f"{n}: old primary fenced",
                  lambda item=item: (cb.failovers(item)[0]["result"].get("fence") or {})
                  .get("state") == "done", 60)
            assert prim.get_vm(vms[n]).power is not PowerState.RUNNING, n
            assert sec.find_vm(n).power is PowerState.RUNNING, n
    assert "following the active vault" in (c.root / "logs" / "agent-primary.log").read_text()

    # rejoin: vault A stopped, its cluster rewound onto B's, the fence lifted; back as standby
    os.killpg(c.pids.pop("vault"), signal.SIGTERM)
    until("vault A stopped", lambda: cli("vault", "rejoin", "--data", str(c.root / "vault"),
                                         "--pg", str(pg_a.directory), "--pg-port",
                                         str(pg_a.port), "--primary-port",
                                         str(c.pg_ports["secondary"]), "--slot",
                                         "drsite_primary").returncode == 0, 90)
    assert not (c.root / "vault" / "fenced.json").exists()
    start_vault(c)
    # the summary reads the roles from the vaults: B active, A its standby now
    said = summary(c, c.vault_states(), data=c.root, detach=True)
    assert f"vault A {c.vault_url}  (pid {c.pids['vault']}, standby;" in said, said
    assert f"vault B {c.vault_b_url}  (pid {c.pids['vault-secondary']}, active)" in said, said
    with client(c, c.vault_url) as ca:
        assert ca.controller()["role"] == "standby"
        until("B's failovers on the rejoined standby",
              lambda: all(ca.item(i)["protection"] == "failed_over" for i in items.values()), 30)

    # re-protect towards A through vault B (only differences travel), then a planned failback
    # to site A: every VM back equal to its recovery VM
    with client(c, c.vault_b_url) as cb:
        for action in ("commit", "reprotect"):
            jobs = [cb.item_action(i, action)["id"] for i in items.values()]
            for j in jobs:
                done = cb.wait_job(j, timeout=180)
                assert done["state"] == "succeeded", job_said(done)
        rev = {n: cb.failovers(i)[0]["result"]["reprotect"]["item_id"] for n, i in items.items()}
        for n, r in rev.items():
            assert cb.item(r)["protection"] == "protected" and cb.item(r)["site"] == "secondary"
            until(f"{n} replicates towards A", lambda r=r: len(cb.points(r)) >= 2, 90)
            assert prim.get_vm(vms[n]).power is not PowerState.RUNNING, n  # never on both
        jobs = [cb.item_action(r, "planned-failover")["id"] for r in rev.values()]
        for j in jobs:
            done = cb.wait_job(j, timeout=180)
            assert done["state"] == "succeeded", job_said(done)
        for n in VMS:
            back, rec = prim.find_vm(n), sec.find_vm(n)
            assert back.power is PowerState.RUNNING and rec.power is PowerState.STOPPED, n
            assert disks_digest(sec, rec.vm_id) == disks_digest(prim, back.vm_id), n


def test_active_vault_killed_mid_plan_then_promoted(ha: Cluster) -> None:
    """SIGKILL of the active vault (only it) while a plan's planned failover runs; the standby
    is promoted and its controller takes the job over: the plan finishes or fails with a hint,
    and no VM ever runs on both sites."""
    c = ha
    vms = {n: make_vm(c, n, 8, f"10.0.0.{60 + i}") for i, n in enumerate(("m1", "m2"))}
    prim, sec = hv(c, "primary"), hv(c, "secondary")

    def on_both() -> list[str]:
        return [n for n, v in vms.items() if prim.get_vm(v).power is PowerState.RUNNING
                and any(x.name == n and x.power is PowerState.RUNNING for x in sec.list_vms())]

    with c.client() as cl:
        setup(cl)
        items = {n: protect(cl, v)["id"] for n, v in vms.items()}
        cl.apply_plans([{"name": "p", "groups": [{"name": "one", "vms": ["m1"]},
                                                 {"name": "two", "vms": ["m2"]}]}])
        job = cl.plan_action("p", "planned-failover")
        until("plan running", lambda: cl.job(job["id"])["progress"] > 0
              or cl.job(job["id"])["state"] != "queued", 30)
    os.kill(c.pids["vault"], signal.SIGKILL)  # PostgreSQL A, the agents and the VMs live on
    out = cli("vault", "promote", "--vault", c.vault_b_url, "--token", c.admin_token,
              "--ca-file", str(c.ca_file), "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    with client(c, c.vault_b_url) as cb:
        deadline = time.monotonic() + 180
        while True:
            assert on_both() == [], "a VM runs on both sites"
            final = cb.job(job["id"])
            if final["state"] in ("succeeded", "failed", "cancelled"):
                break
            assert time.monotonic() < deadline, final
            time.sleep(0.2)
        assert final["state"] in ("succeeded", "failed"), final
        print(f"\nplan after the promotion: {final['state']}")
        if final["state"] == "failed":
            assert final["error"]["hint"], final
        else:
            for n, item in items.items():
                assert sec.find_vm(n).power is PowerState.RUNNING, n
                assert cb.item(item)["protection"] == "failed_over", n
        assert on_both() == []
        assert cb.controller()["role"] == "active"
