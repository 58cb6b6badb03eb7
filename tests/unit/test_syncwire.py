"""The sync wire's frame reader (tracking/syncwire.py): ``spin`` busy-waits for a frame without
sleeping and gives up at its bound; ``ready`` polls any descriptor number (``select`` could not
past 1023)."""

from __future__ import annotations

import os
import resource
import socket
import threading
import time

import pytest

from drsite.tracking import syncwire as W


def _pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    a.settimeout(5)
    return a, b


def test_spin_returns_when_a_frame_arrives_and_gives_up_at_its_bound() -> None:
    a, b = _pair()
    try:
        r = W.FrameReader(a)
        t0 = time.monotonic()
        assert r.spin(t0 + 0.02) is False          # nothing came: False at the bound
        took = time.monotonic() - t0
        assert 0.02 <= took < 0.5
        threading.Timer(0.05, lambda: b.sendall(W.ack_frame(7))).start()
        timeouts: list[float] = []
        poll = r._poll()

        def recording(timeout: float) -> list[tuple[int, int]]:
            timeouts.append(timeout)
            return poll(timeout)

        r._poll = lambda: recording  # type: ignore[method-assign]
        t0 = time.monotonic()
        assert r.spin(t0 + 5.0) is True            # the ack came during the spin
        took = time.monotonic() - t0
        assert 0.04 <= took < 2.0
        # it spun: many polls, none of which could sleep
        assert len(timeouts) > 10 and set(timeouts) == {0}
        del r._poll
        assert r.read() == (W.T_ACK, (7).to_bytes(8, "little"))
        b.sendall(W.ack_frame(8) + W.ack_frame(9))
        assert r.read()[0] == W.T_ACK              # 9 is now buffered whole
        assert r.spin(time.monotonic() - 1) is True   # buffered: True even past the bound
        assert W.seq_of(r.read()[1]) == 9
        calls: list[int] = []

        def stop() -> bool:
            calls.append(1)
            return len(calls) > 3

        t0 = time.monotonic()                      # stop() ends a spin at once
        assert r.spin(t0 + 5.0, stop=stop) is False
        assert len(calls) == 4 and time.monotonic() - t0 < 1.0
        b.shutdown(socket.SHUT_WR)                 # a hang-up ends a spin too
        assert r.spin(time.monotonic() + 5.0) is True
        with pytest.raises(Exception, match="closed"):
            r.read()
    finally:
        a.close()
        b.close()


def test_ready_polls_a_descriptor_past_1023() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2048:
        pytest.skip("the descriptor limit is below 2048")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 2048), hard))
    a, b = _pair()
    with pytest.raises(OSError):
        os.fstat(1500)   # free: dup2 would close whatever held it
    high = os.dup2(a.fileno(), 1500)
    hs = socket.socket(fileno=high)
    try:
        r = W.FrameReader(hs)
        assert r.ready() is False
        b.sendall(W.ack_frame(3))
        deadline = time.monotonic() + 5
        while not r.ready():
            assert time.monotonic() < deadline
        assert W.seq_of(r.read()[1]) == 3
    finally:
        hs.close()
        a.close()
        b.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
