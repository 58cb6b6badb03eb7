"""Cloud recovery stores end to end, in process: a primary agent (against a fake vault)
protects a file VM into S3 (moto) and Azure Blob (Azurite) through ``open_store`` (retry,
concurrency, encryption), delta points arrive (also after an agent restart, which reopens the
item from its 0600 spec file), then the recovery site fails over from the cloud repository
(``open_item_repository``) and the recovery VM's disks equal the source at the point."""

from __future__ import annotations

import base64
import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from drsite.agent.daemon import Agent
from drsite.agent.process import agent_register
from drsite.agent.testing import FakeVault
from drsite.core.model import DiskSpec, VmSpec
from drsite.failover import actions as fo
from drsite.hypervisors.file.driver import FileHypervisor
from drsite.store.digest import file_digest, image_digest
from drsite.store.factory import StoreSpec, ensure_bucket, open_backend, open_item_repository
from drsite.store.generation import GenerationStore
from drsite.store.replica import ReplicaHydrator
from drsite.store.testing.servers import (
    AZURITE_KEY,
    TEST_ACCESS_KEY,
    TEST_BUCKET,
    TEST_REGION,
    TEST_SECRET_KEY,
    unique_prefix,
)
from tests.cloud import server_or_skip

pytestmark = pytest.mark.slow

MiB = 1 << 20
ITEM = "item-cloud"
SIZE = 8 * MiB
SETTINGS = {"frequency_s": 5, "app_consistent_every_s": None, "rpo_threshold_s": 600,
            "retention_hours": 24, "resync_window": "always"}
KEYS = {"k1": base64.b64encode(os.urandom(32)).decode(),
        "k2": base64.b64encode(os.urandom(32)).decode()}


def s3_spec() -> dict[str, Any]:
    srv = server_or_skip("moto")
    return {"kind": "s3", "name": "offsite-s3",
            "config": {"bucket": TEST_BUCKET, "endpoint_url": srv.endpoint, "region": TEST_REGION,
                       "prefix": unique_prefix(), "retry_base_delay_s": 0.01},
            "secret": {"access_key": TEST_ACCESS_KEY, "secret_key": TEST_SECRET_KEY},
            "keys": {"k1": KEYS["k1"]}, "active_key_id": "k1"}


def azure_spec() -> dict[str, Any]:
    srv = server_or_skip("azurite")
    return {"kind": "azure", "name": "offsite-azure",
            "config": {"container": "drsite-test", "account_url": srv.endpoint,
                       "prefix": unique_prefix(), "retry_base_delay_s": 0.01},
            "secret": {"account_key": AZURITE_KEY},
            "keys": {"k1": KEYS["k1"]}, "active_key_id": "k1"}


SPECS: dict[str, Callable[[], dict[str, Any]]] = {"s3-moto": s3_spec, "azure-azurite": azure_spec}


def _write(hv: FileHypervisor, vm_id: str, rng: np.random.Generator, n: int) -> None:
    for _ in range(n):
        d = f"d{int(rng.integers(0, 2))}"
        off = int(rng.integers(0, SIZE - 70_000))
        hv.write(vm_id, d, off, rng.integers(0, 256, 65_536, dtype=np.uint8).tobytes())


def _run(agent: Agent) -> threading.Thread:
    t = threading.Thread(target=agent.run, daemon=True)
    t.start()
    return t


def _stop(agent: Agent, t: threading.Thread) -> None:
    agent.stop()
    t.join(30)
    assert not t.is_alive()


@pytest.mark.parametrize("kind", sorted(SPECS))
def test_protect_to_cloud_restart_and_unplanned_failover(kind: str, tmp_path: Path) -> None:
    spec = SPECS[kind]()
    ensure_bucket(spec)
    vault = FakeVault(tmp_path / "vault")
    vault.start()
    try:
        pri = agent_register(vault.url, vault.registration_key("site-a"), tmp_path / "pri",
                             "pri-host", ca_file=vault.ca_file)
        hv = FileHypervisor(tmp_path / "vms")
        vm_spec = VmSpec(name="app", disks=(DiskSpec("d0", SIZE), DiskSpec("d1", SIZE)))
        vm = hv.create_blank(vm_spec)
        rng = np.random.default_rng(7)
        _write(hv, vm.vm_id, rng, 40)

        agent = Agent(tmp_path / "pri", hypervisor=hv, heartbeat_interval=0.3)
        t = _run(agent)
        args = {"vm_id": vm.vm_id, "target_site": "site-b", "store_url": "cloud:x",
                "settings": SETTINGS, "store": spec}
        r = vault.wait_final(vault.send(pri.host_id, "protect", ITEM, args), 60)
        assert r["status"] == "succeeded", r
        _write(hv, vm.vm_id, rng, 10)
        r = vault.wait_final(vault.send(pri.host_id, "cycle", ITEM, {}), 60)
        assert r["status"] == "succeeded", r
        assert r["result"]["point"]["kind"] == "delta"
        _stop(agent, t)

        # secrets only in the 0600 spec file; items.json names the store, nothing more
        spec_file = tmp_path / "pri" / "cloud-stores" / f"{ITEM}.json"
        assert spec_file.stat().st_mode & 0o777 == 0o600
        assert (spec_file.parent.stat().st_mode & 0o777) == 0o700
        assert json.loads(spec_file.read_text()) == StoreSpec.from_dict(spec).to_dict()
        items = (tmp_path / "pri" / "items.json").read_text()
        secret = next(iter(spec["secret"].values()))
        assert secret not in items and KEYS["k1"] not in items
        assert json.loads(items)["items"][0]["store_url"] == f"cloud:{spec['name']}"

        # restart: the item reopens from its spec file; a key rotation arrives with protect
        agent = Agent(tmp_path / "pri", hypervisor=hv, heartbeat_interval=0.3)
        t = _run(agent)
        _write(hv, vm.vm_id, rng, 10)
        r = vault.wait_final(vault.send(pri.host_id, "cycle", ITEM, {}), 60)
        assert r["status"] == "succeeded", r
        rotated = {**spec, "keys": KEYS, "active_key_id": "k2"}
        r = vault.wait_final(vault.send(pri.host_id, "protect", ITEM, {**args, "store": rotated}),
                             60)
        assert r["status"] == "succeeded", r
        _write(hv, vm.vm_id, rng, 10)
        r = vault.wait_final(vault.send(pri.host_id, "cycle", ITEM, {}), 60)
        assert r["status"] == "succeeded", r
        last = r["result"]["point"]
        assert last["seq"] == 4
        _stop(agent, t)
        source = {d: file_digest(hv.disk_path(vm.vm_id, d), SIZE) for d in ("d0", "d1")}

        # what is in the bucket is ciphertext, under both key ids
        raw = open_backend(StoreSpec.from_dict(spec))
        packs = [k for k in raw.list(f"items/{ITEM}/packs/")]
        heads = {raw.get_range(k, 0, 12)[:12] for k in packs}
        assert packs and all(h.startswith(b"DRSE") for h in heads)
        assert any(b"k1" in h for h in heads) and any(b"k2" in h for h in heads)

        # the primary site is gone: fail over from the cloud repository
        repo = open_item_repository(rotated, None, ITEM)
        assert repo.latest() is not None and repo.latest().point_id == last["point_id"]  # type: ignore[union-attr]
        assert {d: image_digest(repo.reader(last["point_id"], d)) for d in source} == source
        GenerationStore(repo.store).ensure(ITEM, "site-a", now=time.time())
        hv_b = FileHypervisor(tmp_path / "b-vms")
        item = fo.ProtectedItem(
            ITEM, vm.vm_id, vm_spec, fo.Site("site-a", None, tmp_path / "a-work"),
            fo.Site("site-b", hv_b, tmp_path / "b-work"), repo,
            ReplicaHydrator(repo, tmp_path / "b-work" / "replicas" / ITEM))
        res = fo.unplanned_failover(item, "latest", failover_id="uf-cloud")
        assert res.point_id == last["point_id"] and res.verified and res.generation == 2
        assert res.vm_id is not None
        got = {}
        for d in hv_b.get_vm(res.vm_id).disks:
            rd = hv_b.open_live_reader(res.vm_id, d.disk_id)
            try:
                got[d.disk_id] = image_digest(rd)
            finally:
                rd.close()
        assert got == source
        rec = GenerationStore(repo.store).read(ITEM)
        assert rec is not None and rec.primary == "site-b"
        for v in hv_b.list_vms():
            hv_b.power_off(v.vm_id, force=True)
        repo.close()
    finally:
        vault.stop()
