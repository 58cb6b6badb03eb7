"""RateLimitedStore / ConcurrencyLimitedStore (with FakeClock) and EncryptedStore."""

from __future__ import annotations

import threading
import time

import pytest

from drsite.core.clock import FakeClock
from drsite.core.errors import AuthError, CorruptData, ObjectNotFound
from drsite.store.crypto import EncryptedStore
from drsite.store.testing import MemoryObjectStore
from drsite.store.wrappers import ConcurrencyLimitedStore, RateLimitedStore

K1, K2 = b"\x11" * 32, b"\x22" * 32


def test_rate_limit_holds_average_and_pays_in_small_steps() -> None:
    clock = FakeClock()
    start = clock.now()
    rs = RateLimitedStore(MemoryObjectStore(), 1_000_000, clock, piece=100_000, burst_s=0.1)
    rs.put("a", b"x" * 3_000_000)           # 3 MB at 1 MB/s: ~2.9 s after the burst
    assert clock.now() - start == pytest.approx(2.9)
    assert max(clock.sleeps) <= 0.1 + 1e-9   # no single long stall: paced piece by piece
    assert len(clock.sleeps) >= 29
    t0 = clock.now()
    assert rs.get("a") == b"x" * 3_000_000  # whole gets pay after the call
    assert clock.now() - t0 == pytest.approx(3.0)
    t1 = clock.now()
    assert rs.get_range("a", 0, 500_000) == b"x" * 500_000
    assert clock.now() - t1 == pytest.approx(0.5)
    t2 = clock.now()
    rs.exists("a")  # metadata is free
    rs.size("a")
    list(rs.list())
    rs.delete("a")
    assert clock.now() == t2


def test_rate_limit_idle_time_refills_only_the_burst() -> None:
    clock = FakeClock()
    rs = RateLimitedStore(MemoryObjectStore(), 1000, clock, piece=100, burst_s=0.5)
    clock.advance(3600)                      # a long idle period does not bank an hour of bytes
    t0 = clock.now()
    rs.put("k", b"y" * 1500)
    assert clock.now() - t0 == pytest.approx(1.0)


def test_rate_limit_rejects_bad_rate() -> None:
    with pytest.raises(ValueError):
        RateLimitedStore(MemoryObjectStore(), 0, FakeClock())


class _Slow(MemoryObjectStore):
    def get(self, key: str) -> bytes:
        time.sleep(0.02)
        return super().get(key)


def test_concurrency_limit() -> None:
    inner = _Slow()
    inner.put("k", b"v")
    cs = ConcurrencyLimitedStore(inner, 3)
    threads = [threading.Thread(target=cs.get, args=("k",)) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert cs.peak == 3
    assert cs.in_flight == 0
    with pytest.raises(ValueError):
        ConcurrencyLimitedStore(inner, 0)


def test_concurrency_limit_releases_on_error() -> None:
    cs = ConcurrencyLimitedStore(MemoryObjectStore(), 1)
    for _ in range(3):
        with pytest.raises(ObjectNotFound):
            cs.get("missing")
    cs.put("k", b"v")
    assert cs.get("k") == b"v"


# --- EncryptedStore ----------------------------------------------------------------------------

def test_encrypted_roundtrip_ranges_and_ciphertext_is_opaque() -> None:
    inner = MemoryObjectStore()
    es = EncryptedStore(inner, {"k1": K1}, "k1", segment_size=1000)
    data = bytes(range(256)) * 40            # 10 240 bytes, 11 segments
    es.put("p/x", data)
    assert es.get("p/x") == data
    assert es.size("p/x") == len(data)
    assert data[:64] not in inner.objects["p/x"]
    assert inner.objects["p/x"].startswith(b"DRSE")
    for off, ln in [(0, 1), (999, 2), (1000, 1000), (5, 9000), (10_000, 500), (10_240, 3)]:
        assert es.get_range("p/x", off, ln) == data[off:off + ln]


def test_encrypted_ranged_read_fetches_only_touched_segments() -> None:
    from drsite.store.testing import FaultyObjectStore

    mem = MemoryObjectStore()
    faulty = FaultyObjectStore(mem)
    es = EncryptedStore(faulty, {"k1": K1}, "k1", segment_size=1 << 20)
    es.put("pack", b"z" * (8 << 20))
    before = mem.objects["pack"]
    got: list[int] = []
    real = mem.get_range

    def spy(key: str, offset: int, length: int) -> bytes:
        got.append(length)
        return real(key, offset, length)

    mem.get_range = spy  # type: ignore[method-assign]
    assert es.get_range("pack", 3 << 20, 4096) == b"z" * 4096
    assert len(before) > 8 << 20
    assert max(got) <= (1 << 20) + 16       # one segment, not the whole 8 MiB


def test_key_rotation_keeps_old_objects_readable() -> None:
    inner = MemoryObjectStore()
    EncryptedStore(inner, {"k1": K1}, "k1").put("old", b"before")
    es = EncryptedStore(inner, {"k1": K1, "k2": K2}, "k2")
    es.put("new", b"after")
    assert es.get("old") == b"before"
    assert es.get("new") == b"after"
    assert b"k2" in inner.objects["new"][:10]
    with pytest.raises(AuthError, match="key id 'k1'"):
        EncryptedStore(inner, {"k2": K2}, "k2").get("old")


def test_wrong_key_tamper_and_move_are_detected() -> None:
    inner = MemoryObjectStore()
    es = EncryptedStore(inner, {"k1": K1}, "k1", segment_size=16)
    es.put("a", b"secret data that spans segments")
    with pytest.raises(CorruptData, match="wrong key"):
        EncryptedStore(inner, {"k1": K2}, "k1").get("a")
    blob = bytearray(inner.objects["a"])
    blob[-3] ^= 1
    inner.put("t", bytes(blob))
    with pytest.raises(CorruptData) as ei:
        es.get("t")                          # also: the key is bound as associated data
    assert not ei.value.transient
    inner.put("moved", inner.objects["a"])
    with pytest.raises(CorruptData):
        es.get("moved")
    inner.put("trunc", inner.objects["a"][:-20])
    with pytest.raises(CorruptData):
        es.get("trunc")
    inner.put("plain", b"not encrypted at all")
    with pytest.raises(CorruptData, match="not an encrypted"):
        es.get("plain")
    with pytest.raises(CorruptData):
        es.get_range("moved", 0, 4)


def test_bad_keys_config_refused() -> None:
    with pytest.raises(ValueError):
        EncryptedStore(MemoryObjectStore(), {"k1": b"short"}, "k1")
    with pytest.raises(ValueError):
        EncryptedStore(MemoryObjectStore(), {"k1": K1}, "k9")
    assert "\\x11" not in repr(EncryptedStore(MemoryObjectStore(), {"k1": K1}, "k1"))
