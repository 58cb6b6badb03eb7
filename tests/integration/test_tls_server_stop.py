"""Stopping a TLS server started by ``tlsutil`` (every vault stop, every agent's store server):
a response in flight is delivered whole, and an idle keep-alive client — which never answers
the server's TLS close_notify — does not hold the stop for the graceful timeout."""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from drsite import tlsutil
from drsite.pki import CertificateAuthority
from drsite.vault.context import TlsFiles, ensure_server_cert

BIG = 8 << 20  # larger than the socket buffers: part of it is still queued when the stop begins
GRACEFUL_S = 2


async def fast(_: Request) -> Response:
    return PlainTextResponse("ok")


async def slow(_: Request) -> Response:
    await asyncio.sleep(0.6)
    return Response(b"x" * BIG, media_type="application/octet-stream")


@pytest.fixture
def tls(tmp_path: Path) -> TlsFiles:
    ca = CertificateAuthority.load_or_create(tmp_path / "ca")
    files = ensure_server_cert(ca, tmp_path / "pki")
    files.ca.write_bytes(ca.ca_pem)
    return files


def _start(tls: TlsFiles, graceful_s: int) -> tlsutil.ServerHandle:
    app = Starlette(routes=[Route("/fast", fast), Route("/slow", slow)])
    return tlsutil.start_in_thread(app, host="127.0.0.1", port=0, certfile=tls.cert,
                                   keyfile=tls.key, cafile=tls.ca, client_cert="optional",
                                   graceful_s=graceful_s)


@pytest.fixture
def server(tls: TlsFiles) -> Iterator[tlsutil.ServerHandle]:
    handle = _start(tls, GRACEFUL_S)
    try:
        yield handle
    finally:
        handle.stop()


@pytest.fixture
def patient_server(tls: TlsFiles) -> Iterator[tlsutil.ServerHandle]:
    """A graceful period no loaded box outlasts: what is cut here was cut by our stop, not by
    uvicorn's timeout (a CI run at load 20 took over 2 s to move the 8 MiB)."""
    handle = _start(tls, 60)
    try:
        yield handle
    finally:
        handle.stop()


def _connect(handle: tlsutil.ServerHandle, tls: TlsFiles) -> ssl.SSLSocket:
    ctx = ssl.create_default_context(cafile=str(tls.ca))
    raw = socket.create_connection((handle.host, handle.port), timeout=30)
    return ctx.wrap_socket(raw, server_hostname="localhost")


def _request(sock: ssl.SSLSocket, path: str) -> None:
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: keep-alive\r\n\r\n".encode())


def _read_response(sock: ssl.SSLSocket) -> tuple[bytes, bytes]:
    """Headers and body of one response with a Content-Length (the connection stays open)."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        assert chunk, "the server closed before the headers"
        buf += chunk
    head, body = buf.split(b"\r\n\r\n", 1)
    length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    while len(body) < length:
        chunk = sock.recv(1 << 20)
        assert chunk, f"the response was cut at {len(body)} of {length} bytes"
        body += chunk
    return head, body


def test_idle_keep_alive_clients_do_not_hold_the_stop(server: tlsutil.ServerHandle,
                                                       tls: TlsFiles) -> None:
    """Each client got its answer and then sits idle on its open connection, reading nothing:
    it never replies to the server's close_notify. The stop used to wait the graceful timeout
    for those replies (every vault stop with agents connected took 2 s more)."""
    idle = []
    for _ in range(3):
        sock = _connect(server, tls)
        _request(sock, "/fast")
        assert _read_response(sock)[1] == b"ok"
        idle.append(sock)
    try:
        t0 = time.monotonic()
        server.stop(timeout=30)
        took = time.monotonic() - t0
        assert not server.running
        assert took < GRACEFUL_S / 2, f"the stop took {took:.2f} s with idle clients connected"
    finally:
        for sock in idle:
            sock.close()


def test_a_response_in_flight_is_delivered_whole_by_a_stop(patient_server: tlsutil.ServerHandle,
                                                           tls: TlsFiles) -> None:
    """A stop while a handler still works, and while its large answer is still queued for a
    client that reads slowly: the client gets every byte, then the connection ends."""
    server = patient_server
    sock = _connect(server, tls)
    got: list[bytes] = []
    errors: list[BaseException] = []

    def client() -> None:
        try:
            _request(sock, "/slow")
            time.sleep(1.0)  # the stop began while the answer waits in the buffers
            got.append(_read_response(sock)[1])
        except BaseException as exc:  # reported below
            errors.append(exc)

    t = threading.Thread(target=client, daemon=True)
    t.start()
    time.sleep(0.2)  # the handler sleeps: the response is in flight
    server.stop(timeout=90)
    t.join(60)
    try:
        assert not t.is_alive(), "the client still waits for the rest of the answer"
        assert not errors, errors
        assert got and len(got[0]) == BIG and got[0] == b"x" * BIG
        sock.settimeout(5)
        assert sock.recv(1) == b""  # then the server closed the connection
    finally:
        sock.close()
