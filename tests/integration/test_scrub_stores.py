"""Scrub and point verification on every store kind (local files, the site store over mTLS,
S3 on moto, Azure Blob on Azurite): a flipped, a truncated and a deleted pack are each found,
attributed to the points that reference them, and corrupt packs are moved aside."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from drsite.core.clock import FakeClock
from drsite.core.model import Consistency
from drsite.sitestore.testing import shared_site_store
from drsite.store.contract import ObjectStore
from drsite.store.digest import image_digest
from drsite.store.local import LocalObjectStore
from drsite.store.repository import Repository
from drsite.store.scrub import CORRUPT, MISSING, ScrubCursor, references, scrub, verify_point
from tests.cloud import azure_azurite, s3_moto

KiB, MiB = 1 << 10, 1 << 20
SEG, PACK, DISK = 256 * KiB, 512 * KiB, 2 * MiB

STORES: dict[str, Callable[[Path], Any]] = {
    "local": lambda tmp: LocalObjectStore(tmp / "store"),
    "site": shared_site_store,
    "s3-moto": s3_moto,
    "azure-azurite": azure_azurite,
}


class Disk:
    """A model disk and the point ids committed from it."""

    def __init__(self) -> None:
        self.rng = np.random.default_rng(7)
        self.data = bytearray(DISK)
        self.images: dict[str, bytes] = {}

    def rand(self, n: int) -> bytes:
        return self.rng.integers(0, 256, n, dtype=np.uint8).tobytes()


def commit(repo: Repository, disk: Disk, cycle: str, base: str | None,
           writes: list[tuple[int, int]], t: float) -> str:
    w = repo.begin(cycle, base=base, disk_sizes={"d0": DISK}, kind="delta" if base else "initial")
    for off, n in writes:
        data = disk.rand(n)
        disk.data[off:off + n] = data
        w.write("d0", off, data)
    pid = w.commit(created_at=t, consistency=Consistency.CRASH).point_id
    w.close()
    disk.images[pid] = bytes(disk.data)
    return pid


def three_points(store: ObjectStore) -> tuple[Repository, Disk, list[str]]:
    """p1: the whole disk; p2 writes [0, 256K); p3 overwrites [0, 256K) and writes
    [512K, 768K): p2's pack is referenced by p2 only (its data was overwritten)."""
    repo = Repository(store, "vm1", segment_size=SEG, pack_target=PACK, threads=2)
    disk = Disk()
    p1 = commit(repo, disk, "c1", None, [(0, DISK)], 1000.0)
    p2 = commit(repo, disk, "c2", p1, [(0, SEG)], 1100.0)
    p3 = commit(repo, disk, "c3", p2, [(0, SEG), (2 * SEG, SEG)], 1200.0)
    return repo, disk, [p1, p2, p3]


def packs(repo: Repository, cycle: str) -> list[str]:
    return repo._list(f"packs/{cycle}/")


@pytest.mark.parametrize("kind", list(STORES))
def test_scrub_finds_flipped_truncated_and_deleted_packs(kind: str, tmp_path: Path) -> None:
    store = STORES[kind](tmp_path)
    repo, _disk, (p1, p2, p3) = three_points(store)
    clean, cur = scrub(repo)
    assert cur is None and clean.complete and clean.findings == []
    assert clean.points == [p1, p2, p3] and clean.latest_point == p3
    assert clean.bytes_checked > DISK // 2

    flip = packs(repo, "c3")[0]
    data = bytearray(store.get(repo.key(flip)))
    data[100:116] = bytes(b ^ 0xFF for b in data[100:116])
    store.put(repo.key(flip), bytes(data), overwrite=True)
    trunc = packs(repo, "c2")[0]
    store.put(repo.key(trunc), store.get(repo.key(trunc))[:-1000], overwrite=True)
    gone = packs(repo, "c1")[-1]
    store.delete(repo.key(gone))

    rep, cur = scrub(repo)
    assert cur is None and rep.complete
    by_key = {f.key: f for f in rep.findings}
    assert set(by_key) == {flip, trunc, gone}
    assert by_key[flip].kind == CORRUPT and by_key[flip].points == [p3]
    assert by_key[trunc].kind == CORRUPT and by_key[trunc].points == [p2]
    assert by_key[gone].kind == MISSING and by_key[gone].points == [p1, p2, p3]
    assert rep.latest_damaged and rep.damaged_points == [p1, p2, p3]
    # corrupt packs were really moved aside (kept under quarantine/), missing ones stay missing
    for key in (flip, trunc):
        assert not store.exists(repo.key(key))
        q = by_key[key].quarantined_to
        assert q is not None and q.startswith(f"quarantine/{key}.") and store.exists(repo.key(q))
    # a second pass finds the same damage (now all missing) and nothing else
    again, _ = scrub(repo)
    assert {f.key: f.kind for f in again.findings} == {flip: MISSING, trunc: MISSING, gone: MISSING}

    # verify: every disk read whole; the damaged ranges are named, a good point digests right
    proof = verify_point(repo, p3)
    assert not proof.ok and proof.disks[0].damaged and proof.disks[0].digest is None


@pytest.mark.parametrize("kind", ["local", "s3-moto"])
def test_verify_point_digest_equals_the_source(kind: str, tmp_path: Path) -> None:
    store = STORES[kind](tmp_path)
    repo, disk, points = three_points(store)
    for pid in points:
        proof = verify_point(repo, pid)
        assert proof.ok, proof.to_dict()
        want = image_digest(_Bytes(disk.images[pid]))
        assert proof.disks[0].digest == want
        assert proof.disks[0].bytes_read > 0


class _Bytes:
    def __init__(self, data: bytes) -> None:
        self.data = data

    @property
    def size(self) -> int:
        return len(self.data)

    def readinto(self, offset: int, buf: memoryview) -> None:
        buf[:] = self.data[offset:offset + len(buf)]


def test_scrub_resumes_from_its_cursor(tmp_path: Path) -> None:
    """With a budget of zero each call checks one pack and hands back a cursor; each resume
    goes on after the last pack checked (the cursor survives a JSON round trip), and damage
    found before an interruption is still reported when the pass completes."""
    store = LocalObjectStore(tmp_path / "store")
    repo, _disk, _points = three_points(store)
    all_packs = sorted(k for c in ("c1", "c2", "c3") for k in packs(repo, c))
    first = all_packs[0]
    data = bytearray(store.get(repo.key(first)))
    data[-5] ^= 1
    store.put(repo.key(first), bytes(data), overwrite=True)

    cur: ScrubCursor | None = None
    afters: list[str] = []
    for _ in range(len(all_packs)):
        rep, cur = scrub(repo, cur, budget_s=0.0)
        if cur is None:
            break
        afters.append(cur.after)
        assert not rep.complete and rep.packs_done == len(afters)
        cur = ScrubCursor.from_dict(cur.to_dict())
    assert cur is None and rep.complete
    assert afters == all_packs[:-1]  # one pack per call, in key order, none twice
    assert [f.key for f in rep.findings] == [first]
    assert rep.pass_started_at <= rep.finished_at  # type: ignore[operator]


def test_scrub_rate_limit_is_paid_by_the_bytes_read(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path / "store")
    repo, _disk, _points = three_points(store)
    clock = FakeClock(5000.0)
    rep, _ = scrub(repo, rate_bps=1 * MiB, clock=clock)
    slept = clock.now() - 5000.0
    # the bucket starts empty: every byte read is paid for, none borrowed from a burst
    assert rep.bytes_checked / MiB - 0.01 <= slept <= rep.bytes_checked / MiB + 0.01


class _StoreHost:
    """What ``ScrubCommands`` needs of an agent: its data directory, the store it serves, and
    whether another command waits in an item's lane."""

    def __init__(self, data_dir: Path, store: LocalObjectStore) -> None:
        self.data_dir = data_dir
        self.identity = None
        no_keys = type("Acl", (), {"point_auth": staticmethod(lambda item_id: None)})()
        self.store_service = type("Svc", (), {"local_store": store, "acl": no_keys})()
        self.waiting = False
        self.asked = 0

    def lane_waiting(self, item_id: str) -> bool:
        assert item_id == "vm1"
        self.asked += 1
        return self.waiting


def test_agent_scrub_yields_to_a_command_waiting_in_the_lane(tmp_path: Path) -> None:
    """A scrub slice ends after the pack it reads once a command waits behind it (a failover
    must not wait for a whole pass); its cursor is kept and the next slice goes on from it."""
    from drsite.agent.link import Command
    from drsite.agent.scrub import ScrubCommands

    store = LocalObjectStore(tmp_path / "store")
    repo, _disk, _points = three_points(store)
    n_packs = len([k for c in ("c1", "c2", "c3") for k in packs(repo, c)])
    assert n_packs >= 3
    host = _StoreHost(tmp_path / "agent", store)
    cmds = ScrubCommands(host)  # type: ignore[arg-type]
    host.waiting = True
    out = cmds.handle(Command("c1", "scrub", "vm1", {"budget_s": 300}))["scrub"]
    assert out["complete"] is False and out["packs_done"] == 1, out
    assert cmds.cursor_path("vm1").exists()  # the next slice goes on from here
    host.waiting = False
    out = cmds.handle(Command("c2", "scrub", "vm1", {"budget_s": 300}))["scrub"]
    assert out["complete"] is True and out["packs_done"] == n_packs and out["findings"] == []
    assert not cmds.cursor_path("vm1").exists()
    assert host.asked >= n_packs - 1


def test_references_name_the_points_that_need_each_object(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path / "store")
    repo, _disk, (p1, p2, p3) = three_points(store)
    refs = references(repo)
    assert refs[f"points/{p3}"] == {p3}
    (only_p2,) = packs(repo, "c2")  # its data was overwritten by p3
    assert refs[only_p2] == {p2}
    assert all(refs[k] == {p1, p2, p3} for k in packs(repo, "c1"))
    assert set(packs(repo, "c3")) <= {k for k, pts in refs.items() if pts == {p3}}
