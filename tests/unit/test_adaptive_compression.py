"""Adaptive compression (policy "auto", ``PointWriter.adaptive``): a store slower than the
compressors gets every frame compressed; a fast store whose compressors are the bottleneck gets
most frames raw; the point reads back equal to the source either way, and the choice is
per frame (RAW or ZSTD), invisible to readers."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest

from drsite.core.model import Consistency
from drsite.store import writer as writer_mod
from drsite.store.format import ENTRY_DT, PACK_FOOTER, RAW, ZSTD
from drsite.store.repository import Repository
from drsite.store.testing import MemoryObjectStore

KiB, MiB = 1024, 1024 * 1024


class SlowPackStore(MemoryObjectStore):
    """A store whose pack puts take ``delay`` seconds (a remote store over a slow link)."""

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay

    def put(self, key: str, data: bytes | memoryview, *, overwrite: bool = False) -> None:
        if "/packs/" in key:
            time.sleep(self.delay)
        super().put(key, data, overwrite=overwrite)


def slow_compressors(monkeypatch: pytest.MonkeyPatch, delay: float) -> None:
    """Each frame handed to the workers with a zstd level costs ``delay`` more (a raw one
    nothing): the compressors, not the store, are the bottleneck."""
    real = writer_mod._prepare

    def slow_zstd(frame: memoryview, offsets: Any, lengths: Any, level: int) -> Any:
        if level:
            time.sleep(delay)
        return real(frame, offsets, lengths, level)

    monkeypatch.setattr(writer_mod, "_prepare", slow_zstd)


def _text(n: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    words = [b"alpha", b"beta", b"gamma", b"delta", b"epsilon", b"zeta", b"eta", b"theta"]
    out = b" ".join(words[int(i)] for i in rng.integers(0, len(words), n // 3))
    return out[:n].ljust(n, b" ")


def _codecs(store: MemoryObjectStore) -> dict[int, int]:
    """Data bytes per codec over every pack's trailer in the store."""
    out = {RAW: 0, ZSTD: 0}
    for key, blob in store.objects.items():
        if "/packs/" not in key:
            continue
        _m, _hlen, n, _h = PACK_FOOTER.unpack(blob[-PACK_FOOTER.size:])
        end = len(blob) - PACK_FOOTER.size
        e = np.frombuffer(blob[end - n * ENTRY_DT.itemsize:end], ENTRY_DT)
        for c in (RAW, ZSTD):
            out[c] += int(e["length"][e["codec"] == c].sum())
    return out


def _write_and_read_back(repo: Repository, data: bytes, *, adaptive: bool,
                         batch: int = 4 * MiB) -> tuple[Any, int]:
    w = repo.begin("c0", base=None, disk_sizes={"d0": len(data)}, kind="initial")
    w.adaptive = adaptive
    for off in range(0, len(data), batch):
        chunk = data[off:off + batch]
        w.write_many("d0", np.array([off], np.int64), np.array([len(chunk)], np.int64), chunk)
    p = w.commit(created_at=1.0, consistency=Consistency.CRASH)
    raw_chosen = w.raw_chosen_bytes
    got = bytearray(len(data))
    repo.reader(p.point_id, "d0").readinto(0, memoryview(got))
    assert bytes(got) == data
    return p, raw_chosen


def test_a_slow_store_gets_every_frame_compressed() -> None:
    """Uploads slower than the compressors: the feeder's waits are for the store (the uploads
    at their cap), so nothing is stored raw. (8 MiB/s of raw data here: slower than two
    zstd workers even on a loaded box; a store about as fast as the compressors gets a mix,
    by design.)"""
    store = SlowPackStore(0.25)
    repo = Repository(store, "vm1", segment_size=4 * MiB, pack_target=256 * KiB, threads=2,
                      upload_threads=2)
    data = _text(20 * MiB, 1)
    p, raw_chosen = _write_and_read_back(repo, data, adaptive=True)
    assert raw_chosen == 0 and p.meta["stats"]["raw_chosen_bytes"] == 0
    codecs = _codecs(store)
    assert codecs[RAW] == 0 and codecs[ZSTD] == len(data)
    assert p.bytes_stored < len(data) // 2


def test_a_fast_store_with_saturated_compressors_gets_mostly_raw_frames(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The compressors are the bottleneck (each compressed frame costs 20 ms, a raw one
    nothing) and the store takes a pack at once: most frames go raw, the first pack (before
    the store's speed is known) and the periodic probes are compressed."""
    slow_compressors(monkeypatch, 0.02)
    choices: list[int] = []  # the level of each frame handed after the first upload returned
    decide = writer_mod.PointWriter._frame_level

    def recorded(self: writer_mod.PointWriter) -> int:
        level = decide(self)
        if self._stored_one:
            choices.append(level)
        return level

    monkeypatch.setattr(writer_mod.PointWriter, "_frame_level", recorded)
    store = MemoryObjectStore()
    repo = Repository(store, "vm1", segment_size=4 * MiB, pack_target=4 * MiB, threads=2,
                      upload_threads=2)
    data = _text(128 * MiB, 2)
    p, raw_chosen = _write_and_read_back(repo, data, adaptive=True)
    codecs = _codecs(store)
    assert codecs[RAW] == raw_chosen == p.meta["stats"]["raw_chosen_bytes"]
    assert codecs[RAW] + codecs[ZSTD] == len(data)
    assert codecs[ZSTD] >= MiB  # the frames before the first upload returned
    # before the first upload returned (~35 frames here) every frame is compressed; after it
    # most go raw
    assert codecs[RAW] >= 0.4 * len(data), codecs
    assert choices.count(0) >= 0.7 * len(choices), choices


def test_without_adaptive_every_compressible_frame_is_compressed(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The same saturated compressors with the policy "zstd": no frame is chosen raw."""
    slow_compressors(monkeypatch, 0.005)
    store = MemoryObjectStore()
    repo = Repository(store, "vm1", segment_size=4 * MiB, pack_target=MiB, threads=2)
    data = _text(24 * MiB, 3)
    p, raw_chosen = _write_and_read_back(repo, data, adaptive=False)
    assert raw_chosen == 0 and "raw_chosen_bytes" not in p.meta["stats"]
    assert _codecs(store) == {RAW: 0, ZSTD: len(data)}


def test_a_point_mixing_raw_and_compressed_frames_is_a_base_like_any_other(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A delta over a point with raw and zstd frames, itself adaptive: both read back equal
    to their sources (reads never depend on the codec)."""
    slow_compressors(monkeypatch, 0.01)
    store = MemoryObjectStore()
    repo = Repository(store, "vm1", segment_size=4 * MiB, pack_target=MiB, threads=2)
    data = bytearray(_text(32 * MiB, 4))
    p0, _ = _write_and_read_back(repo, bytes(data), adaptive=True)
    assert _codecs(store)[RAW] > 0
    w = repo.begin("c1", base=p0.point_id, disk_sizes={"d0": len(data)}, kind="delta")
    w.adaptive = True
    rng = np.random.default_rng(9)
    for off in rng.integers(0, len(data) // 4096, 300).tolist():
        block = rng.integers(0, 256, 4096, dtype=np.uint8).tobytes()
        data[off * 4096:(off + 1) * 4096] = block
        w.write("d0", off * 4096, block)
    p1 = w.commit(created_at=2.0, consistency=Consistency.CRASH)
    for pid, want in ((p1.point_id, bytes(data)),):
        got = bytearray(len(data))
        repo.reader(pid, "d0").readinto(0, memoryview(got))
        assert bytes(got) == want


def test_compression_mode_values() -> None:
    """The policy's modes, and the boolean it used to be; anything else is a clear error."""
    from drsite.core.compression import compression_mode
    from drsite.core.errors import InvalidInput

    assert [compression_mode(v) for v in ("auto", "zstd", "off", True, False)] \
        == ["auto", "zstd", "off", "zstd", "off"]
    for bad in ("gzip", "", 1, 0, None, "AUTO"):
        with pytest.raises(InvalidInput, match="compression must be 'auto', 'zstd' or 'off'"):
            compression_mode(bad)


def test_agent_settings_carry_the_mode_and_the_old_boolean() -> None:
    """The vault sends ``compression_mode`` and, for an agent older than it, the boolean
    (false only for "off"); an agent reads the mode first, else the boolean, and sets the
    writer from it."""
    from drsite.agent.state import settings_from_args
    from drsite.core.errors import InvalidInput
    from drsite.replication.driver import ReplicationSettings
    from drsite.vault.db.models import Policy
    from drsite.vault.policies import agent_settings

    for mode, old in (("auto", True), ("zstd", True), ("off", False)):
        p = Policy(frequency_s=30.0, app_consistent_every_s=None, rpo_threshold_s=60.0,
                   retention_hours=1.0, resync_window="always", compression=mode,
                   encryption=False, bandwidth_limit_bps=None, mode="async", sync_budget_ms=50)
        s = agent_settings(p)
        assert s["compression_mode"] == mode and s["compression"] is old
        assert settings_from_args(s).compression == mode
        # what an older vault sends: the boolean only
        assert settings_from_args({"compression": old}).compression == ("zstd" if old else "off")
    assert settings_from_args({}).compression == "zstd"
    with pytest.raises(InvalidInput):
        settings_from_args({"compression_mode": "fast"})
    assert ReplicationSettings(compression=False).compression == "off"
