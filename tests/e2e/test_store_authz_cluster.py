"""Store authorization with real processes (issue 11): a vault and three agents (``drsite vault
serve``, ``drsite agent run``): two sites serving a store each, and a third site whose host
protects one VM to each store. That host's certificate works on both stores for its own items
only; its refused delete/overwrite reaches the vault's audit trail; once it is revoked, both
stores refuse it within one heartbeat interval. A point planted through a store's files is
refused by a test failover (job failed, security alert)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tests.e2e.test_cluster import until

from drsite.agent.registration import AgentIdentity
from drsite.core.errors import Conflict, Forbidden
from drsite.core.model import DiskSpec, Nic, VmSpec
from drsite.hypervisors.file import FileHypervisor
from drsite.sitestore.client import SiteObjectStore
from drsite.store.format import canonical_json, hex_hash
from drsite.up import Cluster, down, start_agent, start_vault

pytestmark = pytest.mark.slow

MiB = 1 << 20
HEARTBEAT_S = 2.0          # the agents' heartbeat interval (drsite agent run's default)
SLACK_S = 1.5              # the heartbeat's own round trip and the poll, on a loaded machine


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster((tmp_path / "c").resolve())
    c.root.mkdir(parents=True)
    c.hypervisor = "file"
    try:
        start_vault(c)
        start_agent(c, "secondary", store=True)
        start_agent(c, "primary", store=True)
        start_agent(c, "third", store=False)
        yield c
    finally:
        down(c)
        h = FileHypervisor(c.root / "third" / "vms")
        for vm in h.list_vms():
            h.power_off(vm.vm_id, force=True)


def make_vm(c: Cluster, name: str, mac: str) -> str:
    h = FileHypervisor(c.root / "third" / "vms")
    vm = h.create_blank(VmSpec(name=name, nics=(Nic("prod", mac, "10.0.0.5"),),
                               disks=(DiskSpec("d0", 8 * MiB),)))
    h.write(vm.vm_id, "d0", 0, np.random.default_rng(3).integers(0, 256, MiB, np.uint8).tobytes())
    h.power_on(vm.vm_id)
    return vm.vm_id


def protect_both(c: Cluster) -> dict[str, dict[str, Any]]:
    """vm-s → secondary's store, vm-p → primary's; returns site → item."""
    vms = {"secondary": make_vm(c, "vm-s", "52:54:00:00:01:01"),
           "primary": make_vm(c, "vm-p", "52:54:00:00:01:02")}
    with c.client() as cl:
        cl.create_policy({"name": "fast", "frequency_s": 5.0, "retention_hours": 24,
                          "app_consistent_every_s": None, "rpo_threshold_s": 60,
                          "resync_window": "00:00-00:00", "compression": True,
                          "encryption": False, "bandwidth_limit_bps": None})
        out: dict[str, dict[str, Any]] = {}
        for site, vm_id in vms.items():
            cl.create_group({"name": f"to-{site}", "site": "third", "target_site": site,
                             "policy": "fast",
                             "match": {"vm_names": [f"vm-{site[0]}"], "hosts": [], "labels": []}})
            until("inventory", lambda vm_id=vm_id: any(v["vm_id"] == vm_id for v in cl.vms()))
            try:
                job = cl.wait_job(cl.protect(vm_id, f"to-{site}")["job_id"], timeout=120)
                assert job["state"] == "succeeded", job
            except Conflict:
                pass  # the group's policy protected it already (auto-protection)
            out[site] = until(f"{site} item protected", lambda vm_id=vm_id: next(
                (it for it in cl.items() if it["vm_id"] == vm_id
                 and it["protection"] == "protected"), None), timeout=120)
        cl.set_network_mapping({"source_site": "third", "recovery_site": "secondary",
                                "source_network": "prod", "recovery_network": "dr",
                                "test_network": "dr-test",
                                "ip_rule": {"kind": "subnet", "source": "10.0.0.0/24",
                                            "target": "10.9.0.0/24"}})
    return out


def store_urls(c: Cluster) -> dict[str, str]:
    with c.client() as cl:
        return {h["site"]: h["store_url"] for h in cl.hosts() if h.get("store_url")}


def test_store_access_revocation_audit_and_forged_points(cluster: Cluster) -> None:
    c = cluster
    items = protect_both(c)
    third = AgentIdentity.load(c.root / "third" / "agent")
    urls = store_urls(c)
    clients = {site: SiteObjectStore(urls[site], third.client_context()) for site in items}
    try:
        # its own items, on both stores; nothing of another host's store content
        for site, item in items.items():
            keys = list(clients[site].list(f"items/{item['id']}/"))
            assert any("/points/" in k for k in keys), (site, keys)
            other = next(s for s in items if s != site)
            with pytest.raises(Forbidden):
                list(clients[site].list(f"items/{items[other]['id']}/"))
        # refused delete and overwrite of a committed point: in the vault's audit trail
        sec_item = items["secondary"]["id"]
        manifest = next(k for k in clients["secondary"].list(f"items/{sec_item}/points/"))
        with pytest.raises(Forbidden, match="cannot be deleted remotely"):
            clients["secondary"].delete(manifest)
        with pytest.raises(Forbidden, match="cannot be overwritten remotely"):
            clients["secondary"].put(manifest, b"{}", overwrite=True)
        with c.client() as cl:
            def audited() -> list[dict[str, Any]]:
                return [e for e in cl.audit(limit=200, actor=third.host_id)["entries"]
                        if e["action"] in ("store.delete", "store.overwrite")
                        and manifest in e["target"] and e["outcome"] == "refused"]
            until("store audit rows", lambda: len(audited()) == 2, timeout=30)
            assert {e["action"] for e in audited()} == {"store.delete", "store.overwrite"}

            # a point planted through the secondary store's files: a test failover refuses it
            store_dir = c.root / "secondary" / "store" / "items" / sec_item / "points"
            env = json.loads((store_dir / manifest.rsplit("/", 1)[1]).read_bytes())
            body = dict(env["body"], point_id="p000000009999", seq=9999,
                        created_at=time.time() + 5)
            (store_dir / "p000000009999").write_bytes(canonical_json(
                {"blake3": hex_hash(canonical_json(body)), "body": body}))
            job = cl.wait_job(cl.item_action(sec_item, "test-failover")["id"], timeout=120)
            assert job["state"] == "failed", job
            assert job["error"]["code"] == "point_not_authentic", job["error"]
            until("security alert", lambda: any(
                a["kind"] == "security" and "not authentic" in a["message"]
                for a in cl.alerts()), timeout=20)
            (store_dir / "p000000009999").unlink()

            # revoked: every store refuses the certificate within one heartbeat interval
            cl._call("DELETE", f"/hosts/{third.host_id}")
        t0 = time.monotonic()
        refused_after: dict[str, float] = {}
        while len(refused_after) < len(items) and time.monotonic() - t0 < 30:
            for site, item in items.items():
                if site in refused_after:
                    continue
                try:
                    list(clients[site].list(f"items/{item['id']}/"))
                except Forbidden as e:
                    assert "revoked" in e.message or "not a host" in e.message, e
                    refused_after[site] = time.monotonic() - t0
            time.sleep(0.05)
        assert set(refused_after) == set(items), refused_after
        assert max(refused_after.values()) <= HEARTBEAT_S + SLACK_S, refused_after
    finally:
        for cl_ in clients.values():
            cl_.close()
