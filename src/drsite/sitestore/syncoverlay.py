"""The recovery site's sync overlays: where synchronous QEMU VMs mirror their writes.

Per sync item, a ``qemu-storage-daemon`` (own session, recorded in ``daemon.json`` by
``pid:starttime``) serves NBD over TLS with the vault's CA: ``tls-creds-x509`` with
``verify-peer`` (a client certificate of the vault's CA is required) and ``tls-authz`` = an
``authz-list`` allowing only the distinguished name of the item's writer host (the host the
store's access list lets ``put`` the item; the HTTPS request that provisions the overlay comes
from it). Each *run* of the primary's mirror gets a fresh sparse qcow2 overlay per disk
(``<item>/<stream>/<disk>.qcow2``, virtual size = the disk's, 512-byte subclusters:
``extended_l2`` with 16 KiB clusters, so the allocation map is exactly the sectors the guest
wrote; ``lazy_refcounts``) exported read-write with ``writethrough``: a write is answered only
once it is flushed here. Invariants:

- an overlay is never handed out twice (``run.json`` is written before its export exists);
- overlays are deleted only when a committed point's mark names a newer run (``trim``), or
  when they were never written and a later run was (an overlay of a run that never began);
- a failover stops the item's daemon first (:meth:`OverlayServer.stop_item`): nothing writes
  an overlay once failover reads it;
- an item whose sync state ended here (unprotected, protection disabled, failed over and
  committed, re-protected the other way) loses everything at once (:meth:`OverlayServer.drop`):
  its daemon is stopped (also one a killed agent left, found by its QMP socket), then its
  directory is renamed aside (``.dropped-*``: one atomic step) and removed; a crash in between
  is finished by the next :meth:`~OverlayServer.drop` (the directory is still there) or by
  :meth:`~OverlayServer.sweep` at start.

Responsible for: the daemons, overlay files, exports, trimming. Not responsible for: applying
overlays (``failover.synctail``), deciding who may write (the store's access list).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from cryptography import x509

from drsite.core.errors import DrsiteError, InvalidInput, PermanentError, classify_os_error
from drsite.core.model import validate_name
from drsite.fsutil import atomic_write_json, fsync_dir, read_json
from drsite.hypervisors.qemu.qmp import QmpClient, wait_for_monitor
from drsite.hypervisors.qemu.runner import process_token
from drsite.hypervisors.qemu.tools import run_tool

log = logging.getLogger(__name__)
DAEMON = "qemu-storage-daemon"
DROPPED = ".dropped-"   # an item's directory renamed aside, being removed (sweep finishes it)
# extended_l2 with 16 KiB clusters: 32 subclusters of 512 bytes (the allocation map is exactly
# the sectors written); lazy_refcounts: a written-through write flushes data and L2 only, not
# the refcounts (3x fewer flushes, measured; refcounts are repaired when a crashed overlay is
# opened read-write, which qemu-img commit does; reads never need them)
OVERLAY_OPTIONS = "extended_l2=on,cluster_size=16k,lazy_refcounts=on"


class OverlayServer:
    """Sync overlays under ``root/<item>/<stream>/`` (see module doc). Thread-safe."""

    def __init__(self, root: Path, ca_file: Path, cert_file: Path, key_file: Path, *,
                 host: str = "127.0.0.1") -> None:
        self.root = Path(root)
        self.host = host
        self._tls = (Path(ca_file), Path(cert_file), Path(key_file))
        self._lock = threading.Lock()
        self._daemons: dict[str, tuple[subprocess.Popen[bytes], int, str]] = {}

    # -- paths --------------------------------------------------------------------------------
    def item_dir(self, item_id: str) -> Path:
        return self.root / validate_name("item", item_id)

    def run_dir(self, item_id: str, stream: str) -> Path:
        return self.item_dir(item_id) / uuid.UUID(stream).hex

    def runs(self, item_id: str) -> list[dict[str, Any]]:
        """The item's runs (``run.json``), oldest first."""
        out = []
        d = self.item_dir(item_id)
        if not d.is_dir():
            return []
        for p in d.iterdir():
            rec = _read(p / "run.json") if p.is_dir() else None
            if rec is not None:
                out.append(rec)
        return sorted(out, key=lambda r: (float(r.get("created", 0)), str(r["stream"])))

    # -- provisioning -------------------------------------------------------------------------
    def provision(self, item_id: str, disks: dict[str, int], writer_dn: str) -> dict[str, Any]:
        """A new run for ``item_id``: an overlay per disk, exported to ``writer_dn`` only.
        Returns ``{"port", "stream", "exports": {disk: name}}``."""
        if not disks or any(int(n) <= 0 for n in disks.values()):
            raise InvalidInput(f"sync overlay of {item_id}: bad disks {disks!r}")
        for disk_id in disks:
            validate_name("disk", disk_id)
        if not writer_dn or "\n" in writer_dn:
            raise InvalidInput("sync overlay: the writer's certificate has no name")
        stream = uuid.uuid4().hex
        rd = self.run_dir(item_id, stream)
        with self._lock:
            try:
                self._drop_unwritten(item_id)
                rd.mkdir(parents=True)
                exports = {d: f"{stream}-{d}" for d in disks}
                for d, size in disks.items():
                    run_tool(["qemu-img", "create", "-q", "-f", "qcow2", "-o",
                              OVERLAY_OPTIONS, str(rd / f"{d}.qcow2"), str(int(size))])
                atomic_write_json(rd / "run.json", {"stream": stream, "disks": dict(disks),
                                                    "exports": exports, "created": time.time(),
                                                    "writer": writer_dn})
                port = self._daemon(item_id, writer_dn)
                with QmpClient.connect(str(self._qmp(item_id)), timeout=10.0) as q:
                    for i, (d, _) in enumerate(sorted(disks.items())):
                        node = f"ov-{stream[:12]}-{i}"
                        q.execute("blockdev-add", {
                            "driver": "qcow2", "node-name": node,
                            "file": {"driver": "file", "filename": str(rd / f"{d}.qcow2")}})
                        q.execute("block-export-add", {
                            "type": "nbd", "id": node, "node-name": node, "name": exports[d],
                            "writable": True, "writethrough": True})
            except OSError as e:
                shutil.rmtree(rd, ignore_errors=True)
                raise PermanentError(f"sync overlay of {item_id}: {e}") from e
            except DrsiteError:
                self._delete_run(item_id, stream)   # never handed out: nothing may keep it
                raise
        log.info("sync overlay %s of %s exported on port %d to %s", stream[:8], item_id, port,
                 writer_dn)
        return {"port": port, "stream": stream, "exports": exports}

    def _qmp(self, item_id: str) -> Path:
        """The daemon's QMP socket, in a short directory of its own (a unix socket path is
        limited to 108 bytes; data directories can be deeper)."""
        h = hashlib.sha1(str(self.item_dir(item_id).absolute()).encode()).hexdigest()[:16]
        d = Path(tempfile.gettempdir()) / f"drsite-qsd-{os.getuid()}" / h
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        return d / "qmp.sock"

    def _daemon(self, item_id: str, writer_dn: str) -> int:
        """The item's daemon for ``writer_dn`` (started, or restarted for another writer)."""
        cur = self._daemons.get(item_id)
        rec = _read(self.item_dir(item_id) / "daemon.json") or {}
        if cur is not None and cur[0].poll() is None and rec.get("writer") == writer_dn:
            return cur[1]
        self._stop_locked(item_id)
        tls = self.item_dir(item_id) / "tls"
        tls.mkdir(mode=0o700, exist_ok=True)
        for src, name in zip(self._tls, ("ca-cert.pem", "server-cert.pem", "server-key.pem"),
                             strict=True):
            shutil.copyfile(src, tls / name)
            os.chmod(tls / name, 0o600)
        port = _free_port(self.host)
        qmp = self._qmp(item_id)
        qmp.unlink(missing_ok=True)
        authz = {"qom-type": "authz-list", "id": "writer", "policy": "deny",
                 "rules": [{"match": writer_dn, "policy": "allow", "format": "exact"}]}
        args = [DAEMON,
                "--object", f"tls-creds-x509,id=tls0,endpoint=server,dir={tls},verify-peer=on",
                "--object", json.dumps(authz),
                "--chardev", f"socket,id=m0,path={qmp},server=on,wait=off",
                "--monitor", "chardev=m0",
                "--nbd-server", f"addr.type=inet,addr.host={self.host},addr.port={port},"
                                "tls-creds=tls0,tls-authz=writer"]
        if shutil.which(DAEMON) is None:
            raise PermanentError(f"{DAEMON} is not installed",
                                 hint="Install Debian's qemu-system-common package.")
        with open(self.item_dir(item_id) / "qsd.log", "ab") as lf:
            proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=lf, stderr=lf,
                                    start_new_session=True, close_fds=True)
        wait_for_monitor(proc, qmp, 15.0, f"{DAEMON} for {item_id}")
        tok = process_token(proc.pid) or ""
        atomic_write_json(self.item_dir(item_id) / "daemon.json",
                          {"pid": proc.pid, "token": tok, "port": port, "writer": writer_dn})
        self._daemons[item_id] = (proc, port, tok)
        return port

    # -- ending -------------------------------------------------------------------------------
    def stop_item(self, item_id: str) -> None:
        """Stop the item's daemon (it flushes and closes every overlay); idempotent, also for
        a daemon an earlier process of this agent started."""
        with self._lock:
            self._stop_locked(item_id)

    def _stop_locked(self, item_id: str) -> None:
        cur = self._daemons.pop(item_id, None)
        rec = _read(self.item_dir(item_id) / "daemon.json")
        if cur is not None:
            proc = cur[0]
            try:
                with QmpClient.connect(str(self._qmp(item_id)), timeout=2.0) as q:
                    q.execute("quit", timeout=5.0)
                proc.wait(10.0)
            except (DrsiteError, subprocess.TimeoutExpired):
                proc.kill()
                proc.wait()
        elif rec is not None and process_token(int(rec["pid"])) == rec.get("token"):
            os.kill(int(rec["pid"]), signal.SIGTERM)   # QEMU flushes and exits on SIGTERM
            deadline = time.monotonic() + 10.0
            while process_token(int(rec["pid"])) == rec.get("token") and \
                    time.monotonic() < deadline:
                time.sleep(0.02)
            if process_token(int(rec["pid"])) == rec.get("token"):
                os.kill(int(rec["pid"]), signal.SIGKILL)
        for pid in self._orphans(item_id):
            tok = process_token(pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)   # unrecorded: its runs were never handed out
            deadline = time.monotonic() + 10.0
            while tok is not None and process_token(pid) == tok and time.monotonic() < deadline:
                time.sleep(0.02)
        (self.item_dir(item_id) / "daemon.json").unlink(missing_ok=True)
        sock = self._qmp(item_id)
        sock.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            sock.parent.rmdir()

    def stop(self) -> None:
        with self._lock:
            for item_id in list(self._daemons):
                self._stop_locked(item_id)

    def items(self) -> list[str]:
        """Items that have overlays (a directory) here."""
        try:
            return sorted(p.name for p in self.root.iterdir()
                          if p.is_dir() and not p.name.startswith("."))
        except FileNotFoundError:
            return []
        except OSError as e:
            raise classify_os_error(e, f"sync overlays {self.root}") from e

    def drop(self, item_id: str) -> bool:
        """Delete everything of the item here (its sync state ended on this site): stop its
        daemon, rename its directory aside, remove it. Idempotent; whether there was one.
        The caller decides that no failover can need the overlays any more."""
        d = self.item_dir(item_id)
        with self._lock:
            self._stop_locked(item_id)   # nothing writes or exports the files from here on
            try:
                if d.is_dir():
                    os.replace(d, self.root / f"{DROPPED}{item_id}-{uuid.uuid4().hex[:8]}")
                    fsync_dir(self.root)
                    existed = True
                else:
                    existed = False
            except OSError as e:
                raise classify_os_error(e, f"sync overlays {d}") from e
        self.sweep()
        return existed

    def sweep(self) -> int:
        """Finish removals a crash interrupted (every ``.dropped-*`` directory); how many."""
        try:
            gone = [p for p in self.root.iterdir() if p.name.startswith(DROPPED)]
        except FileNotFoundError:
            return 0
        except OSError as e:
            raise classify_os_error(e, f"sync overlays {self.root}") from e
        for p in gone:
            shutil.rmtree(p, ignore_errors=True)
        return len(gone)

    def _orphans(self, item_id: str) -> list[int]:
        """Daemons serving this item's QMP socket that no ``daemon.json`` names (an agent
        killed between starting one and recording it)."""
        needle = f"path={self._qmp(item_id)},".encode()
        out = []
        for p in Path("/proc").iterdir():
            if not p.name.isdigit():
                continue
            try:
                argv = (p / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if argv and argv[0].endswith(DAEMON.encode()) and any(needle in a for a in argv):
                out.append(int(p.name))
        return out

    # -- trimming -----------------------------------------------------------------------------
    def trim(self, item_id: str, stream: str | None) -> int:
        """A committed point's mark names run ``stream``: delete the runs provisioned before
        it (their writes are in that point). Returns how many were deleted."""
        if not stream:
            return 0
        runs = self.runs(item_id)
        names = [r["stream"] for r in runs]
        if stream not in names:
            return 0
        n = 0
        with self._lock:
            for r in runs[:names.index(stream)]:
                self._delete_run(item_id, str(r["stream"]))
                n += 1
        return n

    def _drop_unwritten(self, item_id: str) -> None:
        """Runs whose overlays hold nothing and that were provisioned before a run that holds
        something: never begun (a primary never goes back to an older run). An empty run
        after the newest written one may be the one running now: kept."""
        runs = self.runs(item_id)
        written = [any(_allocated(self.run_dir(item_id, str(r["stream"])) / f"{d}.qcow2")
                       for d in r["disks"]) for r in runs]
        if True not in written:
            return
        newest = len(written) - 1 - written[::-1].index(True)
        for r, w in zip(runs[:newest], written[:newest], strict=True):
            if not w:
                self._delete_run(item_id, str(r["stream"]))

    def _delete_run(self, item_id: str, stream: str) -> None:
        rd = self.run_dir(item_id, stream)
        try:
            with QmpClient.connect(str(self._qmp(item_id)), timeout=2.0) as q:
                for i in range(16):
                    node = f"ov-{stream[:12]}-{i}"
                    try:
                        q.execute("block-export-del", {"id": node, "mode": "hard"})
                    except DrsiteError:
                        break
                    deadline = time.monotonic() + 5.0
                    while time.monotonic() < deadline:
                        try:
                            q.execute("blockdev-del", {"node-name": node})
                            break
                        except DrsiteError:
                            time.sleep(0.02)   # the export is still going away
        except DrsiteError:
            pass   # no daemon: nothing exports it
        (rd / "run.json").unlink(missing_ok=True)
        shutil.rmtree(rd, ignore_errors=True)


def _allocated(path: Path) -> bool:
    try:
        out = run_tool(["qemu-img", "map", "-U", "--output=json", "-f", "qcow2", str(path)])
    except DrsiteError:
        return True   # cannot tell: keep it
    return any(e.get("present") for e in json.loads(out))


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _read(path: Path) -> dict[str, Any] | None:
    try:
        raw = read_json(path)
    except (FileNotFoundError, ValueError):
        return None
    return raw if isinstance(raw, dict) else None


def writer_dn(cert_der: bytes) -> str:
    """The distinguished name QEMU's ``tls-authz`` matches for a client certificate, as
    GnuTLS prints it: RFC 4514 attribute syntax, RDNs in certificate order (``CN=h,O=site``;
    cryptography's ``rfc4514_string`` reverses the order)."""
    subject = x509.load_der_x509_certificate(cert_der).subject
    return ",".join(rdn.rfc4514_string() for rdn in subject.rdns)
