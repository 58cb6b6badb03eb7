"""The agent's calls to the other site (issue 13 part 1): the circuit breaker and the
catalogue refresher — a hung peer never blocks a reader, and stalls only its own items."""

from __future__ import annotations

import threading
import time

import pytest

from drsite.agent.peers import CatalogueRefresher, PeerBreaker
from drsite.core.errors import NetworkError, NotFound, PeerUnavailable
from drsite.store.format import PointInfo


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_breaker_opens_fails_fast_probes_and_closes() -> None:
    clock = Clock()
    b = PeerBreaker("https://peer", failures_to_open=2, open_for_s=10, clock=clock)
    calls = []

    def down() -> list[PointInfo]:
        calls.append(1)
        raise NetworkError("timed out")

    for _ in range(2):
        with pytest.raises(NetworkError):
            b.call(down)
    assert b.is_open and len(calls) == 2
    with pytest.raises(PeerUnavailable, match="2 call"):
        b.call(down)              # fails fast: the peer is not called
    assert len(calls) == 2
    clock.t = 11                 # half-open: one probe goes through
    with pytest.raises(NetworkError):
        b.call(down)
    assert len(calls) == 3 and b.is_open
    with pytest.raises(PeerUnavailable):
        b.call(down)
    assert b.call(lambda: [], probe=True) == []   # a probe that succeeds closes it
    assert not b.is_open
    with pytest.raises(NotFound):  # a permanent answer is not the peer's failure
        b.call(lambda: (_ for _ in ()).throw(NotFound("no such item")))
    assert not b.is_open


def test_a_hung_peer_stalls_only_its_own_items() -> None:
    hang = threading.Event()
    r = CatalogueRefresher(0.05, breaker_open_for_s=0.2)

    def hung() -> list[PointInfo]:
        hang.wait(5)
        raise NetworkError("read timed out")

    try:
        r.track("a", "https://hung", hung)
        r.track("b", "https://fine", lambda: [])
        deadline = time.monotonic() + 5
        while r.get("b").points is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert r.get("b").points == []          # the healthy peer's item is listed
        t0 = time.monotonic()
        cat = r.get("a")                        # reading never waits on the hung peer
        assert time.monotonic() - t0 < 0.05 and cat.points is None
        hang.set()
        deadline = time.monotonic() + 5
        while r.get("a").error is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert isinstance(r.get("a").error, (NetworkError, PeerUnavailable))
    finally:
        hang.set()
        r.stop()


def test_an_open_breaker_never_quotes_another_items_failure() -> None:
    """Items on one peer share its breaker; an item whose own listing never failed learns
    only that the peer fails fast, not item A's error (which names item A); an item that did
    fail keeps its own error."""
    r = CatalogueRefresher(3600, breaker_open_for_s=60)
    r.stop()   # no background threads: the listings run here, in order

    def a_fails() -> list[PointInfo]:
        raise NetworkError("list items/i-aaa/points: timed out talking to https://peer")

    try:
        r.track("i-aaa", "https://peer", a_fails)
        r.track("i-bbb", "https://peer", lambda: [])
        tr_a, tr_b = r._items["i-aaa"], r._items["i-bbb"]
        r._list("i-aaa", tr_a)
        r._list("i-aaa", tr_a)            # two failures in a row: the breaker opens
        assert r.breaker("https://peer").is_open
        r._list("i-bbb", tr_b)            # refused fast, without a call
        err_b = r.get("i-bbb").error
        assert isinstance(err_b, PeerUnavailable) and "i-aaa" not in err_b.message, err_b
        assert "https://peer is not answering" in err_b.message and "fail fast" in err_b.message
        r._list("i-aaa", tr_a)            # refused fast too: keeps its own, more telling error
        err_a = r.get("i-aaa").error
        assert isinstance(err_a, NetworkError) and "i-aaa" in err_a.message
        r.refresh("i-bbb")                # a probe that succeeds closes it for every item
        assert r.get("i-bbb").error is None and r.get("i-bbb").points == []
        assert not r.breaker("https://peer").is_open
    finally:
        r.stop()
