"""The fence between the two vaults of a pair (issue 14): an active vault writes only while its
peer has not been promoted past it.

Why the lease alone is not enough: each vault of a pair runs on its own PostgreSQL. After
``drsite vault promote`` at site B, B's database holds the lease at a newer epoch on a newer
timeline — but the old active's database, if site A comes back, still names A at the old epoch.
So the active vault also asks its peer (``GET /api/v1/vault/state``, over TLS checked against
the pair's CA: nobody else can answer for the peer) what it is:

- the peer is a standby, or fenced, or its (timeline, epoch) is older than ours → we stay
  active (**confirmed** for ``window_s`` from the moment the question was *sent*);
- the peer is active with a newer (timeline, epoch) → we are **fenced**: every write refused
  from then on (``StandbyVault``, naming the peer), the controller stops, and a marker
  (``DATA/fenced.json``) keeps it so across restarts until ``drsite vault rejoin``;
- the peer does not answer → without a witness, we stay active (the peer's site may be the
  one lost: a human decides, docs/control-plane.md, "Vault pair": promote only when site A is
  down or cut off from everything, agents included). With a witness (``vault/witness.py``,
  rule 2 of the witness rule), we stay active only while the witness took our renewal within
  ``window_s`` (:class:`~drsite.vault.witnesslink.WitnessLink`); cut off from both, no write.
  A standby that is a *candidate* for automatic promotion counts as not answering.

With a witness the loop also renews at the witness every ``window_s / 3`` (whatever the peer
says: the witness must keep hearing from the holder), and an answer naming a newer holder or
epoch fences this vault exactly like a peer promoted past it (rule 3).

Every write transaction checks the fence first (``Database.set_gate``): when the confirmation
has expired — always the case after the process was stopped (SIGSTOP, a frozen VM) for longer
than ``window_s``: the monotonic clock runs on — the write waits for a fresh answer before it
may start: at most one check, and a check asks the peer and renews at the witness at once, so
it lasts at most ``timeout_s`` (plus the local database read of this vault's epoch). A
background loop refreshes it every ``window_s / 3``, so a healthy pair never waits.

Responsible for: deciding, from the peer's answer, whether this vault may write. Not
responsible for: promotion (``context.Vault.promote``), the database's role, or agents.
"""

from __future__ import annotations

import json
import logging
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from drsite.core.errors import StandbyVault
from drsite.fsutil import atomic_write_bytes
from drsite.vault.witnesslink import WitnessLink

log = logging.getLogger(__name__)

MARKER = "fenced.json"
STATE_PATH = "/api/v1/vault/state"


@dataclass(frozen=True)
class Fenced:
    """Why this vault is fenced: the peer that took over, at which timeline and epoch."""

    peer_url: str
    timeline: int | None
    epoch: int
    at: float

    def to_dict(self) -> dict[str, Any]:
        return {"peer_url": self.peer_url, "timeline": self.timeline, "epoch": self.epoch,
                "at": self.at}

    def error(self) -> StandbyVault:
        return StandbyVault(
            f"this vault is fenced: the vault at {self.peer_url} was promoted past it (epoch "
            f"{self.epoch}, timeline {self.timeline}); the active vault is {self.peer_url}",
            hint=f"Send writes to {self.peer_url}. Make this vault its standby again with "
                 "'drsite vault rejoin' (its database is rewound onto the active one's).")


def load_marker(data_dir: Path) -> Fenced | None:
    try:
        raw = json.loads((data_dir / MARKER).read_text())
        return Fenced(str(raw["peer_url"]), raw.get("timeline"), int(raw["epoch"]),
                      float(raw["at"]))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        # a damaged marker still fences: refusing writes is the safe side
        log.error("fence marker %s is unreadable (%s): staying fenced", data_dir / MARKER, e)
        return Fenced("(unknown: damaged fence marker)", None, 0, time.time())


def clear_marker(data_dir: Path) -> bool:
    try:
        (data_dir / MARKER).unlink()
    except FileNotFoundError:
        return False
    return True


Own = Callable[[], tuple[int | None, int]]


class PeerFence:
    """This vault's side of the fence (see the module docstring). ``own()`` returns this
    vault's (timeline, epoch) as its database holds them; ``on_fenced`` runs once when the
    peer is found promoted past us (persist, stop the controller)."""

    def __init__(self, peer_url: str, ssl_context: ssl.SSLContext, own: Own, *,
                 window_s: float, timeout_s: float = 2.0,
                 on_fenced: Callable[[Fenced], None] | None = None,
                 fenced: Fenced | None = None, witness: WitnessLink | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.peer_url = peer_url.rstrip("/")
        self._ctx = ssl_context
        self._own = own
        self.window_s = window_s
        self.timeout_s = timeout_s
        self._on_fenced = on_fenced
        self.witness = witness
        self._clock = clock
        self._lock = threading.Lock()
        self._confirmed_until = 0.0  # monotonic
        self._refusal: StandbyVault | None = None  # why the last check did not confirm
        self._checked_at = float("-inf")  # when the last check ended, and its answer
        self._checked_ok = False
        self.fenced: Fenced | None = fenced
        self.last_answer: dict[str, Any] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def admit(self) -> None:
        """Before a write: raise ``StandbyVault`` when fenced; when the confirmation expired,
        ask the peer (and the witness) first: the write waits for at most one check, whether
        its own or the one running when it came (each lasts about ``timeout_s``)."""
        if self.fenced is not None:
            raise self.fenced.error()
        entered = self._clock()
        if entered < self._confirmed_until:
            return
        with self._lock:
            if self.fenced is None and self._clock() < self._confirmed_until:
                ok = True
            elif self.fenced is None and self._checked_at > entered:
                # a check finished while this write waited for the lock: its answer holds
                # (writes never queue behind one full check after another)
                ok = self._checked_ok
            else:
                ok = self.fenced is None and self._check_locked()
            refusal = self._refusal
        if self.fenced is not None:
            raise self.fenced.error()
        if not ok:
            raise refusal or StandbyVault("this vault is not confirmed to write")

    def peer_state(self) -> dict[str, Any] | None:
        """The peer's ``/vault/state`` answer, or None when it does not answer in time."""
        try:
            r = httpx.get(self.peer_url + STATE_PATH, verify=self._ctx, timeout=self.timeout_s)
            out = r.json() if r.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            return None
        return out if isinstance(out, dict) else None

    def check(self) -> None:
        """One round of the loop: renew at the witness (if any) and ask the peer."""
        with self._lock:
            if self.fenced is None:
                self._check_locked()

    def _renew_locked(self) -> None:
        """Renew at the witness as the holder at this vault's epoch; a newer holder or epoch
        recorded there fences this vault (rule 3)."""
        assert self.witness is not None
        try:
            epoch = self._own()[1]
        except Exception as e:  # its database unreachable: no renewal, the window runs out
            log.warning("cannot read this vault's epoch to renew at the witness: %s",
                        type(e).__name__)
            return
        out = self.witness.renew(epoch)
        if out is not None and out.get("fenced") is True:
            holder = str(out.get("holder") or "(unknown)")
            theirs = _int(out.get("epoch")) or 0
            log.error("the witness %s records %s at epoch %s, past this vault's epoch %s: this "
                      "vault is fenced and writes nothing until 'drsite vault rejoin'",
                      self.witness.url, holder, theirs, epoch)
            self._fence(Fenced(holder, None, theirs, time.time()))

    def _fence(self, f: Fenced) -> None:
        self.fenced = f
        if self._on_fenced is not None:
            self._on_fenced(f)

    def _check_locked(self) -> bool:
        """Ask the peer and, with a witness, renew there at the same time (a vault cut off
        from both learns it within one ``timeout_s``, not two); whether this vault is
        confirmed (may write)."""
        ok = self._ask_locked()
        self._checked_at, self._checked_ok = self._clock(), ok
        return ok

    def _peer_while_renewing(self) -> dict[str, Any] | None:
        """The peer's answer, asked in a thread while this one renews at the witness."""
        answer: list[dict[str, Any] | None] = [None]

        def ask() -> None:
            answer[0] = self.peer_state()

        t = threading.Thread(target=ask, daemon=True, name="drsite-vault-peer-ask")
        t.start()
        try:
            self._renew_locked()
        finally:
            t.join()
        return answer[0]

    def _ask_locked(self) -> bool:
        sent = self._clock()
        peer = self.peer_state() if self.witness is None else self._peer_while_renewing()
        if self.fenced is not None:  # the witness named a newer holder (rule 3)
            return False
        if peer is None:
            log.debug("peer vault %s does not answer", self.peer_url)
        self.last_answer = peer
        if peer is not None and peer.get("role") == "active":
            mine = self._own()
            theirs = (_int(peer.get("timeline")), _int(peer.get("epoch")) or 0)
            if _newer(theirs, mine):
                f = Fenced(self.peer_url, theirs[0], theirs[1], time.time())
                log.error("the peer vault %s is active at timeline %s, epoch %s, past this "
                          "vault's (timeline %s, epoch %s): this vault is fenced and writes "
                          "nothing until 'drsite vault rejoin'", self.peer_url, theirs[0],
                          theirs[1], mine[0], mine[1])
                self._fence(f)
                return False
            if theirs == mine:
                # two primaries at the same point: nobody can say who is newer; write nothing
                log.error("the peer vault %s is active at this vault's own timeline and epoch "
                          "(%s): refusing writes until that changes", self.peer_url, mine)
                self._refusal = StandbyVault(
                    f"this vault and the vault at {self.peer_url} are both active at the same "
                    "timeline and epoch; this one writes nothing until that is resolved",
                    hint="Stop one of them and make it the other's standby with 'drsite vault "
                         "rejoin'.")
                return False
        if self.witness is None or (peer is not None and peer.get("candidate") is not True):
            # a standby, a fenced or older peer, or (no witness) none answering: confirmed
            # from when we asked
            self._confirmed_until = sent + self.window_s
            return True
        # the peer is silent (or a candidate for promotion): the witness must confirm us (it
        # was just asked, above)
        if self.witness.confirmed():
            self._confirmed_until = max(self._confirmed_until, self.witness.confirmed_until)
            return True
        log.error("this vault reaches neither its peer %s nor the witness %s: it writes nothing "
                  "until one of them answers", self.peer_url, self.witness.url)
        self._refusal = StandbyVault(
            f"this vault reaches neither its peer vault {self.peer_url} nor the witness "
            f"{self.witness.url}: it writes nothing (the peer may be promoted)",
            hint="Restore its links; if the peer was promoted, send writes there and make this "
                 "vault its standby with 'drsite vault rejoin'.")
        return False

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="drsite-vault-peer")
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def _loop(self) -> None:
        while not self._stop.wait(self.window_s / 3.0):
            if self.fenced is not None:
                return
            try:
                self.check()
            except Exception:  # keep checking; a failed check only lets the window expire
                log.exception("checking the peer vault failed")


def _int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _newer(theirs: tuple[int | None, int], mine: tuple[int | None, int]) -> bool:
    """Whether the peer's (timeline, epoch) is past ours: a newer timeline (a promotion), or
    the same timeline and a newer epoch."""
    (tt, te), (mt, me) = theirs, mine
    if tt is not None and mt is not None and tt != mt:
        return tt > mt
    return te > me


def write_marker(data_dir: Path, f: Fenced) -> None:
    atomic_write_bytes(data_dir / MARKER, json.dumps(f.to_dict()).encode())
