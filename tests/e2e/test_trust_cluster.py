"""Trust boundaries with real processes (issue 11): a vault (``drsite vault serve``) and two
agents (``drsite up``), a VM replicating to a cloud store (moto) whose credentials and keys the
vault holds. Secrets never reach the vault's database files in clear (raw bytes of vault.db,
-wal and -shm scanned for every credential and key, as text, base64 and raw bytes), and every
path under the vault's data directory is private (0700 / 0600), while it runs and after. A
second agent registering under the primary host's name is refused while the real one goes on;
the audit trail has every step; the master key is rotated with the CLI and the vault starts
again on the re-sealed database."""

from __future__ import annotations

import base64
import json
import stat
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from tests.cloud import server_or_skip
from tests.e2e.test_failover_cluster import cluster, make_vm, until

from drsite.agent.process import agent_register
from drsite.core.errors import Conflict
from drsite.store.factory import StoreSpec, ensure_bucket
from drsite.store.testing.servers import TEST_BUCKET, TEST_REGION, unique_prefix
from drsite.up import Cluster, down, start_vault
from drsite.vault.db.database import sqlite_url
from drsite.vault.masterkey import open_database
from drsite.vault.stores import get_store, row_spec

__all__ = ["cluster"]
pytestmark = pytest.mark.slow

ACCESS = f"AKIA-e2e-{uuid.uuid4().hex[:12]}"
SECRET = f"e2e-secret-{uuid.uuid4().hex}"


def s3_body() -> dict[str, Any]:
    srv = server_or_skip("moto")
    return {"name": "offsite", "kind": "s3",
            "config": {"bucket": TEST_BUCKET, "endpoint_url": srv.endpoint, "region": TEST_REGION,
                       "prefix": unique_prefix().rstrip("/")},
            "secret": {"access_key": ACCESS, "secret_key": SECRET}}


def vault_spec(c: Cluster) -> StoreSpec:
    """The store's spec as the vault holds it (opened with the vault's master key)."""
    db = open_database(sqlite_url(c.root / "vault" / "vault.db"), c.root / "vault" / "master.key")
    try:
        with db.read() as s:
            return row_spec(get_store(s, "offsite"))
    finally:
        db.dispose()


def needles(spec: StoreSpec) -> list[bytes]:
    out = [str(v).encode() for v in spec.secret.values()]
    for raw in spec.keys.values():
        out += [raw, base64.b64encode(raw), base64.urlsafe_b64encode(raw), raw.hex().encode()]
    return out


def scan(data: Path, found: list[bytes]) -> list[str]:
    files = [data / n for n in ("vault.db", "vault.db-wal", "vault.db-shm") if (data / n).exists()]
    assert data / "vault.db" in files
    return [f"{f.name}: {n[:12]!r}" for f in files for n in found if n in f.read_bytes()]


def not_private(data: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for p in [data, *data.rglob("*")]:
        if p.is_symlink():
            continue
        mode = stat.S_IMODE(p.stat().st_mode)
        if mode != (0o700 if p.is_dir() else 0o600):
            out[str(p.relative_to(data))] = oct(mode)
    return out


def test_secrets_sealed_and_files_private_with_real_processes(cluster: Cluster) -> None:
    body = s3_body()
    ensure_bucket(StoreSpec.from_dict(body))
    vm_id = make_vm(cluster, "sealed", 8, "10.0.0.9")
    data = cluster.root / "vault"
    with cluster.client() as cl:
        cl.create_store(body)
        cl.create_policy({"name": "cloudy", "frequency_s": 5.0, "retention_hours": 24,
                          "app_consistent_every_s": None, "rpo_threshold_s": 60,
                          "resync_window": "00:00-00:00", "compression": True, "encryption": True,
                          "bandwidth_limit_bps": None})
        cl.create_group({"name": "gc", "site": "primary", "target_site": "secondary",
                         "policy": "cloudy", "store": "offsite",
                         "match": {"vm_names": [], "hosts": [], "labels": []}})
        until("inventory", lambda: any(v["vm_id"] == vm_id for v in cl.vms()))
        job = cl.wait_job(cl.protect(vm_id, "gc")["job_id"], timeout=120)
        assert job["state"] == "succeeded", job
        item = next(it for it in cl.items() if it["vm_id"] == vm_id)
        n0 = len(cl.points(item["id"]))
        # a new key: the vault sends the new spec (credentials, keys) to the agent again
        assert len(cl.rotate_store_key("offsite")["key_ids"]) == 2
        until("points under the new key", lambda: len(cl.points(item["id"])) >= n0 + 2, 60)
        spec = vault_spec(cluster)
        assert spec.secret == body["secret"] and len(spec.keys) == 2
        # while the vault runs: WAL and SHM are there, nothing is in clear, everything private
        assert (data / "vault.db-wal").exists()
        assert scan(data, needles(spec)) == []
        assert not_private(data) == {}
        assert not_private(cluster.root / "logs") == {}
        # a second agent under the primary host's name, with a fresh site key: refused
        primary = next(hh for hh in cl.hosts() if hh["site"] == "primary")
        key = cl.registration_key("primary", 600)["key"]
        with pytest.raises(Conflict) as ei:
            agent_register(cluster.vault_url, key, cluster.root / "thief", primary["name"],
                           ca_file=cluster.ca_file)
        assert f"drsite hosts reissue {primary['name']}" in ei.value.hint
        n1 = len(cl.points(item["id"]))
        until("the real agent goes on", lambda: len(cl.points(item["id"])) > n1, 60)
        assert cl.host(primary["id"])["up"] is True
        # the audit trail of all this, from 127.0.0.1, without a secret
        rows: list[dict[str, Any]] = []
        page = cl.audit(limit=200)
        rows += page["entries"]
        while page["next_before"]:
            page = cl.audit(limit=200, before=page["next_before"])
            rows += page["entries"]
        did = {(e["actor"], e["action"], e["outcome"], e["error_code"]) for e in rows}
        hosts = {hh["id"] for hh in cl.hosts()}
        assert {e["actor"] for e in rows if e["action"] == "POST /api/v1/agent/register"
                and e["outcome"] == "ok"} == hosts
        for action in ("POST /api/v1/stores", "POST /api/v1/policies", "POST /api/v1/groups",
                       "POST /api/v1/items", "POST /api/v1/stores/{store}/rotate-key",
                       "POST /api/v1/sites/{site}/registration-keys"):
            assert ("admin", action, "ok", None) in did, action
        assert ("", "POST /api/v1/agent/register", "refused", "conflict") in did
        assert {e["client"] for e in rows} == {"127.0.0.1"}
        text = json.dumps(rows)
        assert all(n.decode("latin-1") not in text for n in needles(spec)[:2])
        assert key not in text and cluster.admin_token not in text
    down(cluster)
    assert scan(data, needles(spec)) == []
    assert not_private(data) == {}
    assert (data / "master.key").exists() and (data / "vault.lock").exists()
    # rotate the master key with the CLI (the vault is stopped), then start the vault again
    old_key = (data / "master.key").read_bytes()
    done = subprocess.run([sys.executable, "-m", "drsite.cli.main", "vault", "rotate-master-key",
                           "--data", str(data), "--json"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["values_resealed"] >= 2
    assert (data / "master.key").read_bytes() != old_key
    assert vault_spec(cluster) == spec
    assert scan(data, needles(spec)) == [] and not_private(data) == {}
    start_vault(cluster)
    with cluster.client() as cl:
        assert cl.store("offsite")["key_ids"] == sorted(spec.keys)
        assert any(e["action"] == "vault.rotate_master_key" for e in cl.audit(limit=50)["entries"])
