"""The replica's verification (``ReplicaHydrator.check`` and ``verify_step``): a failover
compares only what the last verified point leaves unproven — nothing once the background
verification proved the point it boots — and a replica that differs is found, forgotten and
rebuilt, never booted. Every figure here is a count (bytes compared), not a time."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from tests.unit.test_repository import MiB, _replica_bytes, _stream_cycle, commit_cycle, rand, repo_on

from drsite.core.errors import InvalidReplicaState
from drsite.store.local import LocalObjectStore
from drsite.store.replica import ReplicaHydrator
from drsite.store.repository import Repository

SIZE = 8 * MiB


@contextlib.contextmanager
def no_lock() -> Iterator[None]:
    yield


def setup(tmp_path: Path) -> tuple[Repository, ReplicaHydrator, bytearray, str]:
    """A point p1 with 3 MiB of data in three places, hydrated."""
    repo = repo_on(LocalObjectStore(tmp_path / "store"))
    rng = np.random.default_rng(1)
    model = bytearray(SIZE)
    writes = []
    for off in (0, 3 * MiB, 7 * MiB):
        data = rand(rng, MiB)
        model[off:off + MiB] = data
        writes.append(("d0", off, data, MiB))
    p1 = commit_cycle(repo, "c1", None, {"d0": SIZE}, writes, 1.0)
    h = ReplicaHydrator(repo, tmp_path / "replica")
    assert h.catch_up() == [p1]
    return repo, h, model, p1


def delta(repo: Repository, h: ReplicaHydrator, model: bytearray, cycle: str, base: str,
          off: int, n: int, seed: int) -> str:
    data = rand(np.random.default_rng(seed), n)
    model[off:off + n] = data
    p = commit_cycle(repo, cycle, base, {"d0": SIZE}, [("d0", off, data, n)], 2.0)
    assert h.catch_up() == [p]
    return p


def flip(h: ReplicaHydrator, off: int) -> None:
    """Damage one byte of the replica image behind the hydrator's back."""
    fd = os.open(h.disk_path("d0"), os.O_RDWR)
    try:
        old = os.pread(fd, 1, off)
        os.pwrite(fd, bytes([old[0] ^ 0xFF]), off)
    finally:
        os.close(fd)


def test_a_failover_compares_only_what_changed_since_the_verified_point(tmp_path: Path) -> None:
    repo, h, model, p1 = setup(tmp_path)
    assert h.verified() is None
    first = h.check(repo.point(p1))            # never verified: every byte with data
    assert (first.how, first.bytes) == ("full", 3 * MiB)
    assert h.verified() == p1
    again = h.check(repo.point(p1))
    assert (again.how, again.bytes) == ("pre-verified", 0)
    p2 = delta(repo, h, model, "c2", p1, 5 * MiB, 64 * 1024, seed=2)
    assert h.verified() == p1                  # a delta keeps it: diff(p1, p2) is what is new
    inc = h.check(repo.point(p2))
    assert inc.how == "incremental" and inc.since == p1 and inc.bytes == 64 * 1024, inc
    assert h.verified() == p2 and _replica_bytes(h, "d0", SIZE) == bytes(model)


def test_damage_in_a_changed_range_is_found_and_the_replica_rebuilt(tmp_path: Path) -> None:
    repo, h, model, p1 = setup(tmp_path)
    h.check(repo.point(p1))
    p2 = delta(repo, h, model, "c2", p1, 5 * MiB, 64 * 1024, seed=2)
    flip(h, 5 * MiB + 100)                     # a bad write into the delta's range
    with pytest.raises(InvalidReplicaState, match="differs from point"):
        h.check(repo.point(p2))
    assert h.state() == (None, None) and h.verified() is None   # forgotten: never booted
    assert h.catch_up() == [p2]                # rebuilt in full from the store
    assert _replica_bytes(h, "d0", SIZE) == bytes(model)
    assert h.check(repo.point(p2)).how == "full"


def test_a_full_rewrite_forgets_the_verified_point(tmp_path: Path) -> None:
    """A rebuild (the held point pruned) and a streamed full cycle rewrite every range: the
    next check compares everything again."""
    repo, h, _model, p1 = setup(tmp_path)
    h.check(repo.point(p1))
    p2 = commit_cycle(repo, "c2", p1, {"d0": SIZE}, [("d0", 0, b"x" * 4096, 4096)], 2.0)
    p3 = commit_cycle(repo, "c3", p2, {"d0": SIZE}, [("d0", 8192, b"y" * 4096, 4096)], 3.0)
    repo.delete_point(p1)                      # the held point is gone: full rebuild
    repo.delete_point(p2)
    assert h.catch_up() == [p3]
    assert h.verified() is None and h.check(repo.point(p3)).how == "full"
    p4 = _stream_cycle(repo, h, "c4", None, SIZE, [(0, b"z" * 8192)])
    assert p4 is not None and h.verified() is None   # a full cycle streamed over the images
    assert h.check(repo.point(p4)).how == "full"
    p5 = _stream_cycle(repo, h, "c5", p4, SIZE, [(MiB, b"w" * 4096)])
    assert p5 is not None and h.verified() == p4     # a streamed delta keeps it
    assert h.check(repo.point(p5)).how == "incremental"


def test_background_verification_follows_the_replica_and_resumes(tmp_path: Path) -> None:
    """``verify_step`` works a batch at a time within its budget, resumes from its progress,
    follows the replica when hydration moves it on by deltas (the ranges that changed are
    compared too), and starts over when the images were rewritten in full."""
    repo, h, model, p1 = setup(tmp_path)
    prog = h.verify_step(no_lock, None, budget_s=0.0)   # no time: only its plan
    assert prog is not None and prog.target.point_id == p1 and prog.compared == 0
    p2 = delta(repo, h, model, "c2", p1, 5 * MiB, 64 * 1024, seed=2)
    assert h.verify_step(no_lock, prog, budget_s=60.0) is None
    assert prog.target.point_id == p2 and prog.compared == 3 * MiB + 64 * 1024
    assert h.verified() == p2
    assert h.check(repo.point(p2)).how == "pre-verified"
    assert h.verify_step(no_lock, None, budget_s=60.0) is None   # nothing left to do
    # a full rewrite in the middle of a verification: it starts over
    p3 = delta(repo, h, model, "c3", p2, 0, 4096, seed=3)
    prog = h.verify_step(no_lock, None, budget_s=0.0)
    assert prog is not None and prog.since == p2
    p4 = _stream_cycle(repo, h, "c4", None, SIZE, [(0, bytes(model[:2 * MiB]))])
    assert p4 is not None and p3 != p4
    assert h.verify_step(no_lock, prog, budget_s=60.0) is None
    assert h.verified() == p4


def test_background_verification_finds_damage(tmp_path: Path) -> None:
    _repo, h, model, p1 = setup(tmp_path)
    flip(h, 3 * MiB + 7)
    with pytest.raises(InvalidReplicaState, match="differs from point"):
        h.verify_step(no_lock, None, budget_s=60.0)
    assert h.state() == (None, None)
    assert h.catch_up() == [p1] and _replica_bytes(h, "d0", SIZE) == bytes(model)
    assert h.verify_step(no_lock, None, budget_s=60.0) is None and h.verified() == p1


def test_nothing_is_verified_while_a_point_is_being_applied(tmp_path: Path) -> None:
    repo, h, _model, p1 = setup(tmp_path)
    w = repo.begin("c2", base=p1, disk_sizes={"d0": SIZE}, kind="delta")
    stream = h.stream("c2", p1, {"d0": SIZE})
    assert stream is not None
    try:
        assert h.verify_step(no_lock, None, budget_s=60.0) is None and h.verified() is None
        with pytest.raises(InvalidReplicaState, match="does not hold"):
            h.check(repo.point(p1))
    finally:
        stream.close()
        w.close()


def test_a_periodic_full_reproof_finds_damage_no_cycle_rewrote(tmp_path: Path) -> None:
    """Damage behind the hydrator's back in a range no cycle rewrote since the last proof is
    not in an incremental comparison's scope; the periodic full re-proof (``full_every_s``)
    finds it before a failover needs the replica."""
    repo, h, model, p1 = setup(tmp_path)
    assert h.verify_step(no_lock, None, budget_s=60.0, full_every_s=3600.0) is None
    assert h.verified() == p1                   # proven in full just now: not due again
    assert h.verify_step(no_lock, None, budget_s=60.0, full_every_s=3600.0) is None
    p2 = delta(repo, h, model, "c2", p1, 5 * MiB, 64 * 1024, seed=2)
    flip(h, 100)                                # p1's data, which no later cycle touched
    assert h.check(repo.point(p2)).how == "incremental"   # not its scope: not seen
    prog = h.verify_step(no_lock, None, budget_s=0.0, full_every_s=0.0)
    assert prog is not None and prog.full       # due (every 0 s): a full comparison
    with pytest.raises(InvalidReplicaState, match="differs from point"):
        h.verify_step(no_lock, prog, budget_s=60.0, full_every_s=0.0)
    assert h.state() == (None, None)
    assert h.catch_up() == [p2] and _replica_bytes(h, "d0", SIZE) == bytes(model)


_VERIFY_IN_A_PROCESS = """
import contextlib, sys
from pathlib import Path
from drsite.store.local import LocalObjectStore
from drsite.store.replica import ReplicaHydrator
from tests.unit.test_repository import repo_on
root = Path(sys.argv[1])
h = ReplicaHydrator(repo_on(LocalObjectStore(root / "store")), root / "replica")
h.verify_step(contextlib.nullcontext, None, budget_s=60.0)
"""


@pytest.mark.parametrize("failpoint", ["replica.verify-batch=kill@1", "replica.verify-proving"
                                       "=kill"])
def test_a_background_proof_killed_midway_proves_nothing_and_runs_again(
        tmp_path: Path, failpoint: str) -> None:
    """The store agent SIGKILLed in the middle of a background proof (after its first batch,
    or with every batch compared, before the proof is saved): the replica's state is the one
    before it (nothing proven), readable, and the next agent's proof starts over and
    completes; the images are untouched."""
    repo, h, model, p1 = setup(tmp_path)
    p2 = delta(repo, h, model, "c2", p1, 1 * MiB, 5 * MiB, seed=5)   # two batches to compare
    before = (h.dir / "state.json").read_bytes()
    proc = subprocess.run([sys.executable, "-c", _VERIFY_IN_A_PROCESS, str(tmp_path)],
                          cwd=Path(__file__).parents[2], capture_output=True, text=True,
                          env={**os.environ, "DRSITE_FAILPOINTS": failpoint}, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert (h.dir / "state.json").read_bytes() == before
    assert h.verified() is None and h.state()[0] == p2
    assert h.verify_step(no_lock, None, budget_s=60.0) is None
    assert h.verified() == p2 and h.check(repo.point(p2)).how == "pre-verified"
    assert _replica_bytes(h, "d0", SIZE) == bytes(model)
