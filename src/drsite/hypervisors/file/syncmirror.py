"""Synchronous mode of a file VM: each batch of guest writes is acknowledged to the guest only
once the recovery agent holds it durably (its sync journal, ``tracking.syncjournal``) — or
after at most the policy's latency budget, when the mirror falls back to asynchronous.

How it fits :class:`~drsite.hypervisors.file.vm.FileVm` (all under its I/O lock, so the
numbering is the write order and a seal is one instant of it):

- :meth:`SyncMirror.submit` numbers every batch (``seq`` +1, also while suspended), *before*
  the batch's local writes, and, while a journal run is active, queues it — and when the wire
  is idle sends it at once, so the recovery site's append and ``fdatasync`` overlap the
  guest's local writes; after releasing the lock the writer :meth:`SyncMirror.wait` s for the
  ack, at most ``budget_ms`` — sending the queue and reading the acks itself when no other
  writer is on the wire (see the class doc); a batch whose local writes fail after it was
  numbered is :meth:`SyncMirror.abandon` ed (the run ends: suspended);
- :meth:`SyncMirror.mark` gives the seal its instant ``{stream, seq}`` (stored in the cycle and
  in the point's meta) and, when no run is active (never started, or suspended), begins one
  at that instant: the journal holds the writes after the seal, the point what came before.

Fallback: a write whose ack does not come within the budget, a lost connection or a refused
hello suspend the mirror (``state: suspended``, ``reason``): writers stop waiting at once,
the change log records everything as always, and the next seal begins a new run; the item
is back in sync once that seal's point is committed (the agent checks, ``agent/syncmode.py``).

Responsible for: numbering, sending, waiting within the budget, the run's state. Not
responsible for: durability on the recovery site (the server), the seal (``FileVm``).
"""

from __future__ import annotations

import logging
import os
import select
import socket
import ssl
import threading
import time
import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from drsite import tlsutil
from drsite.core.errors import DrsiteError, InvalidInput, NetworkError
from drsite.tracking import syncwire as W
from drsite.tracking.syncjournal import encode_writes

log = logging.getLogger(__name__)
MAX_QUEUED_BYTES = 256 << 20   # beyond this the mirror suspends rather than buffer more
# A batch is sent from submit (under the VM's I/O lock) only when the wire is idle (nothing
# unacknowledged: the peer has read everything sent) and the frames are at most this: they
# then fit the kernel's socket buffers, so the send never waits for the peer.
EARLY_SEND_BYTES = 64 << 10
# A writer at queue depth 1 spins (``FrameReader.spin``) rather than sleeps for its ack, for
# at most twice the acks' recent round trip and never past this (nor its deadline), and stops
# when another writer arrives; while that round trip is longer (a slow recovery disk or
# link), it sleeps: a wake-up then costs a small share.
ACK_SPIN_MAX_S = 0.5e-3


@dataclass
class _Lead:
    """A leader's turn on the wire: what it sent and until when it may wait for the acks."""

    sock: ssl.SSLSocket
    reader: W.FrameReader
    run: int
    batch: list[tuple[int, bytes]]   # (seq, payload) to send, in seq order
    last: int          # the last seq sent: the turn ends when it is acknowledged
    deadline: float    # time.monotonic()
    thread: int        # the writer that reads the acks
    timeout_at: float = 0.0   # when the socket's timeout was last set to the deadline
    sent_at: float = 0.0      # time.monotonic() after the send (the ack round trip's start)


@dataclass(frozen=True)
class SyncConfig:
    """Where and how to mirror (``sync.json`` in the VM directory, written by the driver)."""

    item_id: str
    host: str
    port: int
    budget_ms: int
    ca_file: str
    cert_file: str
    key_file: str

    def __post_init__(self) -> None:
        if not self.item_id or not 0 < self.port < 65536 or not 1 <= self.budget_ms <= 60_000:
            raise InvalidInput(f"bad sync configuration {self!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"item_id": self.item_id, "host": self.host, "port": self.port,
                "budget_ms": self.budget_ms, "ca_file": self.ca_file,
                "cert_file": self.cert_file, "key_file": self.key_file}

    @staticmethod
    def from_dict(d: dict[str, Any]) -> SyncConfig:
        try:
            return SyncConfig(str(d["item_id"]), str(d["host"]), int(d["port"]),
                              int(d["budget_ms"]), str(d["ca_file"]), str(d["cert_file"]),
                              str(d["key_file"]))
        except (KeyError, TypeError, ValueError) as e:
            raise InvalidInput(f"bad sync configuration: {e}") from None


class SyncMirror:
    """The guest's half of synchronous mode (see module doc). Thread-safe.

    No I/O thread on the write path: a writer *leads* when nobody is on the wire: it sends
    everything queued (its own batch and those queued since) and reads the acks itself, then
    wakes the others. At queue depth 1 the writer sends its batch from :meth:`submit`, under
    the VM's I/O lock and before the batch's local writes (the wire is idle and the frame
    small: the send never waits for the peer), so the round trip and the recovery site's
    ``fdatasync`` overlap the local writes; it reads the ack in :meth:`wait`. A write is one
    send and one receive on the guest's own thread: no hand-off, no wake-up. At depth > 1
    the writers that queued meanwhile go in the next batch, sent by a waiting writer, and
    share the recovery site's ``fdatasync`` (group commit). One thread at a time uses the
    TLS connection (``_busy``, under ``_cv``, held from a leader's send to its last ack —
    across its local writes when it sent from :meth:`submit`): OpenSSL objects are not for
    concurrent use; other threads end it with a raw TCP shutdown. A leader's socket
    operations time out at its own deadline (the budget from :meth:`submit` or :meth:`wait`)."""

    def __init__(self, config: SyncConfig, *, connect_timeout: float = 5.0) -> None:
        self.config = config
        self.stream = uuid.uuid4().hex
        self.seq = 0                     # the last batch numbered (under the VM's I/O lock)
        self.state = "starting"          # starting | connecting | in_sync | suspended | closed
        self.reason = "waiting for the next seal to begin the sync journal"
        self.base: int | None = None     # the current run's seal instant
        self.acked = 0
        self.suspended_at: float | None = None
        self.fallbacks = 0
        self.early_sends = 0             # batches sent from submit (before their local writes)
        self.early_send_bytes = EARLY_SEND_BYTES   # 0: never (the benchmark's serial variant)
        self.ack_spin_max_s = ACK_SPIN_MAX_S       # 0: never spin (the benchmark's variant)
        # moving average of queue-depth-1 ack round trips, each at most 2 * ack_spin_max_s
        # (whether to spin, not a measurement to report); 0: none yet
        self.ack_rtt_s = 0.0
        self._cv = threading.Condition()
        self._queue: deque[tuple[int, bytes]] = deque()   # (seq, payload)
        self._queued_bytes = 0
        self._run = 0                    # bumped at each begin/suspend: I/O of an old run stops
        self._sock: ssl.SSLSocket | None = None   # the run's connection (once in sync)
        self._reader: W.FrameReader | None = None
        self._busy = False               # a leader is using the connection
        self._pending: _Lead | None = None   # sent from submit; its writer reads the acks in wait
        self._waiters = 0                # writers in wait()
        self._connect_timeout = connect_timeout
        self._ctx: ssl.SSLContext | None = None

    # -- under the VM's I/O lock --------------------------------------------------------------
    def submit(self, writes: Sequence[tuple[str, int, bytes | bytearray | memoryview]], *,
               alone: bool = True) -> int | None:
        """Number one batch (before its local writes); queue it while a run is active, and
        send it now when the wire is idle and the writer is ``alone`` (the caller's hint: no
        other writer in the VM's write path, queue depth 1). Returns the seq to :meth:`wait`
        for (or to :meth:`abandon`), or None (asynchronous: nothing to wait for)."""
        with self._cv:
            self.seq += 1
            if self.state not in ("connecting", "in_sync"):
                return None
            payload = encode_writes(writes)
            if self._queued_bytes + len(payload) > MAX_QUEUED_BYTES:
                self._suspend_locked("the recovery agent fell too far behind")
                return None
            self._queue.append((self.seq, payload))
            self._queued_bytes += len(payload)
            if (alone and self.state == "in_sync" and not self._busy and not self._waiters
                    and len(self._queue) == 1 and len(payload) <= self.early_send_bytes):
                # queue depth 1 (no other writer: at depth > 1 a send here would lengthen the
                # I/O lock every writer takes — the recovery side, woken on this CPU, runs
                # while it is held; the waiting writers lead from wait instead) and an idle
                # wire: every frame sent before was acknowledged, so the peer has read it
                # all and this small send fits the socket buffers (never waits for it)
                lead = self._take_wire_locked(time.monotonic() + self.config.budget_ms / 1000.0)
                self._cv.release()
                try:
                    failure = self._send(lead)
                finally:
                    self._cv.acquire()
                if failure is not None:
                    self._release_wire_locked(lead, failure)
                else:
                    self._pending = lead
                    self.early_sends += 1
            return self.seq

    def abandon(self, seq: int, why: str) -> None:
        """The local writes of batch ``seq`` (numbered, perhaps sent) failed: the journal may
        hold a batch the disks do not, so the run ends (suspended; the next seal begins a new
        one). The caller's turn on the wire, if it sent from :meth:`submit`, ends here.
        Called under the VM's I/O lock, so no seal began another run since ``submit``."""
        with self._cv:
            self._suspend_locked(f"the local write of batch {seq} failed: {why}")
            lead = self._pending
            if lead is not None and lead.thread == threading.get_ident():
                self._pending = None
                self._release_wire_locked(lead, None)

    def mark(self) -> dict[str, Any]:
        """The seal's instant; begins a new run there if none is active."""
        with self._cv:
            mark = {"stream": self.stream, "seq": self.seq}
            if self.state in ("starting", "suspended"):
                self._begin_locked()
            return mark

    # -- after the I/O lock -------------------------------------------------------------------
    def wait(self, seq: int) -> None:
        """Wait until ``seq`` is durable on the recovery site, at most the budget; past it,
        or on any failure, the mirror suspends and this returns (never raises). Reads the
        acks of what this writer sent from :meth:`submit`; leads (sends and reads the acks
        itself) when nobody else is on the wire."""
        deadline = time.monotonic() + self.config.budget_ms / 1000.0
        with self._cv:
            self._waiters += 1
            try:
                self._wait_locked(seq, deadline)
            finally:
                self._waiters -= 1

    def _wait_locked(self, seq: int, deadline: float) -> None:
        """:meth:`wait` with ``_cv`` held (released for the network I/O)."""
        lead = self._pending
        if lead is not None and lead.thread == threading.get_ident():
            self._pending = None
            self._cv.release()
            try:
                failure = self._read_acks(lead, spin=True)
            finally:
                self._cv.acquire()
            self._release_wire_locked(lead, failure)
        while self.acked < seq and self.state in ("connecting", "in_sync"):
            left = deadline - time.monotonic()
            if left <= 0:
                self._suspend_locked(f"a write waited more than the latency budget of "
                                     f"{self.config.budget_ms} ms for the recovery site")
                return
            if self.state == "in_sync" and not self._busy and self._queue:
                lead = self._take_wire_locked(deadline)
                self._cv.release()
                try:
                    failure = self._send(lead)
                    if failure is None:
                        failure = self._read_acks(lead)
                finally:
                    self._cv.acquire()
                self._release_wire_locked(lead, failure)
            else:
                self._cv.wait(left)

    # -- a leader's turn on the wire ----------------------------------------------------------
    def _take_wire_locked(self, deadline: float) -> _Lead:
        """Take the connection (``_busy``) and everything queued."""
        sock, reader = self._sock, self._reader
        assert sock is not None and reader is not None and not self._busy
        batch = list(self._queue)
        self._queue.clear()
        self._queued_bytes = 0
        self._busy = True
        return _Lead(sock, reader, self._run, batch, batch[-1][0], deadline,
                     threading.get_ident())

    def _send(self, lead: _Lead) -> str | None:
        """Send the turn's frames (without ``_cv``); a failure's reason, or None."""
        try:
            data = b"".join(W.entry_frame(q, payload) for q, payload in lead.batch)
            lead.timeout_at = time.monotonic()
            lead.sock.settimeout(max(lead.deadline - lead.timeout_at, 1e-3))
            lead.sock.sendall(data)
            lead.sent_at = time.monotonic()
            return None
        except TimeoutError:
            return self._over_budget()
        except (OSError, DrsiteError, ssl.SSLError) as e:
            return f"the connection to the recovery agent failed: {e}"

    def _read_acks(self, lead: _Lead, *, spin: bool = False) -> str | None:
        """Read acks until the turn's last seq is acknowledged (without ``_cv``); a
        failure's reason, or None. ``spin`` (queue depth 1, the writer sent from
        :meth:`submit`): busy-wait for the first ack while it is due soon (see
        ``ACK_SPIN_MAX_S``), and keep the round trip's moving average."""
        sock, reader = lead.sock, lead.reader
        try:
            rtt = self.ack_rtt_s
            if spin and self.ack_spin_max_s > 0 and rtt <= self.ack_spin_max_s:
                window = min(2 * rtt, self.ack_spin_max_s) if rtt else self.ack_spin_max_s
                if not reader.spin(min(lead.sent_at + window, lead.deadline), self._crowded) \
                        and time.monotonic() >= lead.deadline:
                    return self._over_budget()
            while True:
                now = time.monotonic()
                if now - lead.timeout_at > 1e-3:   # the timeout is per operation
                    sock.settimeout(max(lead.deadline - now, 1e-3))
                    lead.timeout_at = now
                kind, body = reader.read()
                if kind != W.T_ACK:
                    err = W.read_json_body(body) if kind == W.T_JSON else {}
                    raise NetworkError(f"the recovery agent stopped the sync journal: "
                                       f"{(err.get('error') or {}).get('message', kind)}")
                got = W.seq_of(body)
                with self._cv:
                    if self._run != lead.run:
                        return None
                    if got > self.acked:
                        self.acked = got
                        self._cv.notify_all()
                if got >= lead.last:
                    if spin:   # clamped: one slow flush does not stop spinning for long
                        took = min(time.monotonic() - lead.sent_at,
                                   2 * self.ack_spin_max_s)
                        self.ack_rtt_s = took if not rtt else rtt + (took - rtt) / 8
                    return None
        except TimeoutError:
            return self._over_budget()
        except (OSError, DrsiteError, ssl.SSLError) as e:
            return f"the connection to the recovery agent failed: {e}"

    def _crowded(self) -> bool:
        """Another writer arrived (read without ``_cv``: a hint): a spinning writer stops,
        the newcomer needs the CPU and the GIL for its local writes."""
        return self._waiters > 1 or bool(self._queue)

    def _over_budget(self) -> str:
        return (f"a write waited more than the latency budget of "
                f"{self.config.budget_ms} ms for the recovery site")

    def _release_wire_locked(self, lead: _Lead, failure: str | None) -> None:
        """End a turn (``_cv`` held): suspend on failure, close a connection whose run ended
        meanwhile, wake the next leader and the writers acknowledged."""
        self._busy = False
        if failure is not None and self._run == lead.run:
            self._suspend_locked(failure)
        if self._sock is not lead.sock:   # the run ended while this thread used it
            _close_quietly(lead.sock)
        self._cv.notify_all()

    # -- runs ---------------------------------------------------------------------------------
    def _begin_locked(self) -> None:
        self._run += 1
        self.base = self.seq
        self.acked = self.seq
        self._queue.clear()
        self._queued_bytes = 0
        self.state = "connecting"
        threading.Thread(target=self._connector, args=(self._run, self.base), daemon=True,
                         name="drsite-sync-mirror").start()

    def _suspend_locked(self, reason: str) -> None:
        if self.state in ("suspended", "closed"):
            return
        log.warning("sync mode suspended for %s: %s", self.config.item_id, reason)
        self.state = "suspended"
        self.reason = reason
        self.suspended_at = time.time()
        self.fallbacks += 1
        self._end_run_locked()

    def _end_run_locked(self) -> None:
        """The run is over: waiters stop, its connection is shut down (and closed, unless a
        leader is using it: the leader closes it)."""
        self._run += 1
        self._queue.clear()
        self._queued_bytes = 0
        sock, self._sock, self._reader = self._sock, None, None
        self._cv.notify_all()
        if sock is not None:
            _shutdown_raw(sock)  # a leader's read or write fails at once; the watcher wakes
            if not self._busy:
                _close_quietly(sock)

    def _context(self) -> ssl.SSLContext:
        if self._ctx is None:
            c = self.config
            self._ctx = tlsutil.client_context(Path(c.ca_file), Path(c.cert_file), Path(c.key_file))
        return self._ctx

    def _connect(self, base: int) -> ssl.SSLSocket:
        c = self.config
        raw = socket.create_connection((c.host, c.port), timeout=self._connect_timeout)
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock = self._context().wrap_socket(raw, server_hostname=c.host)
        except BaseException:
            raw.close()
            raise
        sock.sendall(W.json_frame({"item_id": c.item_id, "stream": self.stream, "base": base}))
        reply = W.read_json(W.FrameReader(sock))
        if not reply.get("ok"):
            sock.close()
            err = reply.get("error") or {}
            raise NetworkError(f"the recovery agent refused the sync journal: "
                               f"{err.get('message', reply)}")
        return sock

    def _connector(self, run: int, base: int) -> None:
        """The run's thread: connect and say hello (off the I/O lock: a seal never waits for
        the network), then watch the idle connection for the peer closing it, so the mirror
        suspends at once rather than at the next write. It never reads or writes the TLS
        connection once it is in sync (the leaders do) and wakes only on a hang-up."""
        try:
            sock = self._connect(base)
        except (OSError, DrsiteError, ssl.SSLError) as e:
            with self._cv:
                if self._run == run:
                    self._suspend_locked(f"cannot reach the recovery agent's sync journal: {e}")
            return
        try:
            watch = os.dup(sock.fileno())  # its own fd: the socket may be closed meanwhile
        except OSError as e:
            _close_quietly(sock)
            with self._cv:
                if self._run == run:
                    self._suspend_locked(f"the connection to the recovery agent failed: {e}")
            return
        try:
            with self._cv:
                if self._run != run:
                    _close_quietly(sock)
                    return
                self._sock, self._reader = sock, W.FrameReader(sock)
                self.state = "in_sync"
                self.reason = ""
                self._cv.notify_all()
            poller = select.poll()
            poller.register(watch, select.POLLRDHUP)   # FIN or RST; not data (the acks)
            while True:
                try:
                    poller.poll()
                except InterruptedError:
                    continue
                with self._cv:
                    while self._busy and self._run == run:
                        self._cv.wait()   # a leader is on the wire: it sees the end itself
                    if self._run == run:
                        self._suspend_locked("the recovery agent closed the connection")
                    return
        finally:
            os.close(watch)

    # -- status / end -------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        with self._cv:
            return {"item_id": self.config.item_id, "state": self.state, "reason": self.reason,
                    "stream": self.stream, "seq": self.seq, "base": self.base,
                    "acked": self.acked, "budget_ms": self.config.budget_ms,
                    "fallbacks": self.fallbacks, "suspended_at": self.suspended_at}

    def close(self) -> None:
        with self._cv:
            self.state = "closed"
            self._end_run_locked()


def _shutdown_raw(sock: socket.socket) -> None:
    """End a connection another thread is using: a TCP shutdown below TLS (no OpenSSL call
    from this thread), which makes that thread's read or write fail at once."""
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass


def _close_quietly(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass
