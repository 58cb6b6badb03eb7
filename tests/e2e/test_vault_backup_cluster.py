"""``drsite vault backup`` / ``restore`` with real processes (issue 14 part 5): a live vault is
backed up while agents replicate and an operator writes through the API; the backup is
restored into a new directory and started in place of the old vault: hosts, items, points,
tokens and the CA are all there, the agents (their certificates signed by the restored CA)
carry on, and replication goes on."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import pytest
from tests.e2e.test_cluster import until
from tests.e2e.test_failover_cluster import cluster, make_vm, protect, setup
from tests.procs import kill9

from drsite.client.api import VaultClient, VaultConfig
from drsite.up import Cluster, start_vault

__all__ = ["cluster"]
pytestmark = pytest.mark.slow
DRSITE = str(Path(sys.executable).parent / "drsite")


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([DRSITE, "vault", *args], capture_output=True, text=True, timeout=120)


def test_backup_a_live_vault_and_restore_it(cluster: Cluster, tmp_path: Path) -> None:
    vault_dir = cluster.root / "vault"
    vms = [make_vm(cluster, n, 8, f"10.0.0.{50 + i}") for i, n in enumerate(("k1", "k2"))]
    with cluster.client() as cl:
        setup(cl)
        items = [protect(cl, v)["id"] for v in vms]
        until("delta points", lambda: all(len(cl.points(i)) >= 2 for i in items), 60)
        reader = cl.create_token("reader-1", "reader")["token"]

        # under load: agents replicate (5 s policy) and an operator keeps writing
        stop = threading.Event()
        made: list[str] = []

        def writer() -> None:
            with cluster.client() as w:
                n = 0
                while not stop.is_set():
                    w.create_token(f"load-{n}", "reader")
                    made.append(f"load-{n}")
                    n += 1

        t = threading.Thread(target=writer)
        t.start()
        try:
            until("writes under way", lambda: len(made) >= 5, 30)
            # in the snapshot for certain: catalogued before the backup started
            points_before = {i: {pt["point_id"] for pt in cl.points(i)} for i in items}
            p = cli("backup", "--data", str(vault_dir), "--out", str(tmp_path / "v.tar"), "--json")
        finally:
            stop.set()
            t.join()
        assert p.returncode == 0, p.stderr
        rep = json.loads(p.stdout)
        hosts = {h["id"] for h in cl.hosts()}
        points_at_backup = {i: {pt["point_id"] for pt in cl.points(i)} for i in items}

    # the backup holds neither the master key nor a private key in clear
    key_b64 = (vault_dir / "master.key").read_text().strip()
    ca_key = (vault_dir / "pki" / "ca.key").read_bytes()
    with tarfile.open(tmp_path / "v.tar") as tar:
        names = tar.getnames()
        blob = b"".join(tar.extractfile(m).read() for m in tar.getmembers() if m.isfile())  # type: ignore[union-attr]
    assert (tmp_path / "v.tar").stat().st_mode & 0o777 == 0o600
    assert "master.key" not in names and "pki/ca.key" not in names and "pki/ca.key.sealed" in names
    assert key_b64.encode() not in blob and base64.b64decode(key_b64) not in blob
    assert ca_key not in blob and b"PRIVATE KEY" not in blob
    assert rep["master_key_id"].startswith("mk-")

    # the vault's host is lost; its master key was kept apart
    kill9(cluster.pids["vault"])
    kept_key = tmp_path / "kept-master.key"
    kept_key.write_text(key_b64 + "\n")
    kept_key.chmod(0o600)
    vault_dir.rename(cluster.root / "vault-lost")

    # a wrong key is refused; then the restore
    wrong = tmp_path / "wrong.key"
    wrong.write_text(base64.b64encode(b"x" * 32).decode() + "\n")
    wrong.chmod(0o600)
    p = cli("restore", "--from", str(tmp_path / "v.tar"), "--data", str(vault_dir),
            "--master-key-file", str(wrong))
    assert p.returncode == 2 and "secret_unreadable" in p.stderr and not vault_dir.exists(), p
    p = cli("restore", "--from", str(tmp_path / "v.tar"), "--data", str(vault_dir),
            "--master-key-file", str(kept_key), "--json")
    assert p.returncode == 0, p.stderr
    assert (vault_dir / "pki" / "ca.key").read_bytes() == ca_key
    assert (vault_dir / "master.key").stat().st_mode & 0o777 == 0o600

    start_vault(cluster)
    # a running vault is never restored over
    p = cli("restore", "--from", str(tmp_path / "v.tar"), "--data", str(vault_dir),
            "--master-key-file", str(kept_key), "--force")
    assert p.returncode == 2 and "running" in p.stderr, p
    with cluster.client() as cl:
        assert {h["id"] for h in cl.hosts()} == hosts
        until("both agents heard by the restored vault",
              lambda: all(h["up"] for h in cl.hosts()), 30)
        assert {i["id"] for i in cl.items()} >= set(items)
        for i in items:
            assert points_before[i] <= {pt["point_id"] for pt in cl.points(i)}
            # a point catalogued while the backup ran may be newer than the snapshot: the
            # restored vault's acknowledgement is behind the agent's, which sends it again
            until(f"{i}: every point catalogued by the end of the backup",
                  lambda i=i: points_at_backup[i] <= {pt["point_id"] for pt in cl.points(i)}, 30)
            until(f"{i} replicates on", lambda i=i: len(cl.points(i)) > len(points_at_backup[i]), 60)
        # tokens: the old admin token (what start_vault read from the restored file) works and
        # lists the tokens of the snapshot: made before the backup, or during it
        names = {t["name"] for t in cl.tokens()}
        assert "reader-1" in names and names - {"admin", "reader-1"} <= set(made), names
    with VaultClient(VaultConfig(cluster.vault_url, reader, cluster.ca_file, timeout=10)) as rc:
        assert {i["id"] for i in rc.items()} >= set(items)
