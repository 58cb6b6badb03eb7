"""The recovery site's sync-journal server: where synchronous file VMs send their writes.

A TLS socket server (client certificate required, the vault's CA only) beside the store
server, speaking :mod:`drsite.tracking.syncwire`. Per connection: the hello names the item,
the stream and the seal instant the run begins at; the caller must be the item's writer in
the store's access list (``Authorizer.authorize(..., "put", item, ...)``), and the item must
not be held by a failover (:func:`~drsite.sitestore.server.replica_held`). Then entries are
appended to the item's :class:`~drsite.tracking.syncjournal.SyncJournal` and acknowledged
after one flush for every entry read so far (group commit: at queue depth > 1 many
entries share one flush), by the connection's own thread: receive, append, flush, ack, with
no hand-off (the journal's preallocated segment makes the flush data-only). A newer
connection for an item replaces the older one (the mirror began a new run).

A journal is deleted with :meth:`SyncServer.drop` (crash-safe: renamed aside under
``.dropped-*``, then removed; :meth:`SyncServer.sweep` finishes an interrupted removal).

Responsible for: connections, authorization, appending and acknowledging, removing a journal.
Not responsible for: trimming or deciding when a journal goes (the store agent), or replay
(failover).
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path

from drsite.core.errors import (
    Conflict,
    DrsiteError,
    Forbidden,
    InvalidInput,
    NetworkError,
)
from drsite.core.model import validate_name
from drsite.fsutil import drop_aside, named_subdirs, sweep_dropped
from drsite.pki import cert_identity
from drsite.sitestore.acl import Authorizer
from drsite.sitestore.server import held_marker, replica_held
from drsite.tracking import syncwire as W
from drsite.tracking.syncjournal import SyncJournal

log = logging.getLogger(__name__)
HELLO_TIMEOUT_S = 10.0
# After an ack the connection's thread spins (``FrameReader.spin``) rather than sleeps for the
# next entry, at most this long, when the writer's last gap (ack sent → next entry read here)
# was under 4 times as long (a gap read after sleeping includes the wake-up): a writer at
# queue depth 1 sends its next write within tens of µs, and waking a sleeping thread on an
# idle CPU costs as much. A writer with longer gaps costs no spinning; one whose gaps are just
# over the window costs two spins in every SPIN_REST + 2 entries.
NEXT_SPIN_S = 200e-6
SPIN_REST = 16   # after two spins in a row that caught nothing: this many entries read unspun
JOURNALS_DIR = "sync-journals"   # DATA/sync-journals/<item>/: beside DATA/replicas/


def journals_dir(data_dir: Path) -> Path:
    """Where an agent whose data directory is ``data_dir`` keeps its sync journals."""
    return Path(data_dir) / JOURNALS_DIR


class SyncServer:
    """Serves the sync journals under ``journals/<item>/`` (see module doc)."""

    def __init__(self, journals: Path, replicas: Path, context: ssl.SSLContext,
                 acl: Authorizer, *, host: str = "127.0.0.1", port: int = 0,
                 latest_point: Callable[[str], str | None] | None = None) -> None:
        self.journals = Path(journals)
        # the item's newest committed point id (None: none), recorded when a run begins
        # (``SyncJournal.begin``'s ``after_point``); None: not recorded
        self.latest_point = latest_point
        self.replicas = Path(replicas)
        self.context = context
        self.acl = acl
        self.host = host
        self._lock = threading.Lock()
        self._open: dict[str, SyncJournal] = {}
        self._active: dict[str, socket.socket] = {}   # item → its current connection
        self._stop = threading.Event()
        self._sock = socket.create_server((host, port))
        self._sock.settimeout(0.25)
        self.port = int(self._sock.getsockname()[1])
        self._thread = threading.Thread(target=self._serve, name="sync-server", daemon=True)
        self.next_spin_s = NEXT_SPIN_S   # 0: never spin (the benchmark's variant)

    def start(self) -> None:
        self.journals.mkdir(parents=True, exist_ok=True)
        self._thread.start()
        log.info("sync journal server at %s:%d", self.host, self.port)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2.0)
        self._sock.close()
        with self._lock:
            for s in self._active.values():
                _shutdown_raw(s)
            self._active.clear()
            for j in self._open.values():
                j.close()
            self._open.clear()

    # -- journals -----------------------------------------------------------------------------
    def journal(self, item_id: str) -> SyncJournal:
        """The item's journal, opened once (a torn tail is cut at that open)."""
        validate_name("item", item_id)
        with self._lock:
            j = self._open.get(item_id)
            if j is None:
                j = self._open[item_id] = SyncJournal.open(self.journals / item_id)
            return j

    def has_journal(self, item_id: str) -> bool:
        return (self.journals / validate_name("item", item_id)).is_dir()

    def journal_items(self) -> list[str]:
        """Items that have a journal directory here."""
        return named_subdirs(self.journals, "item", f"sync journals {self.journals}")

    def drop(self, item_id: str) -> bool:
        """Delete the item's journal, closing its connection: renamed aside (one atomic
        step: from then on the item has no journal, a new run starts a new one), then
        removed (:meth:`sweep`). Whether there was one."""
        path = self.journals / validate_name("item", item_id)
        with self._lock:
            s = self._active.pop(item_id, None)
            j = self._open.pop(item_id, None)
            existed = drop_aside(path, "sync journal")
        if s is not None:
            _shutdown_raw(s)
        if j is not None:
            j.close()
        self.sweep()
        return existed

    def sweep(self) -> int:
        """Finish removals a crash interrupted (every ``.dropped-*`` directory); how many."""
        return sweep_dropped(self.journals, "sync journals")

    def disconnect(self, item_id: str) -> None:
        """Close the item's connection (a failover takes the journal over)."""
        with self._lock:
            s = self._active.pop(item_id, None)
        if s is not None:
            _shutdown_raw(s)  # its connection thread closes it

    # -- connections --------------------------------------------------------------------------
    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                raw, addr = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._conn, args=(raw, addr), daemon=True,
                             name="sync-conn").start()

    def _conn(self, raw: socket.socket, addr: object) -> None:
        item_id = ""
        conn: socket.socket = raw
        try:
            raw.settimeout(HELLO_TIMEOUT_S)
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                sock = self.context.wrap_socket(raw, server_side=True)
            except (ssl.SSLError, OSError) as e:
                log.warning("sync connection from %s: TLS handshake failed: %s", addr, e)
                return
            conn = sock
            reader = W.FrameReader(sock)
            try:
                item_id, journal, run = self._hello(sock, W.read_json(reader))
            except DrsiteError as e:
                log.warning("sync connection from %s refused: %s", addr, e)
                sock.sendall(W.json_frame({"ok": False, "error": e.to_dict()}))
                return
            sock.sendall(W.json_frame({"ok": True}))
            sock.settimeout(None)
            self._pump(item_id, sock, reader, journal, run)
        except (OSError, DrsiteError, ssl.SSLError) as e:
            log.info("sync connection of %s from %s ended: %s", item_id or "?", addr, e)
        finally:
            with self._lock:
                if item_id and self._active.get(item_id) is conn:
                    self._active.pop(item_id, None)
            _close(conn)

    def _hello(self, sock: ssl.SSLSocket,
               hello: dict[str, object]) -> tuple[str, SyncJournal, int]:
        der = sock.getpeercert(binary_form=True)
        if not der:
            raise Forbidden("a sync connection needs a client certificate")
        ident = cert_identity(der)
        try:
            item_id = validate_name("item", str(hello["item_id"]))
            stream, base = str(hello["stream"]), int(str(hello["base"]))
        except (KeyError, ValueError) as e:
            raise InvalidInput(f"malformed sync hello: {e}") from None
        self.acl.authorize(ident, "put", item_id, f"sync journal of {item_id}")
        journal = self.journal(item_id)
        after: str | bool | None = False
        if self.latest_point is not None:
            after = self.latest_point(item_id)
        # the held check, the new run and its registration are one step under the lock:
        # a failover writes the held marker, then disconnect()s (which takes the lock)
        with self._lock:
            if replica_held(self.replicas, item_id):
                raise Forbidden(f"item {item_id} failed over on this site: its sync journal "
                                "is closed")
            if self._open.get(item_id) is not journal:
                raise Conflict(f"the sync journal of {item_id} was removed meanwhile; the "
                               "next seal begins a new one")
            old = self._active.pop(item_id, None)
            if old is not None:
                _shutdown_raw(old)  # the mirror began a new run: the old connection is over
            journal.begin(stream, base, after_point=after)
            run = journal.run   # this connection's appends are refused once another begins
            self._active[item_id] = sock
        log.info("sync journal of %s begins at %d (stream %s, from %s)", item_id, base,
                 stream[:8], ident.common_name)
        return item_id, journal, run

    def _pump(self, item_id: str, sock: ssl.SSLSocket, reader: W.FrameReader,
              journal: SyncJournal, run: int) -> None:
        held = str(held_marker(self.replicas, item_id))   # replica_held, one stat per flush
        gap = 0.0   # the writer's last gap: ack sent → its next entry read
        acked_at = 0.0
        misses = 0  # spins in a row that ended with nothing
        rest = 0    # entries to take without spinning (after two misses)
        while not self._stop.is_set():
            if rest:
                rest -= 1
            elif acked_at and gap <= 4 * self.next_spin_s:
                if reader.spin(acked_at + self.next_spin_s):
                    misses = 0
                else:
                    misses += 1
                    if misses == 2:   # gaps just over the window: spinning only costs
                        misses, rest = 0, SPIN_REST
            frame = reader.read()
            if acked_at:
                gap = time.monotonic() - acked_at
            # group commit: everything already here shares one flush — the last entry's
            # write is it (``durable``: one RWF_DSYNC write, or a write and an fdatasync);
            # each append names this connection's run, refused once a newer one began
            while reader.ready():
                self._append(frame, journal, run, durable=False)
                frame = reader.read()
            with self._lock:
                if self._active.get(item_id) is not sock:
                    raise NetworkError("replaced by a newer sync connection")
            last = self._append(frame, journal, run, durable=True)
            # after the flush, before the ack: a failover in another process (break-glass)
            # writes the held marker, then reads the journal, so every entry acknowledged
            # here was durable before it read
            if os.path.exists(held):
                raise Forbidden(f"item {item_id} failed over on this site: its sync journal "
                                "is closed")
            sock.sendall(W.ack_frame(last))
            acked_at = time.monotonic()

    @staticmethod
    def _append(frame: tuple[int, bytes], journal: SyncJournal, run: int, *,
                durable: bool) -> int:
        kind, body = frame
        if kind != W.T_ENTRY:
            raise InvalidInput(f"unexpected sync frame type {kind}")
        seq = W.seq_of(body)
        journal.append(seq, W.entry_payload(body), durable=durable, run=run)
        return seq


def _shutdown_raw(s: socket.socket) -> None:
    """End a connection another thread uses: TCP shutdown below TLS (no OpenSSL call here)."""
    try:
        socket.socket.shutdown(s, socket.SHUT_RDWR)
    except OSError:
        pass


def _close(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        s.close()
    except OSError:
        pass
