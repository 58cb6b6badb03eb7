"""One conformance suite for every ObjectStore backend.

A new backend (S3, Azure, the remote site store) joins by adding a factory to ``BACKENDS``;
every test below then runs against it.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from tests.cloud import azure_azurite, s3_moto, s3_seaweedfs

from drsite.core.errors import (
    InvalidInput,
    LowDiskSpace,
    NetworkError,
    ObjectExists,
    ObjectNotFound,
    PermanentError,
)
from drsite.sitestore.testing import shared_site_store
from drsite.store.contract import ObjectStore
from drsite.store.crypto import EncryptedStore
from drsite.store.local import LocalObjectStore
from drsite.store.testing import FaultyObjectStore, MemoryObjectStore
from drsite.store.wrappers import RetryingStore


def _local(tmp: Path) -> ObjectStore:
    return LocalObjectStore(tmp / "store")


def _memory(tmp: Path) -> ObjectStore:
    return MemoryObjectStore()


def _flaky(tmp: Path) -> ObjectStore:
    """Every op fails transiently now and then (some after the inner call landed)."""
    faulty = FaultyObjectStore(MemoryObjectStore())
    faulty.inject("put", "network", nth=2, times=None, after=True)   # reply lost: put landed
    faulty.inject("*", "timeout", nth=3, times=None)
    faulty.inject("put", "enospc", nth=5, times=None)
    # each fault fires on the nth and all later calls would never succeed: thin them out
    for f in faulty.faults:
        f.times = 3
    return RetryingStore(faulty, attempts=6, base_delay=0.0, sleep=lambda _s: None)


def _encrypted(tmp: Path) -> ObjectStore:
    """Small segments so objects of the suite span several (ranged reads cross boundaries)."""
    return EncryptedStore(MemoryObjectStore(), {"k1": b"\x01" * 32, "k2": b"\x02" * 32}, "k2",
                          segment_size=64)


BACKENDS: dict[str, Callable[[Path], ObjectStore]] = {
    "local": _local,
    "memory": _memory,
    "retrying-faulty-memory": _flaky,
    "encrypted-memory": _encrypted,
    # the remote site store: a real mTLS server on 127.0.0.1 (one per session, fresh store per test)
    "site": shared_site_store,
    # cloud backends against throw-away servers on 127.0.0.1 (one per session, fresh prefix per
    # test); skipped when the server program is missing unless DRSITE_TEST_CLOUD=1
    "s3-moto": s3_moto,
    "s3-seaweedfs": s3_seaweedfs,
    "azure-azurite": azure_azurite,
}


@pytest.fixture(params=sorted(BACKENDS))
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ObjectStore]:
    yield BACKENDS[request.param](tmp_path)


BAD_KEYS = ["", "../x", "a/../b", "a//b", "/a", "a/", ".", "a/./b", "x\n", "a\x00b", "a b",
            "..", "a/.hidden", "x" * 600]


def test_is_an_object_store(store: ObjectStore) -> None:
    assert isinstance(store, ObjectStore)


def test_put_get_roundtrip(store: ObjectStore) -> None:
    store.put("items/a/obj", b"hello")
    assert store.get("items/a/obj") == b"hello"
    assert store.exists("items/a/obj")
    assert store.size("items/a/obj") == 5


def test_put_memoryview_and_empty(store: ObjectStore) -> None:
    big = bytes(range(256)) * 4096
    store.put("mv", memoryview(big)[10:1_000_010])
    assert store.get("mv") == big[10:1_000_010]
    store.put("empty", b"")
    assert store.get("empty") == b""
    assert store.size("empty") == 0


def test_put_without_overwrite_refuses_existing(store: ObjectStore) -> None:
    store.put("k", b"one")
    with pytest.raises(ObjectExists):
        store.put("k", b"two")
    assert store.get("k") == b"one"


def test_overwrite_replaces(store: ObjectStore) -> None:
    store.put("k", b"one")
    store.put("k", b"second", overwrite=True)
    assert store.get("k") == b"second"
    assert store.size("k") == 6
    store.put("new", b"x", overwrite=True)
    assert store.get("new") == b"x"


def test_get_range(store: ObjectStore) -> None:
    data = bytes(range(200))
    store.put("r", data)
    assert store.get_range("r", 0, 10) == data[:10]
    assert store.get_range("r", 50, 100) == data[50:150]
    assert store.get_range("r", 190, 100) == data[190:]  # short only at the end
    assert store.get_range("r", 200, 5) == b""
    assert store.get_range("r", 5, 0) == b""


def test_missing_keys(store: ObjectStore) -> None:
    assert not store.exists("nope/x")
    with pytest.raises(ObjectNotFound):
        store.get("nope/x")
    with pytest.raises(ObjectNotFound):
        store.get_range("nope/x", 0, 1)
    with pytest.raises(ObjectNotFound):
        store.size("nope/x")
    store.delete("nope/x")  # idempotent


def test_prefix_is_not_an_object(store: ObjectStore) -> None:
    store.put("dir/child", b"1")
    assert not store.exists("dir")
    with pytest.raises(ObjectNotFound):
        store.get("dir")
    with pytest.raises(ObjectNotFound):
        store.size("dir")


def test_delete(store: ObjectStore) -> None:
    store.put("a/b/c", b"1")
    store.put("a/b/d", b"2")
    store.delete("a/b/c")
    assert not store.exists("a/b/c")
    assert store.get("a/b/d") == b"2"
    store.delete("a/b/c")
    store.delete("a/b/d")
    assert list(store.list("a/")) == []
    store.put("a/b/c", b"again")  # a key can be written again after delete
    assert store.get("a/b/c") == b"again"


def test_list_sorted_and_prefixed(store: ObjectStore) -> None:
    keys = ["items/v1/points/p2", "items/v1/points/p10", "items/v1/packs/c/x",
            "items/v2/points/p1", "items/v10/a", "top"]
    for k in keys:
        store.put(k, b"x")
    assert list(store.list()) == sorted(keys)
    assert list(store.list("items/v1/")) == sorted(k for k in keys if k.startswith("items/v1/"))
    assert list(store.list("items/v1")) == sorted(k for k in keys if k.startswith("items/v1"))
    assert list(store.list("items/v1/points/p1")) == ["items/v1/points/p10"]
    assert list(store.list("none/")) == []


@pytest.mark.parametrize("bad", BAD_KEYS)
def test_bad_keys_refused(store: ObjectStore, bad: str) -> None:
    with pytest.raises(InvalidInput):
        store.put(bad, b"x")
    with pytest.raises(InvalidInput):
        store.get(bad)
    with pytest.raises(InvalidInput):
        store.delete(bad)
    with pytest.raises(InvalidInput):
        store.exists(bad)


def test_bad_list_prefix_refused(store: ObjectStore) -> None:
    with pytest.raises(InvalidInput):
        list(store.list("../"))


def test_concurrent_no_overwrite_put_has_one_winner(store: ObjectStore) -> None:
    wins: list[int] = []
    errors: list[BaseException] = []

    def put(i: int) -> None:
        try:
            store.put("race/k", f"writer-{i}".encode())
            wins.append(i)
        except ObjectExists:
            pass
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=put, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(wins) == 1
    assert store.get("race/k") == f"writer-{wins[0]}".encode()


# --- backend-specific behaviour -------------------------------------------------------------

def test_local_cleans_stale_temp_files_and_hides_them(tmp_path: Path) -> None:
    root = tmp_path / "s"
    s = LocalObjectStore(root)
    stale = root / ".tmp" / "dead.part"
    stale.write_bytes(b"half")
    old = time.time() - 7200
    os.utime(stale, (old, old))
    fresh = root / ".tmp" / "inflight.part"
    fresh.write_bytes(b"busy")
    s.put("k", b"v")
    assert list(s.list()) == ["k"]
    LocalObjectStore(root)
    assert not stale.exists()
    assert fresh.exists()  # may belong to a put in flight in another process


def test_local_put_is_durable_layout(tmp_path: Path) -> None:
    s = LocalObjectStore(tmp_path / "s")
    s.put("items/v/packs/c1/abc", b"data")
    assert (tmp_path / "s" / "items" / "v" / "packs" / "c1" / "abc").read_bytes() == b"data"
    assert list((tmp_path / "s" / ".tmp").iterdir()) == []


def test_local_enospc_is_transient(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    s = LocalObjectStore(tmp_path / "s")

    def full(fd: int, data: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(LowDiskSpace) as ei:
        s.put("k", b"v")
    assert ei.value.transient
    monkeypatch.undo()
    assert not s.exists("k")
    assert list((tmp_path / "s" / ".tmp").iterdir()) == []


def test_retrying_store_retries_transient_and_passes_permanent() -> None:
    faulty = FaultyObjectStore(MemoryObjectStore())
    sleeps: list[float] = []
    rs = RetryingStore(faulty, attempts=4, base_delay=0.05, sleep=sleeps.append)
    faulty.inject("get", "network", times=2)
    rs.put("k", b"v")
    assert rs.get("k") == b"v"
    assert sleeps == [0.05, 0.1]
    faulty.inject("get", "permanent")
    with pytest.raises(PermanentError):
        rs.get("k")
    faulty.inject("get", "network", times=None)
    with pytest.raises(NetworkError):
        rs.get("k")
    assert faulty.calls["get"] == 3 + 1 + 4


def test_retrying_store_lost_put_reply_counts_as_done() -> None:
    faulty = FaultyObjectStore(MemoryObjectStore())
    rs = RetryingStore(faulty, sleep=lambda _s: None)
    faulty.inject("put", "network", after=True)  # the put lands, the reply is lost
    rs.put("cas/abc", b"content")
    assert rs.get("cas/abc") == b"content"
    # a different content under the same key is a real conflict
    rs.put("cas/abc2", b"one")
    faulty.inject("put", "network")  # first attempt fails, the retry finds other bytes
    with pytest.raises(ObjectExists):
        rs.put("cas/abc2", b"two")
    assert rs.get("cas/abc2") == b"one"
    faulty.inject("delete", "network", after=True)
    rs.delete("cas/abc")
    assert not rs.exists("cas/abc")


def test_faulty_store_data_faults() -> None:
    faulty = FaultyObjectStore(MemoryObjectStore())
    faulty.put("p/x", b"0123456789")
    faulty.inject("get", "truncate", prefix="p/")
    assert faulty.get("p/x") == b"01234"
    faulty.inject("get_range", "bitflip", prefix="p/")
    assert faulty.get_range("p/x", 0, 10) != b"0123456789"
    assert faulty.get("p/x") == b"0123456789"
    faulty.inject("put", "enospc", prefix="q/", nth=2)
    faulty.put("q/1", b"")
    with pytest.raises(LowDiskSpace):
        faulty.put("q/2", b"")
    faulty.put("other", b"")  # other prefixes are not affected
    assert faulty.calls["put"] == 4
