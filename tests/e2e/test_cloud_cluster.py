"""Cloud recovery stores with real processes: a vault and two agents (``drsite up``); a store is
configured through the API (credentials kept by the vault), a group replicates to it, delta
points arrive, the primary site is lost, and an unplanned failover through the API starts the
VM on the recovery site from the cloud store: its disks equal the point, by digest."""

from __future__ import annotations

import time
from typing import Any

import pytest
from tests.cloud import server_or_skip
from tests.e2e.test_failover_cluster import cluster, hv, make_vm, until
from tests.procs import kill9

from drsite.core.model import PowerState
from drsite.store.digest import file_digest, image_digest
from drsite.store.factory import ensure_bucket, store_repository
from drsite.store.testing.servers import (
    AZURITE_KEY,
    TEST_ACCESS_KEY,
    TEST_BUCKET,
    TEST_REGION,
    TEST_SECRET_KEY,
    unique_prefix,
)
from drsite.up import Cluster

__all__ = ["cluster"]
pytestmark = pytest.mark.slow


def s3_body() -> dict[str, Any]:
    srv = server_or_skip("moto")
    return {"name": "offsite", "kind": "s3",
            "config": {"bucket": TEST_BUCKET, "endpoint_url": srv.endpoint, "region": TEST_REGION,
                       "prefix": unique_prefix().rstrip("/")},
            "secret": {"access_key": TEST_ACCESS_KEY, "secret_key": TEST_SECRET_KEY}}


def azure_body() -> dict[str, Any]:
    srv = server_or_skip("azurite")
    return {"name": "offsite", "kind": "azure",
            "config": {"container": "drsite-e2e", "account_url": srv.endpoint,
                       "prefix": unique_prefix().rstrip("/")},
            "secret": {"account_key": AZURITE_KEY}}


BODIES = {"s3-moto": s3_body, "azure-azurite": azure_body}


@pytest.mark.parametrize("kind", sorted(BODIES))
def test_protect_to_cloud_and_unplanned_failover_from_it(kind: str, cluster: Cluster) -> None:
    body = BODIES[kind]()
    vm_id = make_vm(cluster, "crm", 8, "10.0.0.7")
    with cluster.client() as cl:
        created = cl.create_store(body)
        secret = next(iter(body["secret"].values()))
        assert secret not in str(created) and secret not in str(cl.stores())
        from drsite.vault.db.database import sqlite_url
        from drsite.vault.masterkey import open_database
        from drsite.vault.stores import store_spec

        db = open_database(sqlite_url(cluster.root / "vault" / "vault.db"),
                           cluster.root / "vault" / "master.key")
        try:
            with db.read() as s:
                from drsite.vault.stores import get_store

                spec = store_spec(s, get_store(s, "offsite").id)
        finally:
            db.dispose()
        ensure_bucket(spec)   # operators create buckets; the test does it for them
        cl.create_policy({"name": "cloudy", "frequency_s": 5.0, "retention_hours": 24,
                          "app_consistent_every_s": None, "rpo_threshold_s": 60,
                          "resync_window": "00:00-00:00", "compression": True, "encryption": True,
                          "bandwidth_limit_bps": None})
        cl.create_group({"name": "gc", "site": "primary", "target_site": "secondary",
                         "policy": "cloudy", "store": "offsite",
                         "match": {"vm_names": [], "hosts": [], "labels": []}})
        cl.set_network_mapping({"source_site": "primary", "recovery_site": "secondary",
                                "source_network": "prod", "recovery_network": "dr"})
        until("inventory", lambda: any(v["vm_id"] == vm_id for v in cl.vms()))
        job = cl.wait_job(cl.protect(vm_id, "gc")["job_id"], timeout=120)
        assert job["state"] == "succeeded", job
        item = next(it for it in cl.items() if it["vm_id"] == vm_id)
        n0 = len(cl.points(item["id"]))
        until("delta points in the cloud store", lambda: len(cl.points(item["id"])) >= n0 + 2, 60)

        # the primary site is lost: its agent dies, its VM is gone
        kill9(cluster.pids["agent-primary"])
        hv(cluster, "primary").power_off(vm_id, force=True)
        time.sleep(1)
        point = cl.points(item["id"])[-1]["point_id"]
        fo_job = cl.item_action(item["id"], "unplanned-failover", point=point)
        final = cl.wait_job(fo_job["id"], timeout=180)
        assert final["state"] == "succeeded", final
        fo = cl.failovers(item["id"])[0]
        assert fo["point_id"] == point and fo["state"] == "pending_commit"
        sec = hv(cluster, "secondary")
        rec = sec.find_vm("crm")
        assert rec.power is PowerState.RUNNING
        repo = store_repository(spec, item["id"])
        try:
            for d in rec.disks:
                assert file_digest(sec.disk_path(rec.vm_id, d.disk_id), d.size) == \
                    image_digest(repo.reader(point, d.disk_id))
        finally:
            repo.close()
        # nothing of the VM's data went through the secondary's own store
        assert not (cluster.root / "secondary" / "store" / "items" / item["id"]).exists()
