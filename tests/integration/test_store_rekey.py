"""``drsite stores rekey`` (issue 11, part 4): re-encrypting a cloud store's old objects under
its active key — the pass itself on a local, S3 (moto) and Azure (Azurite) store (every
immutable object rewritten, reads unchanged, resumable from its cursor, mutable records left to
their owners, nothing deleted brought back, a ranged read racing a replacement still reads the
right bytes), the agent command, and the vault's resumable job."""

from __future__ import annotations

import base64
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from drsite.agent.daemon import Agent
from drsite.agent.process import agent_register
from drsite.agent.testing import FakeVault
from drsite.core.model import Consistency
from drsite.hypervisors.file import FileHypervisor
from drsite.store.auth import PointAuth
from drsite.store.contract import ObjectStore
from drsite.store.crypto import EncryptedStore
from drsite.store.factory import StoreSpec, ensure_bucket, open_backend, open_store
from drsite.store.generation import GenerationStore
from drsite.store.local import LocalObjectStore
from drsite.store.rekey import rekey
from drsite.store.repository import Repository
from drsite.store.testing.servers import (
    AZURITE_KEY,
    TEST_ACCESS_KEY,
    TEST_BUCKET,
    TEST_REGION,
    TEST_SECRET_KEY,
    unique_prefix,
)
from drsite.store.wrappers import ForwardingStore
from drsite.vault.db.models import Command
from drsite.vault.testing import Harness
from tests.cloud import server_or_skip

MiB = 1 << 20
K1, K2 = os.urandom(32), os.urandom(32)
ITEM = "item-rk"
AUTH = PointAuth(ITEM, os.urandom(32))


def b64(k: bytes) -> str:
    return base64.b64encode(k).decode()


def local_spec(tmp: Path) -> dict[str, Any]:
    return {"kind": "local", "name": "rk-local", "config": {"path": str(tmp / "bucket")},
            "secret": {}}


def s3_spec(tmp: Path) -> dict[str, Any]:
    srv = server_or_skip("moto")
    return {"kind": "s3", "name": "rk-s3",
            "config": {"bucket": TEST_BUCKET, "endpoint_url": srv.endpoint, "region": TEST_REGION,
                       "prefix": unique_prefix(), "retry_base_delay_s": 0.01},
            "secret": {"access_key": TEST_ACCESS_KEY, "secret_key": TEST_SECRET_KEY}}


def azure_spec(tmp: Path) -> dict[str, Any]:
    srv = server_or_skip("azurite")
    return {"kind": "azure", "name": "rk-azure",
            "config": {"container": "drsite-test", "account_url": srv.endpoint,
                       "prefix": unique_prefix(), "retry_base_delay_s": 0.01},
            "secret": {"account_key": AZURITE_KEY}}


SPECS: dict[str, Callable[[Path], dict[str, Any]]] = {
    "local": local_spec, "s3-moto": s3_spec, "azure-azurite": azure_spec}


def with_keys(spec: dict[str, Any], keys: dict[str, bytes], active: str) -> dict[str, Any]:
    return {**spec, "keys": {k: b64(v) for k, v in keys.items()}, "active_key_id": active}


def fill(spec: dict[str, Any]) -> tuple[list[str], bytes]:
    """Two points (plus seq and a generation record) written under key k1."""
    store = open_store(StoreSpec.from_dict(with_keys(spec, {"k1": K1}, "k1")))
    repo = Repository(store, ITEM, auth=AUTH)
    data = os.urandom(MiB)
    base = None
    for i in range(2):
        w = repo.begin(f"c{i}", base=base, disk_sizes={"d0": 4 * MiB},
                       kind="initial" if base is None else "delta")
        w.write("d0", i * MiB, data)
        base = w.commit(created_at=time.time(), consistency=Consistency.CRASH).point_id
    GenerationStore(store, AUTH).ensure(ITEM, "site-a", now=1.0)
    ids = [p.point_id for p in repo.points()]
    repo.close()
    return ids, data


def read_all(store: ObjectStore, points: list[str]) -> list[bytes]:
    repo = Repository(store, ITEM, auth=AUTH)
    try:
        assert [p.point_id for p in repo.points()] == points
        out = []
        for pid in points:
            r = repo.reader(pid, "d0")
            buf = bytearray(2 * MiB)
            r.readinto(0, memoryview(buf))
            r.close()
            out.append(bytes(buf))
        assert repo.verify(points[-1]).ok
        return out
    finally:
        repo.close()


@pytest.mark.parametrize("kind", sorted(SPECS))
def test_rekey_rewrites_immutable_objects_resumably(kind: str, tmp_path: Path) -> None:
    spec = SPECS[kind](tmp_path)
    if kind != "local":
        ensure_bucket(spec)
    points, _data = fill(spec)
    rotated = open_store(StoreSpec.from_dict(with_keys(spec, {"k1": K1, "k2": K2}, "k2")))
    assert isinstance(rotated, EncryptedStore)
    before = read_all(rotated, points)
    # interrupted after three objects, then resumed from its cursor
    n = {"seen": 0}

    def stop() -> bool:
        n["seen"] += 1
        return n["seen"] > 3

    first = rekey(rotated, should_stop=stop)
    assert first.rewritten + first.already + first.mutable_old == 3 and first.last_key
    second = rekey(rotated, start_after=first.last_key)
    assert second.total == first.total - 3
    raw = open_backend(StoreSpec.from_dict(spec))
    kids = {k: rotated.key_id_of(k) for k in raw.list("items/")}
    mutable = {k for k in kids if k.endswith(("/seq", "/generation")) or "/staging/" in k}
    assert {kids[k] for k in kids if k not in mutable} == {"k2"}
    assert {kids[k] for k in mutable} == {"k1"}        # left to their owners
    assert first.mutable_old + second.mutable_old == len(mutable)
    assert first.rewritten + second.rewritten == len(kids) - len(mutable)
    assert read_all(rotated, points) == before          # same plaintext, MACs still valid
    # only k2 is needed for every point's objects now
    only_k2 = open_store(StoreSpec.from_dict(with_keys(spec, {"k2": K2}, "k2")))
    assert isinstance(only_k2, EncryptedStore)
    for k in kids:
        if k not in mutable:
            only_k2.get(k)
    # idempotent: a third pass rewrites nothing
    third = rekey(rotated)
    assert third.rewritten == 0 and third.already == len(kids) - len(mutable)


class _SwapOnSegmentRead(ForwardingStore):
    """Replaces ``key`` with ``replacement`` right after its header was read: the window in
    which a ranged reader holds the old header."""

    def __init__(self, inner: ObjectStore, key: str, replacement: bytes) -> None:
        super().__init__(inner)
        self.key, self.replacement, self.reads = key, replacement, 0

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        out = self.inner.get_range(key, offset, length)
        if key == self.key and offset == 0:
            self.reads += 1
            if self.reads == 1:
                self.inner.put(key, self.replacement, overwrite=True)
        return out


def test_a_ranged_read_racing_a_replacement_reads_the_new_object(tmp_path: Path) -> None:
    raw = LocalObjectStore(tmp_path / "s")
    old = EncryptedStore(raw, {"k1": K1}, "k1")
    data = os.urandom(3 * MiB)
    old.put("items/x/packs/c/p", data)
    new_blob = EncryptedStore(raw, {"k1": K1, "k2": K2}, "k2").encrypt("items/x/packs/c/p", data)
    racing = EncryptedStore(_SwapOnSegmentRead(raw, "items/x/packs/c/p", new_blob),
                            {"k1": K1, "k2": K2}, "k2")
    assert racing.get_range("items/x/packs/c/p", MiB + 5, 1000) == data[MiB + 5:MiB + 1005]
    assert racing.key_id_of("items/x/packs/c/p") == "k2"


def test_rekey_never_brings_back_a_deleted_object(tmp_path: Path) -> None:
    raw = LocalObjectStore(tmp_path / "s")
    EncryptedStore(raw, {"k1": K1}, "k1").put("items/x/packs/c/p", b"data")

    class Vanishing(ForwardingStore):
        def exists(self, key: str) -> bool:   # GC deleted it after the rekey read it
            self.inner.delete(key)
            return False

    rep = rekey(EncryptedStore(Vanishing(raw), {"k1": K1, "k2": K2}, "k2"))
    assert rep.gone == 1 and rep.rewritten == 0 and list(raw.list()) == []


# ------------------------------------------------------------------------ agent and vault

@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    hh = Harness(tmp_path / "vault")
    yield hh
    hh.close()


def test_the_agent_runs_store_rekey(tmp_path: Path) -> None:
    spec = local_spec(tmp_path)
    points, _ = fill(spec)
    vault = FakeVault(tmp_path / "fv")
    vault.start()
    try:
        ident = agent_register(vault.url, vault.registration_key("site-a"), tmp_path / "a",
                               "a-host", ca_file=vault.ca_file)
        agent = Agent(tmp_path / "a", hypervisor=FileHypervisor(tmp_path / "vms"),
                      heartbeat_interval=0.2)
        agent.start()
        try:
            cid = vault.send(ident.host_id, "store_rekey", None,
                             {"store": with_keys(spec, {"k1": K1, "k2": K2}, "k2"),
                              "start_after": None})
            deadline = time.monotonic() + 30
            while vault.final(cid) is None and time.monotonic() < deadline:
                agent.tick()
                time.sleep(0.1)
            r = vault.final(cid)
            assert r is not None and r["status"] == "succeeded", r
            assert r["result"]["rewritten"] > 0 and r["result"]["active_key_id"] == "k2"
        finally:
            agent.shutdown()
    finally:
        vault.stop()
    rotated = open_store(StoreSpec.from_dict(with_keys(spec, {"k1": K1, "k2": K2}, "k2")))
    assert len(read_all(rotated, points)) == 2


S3_BODY = {"name": "offsite", "kind": "s3",
           "config": {"bucket": "drsite-dr", "endpoint_url": "http://127.0.0.1:1", "region": "x"},
           "secret": {"access_key": "AKIA-rk", "secret_key": "rk-secret"}}


def test_the_vault_job_resumes_from_its_cursor(h: Harness) -> None:
    h.site("prim")
    h.site("sec")
    a = h.register("prim", "hv1")
    vms = [{"vm_id": "vm-1", "name": "web1", "power": "running", "disks": [], "nics": []}]
    a.beat(vms=vms)
    h.ok("POST", "/stores", json=S3_BODY)
    h.ok("POST", "/policies", json={"name": "p1", "frequency_s": 30})
    h.ok("POST", "/groups", json={"name": "g1", "site": "prim", "target_site": "sec",
                                  "policy": "p1", "store": "offsite"})
    h.ok("POST", "/items", json={"vm_id": "vm-1", "group": "g1"})
    h.tick()
    (prot,) = [c for c in a.beat(vms=vms)["commands"] if c["kind"] == "protect"]
    assert a.result(prot["command_id"], "succeeded").status_code == 200
    h.ok("POST", "/stores/offsite/rotate-key")
    job = h.ok("POST", "/stores/offsite/rekey")
    assert h.call("POST", "/stores/offsite/rekey").status_code == 409   # one at a time
    h.tick()
    (cmd,) = [c for c in a.beat(vms=vms)["commands"] if c["kind"] == "store_rekey"]
    assert cmd["args"]["start_after"] is None and cmd["args"]["store"]["secret"]
    assert len(cmd["args"]["store"]["keys"]) == 2
    a.result(cmd["command_id"], "running", progress=40,
             result={"last_key": "items/i/packs/c/x", "rewritten": 7, "total": 20})
    a.result(cmd["command_id"], "running", progress=41)   # no result: the cursor stays
    h.tick()
    assert "items/i/packs/c/x" in h.ok("GET", f"/jobs/{job['id']}")["tasks"][0]["message"]
    # the agent died: a transient failure; a new command resumes after the cursor
    a.result(cmd["command_id"], "failed",
             error={"code": "network", "class": "transient", "message": "gone", "hint": ""})
    h.tick()
    (again,) = [c for c in a.beat(vms=vms)["commands"] if c["kind"] == "store_rekey"]
    assert again["command_id"] != cmd["command_id"]
    assert again["args"]["start_after"] == "items/i/packs/c/x"
    a.result(again["command_id"], "succeeded",
             result={"rewritten": 13, "already": 7, "mutable_old": 2, "active_key_id": "k-2"})
    h.tick()
    final = h.ok("GET", f"/jobs/{job['id']}")
    assert final["state"] == "succeeded" and "13 object(s) re-encrypted" in final["message"]
    # the spec (credentials, keys) was scrubbed from both commands once they ended
    with h.vault.db.read() as s:
        args = [dict(x) for x in s.scalars(select(Command.args)
                                           .where(Command.kind == "store_rekey"))]
    assert len(args) == 2 and all(x["store"].get("redacted") for x in args)
    assert "rk-secret" not in str(args)
