"""``drsite.store.factory``: spec validation, redaction, the wrapper stack, and
``open_item_repository`` (local backend; the cloud backends are in
tests/integration/test_cloud_failover.py)."""

from __future__ import annotations

import base64
import logging
from pathlib import Path
from typing import Any

import pytest

from drsite.core.errors import InvalidInput, ObjectNotFound
from drsite.store.crypto import EncryptedStore
from drsite.store.factory import StoreSpec, open_item_repository, open_store, stack
from drsite.store.testing.memory import MemoryObjectStore
from drsite.store.wrappers import ConcurrencyLimitedStore, RateLimitedStore, RetryingStore

K1 = base64.b64encode(b"\x01" * 32).decode()
K2 = base64.b64encode(b"\x02" * 32).decode()
SECRET = "s3cr3t-value-never-shown"


def s3(**over: Any) -> dict[str, Any]:
    d: dict[str, Any] = {"kind": "s3", "name": "off",
                         "config": {"bucket": "drsite-b", "endpoint_url": "http://127.0.0.1:9"},
                         "secret": {"access_key": "AKIAEXAMPLE", "secret_key": SECRET},
                         "keys": {"k1": K1}, "active_key_id": "k1"}
    d.update(over)
    return d


def test_spec_round_trip_and_redaction() -> None:
    spec = StoreSpec.from_dict(s3())
    assert StoreSpec.from_dict(spec.to_dict()) == spec
    assert spec.config["region"] == "us-east-1" and spec.config["max_in_flight"] == 8
    red = spec.redacted()
    assert red["secret_fields"] == ["access_key", "secret_key"] and red["key_ids"] == ["k1"]
    for text in (str(red), repr(spec), str(spec)):
        assert SECRET not in text and K1 not in text and "AKIAEXAMPLE" not in text
    assert spec.location() == "s3://drsite-b/"


@pytest.mark.parametrize("bad", [
    {"kind": "ftp"},
    {"config": {"bucket": "x"}},                                     # too short a bucket name
    {"config": {}},                                                  # no bucket
    {"config": {"bucket": "drsite-b", "colour": "red"}},             # unknown field
    {"config": {"bucket": "drsite-b", "max_in_flight": 0}},
    {"config": {"bucket": "drsite-b", "bandwidth_limit_bps": 10}},
    {"config": {"bucket": "drsite-b", "endpoint_url": "ftp://x"}},
    {"config": {"bucket": "drsite-b", "prefix": "../x"}},
    {"secret": {"access_key": "a"}},                                 # no secret key
    {"keys": {"k1": base64.b64encode(b"short").decode()}},
    {"keys": {"k1": "not base64 at all!"}},
    {"keys": {"bad id!": K1}},
    {"active_key_id": "k9"},
    {"extra": 1},
    {"name": "../x"},
])
def test_invalid_specs_are_refused_without_echoing_secrets(bad: dict[str, Any]) -> None:
    with pytest.raises(InvalidInput) as ei:
        StoreSpec.from_dict(s3(**bad))
    assert SECRET not in str(ei.value)


def test_azure_spec_rules() -> None:
    ok = {"kind": "azure", "config": {"container": "drsite", "account_url":
                                      "http://127.0.0.1:10000/devstoreaccount1"},
          "secret": {"account_key": "a2V5"}}
    StoreSpec.from_dict(ok)
    StoreSpec.from_dict({"kind": "azure", "config": {"container": "drsite"},
                         "secret": {"connection_string": "DefaultEndpointsProtocol=https;x"}})
    for bad in ({**ok, "secret": {}},
                {**ok, "secret": {"account_key": "a", "sas_token": "b"}},
                {**ok, "config": {"container": "Bad_Name"}},
                {"kind": "azure", "config": {"container": "drsite", "account_url": "http://h/a"},
                 "secret": {"connection_string": "x"}}):
        with pytest.raises(InvalidInput):
            StoreSpec.from_dict(bad)


def test_stack_order_retry_innermost_encryption_outermost() -> None:
    spec = StoreSpec.from_dict(s3(config={"bucket": "drsite-b", "bandwidth_limit_bps": 10 ** 9,
                                          "max_in_flight": 3}))
    mem = MemoryObjectStore()
    st = stack(mem, spec)
    assert isinstance(st, EncryptedStore)
    rl = st.inner
    assert isinstance(rl, RateLimitedStore)
    cl = rl.inner
    assert isinstance(cl, ConcurrencyLimitedStore) and cl.max_in_flight == 3
    rt = cl.inner
    assert isinstance(rt, RetryingStore) and rt.inner is mem
    st.put("a/b", b"hello")
    assert mem.get("a/b")[:4] == b"DRSE" and st.get("a/b") == b"hello"
    st.delete("a/b")
    st.delete("a/b")  # deleting nothing is done
    with pytest.raises(ObjectNotFound):
        st.get("a/b")
    # without keys or limits: retry + concurrency only
    plain = stack(mem, StoreSpec.from_dict(s3(keys={}, active_key_id=None)))
    assert isinstance(plain, ConcurrencyLimitedStore)


def test_local_store_encrypted_with_rotation_and_item_repository(tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture
                                                                 ) -> None:
    caplog.set_level(logging.DEBUG)
    d = {"kind": "local", "config": {"path": str(tmp_path / "st"), "prefix": "p"},
         "keys": {"k1": K1}, "active_key_id": "k1"}
    store = open_store(d)
    store.put("x", b"one")
    raw = (tmp_path / "st" / "p" / "x").read_bytes()
    assert raw.startswith(b"DRSE") and b"one" not in raw
    rotated = open_store({**d, "keys": {"k1": K1, "k2": K2}, "active_key_id": "k2"})
    rotated.put("y", b"two")
    assert rotated.get("x") == b"one" and rotated.get("y") == b"two"
    assert b"k2" in (tmp_path / "st" / "p" / "y").read_bytes()[:16]
    repo = open_item_repository({**d, "keys": {"k1": K1, "k2": K2}, "active_key_id": "k2"},
                                None, "item-1")
    assert repo.points() == []
    local = open_item_repository(None, tmp_path / "plain", "item-1")
    assert local.latest() is None
    with pytest.raises(InvalidInput):
        open_item_repository(None, None, "item-1")
    assert K1 not in caplog.text and K2 not in caplog.text


def _read(repo: Any, point_id: str, size: int) -> bytes:
    buf = bytearray(size)
    repo.reader(point_id, "d0").readinto(0, memoryview(buf))
    return bytes(buf)


class _SlowPacks:
    """Pack puts land in reverse order of submission (earlier ones sleep longer); the put of
    pack number ``fail_at`` (in call order) fails. Other calls pass through."""

    def __init__(self, inner: MemoryObjectStore, fail_at: int | None) -> None:
        import threading

        self.inner, self.fail_at = inner, fail_at
        self.calls = 0
        self.landed: list[int] = []  # call numbers, in landing order
        self._lock = threading.Lock()

    def put(self, key: str, data: bytes | memoryview, *, overwrite: bool = False) -> None:
        import time

        from drsite.core.errors import NetworkError

        if "/packs/" not in key:
            self.inner.put(key, data, overwrite=overwrite)
            return
        with self._lock:
            n = self.calls
            self.calls += 1
        time.sleep(0.04 * (3 - n % 4))
        if n == self.fail_at:
            raise NetworkError("injected: pack upload failed")
        self.inner.put(key, data, overwrite=overwrite)
        with self._lock:
            self.landed.append(n)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_parallel_pack_uploads_keep_write_order_and_resume_fills_gaps() -> None:
    import numpy as np

    from drsite.core.errors import NetworkError
    from drsite.core.extents import ExtentList
    from drsite.core.model import Consistency
    from drsite.store.repository import Repository

    rng = np.random.default_rng(3)
    size = 4 << 20
    src = bytearray(rng.integers(0, 256, size, dtype=np.uint8).tobytes())
    piece = 256 << 10

    # no failure: packs land out of order, later writes still win
    slow = _SlowPacks(MemoryObjectStore(), None)
    repo = Repository(slow, "it", pack_target=piece, upload_threads=4)  # type: ignore[arg-type]
    w = repo.begin("c1", base=None, disk_sizes={"d0": size}, kind="initial")
    for off in range(0, size, piece):
        w.write("d0", off, b"\xee" * piece)          # overwritten below, in later packs
    for off in range(0, size, piece):
        w.write("d0", off, bytes(src[off:off + piece]))
    p = w.commit(created_at=1.0, consistency=Consistency.CRASH)
    w.close()
    assert len(slow.landed) > 8 and slow.landed != sorted(slow.landed)  # out of order
    assert _read(repo, p.point_id, size) == bytes(src)

    # the second pack fails while later ones land: resume fills exactly the gap
    slow = _SlowPacks(MemoryObjectStore(), 1)
    repo = Repository(slow, "it", pack_target=piece, upload_threads=4)  # type: ignore[arg-type]
    w = repo.begin("c1", base=None, disk_sizes={"d0": size}, kind="initial")
    with pytest.raises(NetworkError):
        for off in range(0, size, piece):
            w.write("d0", off, bytes(src[off:off + piece]))
        w.flush()
    w.close()
    assert 1 not in slow.landed and max(slow.landed) > 1  # a gap, with later packs stored
    w2 = repo.begin("c1", base=None, disk_sizes={"d0": size}, kind="initial")  # = resume
    covered = w2.covered("d0")
    assert 0 < covered.total < size
    for off, n in ExtentList.of([(0, size)]).subtract(covered):
        w2.write("d0", off, bytes(src[off:off + n]))
    p = w2.commit(created_at=2.0, consistency=Consistency.CRASH)
    w2.close()
    assert _read(repo, p.point_id, size) == bytes(src)
