"""TLS contexts for drsite's HTTPS endpoints and a uvicorn runner that exposes the verified
client certificate to the application.

uvicorn 0.54 does not put the peer certificate in the ASGI scope. :func:`serve`,
:func:`serve_workers` (in every worker) and :func:`start_in_thread` run uvicorn with
:class:`ClientCertH11Protocol`, a small subclass of its h11 protocol: when a TLS connection is
made (after the handshake, so after the certificate was verified against the CA) it reads the
peer's leaf certificate and adds ``scope["extensions"]["tls"]["client_cert_der"]`` (DER bytes,
or ``None``) to every request of that connection. :func:`peer_certificate` reads it back.

Responsible for: TLS >= 1.2 contexts trusting only the given CA, binding, starting and stopping
uvicorn cleanly, and carrying the verified certificate to the app. Not responsible for:
authorisation (the app decides what an identity may do), issuing certificates
(:mod:`drsite.pki`). Nothing here logs keys, tokens or request bodies.
"""

from __future__ import annotations

import asyncio
import asyncio.selector_events
import asyncio.sslproto
import contextlib
import logging
import os
import signal
import socket
import ssl
import threading
import time
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Literal, cast

import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from drsite.core.errors import DrsiteError, InvalidInput, NetworkError, classify_os_error

log = logging.getLogger(__name__)

ClientCertMode = Literal["none", "optional", "required"]
_VERIFY = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}


# --------------------------------------------------------------------------- contexts

def _load_chain(ctx: ssl.SSLContext, certfile: Path, keyfile: Path) -> None:
    try:
        ctx.load_cert_chain(str(certfile), str(keyfile))
    except FileNotFoundError as exc:
        raise InvalidInput(f"certificate or key file missing: {exc.filename}") from exc
    except (ssl.SSLError, OSError) as exc:
        raise InvalidInput(f"cannot load certificate {certfile} with key {keyfile}: "
                           f"{getattr(exc, 'reason', None) or exc.__class__.__name__}",
                           hint="Check that the key matches the certificate and is PEM.") from exc


def _load_ca(ctx: ssl.SSLContext, cafile: Path) -> None:
    try:
        ctx.load_verify_locations(cafile=str(cafile))
    except FileNotFoundError as exc:
        raise InvalidInput(f"CA file {cafile} missing") from exc
    except (ssl.SSLError, OSError) as exc:
        raise InvalidInput(f"cannot load CA file {cafile}: {exc}") from exc


def server_context(certfile: Path, keyfile: Path, cafile: Path, *,
                   client_cert: ClientCertMode) -> ssl.SSLContext:
    """A server context (TLS >= 1.2) presenting ``certfile``/``keyfile``.

    ``client_cert``: ``"none"`` asks for no client certificate; ``"optional"`` asks for one and,
    if sent, verifies it against ``cafile`` (a bad one fails the handshake); ``"required"`` fails
    the handshake without a valid one. Only ``cafile`` is trusted, never the system store.
    """
    if client_cert not in _VERIFY:
        raise InvalidInput(f"client_cert must be one of {sorted(_VERIFY)}, not {client_cert!r}")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION
    _load_chain(ctx, certfile, keyfile)
    if client_cert != "none":
        _load_ca(ctx, cafile)
    ctx.verify_mode = _VERIFY[client_cert]
    return ctx


def client_context(cafile: Path, certfile: Path | None = None,
                   keyfile: Path | None = None) -> ssl.SSLContext:
    """A client context (TLS >= 1.2) that trusts only ``cafile``, checks the server's hostname
    (or IP SAN), and presents ``certfile``/``keyfile`` as client certificate when given."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)   # CERT_REQUIRED + check_hostname
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION
    _load_ca(ctx, cafile)
    if certfile is not None:
        _load_chain(ctx, certfile, keyfile if keyfile is not None else certfile)
    return ctx


# --------------------------------------------------------------------------- client cert in scope

def _with_client_cert(app: ASGIApp, der: bytes | None) -> ASGIApp:
    """``app`` with ``scope["extensions"]["tls"]["client_cert_der"] = der`` on every http or
    websocket scope. Always overwrites, so nothing upstream can inject a certificate."""

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            scope = dict(scope)
            ext = dict(scope.get("extensions") or {})
            ext["tls"] = {"client_cert_der": der}
            scope["extensions"] = ext
        await app(scope, receive, send)

    return wrapped


class ClientCertH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, plus the verified client certificate of the connection in every
    request's scope. asyncio calls ``connection_made`` only after the TLS handshake, so the
    certificate read there was verified (unless the context is ``CERT_NONE``: then none is
    recorded, because OpenSSL would report an unverified one)."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # asyncio sets TCP_NODELAY only on sockets whose proto is IPPROTO_TCP, and
        # socket.create_server makes proto-0 sockets: without this, Nagle's algorithm holds
        # each response's body until the client acknowledges its headers (~40 ms delayed ACK)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        der: bytes | None = None
        ssl_object = transport.get_extra_info("ssl_object")
        if isinstance(ssl_object, ssl.SSLObject | ssl.SSLSocket) and \
                ssl_object.context.verify_mode != ssl.CERT_NONE:
            der = ssl_object.getpeercert(binary_form=True)
        self.app = cast(Any, _with_client_cert(cast(ASGIApp, self.app), der))

    def shutdown(self) -> None:
        """Server shutdown: like uvicorn's, but an idle keep-alive connection whose output is
        flushed is aborted instead of waiting for the peer's TLS close_notify (an idle pooled
        client never reads it, which held every stop for the full graceful timeout)."""
        idle = self.cycle is None or self.cycle.response_complete
        super().shutdown()
        if not idle or self.transport.is_closing():
            return
        try:
            flushed = self.transport.get_write_buffer_size() == 0
        except AttributeError:  # the TLS layer was torn down meanwhile (peer closed): done
            return
        if flushed:
            self.transport.abort()


def peer_certificate(scope_or_request: Mapping[str, Any] | Any) -> bytes | None:
    """DER of the connection's verified client certificate, or ``None``. Accepts an ASGI scope
    or anything with a ``.scope`` (a Starlette/FastAPI ``Request``). Only servers started by
    this module fill it in."""
    scope = getattr(scope_or_request, "scope", scope_or_request)
    if not isinstance(scope, Mapping):
        return None
    tls = (scope.get("extensions") or {}).get("tls") or {}
    der = tls.get("client_cert_der") if isinstance(tls, Mapping) else None
    return der if isinstance(der, bytes) and der else None


# --------------------------------------------------------------------------- handshake alerts

class _AlertingSSLProtocol(asyncio.sslproto.SSLProtocol):
    """CPython's TLS protocol closes the socket on a failed handshake without sending the alert
    OpenSSL prepared, so a refused client sees a bare EOF and cannot tell "your certificate was
    refused" (permanent) from "the server died" (transient). This sends the alert first, and
    logs the refusal as one warning line (asyncio logs nothing for it outside debug mode)."""

    def _on_handshake_complete(self, handshake_exc: BaseException | None) -> None:
        if handshake_exc is not None:
            with contextlib.suppress(Exception):
                self._process_outgoing()  # type: ignore[attr-defined]
            with contextlib.suppress(Exception):
                transport = getattr(self, "_transport", None)
                peer = transport.get_extra_info("peername") if transport is not None else None
                log.warning("TLS handshake from %s refused: %s", peer[0] if peer else "?",
                            getattr(handshake_exc, "verify_message", None)
                            or getattr(handshake_exc, "reason", None) or handshake_exc)
        super()._on_handshake_complete(handshake_exc)

    def end_close_wait(self) -> None:
        """A server stopping: if this connection has sent its close_notify and only waits for
        the peer's (up to ``ssl_shutdown_timeout``, 30 s), finish the close now, as the peer's
        reply would. Nothing of ours is dropped: the raw transport's ``close`` still flushes
        what it holds. An idle client (a pooled keep-alive connection nobody reads) never
        replies, and held every stop for the whole graceful timeout."""
        if getattr(self, "_state", None) is asyncio.sslproto.SSLProtocolState.SHUTDOWN \
                and self._get_write_buffer_size() == 0:  # type: ignore[attr-defined]
            self._on_shutdown_complete(None)  # type: ignore[attr-defined]


class _AlertingEventLoop(asyncio.SelectorEventLoop):
    """The selector loop, with :class:`_AlertingSSLProtocol` for TLS connections."""

    def _make_ssl_transport(self, rawsock: Any, protocol: Any, sslcontext: Any,
                            waiter: Any = None, *, server_side: bool = False,
                            server_hostname: str | None = None, extra: Any = None,
                            server: Any = None, ssl_handshake_timeout: float | None = None,
                            ssl_shutdown_timeout: float | None = None) -> Any:
        kw: dict[str, Any] = {}
        if ssl_handshake_timeout is not None:
            kw["ssl_handshake_timeout"] = ssl_handshake_timeout
        if ssl_shutdown_timeout is not None:
            kw["ssl_shutdown_timeout"] = ssl_shutdown_timeout
        ssl_protocol = _AlertingSSLProtocol(self, protocol, sslcontext, waiter, server_side,
                                            server_hostname, **kw)
        asyncio.selector_events._SelectorSocketTransport(  # type: ignore[attr-defined]
            self, rawsock, ssl_protocol, extra=extra, server=server)
        return ssl_protocol._app_transport


def _loop_factory() -> asyncio.AbstractEventLoop:
    """uvicorn's ``loop`` setting (an import string naming this function)."""
    return _AlertingEventLoop()


# --------------------------------------------------------------------------- running uvicorn

def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.create_server((host, port), family=family, backlog=128)
    except OSError as exc:
        raise classify_os_error(exc, f"listening on {host}:{port}") from exc
    sock.set_inheritable(True)
    return sock


class _Server(uvicorn.Server):
    """uvicorn's server with our own signal handling: SIGTERM/SIGINT ask for a graceful stop
    (a second SIGINT forces it) and are not re-raised afterwards, so :func:`serve` returns."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handle(sig: int, frame: FrameType | None) -> None:
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True
            self.should_exit = True
            log.info("received %s: shutting down", signal.Signals(sig).name)

        sigs = (signal.SIGTERM, signal.SIGINT)
        old = {s: signal.signal(s, handle) for s in sigs}
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """uvicorn's graceful stop, after the app's ``state.on_server_stop`` hooks ran: they end
        the app's long waits (a command long poll answers at once), which would otherwise hold
        every stop for the whole graceful timeout."""
        state = getattr(self.config.app, "state", None)
        for hook in list(getattr(state, "on_server_stop", None) or ()):
            try:
                hook()
            except Exception:  # a hook must not keep the server from stopping
                log.exception("server stop hook failed")
        reaper = asyncio.get_running_loop().create_task(self._end_close_waits())
        try:
            await super().shutdown(sockets)
        finally:
            reaper.cancel()

    async def _end_close_waits(self) -> None:
        """While the graceful stop runs: a connection whose response is complete and whose TLS
        close only waits for the peer's close_notify is closed at once (an idle keep-alive
        client never sends it). In-flight responses are left to finish."""
        while True:
            for conn in list(self.server_state.connections):
                transport = getattr(conn, "transport", None)
                proto = getattr(transport, "_ssl_protocol", None)
                if (isinstance(proto, _AlertingSSLProtocol) and transport is not None
                        and transport.is_closing()):
                    proto.end_close_wait()
            await asyncio.sleep(0.02)


def _config(app: ASGIApp, ctx: ssl.SSLContext, *, host: str, port: int,
            keep_alive_s: int, graceful_s: int, log_level: str) -> uvicorn.Config:
    return uvicorn.Config(
        app, host=host, port=port, http=ClientCertH11Protocol, ws="none", lifespan="auto",
        loop=f"{__name__}:_loop_factory",
        ssl_context_factory=lambda _cfg, _default: ctx,
        log_config=None, log_level=log_level, access_log=False, server_header=False,
        proxy_headers=False, timeout_keep_alive=keep_alive_s,
        timeout_graceful_shutdown=graceful_s)


def serve(app: ASGIApp, *, host: str, port: int, certfile: Path, keyfile: Path, cafile: Path,
          client_cert: Literal["optional", "required"], keep_alive_s: int = 60,
          graceful_s: int = 10, log_level: str = "info") -> None:
    """Serve ``app`` over HTTPS on ``host:port`` until SIGTERM/SIGINT, then stop gracefully
    (requests in flight finish, within ``graceful_s``) and return. Blocking. Binding errors are
    raised as drsite errors before anything starts."""
    ctx = server_context(certfile, keyfile, cafile, client_cert=client_cert)
    sock = _bind(host, port)
    server = _Server(_config(app, ctx, host=host, port=port, keep_alive_s=keep_alive_s,
                             graceful_s=graceful_s, log_level=log_level))
    log.info("serving https://%s:%d (client certificate %s)", host,
             sock.getsockname()[1], client_cert)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()


def _watch_parent(server: uvicorn.Server, parent: int) -> None:
    """A worker stops (gracefully) when its supervisor is gone: no orphan keeps serving."""
    while not server.should_exit:
        if os.getppid() != parent:
            log.warning("the supervising process %d is gone: this worker stops", parent)
            server.should_exit = True
            return
        time.sleep(1.0)


def _worker(make_app: Callable[[], ASGIApp], sock: socket.socket, *, host: str, port: int,
            certfile: Path, keyfile: Path, cafile: Path, client_cert: ClientCertMode,
            keep_alive_s: int, graceful_s: int, log_level: str, parent: int) -> None:
    """One worker process: its own app (built after the fork), TLS context and uvicorn, on the
    listening socket it inherited."""
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    ctx = server_context(certfile, keyfile, cafile, client_cert=client_cert)
    app = make_app()
    server = _Server(_config(app, ctx, host=host, port=port, keep_alive_s=keep_alive_s,
                             graceful_s=graceful_s, log_level=log_level))
    threading.Thread(target=_watch_parent, args=(server, parent), name="parent-watch",
                     daemon=True).start()
    server.run(sockets=[sock])


def serve_workers(make_app: Callable[[], ASGIApp], *, workers: int, host: str, port: int,
                  certfile: Path, keyfile: Path, cafile: Path,
                  client_cert: Literal["optional", "required"], keep_alive_s: int = 60,
                  graceful_s: int = 10, log_level: str = "info",
                  restart_delay_s: float = 1.0) -> None:
    """Serve over HTTPS with ``workers`` processes forked from this one, until SIGTERM/SIGINT.

    This process binds ``host:port`` once and forks the workers; they share the listening
    socket (the kernel gives each new connection to one worker that accepts it — the model of
    gunicorn and of uvicorn's own ``--workers``, which needs an import string instead of an
    app). Each worker calls ``make_app()`` after the fork (no connection, thread or event loop
    crosses a fork) and runs uvicorn with :class:`ClientCertH11Protocol`, so every worker puts
    the verified client certificate in the scope. This process only supervises: a worker that
    exits while the server is not stopping is replaced after ``restart_delay_s``; SIGTERM/SIGINT
    are passed on to every worker (each stops gracefully within ``graceful_s``; a worker still
    there ``graceful_s + 10`` s later is killed) and the call returns. A worker whose
    supervisor is killed stops by itself. Call it with no other thread running."""
    if not 1 <= workers <= 64:
        raise InvalidInput("workers must be between 1 and 64")
    server_context(certfile, keyfile, cafile, client_cert=client_cert)  # bad files fail here
    sock = _bind(host, port)
    parent = os.getpid()
    children: dict[int, int] = {}  # pid -> slot
    stopping: list[float] = []  # when the stop began (a list: set from the signal handler)

    def spawn(slot: int) -> None:
        pid = os.fork()
        if pid == 0:  # the worker
            code = 0
            try:
                _worker(make_app, sock, host=host, port=port, certfile=certfile,
                        keyfile=keyfile, cafile=cafile, client_cert=client_cert,
                        keep_alive_s=keep_alive_s, graceful_s=graceful_s, log_level=log_level,
                        parent=parent)
            except BaseException:  # reported, then the supervisor replaces this worker
                log.exception("worker %d failed", os.getpid())
                code = 1
            finally:
                logging.shutdown()
                os._exit(code)
        children[pid] = slot
        log.info("worker %d started (pid %d)", slot, pid)

    def on_signal(sig: int, _frame: FrameType | None) -> None:
        if not stopping:
            stopping.append(time.monotonic())
            log.info("received %s: stopping %d worker(s)", signal.Signals(sig).name, len(children))
        for pid in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    old = {sg: signal.signal(sg, on_signal) for sg in (signal.SIGTERM, signal.SIGINT)}
    log.info("serving https://%s:%d with %d workers (client certificate %s)", host,
             sock.getsockname()[1], workers, client_cert)
    try:
        for slot in range(workers):
            spawn(slot)
        while children:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                if stopping and time.monotonic() - stopping[0] > graceful_s + 10:
                    for p in list(children):
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(p, signal.SIGKILL)
                time.sleep(0.2)
                continue
            if pid not in children:
                continue
            slot = children.pop(pid)
            if stopping:
                continue
            log.warning("worker %d (pid %d) exited (%s); starting another in %.1f s", slot, pid,
                        _exit_text(status), restart_delay_s)
            time.sleep(restart_delay_s)
            if not stopping:
                spawn(slot)
    finally:
        for sg, h in old.items():
            signal.signal(sg, h)
        for p in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
        sock.close()


def _exit_text(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"signal {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit code {os.WEXITSTATUS(status)}"


@dataclass
class ServerHandle:
    """A server running in a background thread (tests, and agents embedding a store server).
    ``stop`` is idempotent."""

    host: str
    port: int
    _server: uvicorn.Server = field(repr=False)
    _thread: threading.Thread = field(repr=False)
    _sock: socket.socket = field(repr=False)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"https://{host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout: float = 10.0) -> None:
        """Ask the server to stop, wait for its thread (up to ``timeout``)."""
        self._server.should_exit = True
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)
            if self._thread.is_alive():
                self._server.force_exit = True
                self._thread.join(timeout)
        with contextlib.suppress(OSError):
            self._sock.close()


def start_in_thread(app: ASGIApp, *, host: str, port: int, certfile: Path, keyfile: Path,
                    cafile: Path, client_cert: Literal["optional", "required"],
                    keep_alive_s: int = 60, graceful_s: int = 2, log_level: str = "warning",
                    ready_timeout: float = 10.0) -> ServerHandle:
    """Start ``app`` on ``host:port`` (0 = a free port) in a daemon thread and return once it
    accepts connections. The handle gives the real ``port``, the ``url`` and ``stop()``."""
    ctx = server_context(certfile, keyfile, cafile, client_cert=client_cert)
    sock = _bind(host, port)
    real_port = int(sock.getsockname()[1])
    server = _Server(_config(app, ctx, host=host, port=real_port,
                             keep_alive_s=keep_alive_s, graceful_s=graceful_s,
                             log_level=log_level))
    failure: list[BaseException] = []

    def run() -> None:
        try:
            server.run(sockets=[sock])
        except BaseException as exc:  # reported to the starter below
            failure.append(exc)

    thread = threading.Thread(target=run, name=f"https-{host}:{real_port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + ready_timeout
    while not server.started:
        if failure or not thread.is_alive():
            sock.close()
            err = failure[0] if failure else None
            if isinstance(err, DrsiteError):
                raise err
            raise NetworkError(f"server on {host}:{real_port} failed to start: {err!r}")
        if time.monotonic() > deadline:
            server.should_exit = True
            thread.join(5)
            sock.close()
            raise NetworkError(f"server on {host}:{real_port} did not start in {ready_timeout}s")
        time.sleep(0.005)
    return ServerHandle(host, real_port, server, thread, sock)
