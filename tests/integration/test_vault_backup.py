"""``drsite vault backup`` / ``restore`` (issue 14 part 5) on a real vault (SQLite, its own CA,
sealed secrets): what a backup holds and does not (the master key), the restore's refusals
(wrong key, damaged archive, a running vault, a vault without --force, a directory that is not
a vault), --force keeping the old vault aside, and a restored vault learning again the points
reported after the backup."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import sqlite3
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest
from blake3 import blake3
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from sqlalchemy import select

from drsite.core.errors import Conflict, CorruptData, InvalidInput, SecretUnreadable
from drsite.core.states import ItemProtection
from drsite.vault import storeacl
from drsite.vault.backup import backup, restore
from drsite.vault.db.database import sqlite_url
from drsite.vault.db.models import Item, Store
from drsite.vault.masterkey import open_database
from drsite.vault.testing import Agent, Harness, point, report
from tests.integration.test_vault_api import policy_and_group, protect, two_sites


def _key_file(path: Path, key: bytes) -> Path:
    path.write_text(base64.b64encode(key).decode() + "\n")
    path.chmod(0o600)
    return path


def test_backup_holds_no_master_key_and_restore_refuses_what_it_must(tmp_path: Path) -> None:
    data = tmp_path / "vault"
    h = Harness(data)
    try:
        h.token("reader", "r1")
        secret = {"access_key": "AKIABACKUPTEST", "secret_key": "sEcReT-of-the-bucket-0123"}
        h.ok("POST", "/stores", json={"name": "offsite", "kind": "s3", "secret": secret,
                                     "config": {"bucket": "b-offsite", "prefix": "p",
                                                "endpoint_url": "http://127.0.0.1:9"}})
        out = tmp_path / "b.tar"
        rep = backup(data, out)                      # while the vault runs
        assert out.stat().st_mode & 0o777 == 0o600
        with tarfile.open(out) as tar:
            names = set(tar.getnames())
        assert {"manifest.json", "vault.db", "pki/ca.pem", "pki/ca.key.sealed",
                "admin.token.sealed"} <= names and "master.key" not in names
        key = (data / "master.key").read_text().strip()
        assert key.encode() not in out.read_bytes()
        assert secret["secret_key"].encode() not in out.read_bytes()   # sealed in the snapshot
        kept = _key_file(tmp_path / "kept.key", base64.b64decode(key))
        # a running vault is never restored over, even with --force
        with pytest.raises(Conflict, match="running"):
            restore(out, data, master_key_file=kept, force=True)
        with pytest.raises(InvalidInput, match="SQLite"):
            backup(data, tmp_path / "pg.tar", db_url="postgresql+psycopg://u@127.0.0.1/x")
    finally:
        h.close()
    # the wrong key; a damaged archive; a target that holds a vault; a non-empty non-vault
    with pytest.raises(SecretUnreadable, match=rep.master_key_id):
        restore(out, tmp_path / "new", master_key_file=_key_file(tmp_path / "w.key", b"w" * 32))
    bad = bytearray(out.read_bytes())
    i = bad.index(b"BEGIN CERTIFICATE") + 20
    bad[i] ^= 1
    (tmp_path / "bad.tar").write_bytes(bytes(bad))
    with pytest.raises(CorruptData, match="do not match its manifest"):
        restore(tmp_path / "bad.tar", tmp_path / "new", master_key_file=kept)
    with pytest.raises(Conflict, match="holds a vault already"):
        restore(out, data, master_key_file=kept)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x").write_text("x")
    with pytest.raises(Conflict, match="not empty"):
        restore(out, tmp_path / "other", master_key_file=kept)
    assert not (tmp_path / "new").exists()
    assert not [p for p in tmp_path.iterdir() if ".restore-" in p.name]   # nothing left behind
    # --force over a stopped vault: the old one is kept aside
    res = restore(out, data, master_key_file=kept, force=True)
    assert res["replaced"] and Path(res["replaced"]).is_dir()
    assert (data / "master.key").stat().st_mode & 0o777 == 0o600
    db = open_database(sqlite_url(data / "vault.db"), data / "master.key")
    try:
        with db.read() as s:   # the sealed secret opens under the restored key
            assert s.scalars(select(Store.secret).where(Store.name == "offsite")).one() == secret
    finally:
        db.dispose()
    h2 = Harness(data)
    try:
        assert {t["name"] for t in h2.ok("GET", "/tokens")} >= {"admin", "r1"}
        assert [st["name"] for st in h2.ok("GET", "/stores")] == ["offsite"]
    finally:
        h2.close()


def test_a_restored_vault_learns_the_points_reported_after_the_backup(tmp_path: Path) -> None:
    data = tmp_path / "vault"
    h = Harness(data)
    try:
        a, _b = two_sites(h)
        policy_and_group(h)
        item_id = protect(h, a)                       # point 1
        t0 = h.clock.now()

        def beat(agent: Agent, seqs: list[int]) -> int:
            reply = agent.beat(items=[{"item_id": item_id,
                                       "report": report(item_id, "vm-1", "web1"),
                                       "new_points": [point(item_id, n, t0 + n) for n in seqs]}])
            return int(reply["ack"][item_id])

        assert beat(a, [2, 3]) == 3
        out = tmp_path / "b.tar"
        backup(data, out)
        assert beat(a, [4]) == 4                       # after the backup: lost with the vault
        key = _key_file(tmp_path / "kept.key",
                        base64.b64decode((data / "master.key").read_text().strip()))
        cert_pem = x509.load_der_x509_certificate(a.cert_der).public_bytes(
            serialization.Encoding.PEM)
    finally:
        h.close()
    restore(out, tmp_path / "restored", master_key_file=key)
    h2 = Harness(tmp_path / "restored")
    try:
        a2 = Agent(h2, a.host_id, a.site, a.name, cert_pem)   # the same certificate: same CA
        # the agent reports point 5 (its ack was 4): answered with ack 0, so it reports all
        assert beat(a2, [5]) == 0
        assert beat(a2, [1, 2, 3, 4, 5]) == 5
        seqs = sorted(p["seq"] for p in h2.ok("GET", f"/items/{item_id}/points")["entries"])
        assert seqs == [1, 2, 3, 4, 5]
        assert beat(a2, [6]) == 6                     # back to normal
    finally:
        h2.close()


def test_a_restored_vault_does_not_trust_the_store_lists_it_remembers(tmp_path: Path) -> None:
    """The backup says which access list each store agent held then; after it, the item failed
    over and the store agent took the read-only list. The restored vault (the item protected
    again in its eyes) must not confirm the source's write grant from that memory — the source's
    writes would be refused — but only once the store agent confirmed its list again."""
    data = tmp_path / "vault"
    h = Harness(data)
    try:
        a, b = two_sites(h)
        policy_and_group(h)
        item_id = protect(h, a)
        with h.vault.db.read() as s:
            item = s.get(Item, item_id)
            assert item is not None and storeacl.grant_pending(s, item, h.clock.now()) is None
        out = tmp_path / "b.tar"
        backup(data, out)
        with h.vault.db.tx() as s:                    # after the backup: a failover
            item = s.get(Item, item_id)
            assert item is not None
            item.status = ItemProtection.FAILED_OVER
        h.store_beat()
        assert b.store_acl is not None and b.store_acl["items"][item_id]["writer"] == ""
        key = _key_file(tmp_path / "kept.key",
                        base64.b64decode((data / "master.key").read_text().strip()))
        cert_pem = x509.load_der_x509_certificate(b.cert_der).public_bytes(
            serialization.Encoding.PEM)
    finally:
        h.close()
    restore(out, tmp_path / "restored", master_key_file=key)
    h2 = Harness(tmp_path / "restored")
    try:
        def pending() -> str | None:
            with h2.vault.db.read() as s:
                item = s.get(Item, item_id)
                assert item is not None
                return storeacl.grant_pending(s, item, h2.clock.now())

        assert pending() is not None                  # unknown until the store agent beats
        b2 = Agent(h2, b.host_id, b.site, b.name, cert_pem)
        b2.store_acl = b.store_acl                    # the read-only list it holds
        b2.beat(store_url=b.store_url)                # gets the writable list
        assert pending() is not None
        b2.beat(store_url=b.store_url)                # confirms it
        assert pending() is None
        assert b2.store_acl is not None and b2.store_acl["items"][item_id]["writer"] == a.host_id
    finally:
        h2.close()


def _rewrite(src: Path, dest: Path, change: Callable[[dict[str, bytes]], None]) -> None:
    """``src`` with its members changed by ``change`` and a manifest made to match: what
    anyone who can write the backup file (but has no master key) can produce."""
    with tarfile.open(src) as tar:
        files = {m.name: (tar.extractfile(m) or io.BytesIO()).read() for m in tar.getmembers()}
    change(files)
    manifest = json.loads(files["manifest.json"])
    manifest["members"] = {n: blake3(d).hexdigest() for n, d in sorted(files.items())
                           if n in manifest["members"]}
    files["manifest.json"] = json.dumps(manifest).encode()
    with tarfile.open(dest, "w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_restore_refuses_a_backup_altered_without_the_master_key(tmp_path: Path) -> None:
    """Someone who can write where backups are kept, without the master key, swaps the
    database for one with their own admin token (and a manifest to match): the restored vault
    would obey them. The archive must prove it was made with the master key."""
    data = tmp_path / "vault"
    h = Harness(data)
    try:
        h.token("reader", "r1")
        out = tmp_path / "b.tar"
        backup(data, out)
        key = _key_file(tmp_path / "kept.key",
                        base64.b64decode((data / "master.key").read_text().strip()))
    finally:
        h.close()
    planted = "planted-admin-secret-0123456789"

    def swap_db(files: dict[str, bytes]) -> None:
        db = tmp_path / "swap.db"
        db.write_bytes(files["vault.db"])
        con = sqlite3.connect(db)
        con.execute("INSERT INTO api_tokens (name, role, secret_hash, created_at) "
                    "VALUES ('intruder', 'admin', ?, 0)",
                    (hashlib.sha256(planted.encode()).hexdigest(),))
        con.commit()
        con.close()
        files["vault.db"] = db.read_bytes()

    _rewrite(out, tmp_path / "swapped.tar", swap_db)
    with pytest.raises(CorruptData, match="master key"):
        restore(tmp_path / "swapped.tar", tmp_path / "r1", master_key_file=key)
    assert not (tmp_path / "r1").exists()
    # an edited manifest (its members unchanged)

    def edit_manifest(files: dict[str, bytes]) -> None:
        m = json.loads(files["manifest.json"])
        files["manifest.json"] = json.dumps({**m, "created_at": 0}).encode()

    _rewrite(out, tmp_path / "edited.tar", edit_manifest)
    with pytest.raises(CorruptData, match="master key"):
        restore(tmp_path / "edited.tar", tmp_path / "r2", master_key_file=key)
    # the genuine backup restores
    assert restore(out, tmp_path / "r3", master_key_file=key)["data_dir"]
