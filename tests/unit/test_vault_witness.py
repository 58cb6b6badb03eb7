"""The witness of a vault pair (vault/witness.py) and the rules that use it
(vault/witnesslink.py, vault/pairfence.py), with a fake clock: the conditional claim, the
fenced answer, durability across a restart, the write gate with and without the witness, and
the standby's automatic promotion."""

from __future__ import annotations

import ssl
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from drsite.core.errors import InvalidInput, StandbyVault
from drsite.vault.pairfence import PeerFence
from drsite.vault.server import run_vault
from drsite.vault.witness import STATE_FILE, WitnessBook
from drsite.vault.witnesslink import AutoPromote, WitnessLink

A, B = "https://a:8443", "https://b:8443"


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_renewal_records_the_holder_and_an_older_epoch_is_fenced(tmp_path: Path) -> None:
    clk = Clock()
    w = WitnessBook(tmp_path, clk)
    assert w.renew(A, 0, 10.0)["ok"] is True  # the first renewal records the holder, even at 0
    assert w.record.holder == A and w.record.epoch == 0
    assert w.renew(A, 3, 10.0)["ok"] is True
    clk.t += 3
    assert w.renew(A, 3, 10.0)["ok"] is True and w.quiet_s() == 0
    old = w.renew(A, 2, 10.0)  # the holder itself at an older epoch
    assert old["ok"] is False and old["fenced"] is True and old["epoch"] == 3
    tie = w.renew(B, 3, 10.0)  # a tie belongs to the recorded holder
    assert tie["fenced"] is True and tie["holder"] == A
    assert w.renew(A, 4, 10.0)["ok"] is True  # the holder re-took its lease: a newer epoch
    assert w.record.epoch == 4


def test_a_claim_needs_the_holder_quiet_past_its_lease_and_a_newer_epoch(tmp_path: Path) -> None:
    clk = Clock()
    w = WitnessBook(tmp_path, clk)
    # nobody ever renewed (an active vault without this witness may be writing): refused
    clk.t += 100
    r = w.claim(B, 1, 15.0, 10.0)
    assert r["granted"] is False and "no active vault has renewed" in r["why"]
    w.renew(A, 5, 10.0)
    clk.t += 14.9
    r = w.claim(B, 6, 15.0, 10.0)
    assert r["granted"] is False and "heard" in r["why"]
    clk.t += 0.2
    assert w.claim(B, 6, 10.0, 10.0)["granted"] is False  # N must exceed the holder's lease
    assert w.claim(B, 5, 15.0, 10.0)["granted"] is False  # not a newer epoch
    r = w.claim(B, 6, 15.0, 10.0)
    assert r["granted"] is True and w.record.holder == B and w.record.epoch == 6
    # the old holder comes back: fenced, naming the new one
    back = w.renew(A, 5, 10.0)
    assert back["fenced"] is True and back["holder"] == B and back["epoch"] == 6
    assert w.renew(B, 6, 10.0)["ok"] is True


def test_two_claimants_never_both_win(tmp_path: Path) -> None:
    clk = Clock()
    w = WitnessBook(tmp_path, clk)
    w.renew(A, 1, 10.0)
    clk.t += 60
    results: list[dict[str, Any]] = []
    start = threading.Barrier(8)

    def claim(i: int) -> None:
        start.wait()
        results.append(w.claim(f"https://c{i}:8443", 2 + i % 2, 15.0, 10.0))

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    won = [r for r in results if r["granted"]]
    assert len(won) == 1, results
    # even a claimant with a still newer epoch: the new holder was heard at its grant
    assert w.claim("https://late:8443", 9, 15.0, 10.0)["granted"] is False
    # the operator's forced claim skips the quiet period, never the epoch rule
    assert w.claim(B, w.record.epoch, 15.0, 10.0, force=True)["granted"] is False
    assert w.claim(B, w.record.epoch + 1, 15.0, 10.0, force=True)["granted"] is True


def test_the_record_survives_a_restart_and_a_restart_counts_as_hearing(tmp_path: Path) -> None:
    clk = Clock()
    w = WitnessBook(tmp_path, clk)
    w.renew(A, 7, 10.0)
    clk.t += 100  # the holder silent long enough ...
    w2 = WitnessBook(tmp_path, clk)  # ... but the witness restarted: it cannot know for how long
    assert w2.record.holder == A and w2.record.epoch == 7 and w2.record.lease_s == 10.0
    assert w2.claim(B, 8, 15.0, 10.0)["granted"] is False
    clk.t += 15
    assert w2.claim(B, 8, 15.0, 10.0)["granted"] is True
    assert WitnessBook(tmp_path, clk).record.holder == B  # on disk before it was answered
    (tmp_path / STATE_FILE).write_text("{broken")
    with pytest.raises(Exception, match="unreadable"):
        WitnessBook(tmp_path, clk)


class FakeWitness(WitnessLink):
    """A WitnessLink whose HTTP calls answer from a WitnessBook (or not at all)."""

    def __init__(self, book: WitnessBook, clk: Clock, me: str) -> None:
        super().__init__("https://w:1", "t", None, me=me, lease_s=10.0, clock=clk)
        self.book = book
        self.up = True
        self.calls = 0

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any] | None:
        self.calls += 1
        if not self.up:
            return None
        if path.endswith("renew"):
            return self.book.renew(body["holder"], body["epoch"], body["lease_s"])
        return self.book.claim(body["holder"], body["epoch"], body["after_s"], body["lease_s"],
                               force=body["force"])

    def state(self) -> dict[str, Any] | None:
        return self.book.state() if self.up else None


class FakePeerFence(PeerFence):
    def __init__(self, clk: Clock, witness: WitnessLink | None, epoch: int = 1) -> None:
        self.fenced_calls: list[Any] = []
        super().__init__(B, ssl.create_default_context(), lambda: (1, epoch), window_s=10.0,
                         witness=witness, clock=clk, on_fenced=self.fenced_calls.append)
        self.peer: dict[str, Any] | None = None

    def peer_state(self) -> dict[str, Any] | None:
        return self.peer


def test_gate_cut_off_from_peer_and_witness_stops_writing_within_the_lease(tmp_path: Path) -> None:
    clk = Clock()
    book = WitnessBook(tmp_path, clk)
    wl = FakeWitness(book, clk, A)
    f = FakePeerFence(clk, wl)
    f.peer = {"role": "standby", "epoch": 1}
    f.check()  # the loop: renews at the witness, asks the peer
    f.admit()
    assert book.record.holder == A
    # the peer goes silent: the witness confirms (renewed within the lease)
    f.peer = None
    clk.t += 9
    f.check()
    f.admit()
    # the witness goes silent too: writes go on only until the last renewal's window ends
    wl.up = False
    clk.t += 9.9
    f.admit()  # 9.9 s after the last renewal was sent: still inside lease_s
    clk.t += 0.2
    with pytest.raises(StandbyVault, match="neither its peer"):
        f.admit()
    # a candidate standby confirms nothing either
    f.peer = {"role": "standby", "epoch": 1, "candidate": True}
    with pytest.raises(StandbyVault, match="neither its peer"):
        f.admit()
    # the witness answers again: writes resume
    wl.up = True
    f.admit()
    assert f.fenced is None


def test_a_check_asks_the_peer_and_the_witness_at_once(tmp_path: Path) -> None:
    """Cut off from both, a write that must check waits one timeout, not one per party (CI: a
    vault checking them one after the other refused 5.4 s past its lease on a loaded box)."""
    clk = Clock()
    book = WitnessBook(tmp_path, clk)

    class SlowWitness(FakeWitness):
        def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any] | None:
            time.sleep(0.6)  # no answer within the timeout
            return None

    class SlowPeer(FakePeerFence):
        def peer_state(self) -> dict[str, Any] | None:
            time.sleep(0.6)
            return None

    f = SlowPeer(clk, SlowWitness(book, clk, A))
    t0 = time.monotonic()
    with pytest.raises(StandbyVault, match="neither its peer"):
        f.admit()
    assert time.monotonic() - t0 < 1.1  # one at a time would be >= 1.2


def test_gate_without_a_witness_is_unchanged_and_a_silent_peer_confirms() -> None:
    clk = Clock()
    f = FakePeerFence(clk, None)
    f.admit()
    clk.t += 100
    f.peer = {"role": "standby", "epoch": 1, "candidate": True}
    f.admit()


def test_a_newer_epoch_at_the_witness_fences_like_the_peer(tmp_path: Path) -> None:
    clk = Clock()
    book = WitnessBook(tmp_path, clk)
    wl = FakeWitness(book, clk, A)
    f = FakePeerFence(clk, wl, epoch=3)
    f.check()
    clk.t += 20
    assert book.claim(B, 4, 15.0, 10.0)["granted"] is True
    f.check()
    assert f.fenced is not None and f.fenced.peer_url == B and f.fenced.epoch == 4
    assert len(f.fenced_calls) == 1
    with pytest.raises(StandbyVault, match="fenced"):
        f.admit()


def test_the_standby_promotes_only_after_the_quiet_period_and_the_witness_grant(
        tmp_path: Path) -> None:
    clk = Clock()
    book = WitnessBook(tmp_path, clk)
    book.renew(A, 5, 10.0)
    wl = FakeWitness(book, clk, B)
    peer = {"up": True}
    promoted: list[int] = []
    ap = AutoPromote(wl, after_s=15.0, lease_s=10.0, peer_answers=lambda: peer["up"],
                     own_epoch=lambda: 4, promote=promoted.append, clock=clk)
    assert not ap.step()
    peer["up"] = False
    clk.t += 4.9
    assert not ap.step() and not ap.candidate
    clk.t += 0.2
    assert not ap.step() and ap.candidate  # silent N - lease_s: a candidate, no claim yet
    assert wl.calls == 0
    clk.t += 10  # silent N, a candidate for lease_s: claims; A renewed at the witness meanwhile
    book.renew(A, 5, 10.0)
    assert not ap.step() and promoted == [] and ap.last_claim is not None
    assert ap.last_claim["granted"] is False
    clk.t += 15.1  # A silent at the witness too
    assert ap.step() and promoted == [6]
    assert book.record.holder == B and book.record.epoch == 6
    # the peer answering again ends a candidacy (and restarts the count)
    ap2 = AutoPromote(wl, after_s=15.0, lease_s=10.0, peer_answers=lambda: peer["up"],
                      own_epoch=lambda: 4, promote=promoted.append, clock=clk)
    clk.t += 6
    ap2.step()
    assert ap2.candidate
    peer["up"] = True
    ap2.step()
    assert not ap2.candidate
    # the witness silent: no promotion however long the peer is
    peer["up"], wl.up = False, False
    clk.t += 100
    ap2.step()
    clk.t += 100
    assert not ap2.step() and promoted == [6]
    with pytest.raises(ValueError):
        AutoPromote(wl, after_s=10.0, lease_s=10.0, peer_answers=lambda: True,
                    own_epoch=lambda: 1, promote=promoted.append)


def test_witness_options_are_checked_before_anything_starts(tmp_path: Path) -> None:
    pg = "postgresql+psycopg://u@127.0.0.1:1/x"
    tok = tmp_path / "witness.token"
    tok.write_text("secret\n")
    with pytest.raises(InvalidInput, match="above the controller lease"):
        run_vault(tmp_path / "v", db_url=pg, peer_url=A, witness_url="https://w:1",
                  witness_token_file=tok, auto_promote_after=10.0, lease_s=10.0)
    with pytest.raises(InvalidInput, match="need --witness"):
        run_vault(tmp_path / "v", db_url=pg, peer_url=A, auto_promote_after=30.0)
    with pytest.raises(InvalidInput, match="--peer"):
        run_vault(tmp_path / "v", db_url=pg, witness_url="https://w:1", witness_token_file=tok)
    with pytest.raises(InvalidInput, match="token"):
        run_vault(tmp_path / "v", db_url=pg, peer_url=A, witness_url="https://w:1")
    with pytest.raises(InvalidInput, match="cannot read"):
        run_vault(tmp_path / "v", db_url=pg, peer_url=A, witness_url="https://w:1",
                  witness_token_file=tmp_path / "missing")
    assert not (tmp_path / "v").exists()


def test_after_a_grant_renewals_carry_the_granted_epoch(tmp_path: Path) -> None:
    """The promotion's own lease write passes the fence (a renewal) before the database holds
    the granted epoch: the renewal must not present the older one and fence itself."""
    clk = Clock()
    book = WitnessBook(tmp_path, clk)
    book.renew(A, 1, 10.0)
    clk.t += 20
    wl = FakeWitness(book, clk, B)
    assert (wl.claim(2, 15.0) or {})["granted"] is True and wl.confirmed()
    out = wl.renew(1)  # the database still says 1
    assert out is not None and out["ok"] is True and book.record.epoch == 2


def test_the_automatic_promotion_waits_for_an_operators_promotion() -> None:
    """The standby's role watcher does not run its automatic promotion (rule 1) while an
    operator's promotion runs, and stops once that made the vault active: both used to claim
    at the witness, the second at yet another epoch (seen as a flaky epoch in CI)."""
    import types

    from drsite.vault import context

    steps: list[str] = []
    fake = types.SimpleNamespace(
        standby=True, fenced=None, _role_stop=threading.Event(),
        _promote_lock=threading.RLock(),
        db=types.SimpleNamespace(in_recovery=lambda: True),
        autopromote=types.SimpleNamespace(step=lambda: steps.append("step") or False))
    orig_poll = context.ROLE_POLL_S
    context.ROLE_POLL_S = 0.01
    try:
        fake._promote_lock.acquire()          # the operator's promotion is running
        watcher = threading.Thread(target=context.Vault._watch_role, args=(fake,))
        watcher.start()
        threading.Event().wait(0.3)
        assert steps == []
        fake.standby = False                  # it made the vault active, then let go
        fake._promote_lock.release()
        watcher.join(5)
        assert not watcher.is_alive() and steps == []
        # without a promotion running, the watcher looks as before
        fake.standby = True
        watcher = threading.Thread(target=context.Vault._watch_role, args=(fake,))
        watcher.start()
        threading.Event().wait(0.3)
        assert steps
        fake._role_stop.set()
        watcher.join(5)
    finally:
        context.ROLE_POLL_S = orig_poll


def test_state_never_answers_active_at_the_old_epoch_during_a_promotion(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A promotion makes the vault active and then takes the lease at the granted epoch; a
    ``GET /vault/state`` between the two answered "active" at the old epoch (CI saw it as
    ``epoch 1 > 1`` right after an automatic promotion). It now waits for the promotion."""
    import contextlib
    import types

    from drsite.vault import context

    epoch = [1]
    monkeypatch.setattr(context, "read_lease", lambda s: types.SimpleNamespace(epoch=epoch[0]))
    v = object.__new__(context.Vault)
    seen: list[dict[str, object]] = []

    def step(*, force: bool = False, min_epoch: int = 0) -> float:
        # another request asks for the state while the lease is being taken
        asker = threading.Thread(target=lambda: seen.append(v.state()))
        asker.start()
        asker.join(0.5)
        epoch[0] = max(epoch[0] + 1, min_epoch)
        return 1.0

    v.__dict__.update(
        standby=True, fenced=None, _role_lock=threading.Lock(), _started=False,
        autopromote=None, lease=types.SimpleNamespace(step=step),
        db=types.SimpleNamespace(sqlite=False, read=contextlib.nullcontext),
        settings=types.SimpleNamespace(advertised_url=B, peer_url=A, witness_url=None))
    v.__dict__["_check_schema"] = lambda: None
    v.__dict__["_position"] = lambda: (2, epoch[0])
    v._become_active(force=True, min_epoch=3)
    deadline = time.monotonic() + 5
    while not seen and time.monotonic() < deadline:
        time.sleep(0.01)
    assert seen and seen[0]["role"] == "active" and seen[0]["epoch"] == 3, seen
