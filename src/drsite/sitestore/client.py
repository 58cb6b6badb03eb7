"""The primary side of the remote recovery store: :class:`SiteObjectStore` (the
:class:`~drsite.store.contract.ObjectStore` contract over HTTPS with a client certificate) and
:class:`SiteTarget` (a :class:`~drsite.replication.target.RecoveryTarget` whose replica and
resync digests live on the secondary site's store server).

Error mapping (the contract says backends raise only drsite errors):

- a JSON error body from the server → the same drsite class (``ObjectNotFound``, ``CorruptData``…,
  :func:`drsite.core.errors.from_dict`);
- an answer without one (``HEAD`` has no body): 404 ``ObjectNotFound`` and 409
  ``ObjectExists`` (what those mean on the object routes), anything else by status
  (:func:`drsite.core.errors.class_for_status`: 5xx transient);
- connection errors and timeouts → ``NetworkError`` (transient);
- TLS failures that retrying cannot fix → ``AuthError`` (permanent) with a hint: the server's
  certificate is not trusted (wrong CA or address), or the server refused ours (expired,
  another CA, none).
"""

from __future__ import annotations

import builtins
import json
import ssl
import threading
from collections.abc import Callable, Iterator
from typing import Any, NoReturn, cast

import httpx
import numpy as np

from drsite.core.errors import (
    AuthError,
    DrsiteError,
    InvalidInput,
    NetworkError,
    ObjectExists,
    ObjectNotFound,
    from_dict,
)
from drsite.core.model import validate_name
from drsite.replication.resync import RESYNC_BLOCK, DigestResult
from drsite.sitestore import protocol as P
from drsite.store.contract import validate_key, validate_prefix
from drsite.store.format import PointInfo
from drsite.store.repository import Repository
from drsite.store.wrappers import RetryingStore

# OpenSSL reasons of alerts a server sends when it refuses the client's certificate
_REFUSED_REASONS = frozenset({
    "TLSV13_ALERT_CERTIFICATE_REQUIRED", "SSLV3_ALERT_BAD_CERTIFICATE",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED", "SSLV3_ALERT_CERTIFICATE_REVOKED",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN", "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE",
    "TLSV1_ALERT_UNKNOWN_CA", "TLSV1_ALERT_ACCESS_DENIED", "PEER_DID_NOT_RETURN_A_CERTIFICATE",
    "SSLV3_ALERT_HANDSHAKE_FAILURE",   # TLS 1.2 server that got no certificate
})


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        yield cur
        cur = cur.__cause__ or cur.__context__


def _transport_error(exc: httpx.TransportError, what: str, base_url: str) -> DrsiteError:
    """A transport failure as a drsite error: TLS trust problems are permanent ``AuthError``s,
    everything else a transient ``NetworkError``."""
    for e in _chain(exc):
        if isinstance(e, ssl.SSLCertVerificationError):
            return AuthError(
                f"{what}: the store server at {base_url} is not trusted: "
                f"{e.verify_message or e.reason}",
                hint="The server must present a certificate issued by the vault's CA for this "
                     "address; check the store URL and that both sites belong to this vault.")
        if isinstance(e, ssl.SSLError) and (e.reason or "") in _REFUSED_REASONS:
            return AuthError(
                f"{what}: the store server at {base_url} refused this agent's TLS connection "
                f"({e.reason}): certificate missing, expired or not from the vault's CA",
                hint="The agent needs a current certificate from the vault's CA; re-register it "
                     "if it expired or was issued by another vault.")
    if isinstance(exc, httpx.TimeoutException):
        return NetworkError(f"{what}: timed out talking to {base_url}")
    return NetworkError(f"{what}: cannot reach the store server at {base_url}: "
                        f"{exc.__class__.__name__}: {exc}")


def _status_error(resp: httpx.Response, what: str) -> DrsiteError:
    body: Any = None
    if resp.content and resp.headers.get("content-type", "").startswith("application/json"):
        try:
            body = json.loads(resp.content)
        except ValueError:
            body = None
    status = resp.status_code
    if not (isinstance(body, dict) and isinstance(body.get("code"), str)):
        if status == 404:
            return ObjectNotFound(f"{what}: not found")
        if status == 409:
            return ObjectExists(f"{what}: already exists")
        body = {"message": f"{what}: HTTP {status} from the store server"}
    return from_dict(body, http_status=status)


CONNECT_TIMEOUT_S = 5.0
PUT_PIECE = 1 << 20   # a put's body goes out in pieces of this size (views, not copies)


class SiteObjectStore:
    """:class:`~drsite.store.contract.ObjectStore` over a store server (HTTPS, client certificate
    in ``ssl_context``), plus the server's replica calls (:meth:`catch_up`, :meth:`digests`).

    Responsible for: validating keys before sending, pooled keep-alive connections (one
    ``httpx.Client``, safe to share between threads), and mapping every failure to a drsite
    error. Not responsible for: retries (wrap in ``RetryingStore``; :class:`SiteTarget` does),
    what the server does with the data, or proxies (environment proxy settings are ignored:
    agents talk to each other directly).
    """

    def __init__(self, base_url: str, ssl_context: ssl.SSLContext, *, timeout: float = 60.0,
                 slow_timeout: float = 3600.0, max_connections: int = 16) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.slow_timeout = slow_timeout
        self._client = httpx.Client(
            # a peer that does not accept the connection is known in seconds, whatever the
            # read timeout of the data plane (issue 13: a hung site must not stall callers)
            base_url=self.base_url, verify=ssl_context,
            timeout=httpx.Timeout(timeout, connect=min(timeout, CONNECT_TIMEOUT_S)),
            limits=httpx.Limits(max_connections=max_connections,
                                max_keepalive_connections=max_connections,
                                keepalive_expiry=20.0),   # below the server's 60 s keep-alive
            trust_env=False, follow_redirects=False)

    def __repr__(self) -> str:
        return f"SiteObjectStore({self.base_url!r})"

    # -- plumbing --------------------------------------------------------------------------

    def close(self) -> None:
        """Close pooled connections. The store must not be used afterwards."""
        self._client.close()

    def __enter__(self) -> SiteObjectStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _fail(self, exc: httpx.TransportError, what: str) -> NoReturn:
        raise _transport_error(exc, what, self.base_url) from exc

    def _request(self, method: str, path: str, what: str, *,
                 content: bytes | Iterator[bytes] | None = None,
                 params: dict[str, str] | None = None, headers: dict[str, str] | None = None,
                 timeout: float | None = None, ok_404: bool = False) -> httpx.Response:
        try:
            resp = self._client.request(
                method, path, content=content, params=params, headers=headers,
                timeout=timeout if timeout is not None else httpx.USE_CLIENT_DEFAULT)
        except httpx.TransportError as exc:
            self._fail(exc, what)
        # httpx keeps a response and its stream in a reference cycle: left alone, every
        # response (with its request's body, an 8 MiB pack for a put, and its content) lives
        # until a later cyclic GC, and the engine's memory grew by hundreds of MiB
        resp.stream = httpx.ByteStream(b"")
        if resp.status_code >= 400 and not (ok_404 and resp.status_code == 404):
            raise _status_error(resp, what)
        return resp

    @staticmethod
    def _obj(key: str) -> str:
        return P.OBJECTS + validate_key(key)

    # -- contract --------------------------------------------------------------------------

    def put(self, key: str, data: bytes | memoryview, *, overwrite: bool = False) -> None:
        path = self._obj(key)
        view = memoryview(data).cast("B")
        # sent in pieces straight from the caller's buffer (a pack writer's reused 8 MiB
        # buffer): no copy of the whole body per put, which cost a fresh 8 MiB allocation
        # (page faults, RSS) for every pack in flight
        # (h11 takes any bytes-like piece: it joins each into the bytes it sends)
        pieces = cast(Iterator[bytes],
                      (view[i:i + PUT_PIECE] for i in range(0, len(view), PUT_PIECE)))
        self._request("PUT", path, f"put {key}", content=pieces,
                      params={"overwrite": "1" if overwrite else "0"},
                      headers={"Content-Type": "application/octet-stream",
                               "Content-Length": str(len(view))})

    def get(self, key: str) -> bytes:
        return self._request("GET", self._obj(key), f"get {key}").content

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        path = self._obj(key)
        if offset < 0 or length < 0:
            raise InvalidInput(f"invalid range {offset}+{length} of object {key!r}")
        if length == 0:
            self.size(key)  # a missing object still raises ObjectNotFound
            return b""
        resp = self._request("GET", path, f"get {key}[{offset}:+{length}]",
                             headers={"Range": f"bytes={offset}-{offset + length - 1}"})
        data = resp.content
        if resp.status_code == 200:  # range ignored by the server: cut here
            data = data[offset:offset + length]
        if len(data) > length:
            raise NetworkError(f"get {key}: server returned {len(data)} bytes for a {length}-byte "
                               "range")
        return data

    def exists(self, key: str) -> bool:
        resp = self._request("HEAD", self._obj(key), f"exists {key}", ok_404=True)
        return resp.status_code != 404

    def size(self, key: str) -> int:
        resp = self._request("HEAD", self._obj(key), f"size {key}")
        try:
            return int(resp.headers["content-length"])
        except (KeyError, ValueError) as exc:
            raise NetworkError(f"size {key}: no usable Content-Length from the server") from exc

    def list(self, prefix: str = "") -> Iterator[str]:
        validate_prefix(prefix)
        what = f"list {prefix!r}"
        keys: list[str] = []
        try:
            with self._client.stream("GET", P.LIST,
                                     params={"prefix": prefix, "format": "jsonl"}) as resp:
                if resp.status_code >= 400:
                    resp.read()
                    raise _status_error(resp, what)
                for line in resp.iter_lines():
                    if line:
                        k = json.loads(line)
                        if not isinstance(k, str):
                            raise NetworkError(f"{what}: malformed listing from the server")
                        keys.append(k)
        except httpx.TransportError as exc:
            self._fail(exc, what)
        except ValueError as exc:
            raise NetworkError(f"{what}: malformed listing from the server") from exc
        return iter(keys)

    def delete(self, key: str) -> None:
        self._request("DELETE", self._obj(key), f"delete {key}")

    # -- replica calls ---------------------------------------------------------------------

    def catch_up(self, item_id: str) -> builtins.list[str]:
        """Ask the server to bring ``item_id``'s replica to its latest point; the point ids
        applied. Errors of the hydration (``CorruptData``, ``BrokenChain``…) come back as such."""
        validate_name("item", item_id)
        resp = self._request("POST", f"{P.ITEMS}{item_id}/catch-up", f"catch-up of {item_id}",
                             timeout=self.slow_timeout)
        try:
            applied = resp.json()["applied"]
        except (ValueError, KeyError, TypeError) as exc:
            raise NetworkError(f"catch-up of {item_id}: malformed answer") from exc
        if not isinstance(applied, list) or not all(isinstance(p, str) for p in applied):
            raise NetworkError(f"catch-up of {item_id}: malformed answer")
        return applied

    def sync_port(self, item_id: str) -> int:
        """The port of the recovery site's sync-journal server for ``item_id`` (same host as
        the store). ``NotFound`` when that site runs none."""
        validate_name("item", item_id)
        resp = self._request("GET", f"{P.ITEMS}{item_id}/sync-endpoint",
                             f"sync endpoint of {item_id}")
        try:
            return int(resp.json()["port"])
        except (ValueError, KeyError, TypeError) as exc:
            raise NetworkError(f"sync endpoint of {item_id}: malformed answer") from exc

    def sync_overlay(self, item_id: str, disks: dict[str, int]) -> dict[str, Any]:
        """A new sync overlay run on the recovery site for ``item_id`` (synchronous QEMU
        VMs): ``{"port", "stream", "exports": {disk: NBD export}}``, exported to this
        client's certificate only. ``NotFound`` when that site serves none."""
        validate_name("item", item_id)
        resp = self._request("POST", f"{P.ITEMS}{item_id}/sync-overlay",
                             f"sync overlay of {item_id}",
                             content=json.dumps({"disks": disks}).encode(), timeout=60.0)
        try:
            out = dict(resp.json())
            return {"port": int(out["port"]), "stream": str(out["stream"]),
                    "exports": {str(k): str(v) for k, v in dict(out["exports"]).items()}}
        except (ValueError, KeyError, TypeError) as exc:
            raise NetworkError(f"sync overlay of {item_id}: malformed answer") from exc

    def digests(self, item_id: str, disk_id: str, *, from_store: bool,
                block: int = RESYNC_BLOCK) -> DigestResult:
        """The server's per-block digests of the latest point of ``item_id``/``disk_id`` (from
        its hydrated replica when that holds the latest point and not ``from_store``)."""
        validate_name("item", item_id)
        validate_name("disk", disk_id)
        what = f"digests of {item_id}/{disk_id}"
        resp = self._request("GET", f"{P.ITEMS}{item_id}/digests", what,
                             params={"disk": disk_id, "block": str(block),
                                     "from_store": "1" if from_store else "0"},
                             timeout=self.slow_timeout)
        try:
            n = int(resp.headers[P.BLOCKS_HEADER])
            read = int(resp.headers.get(P.BYTES_READ_HEADER, "0"))
        except (KeyError, ValueError) as exc:
            raise NetworkError(f"{what}: answer without a usable {P.BLOCKS_HEADER}") from exc
        body = resp.content
        if n < 0 or len(body) != n * 17:
            raise NetworkError(f"{what}: {len(body)} bytes for {n} blocks (truncated answer)")
        digests = np.frombuffer(body, dtype=np.uint8, count=n * 16).reshape(n, 16).copy()
        bad = np.frombuffer(body, dtype=np.uint8, offset=n * 16, count=n).astype(bool)
        return DigestResult(digests, bad, read)


# how an agent builds its site targets (the benchmarks build theirs the same way)
SITE_TARGET_OPTIONS: dict[str, Any] = {"background_catch_up": True}


class SiteTarget:
    """The recovery side of one item on a secondary site's store server.

    Responsible for: the item's :class:`Repository` over the site store (inside a
    ``RetryingStore``, so a dropped keep-alive connection or a brief outage costs a retry, not
    a failed cycle), asking the server to hydrate after each commit, and fetching the server's
    digests for a resync. Not responsible for: pinning the point the remote replica holds
    against retention (``replica_point()`` is ``None``; the server's hydrator rebuilds from the
    latest point if its base was pruned), or deciding when to do any of it.

    ``background_catch_up``: :meth:`after_commit` asks for the catch-up in a thread of its own
    and returns at once, so the server's hydration of one point overlaps the shipping of the
    next cycle instead of adding to every cycle (the store agent's own hydration loop keeps
    the replica current anyway; the call only makes it prompt). Requests made while one runs
    are coalesced into one more call (the server applies every point up to the latest). What
    that call raised is raised by the next :meth:`after_commit` (``CorruptData`` included, so
    the engine's repair still starts) or by :meth:`settle`. Without it (the default) the call
    is made in :meth:`after_commit` and the replica holds the point when it returns.
    """

    def __init__(self, store: SiteObjectStore, item_id: str, *, segment_size: int = 64 << 20,
                 pack_target: int = 8 << 20, retry_attempts: int = 4,
                 background_catch_up: bool = False) -> None:
        self.store = store
        self.item_id = validate_name("item", item_id)
        self._repo = Repository(RetryingStore(store, attempts=retry_attempts), item_id,
                                segment_size=segment_size, pack_target=pack_target)
        self.background_catch_up = background_catch_up
        self._cv = threading.Condition()
        self._wanted = False          # a catch-up was asked for since the running one started
        self._running = False         # the catch-up thread is alive
        self._error: DrsiteError | None = None   # what the last background call raised

    @property
    def repo(self) -> Repository:
        return self._repo

    def after_commit(self, point: PointInfo) -> None:
        if not self.background_catch_up:
            self.store.catch_up(self.item_id)
            return
        with self._cv:
            err, self._error = self._error, None
            self._wanted = True
            if not self._running:
                self._running = True
                threading.Thread(target=self._catch_up_loop, daemon=True,
                                 name=f"drsite-catch-up-{self.item_id}").start()
        if err is not None:
            raise err

    def _catch_up_loop(self) -> None:
        """Call catch-up until no request is left; exits when idle (no thread per idle item)."""
        while True:
            with self._cv:
                if not self._wanted:
                    self._running = False
                    self._cv.notify_all()
                    return
                self._wanted = False
            try:
                self.store.catch_up(self.item_id)
                err: DrsiteError | None = None
            except DrsiteError as exc:
                err = exc
            except Exception as exc:   # never lose a failure in a thread nobody joins
                err = NetworkError(f"catch-up of {self.item_id} failed: "
                                   f"{exc.__class__.__name__}: {exc}")
            with self._cv:
                self._error = err   # only the latest call's outcome counts

    @property
    def busy(self) -> bool:
        """A background catch-up is running or asked for."""
        with self._cv:
            return self._running

    def settle(self, timeout: float | None = None) -> bool:
        """Wait until no background catch-up is running or asked for (at most ``timeout``
        seconds); raise what the last one raised. False if it was still running."""
        with self._cv:
            if not self._cv.wait_for(lambda: not self._running, timeout):
                return False
            err, self._error = self._error, None
        if err is not None:
            raise err
        return True

    def digests(self, disk_id: str, *, from_store: bool, block: int = RESYNC_BLOCK,
                progress: Callable[[int], None] | None = None) -> DigestResult:
        res = self.store.digests(self.item_id, disk_id, from_store=from_store, block=block)
        if progress is not None and res.bytes_read:
            progress(res.bytes_read)
        return res

    def replica_point(self) -> str | None:
        return None

    @property
    def runs_retention(self) -> bool:
        return False  # the store's own agent applies it (the vault sends it 'retention')
