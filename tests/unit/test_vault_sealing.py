"""Secrets sealed at rest (issue 11): cloud credentials, stores' data-encryption keys and the
store spec in undelivered commands are AES-256-GCM envelopes in the database (never the clear
bytes, in base64 or raw, anywhere in vault.db, -wal, -shm); the data directory is 0700 and every
file 0600, also for older deployments; the master key is rotated crash-safely (a rotation
killed between rows, or before its final rename, leaves every secret readable)."""

from __future__ import annotations

import base64
import json
import os
import sqlite3
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from drsite.core.errors import Conflict, InvalidInput, SecretUnreadable
from drsite.store.factory import StoreSpec
from drsite.vault import masterkey
from drsite.vault.db.sealed import MARK
from drsite.vault.masterkey import Keyring, MasterKey
from drsite.vault.stores import get_store, row_spec
from drsite.vault.testing import Agent, Harness, vm_info

SECRETS = {"s3a": ("AKIA-sealed-access-0001", "sealed-secret-key-never-in-clear-0001"),
           "s3b": ("AKIA-sealed-access-0002", "sealed-secret-key-never-in-clear-0002"),
           "s3c": ("AKIA-sealed-access-0003", "sealed-secret-key-never-in-clear-0003")}


def s3_body(name: str) -> dict[str, Any]:
    access, secret = SECRETS[name]
    return {"name": name, "kind": "s3",
            "config": {"bucket": f"b-{name}", "endpoint_url": "http://127.0.0.1:9", "prefix": "p"},
            "secret": {"access_key": access, "secret_key": secret}}


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    hh = Harness(tmp_path / "vault")
    yield hh
    hh.close()


def populate(h: Harness) -> Agent:
    """Three cloud stores (one key rotated), a group on one of them and a protect command that
    carries the store's full spec (credentials and keys) for the agent."""
    h.site("prim")
    h.site("sec")
    a = h.register("prim", "hv1")
    a.beat(vms=[vm_info("vm-1", "web1")])
    for name in SECRETS:
        h.ok("POST", "/stores", json=s3_body(name))
    h.ok("POST", "/stores/s3a/rotate-key")
    h.ok("POST", "/policies", json={"name": "p1", "frequency_s": 30, "encryption": True})
    h.ok("POST", "/groups", json={"name": "g1", "site": "prim", "target_site": "sec",
                                  "policy": "p1", "store": "s3a"})
    h.ok("POST", "/items", json={"vm_id": "vm-1", "group": "g1"})
    h.tick()
    h.tick()
    return a


def specs(h: Harness) -> dict[str, StoreSpec]:
    with h.vault.db.read() as s:
        return {name: row_spec(get_store(s, name)) for name in SECRETS}


def needles(all_specs: dict[str, StoreSpec]) -> list[bytes]:
    """Every credential and key, as text, base64 and raw bytes."""
    out: list[bytes] = []
    for spec in all_specs.values():
        for v in spec.secret.values():
            out.append(str(v).encode())
        for raw in spec.keys.values():
            assert len(raw) == 32
            out += [base64.b64encode(raw), raw, base64.urlsafe_b64encode(raw), raw.hex().encode()]
    assert len(out) == 6 + 4 * 4
    return out


def db_files(data: Path) -> list[Path]:
    return [p for p in (data / "vault.db", data / "vault.db-wal", data / "vault.db-shm") if p.exists()]


def assert_no_needle(files: list[Path], found: list[bytes]) -> None:
    assert files
    for f in files:
        blob = f.read_bytes()
        for n in found:
            assert n not in blob, f"a secret is in clear in {f.name}"


def raw_rows(path: Path, sql: str) -> list[Any]:
    con = sqlite3.connect(path)
    try:
        return [json.loads(r[0]) for r in con.execute(sql).fetchall()]
    finally:
        con.close()


def modes(data: Path) -> dict[str, int]:
    out = {".": stat.S_IMODE(data.stat().st_mode)}
    for p in data.rglob("*"):
        if not p.is_symlink():
            out[str(p.relative_to(data))] = stat.S_IMODE(p.stat().st_mode)
    return out


def assert_private(data: Path) -> None:
    bad = {p: oct(m) for p, m in modes(data).items()
           if m != (0o700 if (data / p).is_dir() else 0o600)}
    assert bad == {}


# ----------------------------------------------------------------------------- envelopes

def test_keyring_seals_with_aes_gcm_bound_to_its_purpose() -> None:
    ring = Keyring(MasterKey.generate())
    env = ring.seal({"secret_key": "s3cr3t"}, "stores.secret")
    assert env[MARK] == "v1" and env["kid"] == ring.active.kid and "s3cr3t" not in json.dumps(env)
    assert ring.unseal(env, "stores.secret") == {"secret_key": "s3cr3t"}
    with pytest.raises(SecretUnreadable, match="altered or belongs elsewhere"):
        ring.unseal(env, "stores.keys")  # moved to another column
    tampered = {**env, "ct": base64.b64encode(b"x" * 40).decode()}
    with pytest.raises(SecretUnreadable):
        ring.unseal(tampered, "stores.secret")
    with pytest.raises(SecretUnreadable, match="does not have"):
        Keyring(MasterKey.generate()).unseal(env, "stores.secret")
    assert ring.seal(1, "x")["nonce"] != ring.seal(1, "x")["nonce"]


def test_secrets_are_sealed_in_every_database_file(h: Harness, tmp_path: Path) -> None:
    populate(h)
    data = tmp_path / "vault"
    all_specs = specs(h)
    assert all_specs["s3a"].secret == {"access_key": SECRETS["s3a"][0], "secret_key": SECRETS["s3a"][1]}
    assert len(all_specs["s3a"].keys) == 2 and len(all_specs["s3b"].keys) == 1
    for table, col in (("stores", "secret"), ("stores", "keys")):
        rows = raw_rows(data / "vault.db", f"SELECT {col} FROM {table}")
        assert len(rows) == 3 and all(r[MARK] == "v1" for r in rows)
    cmds = raw_rows(data / "vault.db", "SELECT args FROM commands WHERE kind = 'protect'")
    assert cmds and all(c["store"]["secret"][MARK] == "v1" and c["store"]["keys"][MARK] == "v1"
                        for c in cmds)
    assert cmds[0]["store"]["name"] == "s3a" and cmds[0]["vm_id"] == "vm-1"  # the rest in clear
    assert_no_needle(db_files(data), needles(all_specs))
    assert_private(data)
    h.close()
    assert_no_needle(db_files(data), needles(all_specs))
    assert_private(data)


def test_the_agent_gets_the_clear_spec(h: Harness) -> None:
    a = populate(h)
    (cmd,) = [c for c in a.beat(vms=[vm_info("vm-1", "web1")])["commands"] if c["kind"] == "protect"]
    assert cmd["args"]["store"]["secret"]["secret_key"] == SECRETS["s3a"][1]
    keys = {k: base64.b64decode(v) for k, v in cmd["args"]["store"]["keys"].items()}
    assert keys == dict(specs(h)["s3a"].keys)


# ---------------------------------------------------------------- older deployments, keys

def test_an_older_deployment_is_sealed_and_made_private_at_start(tmp_path: Path) -> None:
    data = tmp_path / "vault"
    h = Harness(data)
    populate(h)
    all_specs = specs(h)
    h.close()
    # as a vault before sealing left it: secrets in clear, files world-readable
    con = sqlite3.connect(data / "vault.db")
    for name, spec in all_specs.items():
        con.execute("UPDATE stores SET secret = ?, keys = ? WHERE name = ?",
                    (json.dumps(dict(spec.secret)),
                     json.dumps({"active": spec.active_key_id,
                                 "keys": {k: base64.b64encode(v).decode() for k, v in spec.keys.items()}}),
                     name))
    con.commit()
    con.close()
    blob = b"".join(f.read_bytes() for f in db_files(data))
    assert all(v.encode() in blob for pair in SECRETS.values() for v in pair)  # in clear now
    for p in [data, *data.rglob("*")]:
        os.chmod(p, 0o755 if p.is_dir() else 0o644)
    h = Harness(data)
    try:
        assert specs(h) == all_specs
        assert_no_needle(db_files(data), needles(all_specs))
        assert_private(data)
        rows = raw_rows(data / "vault.db", "SELECT secret FROM stores")
        assert all(r[MARK] == "v1" for r in rows)
    finally:
        h.close()


def test_a_lost_or_wrong_master_key_stops_the_vault(tmp_path: Path) -> None:
    data = tmp_path / "vault"
    h = Harness(data)
    populate(h)
    h.close()
    key = (data / "master.key").read_bytes()
    (data / "master.key").unlink()
    with pytest.raises(SecretUnreadable, match="missing"):
        Harness(data)
    assert not (data / "master.key").exists()  # never replaced by a fresh key
    masterkey.write_key(data / "master.key", MasterKey.generate())
    with pytest.raises(SecretUnreadable, match="does not hold"):
        Harness(data)
    (data / "master.key").write_bytes(b"not base64!\n")
    with pytest.raises(InvalidInput, match="32-byte"):
        Harness(data)
    (data / "master.key").write_bytes(key)
    Harness(data).close()


def test_master_key_file_outside_the_data_directory(tmp_path: Path) -> None:
    keyfile = tmp_path / "secrets" / "vault-master.key"
    keyfile.parent.mkdir()
    h = Harness(tmp_path / "vault", master_key_file=keyfile)
    populate(h)
    h.close()
    assert keyfile.exists() and not (tmp_path / "vault" / "master.key").exists()
    assert stat.S_IMODE(keyfile.stat().st_mode) == 0o600
    os.chmod(keyfile, 0o644)
    with pytest.raises(InvalidInput, match="read by others") as ei:
        Harness(tmp_path / "vault", master_key_file=keyfile)
    assert ei.value.hint == f"Run 'chmod 600 {keyfile}'."
    os.chmod(keyfile, 0o600)
    with pytest.raises(SecretUnreadable):  # the data directory's own key is not the one
        Harness(tmp_path / "vault")


# ------------------------------------------------------------------------------- rotation

def sealed_kids(data: Path) -> set[str]:
    out: set[str] = set()
    for r in raw_rows(data / "vault.db", "SELECT secret FROM stores") + \
            raw_rows(data / "vault.db", "SELECT keys FROM stores"):
        out.add(r["kid"])
    for c in raw_rows(data / "vault.db", "SELECT args FROM commands"):
        for k in ("secret", "keys"):
            env = (c.get("store") or {}).get(k)
            if isinstance(env, dict) and MARK in env:
                out.add(env["kid"])
    return out


def test_rotation_reseals_everything_and_refuses_a_running_vault(tmp_path: Path) -> None:
    data = tmp_path / "vault"
    h = Harness(data)
    populate(h)
    all_specs = specs(h)
    old = masterkey.read_key(data / "master.key").kid
    with pytest.raises(Conflict, match="running"):
        masterkey.rotate_master_key(data)
    h.close()
    report = masterkey.rotate_master_key(data)
    assert report["old_key"] == old and report["new_key"] != old and not report["resumed"]
    # three stores' secret and keys, one protect command, one item's point key, the CA's key
    assert report["values_resealed"] == 9
    new = masterkey.read_key(data / "master.key").kid
    assert new == report["new_key"] and sealed_kids(data) == {new}
    assert not (data / "master.key.new").exists()
    assert_no_needle(db_files(data), needles(all_specs))
    h = Harness(data)
    try:
        assert specs(h) == all_specs
        assert_private(data)
    finally:
        h.close()


def rotate_cli(data: Path, failpoint: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "DRSITE_FAILPOINTS"}
    if failpoint:
        env["DRSITE_FAILPOINTS"] = failpoint
    return subprocess.run([sys.executable, "-m", "drsite.cli.main", "vault", "rotate-master-key",
                           "--data", str(data), "--json"], env=env, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("failpoint", ["vault.rotate-master-key.row=kill@1",
                                       "vault.rotate-master-key.row=kill@2",
                                       "vault.rotate-master-key.row=kill@3",
                                       "vault.rotate-master-key.swap=kill"])
def test_a_rotation_killed_at_any_point_leaves_every_secret_readable(tmp_path: Path,
                                                                      failpoint: str) -> None:
    data = tmp_path / "vault"
    h = Harness(data)
    populate(h)
    all_specs = specs(h)
    h.close()
    old = masterkey.read_key(data / "master.key").kid
    killed = rotate_cli(data, failpoint)
    assert killed.returncode == -9, killed.stderr
    assert (data / "master.key.new").exists()
    assert masterkey.read_key(data / "master.key").kid == old  # the old key is still there
    pending = masterkey.read_key(data / "master.key.new").kid
    assert sealed_kids(data) <= {old, pending} and pending in sealed_kids(data)
    # a vault started now reads every secret
    h = Harness(data)
    assert specs(h) == all_specs
    h.close()
    # running the rotation again finishes it, with the same new key
    done = rotate_cli(data, None)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["resumed"] is True and report["new_key"] == pending
    assert sealed_kids(data) == {pending} and not (data / "master.key.new").exists()
    assert masterkey.read_key(data / "master.key").kid == pending
    h = Harness(data)
    try:
        assert specs(h) == all_specs
        assert_private(data)
    finally:
        h.close()
    assert_no_needle(db_files(data), needles(all_specs))
