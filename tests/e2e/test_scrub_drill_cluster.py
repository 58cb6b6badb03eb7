"""Scrub, repair, verify and drills with real processes: a vault and two agents (``drsite up``)
on 127.0.0.1, file VMs, one cluster shared by the tests of this module.

On the secondary's store (its files, as a failing disk or a careless hand would) one pack gets
16 flipped bytes, another is truncated, and the map of an older point is deleted: the secondary
agent's scrub finds each within one scrub interval; the item turns warning and a
``store_damage`` alert is raised; the newest point is repaired from the source (its restore
equals the source by digest); the older point whose map is gone is marked damaged and refused as
a failover choice with a message naming a command; ``drsite items verify`` (a real CLI process)
exits 0 on the repaired point and 1 on a damaged one. Drills of a two-group plan: the first is
started by the plan's schedule and passes (report with RPO, RTO, verification and probe per
VM); one whose probe fails fails, still cleans up and raises a ``drill`` alert; ``drsite drills
run`` (a CLI process) passes and the alert clears."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
from tests.e2e.test_cluster import until
from tests.e2e.test_failover_cluster import hv, make_vm, protect

from drsite.client.api import VaultClient
from drsite.core.errors import Conflict
from drsite.core.model import PowerState
from drsite.store.digest import image_digest
from drsite.store.local.backend import LocalObjectStore
from drsite.store.repository import Repository
from drsite.store.scrub import references
from drsite.up import Cluster, down, up

pytestmark = pytest.mark.slow
SCRUB_S = 10.0  # the policy's scrub interval (the smallest a policy takes)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = up(tmp_path_factory.mktemp("scrub-drill") / "c")
    try:
        with c.client() as cl:
            cl.create_policy({"name": "fast", "frequency_s": 5.0, "retention_hours": 24,
                              "app_consistent_every_s": None, "rpo_threshold_s": 60,
                              "resync_window": "00:00-00:00", "compression": True,
                              "encryption": False, "bandwidth_limit_bps": None,
                              "scrub_interval_s": SCRUB_S, "scrub_rate_bps": 64 << 20})
            cl.create_group({"name": "g", "site": "primary", "target_site": "secondary",
                             "policy": "fast", "match": {"vm_names": [], "hosts": [], "labels": []}})
            cl.set_network_mapping({"source_site": "primary", "recovery_site": "secondary",
                                    "source_network": "prod", "recovery_network": "dr",
                                    "test_network": "dr-test",
                                    "ip_rule": {"kind": "subnet", "source": "10.0.0.0/24",
                                                "target": "10.9.0.0/24"}})
        yield c
    finally:
        down(c)
        for site in ("primary", "secondary"):
            h = hv(c, site)
            for vm in h.list_vms():
                h.power_off(vm.vm_id, force=True)


def cli(c: Cluster, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``drsite ARGS`` as its own process, configured from the environment as a user would."""
    env = {**os.environ, "DRSITE_VAULT_URL": c.vault_url, "DRSITE_TOKEN": c.admin_token,
           "DRSITE_CA_FILE": str(c.ca_file), "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "drsite.cli.main", *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


def finding_keys(cl: VaultClient, item_id: str) -> set[str]:
    return {str(f["key"]) for f in (cl.item(item_id).get("scrub") or {}).get("findings") or []}


def active(cl: VaultClient, kind: str) -> list[dict[str, Any]]:
    return [a for a in cl.alerts() if a["kind"] == kind and a["active"]]


def test_scrub_finds_damage_repairs_the_newest_point_refuses_older(cluster: Cluster) -> None:
    prim = hv(cluster, "primary")
    vm_id = make_vm(cluster, "scr", 8, "10.0.0.40")
    store_root = cluster.root / "secondary" / "store"
    with cluster.client() as cl:
        iid = protect(cl, vm_id)["id"]
        until("delta points", lambda: len(cl.points(iid)) >= 3, 60)
        prim.set_workload(vm_id, None)  # the source stops changing: its disk is the reference
        n = len(cl.points(iid))
        until("points after the last write", lambda: len(cl.points(iid)) >= n + 2, 60)
        until("a clean scrub pass", lambda: (cl.item(iid).get("scrub") or {}).get("complete"),
              3 * SCRUB_S)
        it = cl.item(iid)
        assert it["health"] == "normal" and it["damaged_points"] == [], it
        assert active(cl, "store_damage") == []

        repo = Repository(LocalObjectStore(store_root), iid)
        try:
            latest = repo.latest()
            assert latest is not None
            newest = latest.point_id
            refs = references(repo)
        finally:
            repo.close()
        # two packs the newest point needs (repairable), and a map only older points need
        shared = sorted(k for k, pts in refs.items() if k.startswith("packs/") and newest in pts)
        older_only = sorted(k for k, pts in refs.items()
                            if k.startswith("maps/") and newest not in pts)
        assert len(shared) >= 2 and older_only, refs
        flip, trunc, gone = shared[0], shared[-1], older_only[0]
        lost = sorted(refs[gone])  # the older point(s) that cannot be repaired
        key = f"items/{iid}/"
        damaged_at = time.time()
        t0 = time.monotonic()
        with open(store_root / (key + flip), "r+b") as f:
            f.seek(100)
            chunk = f.read(16)
            f.seek(100)
            f.write(bytes(b ^ 0xFF for b in chunk))
        os.truncate(store_root / (key + trunc), (store_root / (key + trunc)).stat().st_size - 1000)
        os.unlink(store_root / (key + gone))

        # found within one scrub interval (plus one pass and a heartbeat)
        until("the scrub finds all three", lambda: {flip, trunc, gone} <= finding_keys(cl, iid),
              3 * SCRUB_S)
        assert time.monotonic() - t0 <= SCRUB_S + 10
        for k in (flip, trunc):  # moved aside, kept as evidence
            assert not (store_root / (key + k)).exists()
            assert list((store_root / key / "quarantine").glob(f"{k}.*")), k
        (alert,) = until("store_damage alert", lambda: active(cl, "store_damage"), 15)
        assert alert["subject"] == "scr"

        # the newest point is repaired from the source: a resync point equal to the source
        rp = until("the repair point", lambda: next(
            (p for p in cl.points(iid) if p["kind"] == "resync" and p["created_at"] > damaged_at),
            None), 60)
        repo = Repository(LocalObjectStore(store_root), iid)
        try:
            src = prim.open_live_reader(vm_id, "d0")
            try:
                want = image_digest(src)
            finally:
                src.close()
            assert image_digest(repo.reader(rp["point_id"], "d0")) == want
        finally:
            repo.close()

        # after the next pass: the older points stay damaged (warning, how many, refused)
        def settled() -> dict[str, Any] | None:
            it = cl.item(iid)
            ok = (set(lost) <= set(it["damaged_points"])
                  and rp["point_id"] not in it["damaged_points"]
                  and (it.get("scrub") or {}).get("pass_started_at", 0) > rp["created_at"])
            return it if ok else None

        it = until("the repaired item", settled, 3 * SCRUB_S)
        assert it["health"] == "warning", it
        assert any("older recovery point(s) cannot be restored" in r for r in it["health_reasons"])
        assert not any("critical" in r for r in it["health_reasons"]), it
        (alert,) = active(cl, "store_damage")
        assert "older recovery point(s) of scr cannot be restored" in alert["message"], alert
        assert active(cl, "critical") == []
        with pytest.raises(Conflict) as refused:
            cl.item_action(iid, "test-failover", point=lost[0])
        assert "cannot be restored" in refused.value.message
        assert f"drsite items points {iid}" in (refused.value.hint or "")
        damaged = {p["point_id"]: p["damage"] for p in cl.points(iid) if p["damage"]}
        assert damaged[lost[0]]["by"] == "scrub" and rp["point_id"] not in damaged

    # drsite items verify as a real process: the repaired point restores exactly (exit 0),
    # a damaged one does not (exit 1)
    good = cli(cluster, "items", "verify", iid, "--point", rp["point_id"])
    assert good.returncode == 0, good.stdout + good.stderr
    assert want[:16] in good.stdout, good.stdout
    bad = cli(cluster, "items", "verify", iid, "--point", lost[0])
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "cannot be restored" in " ".join((bad.stdout + bad.stderr).split())


PROBE_OK = ('test -n "$DRSITE_DRILL_VM_ID" && case "$DRSITE_DRILL_IPS" in 10.9.0.*) exit 0;; '
            'esac; echo "unexpected address $DRSITE_DRILL_IPS"; exit 3')


def test_drills_scheduled_failed_probe_and_by_hand(cluster: Cluster) -> None:
    sec = hv(cluster, "secondary")
    vms = {n: make_vm(cluster, n, 8, f"10.0.0.{41 + i}") for i, n in enumerate(("ddb", "dweb"))}
    with cluster.client() as cl:
        items = {n: protect(cl, v)["id"] for n, v in vms.items()}
        for iid in items.values():
            until("a delta point", lambda iid=iid: len(cl.points(iid)) >= 2, 60)
        cl.apply_plans([{"name": "shop", "groups": [{"name": "db", "vms": ["ddb"]},
                                                    {"name": "web", "vms": ["dweb"]}],
                         "drill": {"every_s": "weekly", "window": None, "boot_timeout_s": 30,
                                   "probe": {"script": PROBE_OK, "timeout_s": 10}}}])
        # never drilled: the schedule starts one at once
        (d,) = until("the scheduled drill", lambda: cl.drills("shop"), 30)
        assert d["trigger"] == "schedule"
        cl.wait_job(d["job_id"], timeout=120)
        d = cl.drill(d["id"])
        assert d["state"] == "passed", d
        rep = d["report"]
        assert rep["ok"] and rep["cleaned_up"] and len(rep["vms"]) == 2
        for v in rep["vms"]:
            pids = [p["point_id"] for p in cl.points(items[v["vm"]])]
            assert v["point_id"] in pids and v["verified"] is True, v
            assert v["probe"]["rc"] == 0 and v["guest_ready"] is True
            # RPO 0: the point used was made after the failover was asked for
            assert 0 <= v["rpo_s"] < 60 and 0 < v["rto_s"] < 60, v
        assert d["rto_s"] == max(v["rto_s"] for v in rep["vms"])
        assert not [v for v in sec.list_vms() if v.name.endswith("-test")]  # cleaned up
        assert active(cl, "drill") == []

        # a probe that never passes: the drill fails, still cleans up, and raises an alert
        started = cl.run_drill("shop", boot_timeout_s=3,
                               probe={"script": 'echo "no answer from $DRSITE_DRILL_IPS"; exit 7',
                                      "timeout_s": 2})
        job = cl.wait_job(started["job_id"], timeout=120)
        assert job["state"] == "failed" and "probe did not pass" in job["error"]["message"], job
        d = cl.drill(started["drill_id"])
        assert d["state"] == "failed" and d["trigger"] == "hand"
        v = d["report"]["vms"][0]
        assert v["probe"]["rc"] == 7 and "no answer from 10.9.0." in v["probe"]["output"], v
        until("test VMs removed", lambda: not [v for v in sec.list_vms()
                                               if v.name.endswith("-test")], 60)
        (alert,) = until("the drill alert", lambda: active(cl, "drill"), 15)
        assert alert["subject"] == "shop" and "probe did not pass" in alert["message"]

    # by hand from the CLI (a real process): it passes, exit code 0, and the alert clears
    until("the failed drill's cleanup ended", lambda: not [
        j for j in cl_jobs(cluster) if j["state"] in ("queued", "running")], 60)
    out = cli(cluster, "drills", "run", "shop")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "passed" in " ".join(out.stdout.split())
    with cluster.client() as cl:
        until("the drill alert cleared", lambda: active(cl, "drill") == [], 15)
        assert [x["state"] for x in cl.drills("shop")] == ["passed", "failed", "passed"]
        assert all(v.power is not PowerState.RUNNING for v in sec.list_vms()
                   if v.name.endswith("-test"))


def cl_jobs(c: Cluster) -> list[dict[str, Any]]:
    with c.client() as cl:
        return cl.jobs()


def test_a_group_drill_schedule_set_from_the_cli(cluster: Cluster) -> None:
    """``drsite drills schedule --group``: the group's protected VMs are drilled at once (never
    drilled before), in parallel, and the schedule ends with ``--off``."""
    out = cli(cluster, "drills", "schedule", "--group", "g", "--every", "weekly",
              "--boot-timeout", "30", "--probe", 'test "$DRSITE_DRILL_GROUP" = g')
    assert out.returncode == 0, out.stdout + out.stderr
    sec = hv(cluster, "secondary")
    with cluster.client() as cl:
        assert cl.group("g")["drill"]["every_s"] == 7 * 86400
        (d,) = until("the group's drill", lambda: cl.drills(group="g"), 30)
        assert d["trigger"] == "schedule" and d["plan"] is None
        assert cl.wait_job(d["job_id"], timeout=120)["state"] == "succeeded"
        d = cl.drill(d["id"])
        assert d["state"] == "passed", d
        protected = sorted(it["vm_name"] for it in cl.items() if it["protection"] == "protected")
        assert sorted(v["vm"] for v in d["report"]["vms"]) == protected
        assert all(v["verified"] and v["probe"]["rc"] == 0 for v in d["report"]["vms"])
        assert not [v for v in sec.list_vms() if v.name.endswith("-test")]
    out = cli(cluster, "drills", "schedule", "--group", "g", "--off")
    assert out.returncode == 0, out.stdout + out.stderr
    with cluster.client() as cl:
        assert cl.group("g")["drill"] is None
    bad = cli(cluster, "drills", "run", "shop", "--group", "g")
    assert bad.returncode != 0 and "one of them" in " ".join((bad.stdout + bad.stderr).split())
