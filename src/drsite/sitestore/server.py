"""The recovery-store server a secondary-site agent runs: its object store and its hydrated
replicas, over HTTPS with a required client certificate (see ``docs/control-plane.md``).

Endpoints (all answer drsite errors as JSON ``DrsiteError.to_dict()`` with the class's
``http_status``):

- ``PUT|GET|HEAD|DELETE /store/v1/objects/{key}`` — the :class:`ObjectStore` contract;
  ``PUT ?overwrite=0|1`` (201), ``GET`` with ``Range: bytes=a-b`` (206), ``DELETE`` (204).
- ``GET /store/v1/list?prefix=P[&format=jsonl]`` — ``{"keys": [...]}``, or one JSON string per
  line with ``format=jsonl`` (what the client uses, so large listings stream).
- ``POST /replica/v1/items/{item}/catch-up`` — bring the item's replica to its latest point.
- ``GET /replica/v1/items/{item}/digests?disk=D&block=B&from_store=0|1`` — the target half of a
  resync: ``n*16`` digest bytes then ``n`` bad-mask bytes, ``X-Blocks: n``.

Responsible for: key and parameter validation (again: the client validates too), refusing any
request without a verified client certificate (401, beyond the TLS layer's own check), asking
the access list about every request (403 ``forbidden``: :mod:`drsite.sitestore.acl`) and the
immutability rules about every remote overwrite and delete (:mod:`drsite.sitestore.immutable`),
scoping listings to what the caller may read, noting deletes/overwrites (done or refused) for
the audit trail (:class:`~drsite.sitestore.audit.StoreAuditLog`), hydrating only authentic
points (the item's point key from the list), one catch-up/digest computation per item at a
time (:func:`replica_lock`, shared with any other hydrator of the same directory), logging who
did what. Not responsible for: TLS (:mod:`drsite.tlsutil`), retries (the client side), building
the list (the vault; the agent delivers it).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.convertors import Convertor, register_url_convertor
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from drsite.core.errors import (
    AuthError,
    DrsiteError,
    Forbidden,
    InternalError,
    InvalidInput,
    MethodNotAllowed,
    NotFound,
    classify_os_error,
)
from drsite.core.model import validate_name
from drsite.pki import CertIdentity, cert_identity
from drsite.replication.resync import RESYNC_BLOCK, DigestResult
from drsite.replication.target import LocalTarget
from drsite.sitestore import protocol as P
from drsite.sitestore.acl import Authorizer, Op, item_of
from drsite.sitestore.audit import StoreAuditLog
from drsite.sitestore.immutable import CommittedCycles, check_remote_change
from drsite.sitestore.syncoverlay import OverlayServer, writer_dn
from drsite.store.catalog import MapCache
from drsite.store.contract import ObjectStore, validate_key, validate_prefix
from drsite.store.replica import ReplicaHydrator
from drsite.store.repository import Repository
from drsite.tlsutil import peer_certificate

log = logging.getLogger(__name__)

RepoFactory = Callable[[ObjectStore, str], Repository]
PEER_KEY = "drsite.peer"          # scope key holding the caller's CertIdentity
_RANGE = re.compile(r"^bytes=(\d{1,19})-(\d{1,19})$")


class _AnyKeyConvertor(Convertor[str]):
    """Like Starlette's ``path`` convertor but also matching control characters, so every
    malformed key reaches :func:`validate_key` (and gets 400) instead of a route miss (404)."""

    regex = r"[\s\S]*"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("drsite_key", _AnyKeyConvertor())


def held_marker(replicas: Path, item_id: str) -> Path:
    """``replicas/<item>.held``: the item failed over on this host; its replica is not
    hydrated again (its images were moved into the recovery VM) until the failover is
    cancelled. Written and removed by the agent's failover commands under the replica lock."""
    return replicas / f"{item_id}.held"


def replica_held(replicas: Path, item_id: str) -> bool:
    return held_marker(replicas, item_id).exists()


@contextlib.contextmanager
def replica_lock(replica_dir: Path) -> Iterator[None]:
    """Hold the exclusive lock of one item's replica directory (``replica_dir/.lock``, an
    ``flock``): one hydration or replica read at a time, across threads *and* processes.
    :class:`~drsite.store.replica.ReplicaHydrator` is crash-safe but not safe against a second
    concurrent writer, so anything else that hydrates the same directory (an agent's own
    hydration loop) must take this lock too. Blocks until the lock is free."""
    try:
        replica_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(replica_dir / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise classify_os_error(exc, f"replica lock in {replica_dir}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _error_response(exc: DrsiteError) -> JSONResponse:
    return JSONResponse(exc.to_dict(), status_code=exc.http_status)


@lru_cache(maxsize=256)
def _identity(der: bytes) -> CertIdentity:
    return cert_identity(der)


class _RequireClientCert:
    """ASGI middleware: 401 for any HTTP request whose connection has no verified client
    certificate; otherwise the caller's identity goes into ``scope["drsite.peer"]``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        der = peer_certificate(scope)
        ident: CertIdentity | None = None
        if der is not None:
            try:
                ident = _identity(der)
            except InvalidInput:
                ident = None
        if ident is None:
            client = scope.get("client")
            log.warning("refused %s %s from %s: no verified client certificate",
                        scope.get("method"), scope.get("path"), client[0] if client else "?")
            resp = _error_response(AuthError(
                "a client certificate issued by the vault's CA is required",
                hint="Use the agent's certificate (issued at registration) for this connection."))
            await resp(scope, receive, send)
            return
        scope = dict(scope)
        scope[PEER_KEY] = ident
        await self.app(scope, receive, send)


def _peer(request: Request) -> str:
    ident = request.scope.get(PEER_KEY)
    return str(ident) if ident is not None else "?"


def _ident(request: Request) -> CertIdentity:
    ident = request.scope.get(PEER_KEY)
    if not isinstance(ident, CertIdentity):   # _RequireClientCert always sets it
        raise AuthError("no verified client certificate on this connection")
    return ident


Handler = Callable[[Request], Awaitable[Response]]


def _endpoint(fn: Handler) -> Handler:
    """Every drsite error becomes its JSON answer; anything else a logged 500."""

    async def wrapped(request: Request) -> Response:
        try:
            return await fn(request)
        except Forbidden as exc:
            log.warning("%s %s by %s refused: %s", request.method, request.url.path,
                        _peer(request), exc.message)
            return _error_response(exc)
        except DrsiteError as exc:
            if not isinstance(exc, NotFound | InvalidInput) or request.method not in ("GET", "HEAD"):
                log.info("%s %s by %s: %s %s", request.method, request.url.path, _peer(request),
                         exc.code, exc.message)
            return _error_response(exc)
        except ClientDisconnect:
            # the caller went away mid-body (a network blip, a killed agent): nothing was
            # stored; the answer reaches nobody
            log.info("%s %s by %s: the client disconnected before its body ended",
                     request.method, request.url.path, _peer(request))
            return Response(status_code=400)
        except Exception:
            log.exception("%s %s by %s failed", request.method, request.url.path, _peer(request))
            return _error_response(InternalError("internal error in the recovery store server",
                                                 hint="See the store server's log."))

    return wrapped


def _flag(request: Request, name: str, default: bool) -> bool:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    if raw not in ("0", "1"):
        raise InvalidInput(f"query parameter {name} must be 0 or 1, not {raw!r}")
    return raw == "1"


def _int_param(request: Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    if not raw.isdigit() or not lo <= int(raw) <= hi:
        raise InvalidInput(f"query parameter {name} must be an integer in [{lo}, {hi}]")
    return int(raw)


async def _read_body(request: Request, limit: int) -> bytearray:
    """The whole request body, refusing more than ``limit`` bytes (before reading, when
    ``Content-Length`` says so)."""
    cl = request.headers.get("content-length")
    if cl is not None and (not cl.isdigit() or int(cl) > limit):
        raise InvalidInput(f"object body of {cl} bytes refused (limit {limit})")
    buf = bytearray()
    async for chunk in request.stream():
        buf += chunk
        if len(buf) > limit:
            raise InvalidInput(f"object body over {limit} bytes refused")
    return buf


class _StoreService:
    """The endpoints over one object store and one replica directory."""

    def __init__(self, store: ObjectStore, replicas: Path, acl: Authorizer,
                 audit: StoreAuditLog | None, repo_factory: RepoFactory | None,
                 max_object: int, sync_port: int | None = None,
                 overlays: OverlayServer | None = None,
                 map_cache: MapCache | None = None) -> None:
        self.sync_port = sync_port
        self.map_cache = map_cache
        self.overlays = overlays
        self.store = store
        self.replicas = Path(replicas)
        self.acl = acl
        self.audit = audit
        self.repo_factory: RepoFactory = repo_factory or (
            lambda s, item: Repository(s, item, map_cache=map_cache))
        self.max_object = max_object
        self.cycles = CommittedCycles()

    def _put(self, key: str, body: memoryview, overwrite: bool) -> None:
        self.store.put(key, body, overwrite=overwrite)
        if self.map_cache is not None and not overwrite:
            try:   # stored: a failover here reads the map warm (best effort: never fails a put)
                self.map_cache.offer(key, body)
            except Exception:
                log.exception("segment map %s not cached", key)

    def _repo(self, item_id: str) -> Repository:
        """The item's repository for replica work, with its point key: hydration and digests
        read only authentic points."""
        repo = self.repo_factory(self.store, item_id)
        auth = self.acl.point_auth(item_id)
        if auth is not None:
            repo.auth = auth
        return repo

    def _note(self, op: str, key: str, item_id: str | None, ident: CertIdentity,
              outcome: str) -> None:
        if self.audit is not None:
            self.audit.record(op, key, item_id, ident.common_name, outcome)

    async def _change(self, op: Op, key: str, ident: CertIdentity, body: bytes | None) -> None:
        """Authorize an overwrite or delete (ACL, then the immutability rules), auditing it
        when refused; the caller audits success."""
        item_id, rel = item_of(key)
        try:
            self.acl.authorize(ident, op, item_id, key)
            if item_id is not None and self.acl.immutable:
                await run_in_threadpool(check_remote_change, self.store, item_id, rel, op, body,
                                        self.acl.point_auth(item_id), self.cycles)
        except Forbidden:
            self._note(op, key, item_id, ident, "refused")
            raise

    # -- objects ---------------------------------------------------------------------------

    async def objects(self, request: Request) -> Response:
        key = validate_key(request.path_params["key"])
        method = request.method
        ident = _ident(request)
        item_id, _rel = item_of(key)
        if method == "PUT":
            overwrite = _flag(request, "overwrite", False)
            if not overwrite:
                self.acl.authorize(ident, "put", item_id, key)
            body = await _read_body(request, self.max_object)
            if overwrite:
                await self._change("overwrite", key, ident, bytes(body))
            await run_in_threadpool(self._put, key, memoryview(body), overwrite)
            if overwrite:
                self._note("overwrite", key, item_id, ident, "ok")
            log.debug("put %s (%d bytes, overwrite=%s) by %s", key, len(body), overwrite,
                      _peer(request))
            return Response(status_code=201)
        if method == "DELETE":
            await self._change("delete", key, ident, None)
            await run_in_threadpool(self.store.delete, key)
            self._note("delete", key, item_id, ident, "ok")
            return Response(status_code=204)
        self.acl.authorize(ident, "read", item_id, key)
        if method == "HEAD":
            size = await run_in_threadpool(self.store.size, key)
            return Response(status_code=200, headers={"Content-Length": str(size),
                                                      "Accept-Ranges": "bytes"})
        rng = request.headers.get("range")
        if rng is None:
            data = await run_in_threadpool(self.store.get, key)
            return Response(data, status_code=200, media_type="application/octet-stream")
        m = _RANGE.fullmatch(rng.strip())
        if m is None:
            raise InvalidInput(f"unsupported Range header {rng!r} (only 'bytes=a-b')")
        first, last = int(m.group(1)), int(m.group(2))
        if last < first:
            raise InvalidInput(f"invalid Range {rng!r}")
        length = last - first + 1
        if length > self.max_object:
            # never let a huge range size a read buffer: clamp to what the object holds
            size = await run_in_threadpool(self.store.size, key)
            length = max(0, min(length, size - first))
        data = await run_in_threadpool(self.store.get_range, key, first, length)
        headers = {"Content-Range": f"bytes {first}-{first + len(data) - 1}/*"} if data else {}
        return Response(data, status_code=206, headers=headers,
                        media_type="application/octet-stream")

    async def listing(self, request: Request) -> Response:
        prefix = validate_prefix(request.query_params.get("prefix", ""))
        fmt = request.query_params.get("format", "json")
        if fmt not in ("json", "jsonl"):
            raise InvalidInput(f"unknown list format {fmt!r}")
        ident = _ident(request)
        parts = prefix.split("/", 2)
        if len(parts) == 3 and parts[0] == "items":   # one item's keys: one decision
            self.acl.authorize(ident, "read", item_of(prefix)[0], f"the keys under {prefix}")
            keys = await run_in_threadpool(lambda: list(self.store.list(prefix)))
        else:                                         # scoped to the items it may read
            self.acl.identify(ident)
            keys = [k for k in await run_in_threadpool(lambda: list(self.store.list(prefix)))
                    if self.acl.readable(ident, item_of(k)[0])]
        if fmt == "json":
            return JSONResponse({"keys": keys})

        async def lines() -> AsyncIterator[bytes]:
            for i in range(0, len(keys), 1000):
                yield "".join(json.dumps(k) + "\n" for k in keys[i:i + 1000]).encode()

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    # -- replicas --------------------------------------------------------------------------

    def _catch_up(self, item_id: str) -> list[str]:
        with replica_lock(self.replicas / item_id):
            if replica_held(self.replicas, item_id):
                return []  # failed over here: its replica became (or becomes) the VM's disks
            repo = self._repo(item_id)
            try:
                return ReplicaHydrator(repo, self.replicas / item_id).catch_up()
            finally:
                repo.close()

    async def sync_endpoint(self, request: Request) -> Response:
        """Where this site's sync-journal server listens (synchronous mode), for the item's
        writer; ``NotFound`` when this site runs none."""
        item_id = validate_name("item", request.path_params["item_id"])
        self.acl.authorize(_ident(request), "put", item_id, f"the sync journal of {item_id}")
        if self.sync_port is None:
            raise NotFound("this recovery site runs no sync-journal server",
                           hint="Upgrade the recovery site's agent ('drsite agent run').")
        return JSONResponse({"port": self.sync_port})

    async def sync_overlay(self, request: Request) -> Response:
        """A new sync overlay run for a synchronous QEMU VM (``syncoverlay``), exported to the
        caller's certificate only; the caller must be the item's writer. Body
        ``{"disks": {disk id: size}}``; answer ``{"port", "stream", "exports"}``."""
        item_id = validate_name("item", request.path_params["item_id"])
        ident = _ident(request)
        self.acl.authorize(ident, "put", item_id, f"the sync overlay of {item_id}")
        if self.overlays is None:
            raise NotFound("this recovery site serves no sync overlays",
                           hint="Upgrade the recovery site's agent ('drsite agent run').")
        if replica_held(self.replicas, item_id):
            raise Forbidden(f"item {item_id} failed over on this site: its sync overlays are "
                            "closed")
        try:
            body = json.loads(await _read_body(request, 1 << 16))
            disks = {validate_name("disk", str(k)): int(v) for k, v in body["disks"].items()}
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise InvalidInput(f"malformed sync overlay request: {e}") from None
        der = peer_certificate(request.scope)
        assert der is not None   # _RequireClientCert let the request in
        out = await run_in_threadpool(self.overlays.provision, item_id, disks, writer_dn(der))
        return JSONResponse(out)

    async def catch_up(self, request: Request) -> Response:
        item_id = validate_name("item", request.path_params["item_id"])
        self.acl.authorize(_ident(request), "read", item_id, f"the replica of {item_id}")
        applied = await run_in_threadpool(self._catch_up, item_id)
        log.info("replica of %s caught up (%d point(s) applied) for %s", item_id, len(applied),
                 _peer(request))
        return JSONResponse({"applied": applied})

    def _digests(self, item_id: str, disk_id: str, block: int,
                 from_store: bool) -> tuple[str, DigestResult]:
        with replica_lock(self.replicas / item_id):
            repo = self._repo(item_id)
            try:
                latest = repo.latest()
                if latest is None:
                    raise NotFound(f"item {item_id} has no committed recovery point")
                if disk_id not in latest.disk_sizes:
                    raise NotFound(f"disk {disk_id} is not in point {latest.point_id} of {item_id}")
                target = LocalTarget(repo, ReplicaHydrator(repo, self.replicas / item_id))
                return latest.point_id, target.digests(disk_id, from_store=from_store, block=block)
            finally:
                repo.close()

    async def digests(self, request: Request) -> Response:
        item_id = validate_name("item", request.path_params["item_id"])
        self.acl.authorize(_ident(request), "read", item_id, f"the replica of {item_id}")
        disk_id = validate_name("disk", request.query_params.get("disk", ""))
        block = _int_param(request, "block", RESYNC_BLOCK, P.MIN_BLOCK, P.MAX_BLOCK)
        from_store = _flag(request, "from_store", False)
        point_id, res = await run_in_threadpool(self._digests, item_id, disk_id, block, from_store)
        n = int(res.digests.shape[0])
        body = np.ascontiguousarray(res.digests, dtype=np.uint8).tobytes() + \
            np.ascontiguousarray(res.bad, dtype=np.uint8).tobytes()
        log.info("digests of %s/%s at %s (%d blocks, from_store=%s) for %s", item_id, disk_id,
                 point_id, n, from_store, _peer(request))
        return Response(body, media_type="application/octet-stream",
                        headers={P.BLOCKS_HEADER: str(n), P.BYTES_READ_HEADER: str(res.bytes_read),
                                 P.POINT_HEADER: point_id})


def make_store_app(store: ObjectStore, replicas: Path, *, acl: Authorizer,
                   audit: StoreAuditLog | None = None, repo_factory: RepoFactory | None = None,
                   max_object: int = P.MAX_OBJECT, sync_port: int | None = None,
                   overlays: OverlayServer | None = None,
                   map_cache: MapCache | None = None) -> ASGIApp:
    """The ASGI app serving ``store`` and the replicas under ``replicas/<item_id>/``.

    ``sync_port``: the port of this site's sync-journal server (``syncserver``), given to an
    item's writer by ``GET /replica/v1/items/{item}/sync-endpoint``. ``overlays``: this
    site's sync overlays (synchronous QEMU VMs), provisioned for an item's writer by
    ``POST /replica/v1/items/{item}/sync-overlay``. ``map_cache``: the segment maps stored
    through this server are put in it (:meth:`MapCache.offer`), for the host's failovers.
    ``acl`` decides every request (:class:`~drsite.sitestore.acl.StoreAcl`: the vault's list;
    without a list every request is refused); ``audit`` receives every delete/overwrite, done
    or refused.

    ``repo_factory(store, item_id)`` builds the :class:`Repository` used for catch-up and
    digests (default: ``Repository(store, item_id, map_cache=map_cache)``; a fresh one per
    request (maps, content-addressed, may come from ``map_cache``), so no cached
    manifest outlives a point deleted by the primary). Run it with :mod:`drsite.tlsutil`
    (``client_cert="required"``); without that module's protocol every request gets 401.
    """
    svc = _StoreService(store, replicas, acl, audit, repo_factory, max_object, sync_port,
                        overlays, map_cache)
    routes = [
        Route(P.OBJECTS + "{key:drsite_key}", _endpoint(svc.objects),
              methods=["GET", "HEAD", "PUT", "DELETE"]),
        Route(P.LIST, _endpoint(svc.listing), methods=["GET"]),
        Route(P.ITEMS + "{item_id}/catch-up", _endpoint(svc.catch_up), methods=["POST"]),
        Route(P.ITEMS + "{item_id}/digests", _endpoint(svc.digests), methods=["GET"]),
        Route(P.ITEMS + "{item_id}/sync-endpoint", _endpoint(svc.sync_endpoint),
              methods=["GET"]),
        Route(P.ITEMS + "{item_id}/sync-overlay", _endpoint(svc.sync_overlay),
              methods=["POST"]),
    ]
    app: Any = Starlette(routes=routes, exception_handlers={HTTPException: _route_error})
    return _RequireClientCert(app)


async def _route_error(request: Request, exc: Exception) -> Response:
    """No route or method: a drsite error body like every other answer."""
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    if status == 405:
        return _error_response(MethodNotAllowed(f"{request.method} is not allowed on "
                                                f"{request.url.path}"))
    if status == 404:
        return _error_response(NotFound(f"no store route {request.url.path}"))
    return _error_response(InvalidInput(f"bad request to {request.url.path} (HTTP {status})"))
