"""The fence between the two vaults of a pair (vault/pairfence.py): who is newer, the marker
that keeps a fenced vault fenced, and a peer that does not answer."""

from __future__ import annotations

import json
import ssl
import time
from pathlib import Path

import pytest

from drsite.core.errors import InvalidInput, StandbyVault
from drsite.vault.pairfence import (
    MARKER,
    Fenced,
    PeerFence,
    _newer,
    clear_marker,
    load_marker,
    write_marker,
)
from drsite.vault.server import run_vault


def test_a_newer_timeline_wins_then_the_epoch() -> None:
    assert _newer((2, 1), (1, 5))      # promoted: new timeline, whatever the epochs
    assert not _newer((1, 9), (2, 1))  # the peer is the old one
    assert _newer((1, 3), (1, 2))      # same timeline: the epoch decides
    assert not _newer((1, 2), (1, 2))
    assert _newer((None, 3), (1, 2))   # a timeline unknown: the epoch decides


def test_marker_round_trip_and_a_damaged_marker_still_fences(tmp_path: Path) -> None:
    assert load_marker(tmp_path) is None
    f = Fenced("https://b:8443", 2, 7, time.time())
    write_marker(tmp_path, f)
    assert load_marker(tmp_path) == f
    (tmp_path / MARKER).write_text("{not json")
    damaged = load_marker(tmp_path)
    assert damaged is not None and "damaged" in damaged.peer_url
    (tmp_path / MARKER).write_text(json.dumps({"peer_url": "x"}))  # fields missing
    assert load_marker(tmp_path) is not None
    assert clear_marker(tmp_path) and not clear_marker(tmp_path)


def test_fenced_refuses_and_an_unreachable_peer_confirms() -> None:
    calls: list[int] = []

    def own() -> tuple[int | None, int]:
        calls.append(1)
        return 1, 1

    ctx = ssl.create_default_context()
    fenced = PeerFence("https://127.0.0.1:9", ctx, own, window_s=5.0,
                       fenced=Fenced("https://b:8443", 2, 2, time.time()))
    with pytest.raises(StandbyVault, match=r"fenced.*https://b:8443"):
        fenced.admit()
    # nobody listens on port 9: the peer's site may be the lost one, so this vault stays
    # active (the operator's or a witness's call, docs/control-plane.md) for one window
    free = PeerFence("https://127.0.0.1:9", ctx, own, window_s=5.0, timeout_s=0.5)
    free.admit()
    free.admit()  # confirmed: no second question
    assert free.fenced is None and free.last_answer is None and calls == []


def test_a_pair_needs_postgresql_and_an_https_peer(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="needs PostgreSQL"):
        run_vault(tmp_path / "v", peer_url="https://127.0.0.1:9")
    with pytest.raises(InvalidInput, match="https"):
        run_vault(tmp_path / "v", db_url="postgresql+psycopg://u@127.0.0.1:1/x",
                  peer_url="http://127.0.0.1:9")
    assert not (tmp_path / "v").exists()  # refused before anything was made
