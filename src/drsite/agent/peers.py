"""Calls to the other site, kept off the agent's control loop.

The heartbeat (what the vault sees of this host) must never wait on another site: a hung or
partitioned peer — the recovery site's store server for a forward item, the old primary's for a
reverse item — would otherwise silence the whole host (issue 13). So:

- :class:`PeerBreaker`: a circuit breaker per peer (a store URL). After ``failures_to_open``
  failed calls in a row it opens: calls fail at once with ``PeerUnavailable`` instead of
  waiting out a timeout; after ``open_for_s`` one probe is let through (half-open); a success
  closes it.
- :class:`CatalogueRefresher`: one thread per peer lists the recovery points of that peer's
  items (through the breaker) and keeps the result; the heartbeat reads the last result and
  the reason it is stale, never the network. One hung peer stalls only its own thread, so only
  the items that need it go stale (with the reason in their health).

Responsible for: the breakers and the catalogue cache. Not responsible for: what the points mean
to the vault (``daemon``) or the data plane's own timeouts (``sitestore``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from drsite.core.errors import DrsiteError, PeerUnavailable
from drsite.store.format import PointInfo

log = logging.getLogger(__name__)


class PeerBreaker:
    """Circuit breaker of one peer. Thread-safe."""

    def __init__(self, peer: str, *, failures_to_open: int = 2, open_for_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.peer = peer
        self.failures_to_open = max(1, failures_to_open)
        self.open_for_s = open_for_s
        self._clock = clock
        self._lock = threading.Lock()
        self._failures = 0
        self._opened_at: float | None = None
        self._probing = False
        self.last_error: DrsiteError | None = None

    @property
    def is_open(self) -> bool:
        with self._lock:
            return self._opened_at is not None

    def before_call(self) -> None:
        """Raise ``PeerUnavailable`` while open (except for one probe after ``open_for_s``).
        Its message names the peer only: the failures that opened the breaker were other
        calls' (another item's listing names that item), and each caller keeps its own."""
        with self._lock:
            if self._opened_at is None:
                return
            if not self._probing and self._clock() - self._opened_at >= self.open_for_s:
                self._probing = True  # half-open: this call is the probe
                return
            failures = self._failures
        raise PeerUnavailable(
            f"{self.peer} is not answering ({failures} call(s) in a row failed); calls to it "
            f"fail fast, and one is tried every {self.open_for_s:.0f} s until it answers")

    def success(self) -> None:
        with self._lock:
            if self._opened_at is not None:
                log.info("peer %s answers again", self.peer)
            self._failures = 0
            self._opened_at = None
            self._probing = False
            self.last_error = None

    def failure(self, err: DrsiteError) -> None:
        with self._lock:
            self._failures += 1
            self.last_error = err
            if self._probing or (self._opened_at is None
                                 and self._failures >= self.failures_to_open):
                if self._opened_at is None:
                    log.warning("peer %s does not answer (%s); calls to it fail fast for %.0f s "
                                "at a time", self.peer, err, self.open_for_s)
                self._opened_at = self._clock()
                self._probing = False

    def call(self, fn: Callable[[], list[PointInfo]], *, probe: bool = False) -> list[PointInfo]:
        """``fn()`` through the breaker (only transient drsite errors count as the peer's
        failures). ``probe``: try even while open (a caller off the control loop that has
        reason to think the peer is back); its success closes the breaker."""
        if not probe:
            self.before_call()
        try:
            out = fn()
        except DrsiteError as e:
            if e.transient:
                self.failure(e)
            raise
        self.success()
        return out


@dataclass
class Catalogue:
    """The last known recovery points of one item, and why they may be stale."""

    points: list[PointInfo] | None = None   # None: never listed yet
    listed_at: float | None = None          # monotonic time of the last good listing
    error: DrsiteError | None = None        # the last listing's failure (cleared on success)


@dataclass
class _Tracked:
    peer: str
    lister: Callable[[], list[PointInfo]]
    view: Catalogue = field(default_factory=Catalogue)
    # the lister (a Repository) is not thread-safe: one listing at a time
    busy: threading.Lock = field(default_factory=threading.Lock)


class CatalogueRefresher:
    """Lists each item's points in the background, one thread per peer (see module doc).

    ``track(item_id, peer, lister)`` registers an item (``lister`` returns its points, e.g.
    ``Repository.points``); :meth:`get` returns the last result at once. :meth:`refresh`
    lists one item now in the caller's thread (a worker that just committed a point), through
    the same breaker.
    """

    def __init__(self, interval: float, *, breaker_open_for_s: float = 5.0) -> None:
        self.interval = interval
        self.breaker_open_for_s = breaker_open_for_s
        self._lock = threading.Lock()
        self._items: dict[str, _Tracked] = {}
        self._breakers: dict[str, PeerBreaker] = {}
        self._threads: dict[str, threading.Thread] = {}
        self._wake: dict[str, threading.Event] = {}
        self._stop = threading.Event()

    def breaker(self, peer: str) -> PeerBreaker:
        with self._lock:
            b = self._breakers.get(peer)
            if b is None:
                b = self._breakers[peer] = PeerBreaker(peer, open_for_s=self.breaker_open_for_s)
            return b

    def track(self, item_id: str, peer: str, lister: Callable[[], list[PointInfo]]) -> None:
        with self._lock:
            old = self._items.get(item_id)
            view = old.view if old is not None and old.peer == peer else Catalogue()
            self._items[item_id] = _Tracked(peer, lister, view)
            start = not self._stop.is_set() and peer not in self._threads
            if start:
                self._wake[peer] = threading.Event()
                t = threading.Thread(target=self._run, args=(peer,), daemon=True,
                                     name=f"catalogue-{len(self._threads)}")
                self._threads[peer] = t
        if start:
            t.start()
        self.kick(peer)

    def untrack(self, item_id: str) -> None:
        with self._lock:
            self._items.pop(item_id, None)

    def get(self, item_id: str) -> Catalogue:
        with self._lock:
            tr = self._items.get(item_id)
            return Catalogue() if tr is None else Catalogue(
                None if tr.view.points is None else list(tr.view.points), tr.view.listed_at,
                tr.view.error)

    def kick(self, peer: str | None = None) -> None:
        """Refresh now (one peer, or all)."""
        with self._lock:
            events = [self._wake[peer]] if peer in self._wake else \
                list(self._wake.values()) if peer is None else []
        for ev in events:
            ev.set()

    def refresh(self, item_id: str) -> None:
        """List one item now, in the caller's thread (never the control loop's): a worker
        that just worked on the item. It probes even an open breaker — the peer may well be
        back (its store answered the work) — and a success closes it for every item."""
        with self._lock:
            tr = self._items.get(item_id)
        if tr is not None:
            self._list(item_id, tr, probe=True)

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def stop(self) -> None:
        """Stop the peer threads (a thread stuck on a hung peer ends after its timeout)."""
        self._stop.set()
        self.kick()

    def _list(self, item_id: str, tr: _Tracked, *, probe: bool = False) -> None:
        breaker = self.breaker(tr.peer)
        try:
            if not probe:
                breaker.before_call()
        except PeerUnavailable as e:
            with self._lock:
                # the item's own last failure says more than "fails fast" (and is its own)
                if tr.view.error is None:
                    tr.view.error = e
            return
        try:
            with tr.busy:
                points = breaker.call(tr.lister, probe=True)
        except DrsiteError as e:
            with self._lock:
                tr.view.error = e
            log.debug("item %s: listing points at %s failed: %s", item_id, tr.peer, e)
            return
        except Exception as e:  # a bug must not kill the peer's thread
            log.exception("item %s: listing points failed unexpectedly", item_id)
            with self._lock:
                tr.view.error = PeerUnavailable(f"listing points failed: {type(e).__name__}")
            return
        with self._lock:
            tr.view.points = points
            tr.view.listed_at = time.monotonic()
            tr.view.error = None

    def _run(self, peer: str) -> None:
        wake = self._wake[peer]
        while not self._stop.is_set():
            with self._lock:
                mine = [(i, t) for i, t in sorted(self._items.items()) if t.peer == peer]
            for item_id, tr in mine:
                if self._stop.is_set():
                    return
                self._list(item_id, tr)
            wake.wait(self.interval)
            wake.clear()
