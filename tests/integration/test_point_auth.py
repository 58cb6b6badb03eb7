"""Authentic points (issue 11): someone who can write the store's files or the bucket (but does
not hold the item's point key) cannot plant a point that a failover, a verification or a
hydration accepts — on a local store and, with DRSITE_TEST_CLOUD=1, on S3 (moto) and Azure
Blob (Azurite). Points written before points were authenticated are refused the same way."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from drsite.core.errors import PointNotAuthentic
from drsite.core.model import Consistency, DiskSpec, VmSpec
from drsite.failover import actions as fo
from drsite.hypervisors.file import FileHypervisor
from drsite.store.auth import PointAuth
from drsite.store.contract import ObjectStore
from drsite.store.factory import StoreSpec, ensure_bucket, open_backend, store_repository
from drsite.store.format import canonical_json, hex_hash
from drsite.store.generation import GenerationRecord, GenerationStore, check_not_fenced
from drsite.store.local import LocalObjectStore
from drsite.store.replica import ReplicaHydrator
from drsite.store.repository import Repository
from drsite.store.testing.servers import (
    AZURITE_KEY,
    TEST_ACCESS_KEY,
    TEST_BUCKET,
    TEST_REGION,
    TEST_SECRET_KEY,
    unique_prefix,
)
from tests.cloud import server_or_skip

MiB = 1 << 20
ITEM = "item-auth"
SIZE = 4 * MiB
KEY = os.urandom(32)


def write_point(repo: Repository, cycle: str, fill: int, base: str | None = None) -> str:
    w = repo.begin(cycle, base=base, disk_sizes={"d0": SIZE}, kind="initial" if base is None
                   else "delta")
    w.write("d0", 0, bytes([fill]) * MiB)
    return w.commit(created_at=time.time(), consistency=Consistency.CRASH).point_id


def forge_point(raw: ObjectStore, item: str, like: str, new_id: str, *,
                mac_key: bytes | None, fill: int = 0xEE) -> None:
    """Plant ``new_id`` with raw store access: a full disk of ``fill`` bytes (new pack, map and
    table, all with correct hashes) and a manifest with a correct checksum; its MAC is made
    with ``mac_key`` (a guess: not the item's key), or absent."""
    scratch = Repository(raw, item)            # no key: what a forger's tools can do
    w = scratch.begin(f"forged-{new_id}", base=None, disk_sizes={"d0": SIZE}, kind="initial")
    w.write("d0", 0, bytes([fill]) * SIZE)
    real = w.commit(created_at=time.time(), consistency=Consistency.CRASH)
    env = json.loads(raw.get(f"items/{item}/points/{real.point_id}"))
    raw.delete(f"items/{item}/points/{real.point_id}")
    body = dict(env["body"], point_id=new_id, seq=int(new_id[1:]), created_at=time.time() + 60)
    canon = canonical_json(body)
    forged: dict[str, Any] = {"blake3": hex_hash(canon), "body": body}
    if mac_key is not None:
        forged["mac"] = PointAuth(item, mac_key).mac("manifest", canon)
    raw.put(f"items/{item}/points/{new_id}", canonical_json(forged))
    scratch.close()


def failover_item(repo: Repository, tmp: Path) -> fo.ProtectedItem:
    hv = FileHypervisor(tmp / "b-vms")
    return fo.ProtectedItem(ITEM, "vm-1", VmSpec(name="app", disks=(DiskSpec("d0", SIZE),)),
                            fo.Site("site-a", None, tmp / "a-work"),
                            fo.Site("site-b", hv, tmp / "b-work"), repo,
                            ReplicaHydrator(repo, tmp / "b-work" / "replicas" / ITEM))


def check_refused(repo: Repository, raw: ObjectStore, tmp: Path) -> None:
    """The item's authentic points work; a forged one (guessed MAC, then none) is refused at
    failover, verification and hydration with a clear error; listing shows the refusal."""
    p1 = write_point(repo, "c1", 1)
    p2 = write_point(repo, "c2", 2, base=p1)
    assert repo.verify(p2).ok
    GenerationStore(repo.store, repo.auth).ensure(ITEM, "site-a", now=time.time())
    for n, mac_key in ((7, os.urandom(32)), (8, None)):
        forged = f"p{n:012d}"
        forge_point(raw, ITEM, p2, forged, mac_key=mac_key)
        repo._forget_all()
        with pytest.raises(PointNotAuthentic, match=f"{forged} of item {ITEM} is not authentic"):
            repo.point(forged)
        with pytest.raises(PointNotAuthentic):
            repo.verify(forged)
        item = failover_item(repo, tmp / f"fo{n}")
        with pytest.raises(PointNotAuthentic) as ei:
            fo.unplanned_failover(item, "latest", failover_id=f"uf-{n}")
        assert "Do not fail over to this point" in (ei.value.hint or "")
        with pytest.raises(PointNotAuthentic):
            ReplicaHydrator(repo, tmp / f"rep{n}").catch_up()
        raw.delete(f"items/{ITEM}/points/{forged}")
        repo._forget_all()
    # the authentic points are untouched and still verify
    assert [p.point_id for p in repo.points()] == [p1, p2]
    assert repo.verify(p2).ok


def test_point_forged_through_the_store_filesystem_is_refused(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path / "store")
    repo = Repository(store, ITEM, auth=PointAuth(ITEM, KEY))
    check_refused(repo, LocalObjectStore(tmp_path / "store"), tmp_path)
    repo.close()


def test_points_written_before_authentication_are_refused_with_a_hint(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path / "store")
    legacy = Repository(store, ITEM)       # an agent without point keys (before the upgrade)
    p1 = write_point(legacy, "c1", 1)
    legacy.close()
    repo = Repository(store, ITEM, auth=PointAuth(ITEM, KEY))
    with pytest.raises(PointNotAuthentic, match="carries no MAC") as ei:
        repo.point(p1)
    assert "drsite items unprotect" in (ei.value.hint or "")
    repo.close()


def test_generation_records_are_authenticated(tmp_path: Path) -> None:
    """Someone with the store's files can neither fence the primary nor un-fence a demoted
    one: a generation record without the MAC is refused."""
    store = LocalObjectStore(tmp_path / "store")
    auth = PointAuth(ITEM, KEY)
    gens = GenerationStore(store, auth)
    gens.ensure(ITEM, "site-a", now=1.0)
    assert gens.current(ITEM) == 1
    check_not_fenced(store, ITEM, 1, auth)
    forged = GenerationRecord(ITEM, 9, "site-x", 2.0, "forged")
    store.put(f"items/{ITEM}/generation", forged.to_bytes(), overwrite=True)   # no MAC
    with pytest.raises(PointNotAuthentic, match="generation record"):
        gens.read(ITEM)
    with pytest.raises(PointNotAuthentic):
        check_not_fenced(store, ITEM, 1, auth)
    store.put(f"items/{ITEM}/generation", forged.to_bytes(PointAuth(ITEM, os.urandom(32))),
              overwrite=True)
    with pytest.raises(PointNotAuthentic, match="does not match"):
        gens.read(ITEM)


def s3_spec() -> dict[str, Any]:
    srv = server_or_skip("moto")
    return {"kind": "s3", "name": "auth-s3",
            "config": {"bucket": TEST_BUCKET, "endpoint_url": srv.endpoint, "region": TEST_REGION,
                       "prefix": unique_prefix(), "retry_base_delay_s": 0.01},
            "secret": {"access_key": TEST_ACCESS_KEY, "secret_key": TEST_SECRET_KEY}}


def azure_spec() -> dict[str, Any]:
    srv = server_or_skip("azurite")
    return {"kind": "azure", "name": "auth-azure",
            "config": {"container": "drsite-test", "account_url": srv.endpoint,
                       "prefix": unique_prefix(), "retry_base_delay_s": 0.01},
            "secret": {"account_key": AZURITE_KEY}}


SPECS: dict[str, Callable[[], dict[str, Any]]] = {"s3-moto": s3_spec, "azure-azurite": azure_spec}


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(SPECS))
def test_point_forged_with_the_bucket_credentials_is_refused(kind: str, tmp_path: Path) -> None:
    """The bucket's credentials (no encryption keys: with them a forger could not even write a
    readable object) are enough to write any object; not to write an authentic point."""
    spec = SPECS[kind]()
    ensure_bucket(spec)
    repo = store_repository(spec, ITEM)
    repo.auth = PointAuth(ITEM, KEY)
    check_refused(repo, open_backend(StoreSpec.from_dict(spec)), tmp_path)
    repo.close()
