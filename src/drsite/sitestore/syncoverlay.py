"""The recovery site's sync overlays: where synchronous QEMU VMs mirror their writes.

Per sync item, a ``qemu-storage-daemon`` (own session, recorded in ``daemon.json`` by
``pid:starttime`` before it runs: it starts behind the runners' gate, ``runner.spawn_gated``)
serves NBD over TLS with the vault's CA: ``tls-creds-x509`` with
``verify-peer`` (a client certificate of the vault's CA is required) and ``tls-authz`` = an
``authz-list`` allowing only the distinguished name of the item's writer host (the host the
store's access list lets ``put`` the item; the HTTPS request that provisions the overlay comes
from it). Each *run* of the primary's mirror gets a fresh sparse qcow2 overlay per disk
(``<item>/<stream>/<disk>.qcow2``, virtual size = the disk's, 512-byte subclusters:
``extended_l2`` with 16 KiB clusters, so the allocation map is exactly the sectors the guest
wrote; ``lazy_refcounts``) exported read-write with ``writethrough``: a write is answered only
once it is flushed here. A new overlay gets 64 MiB of written zeros past its end for the
clusters qcow2 appends (``_runway``); the daemon's NBD listener is ours, with
``TCP_NODELAY`` (``_listener``). Invariants:

- an overlay is never handed out twice (``run.json`` is written before its export exists);
- overlays are deleted only when a committed point's mark names a newer run (``trim``), or
  when they were never written and a later run was (an overlay of a run that never began),
  or when a point marked the run and a newer latest point is not of it (``drop_outlived``:
  the item went asynchronous);
- a run's overlay is a chain of layers (``rotate``/``retire``; the argument is in
  ``hypervisors/qemu/design.md``, synchronous mode 7);
- a failover stops the item's daemon first (:meth:`OverlayServer.stop_item`): nothing writes
  an overlay once failover reads it;
- an item whose sync state ended here (unprotected, protection disabled, failed over and
  committed, re-protected the other way) loses everything at once (:meth:`OverlayServer.drop`):
  its daemon is stopped (also one an agent of an older version left unrecorded, found by its
  QMP socket), then its
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography import x509

from drsite import failpoints
from drsite.core.errors import DrsiteError, InvalidInput, PermanentError, classify_os_error
from drsite.core.model import validate_name
from drsite.failover.synctail import layer_path, run_layers
from drsite.fsutil import atomic_write_json, drop_aside, read_json, sweep_dropped
from drsite.hypervisors.qemu.qmp import QmpClient, wait_for_monitor
from drsite.hypervisors.qemu.runner import cancel_gated, open_gate, process_token, spawn_gated
from drsite.hypervisors.qemu.tools import run_tool

log = logging.getLogger(__name__)
DAEMON = "qemu-storage-daemon"
# extended_l2 with 16 KiB clusters: 32 subclusters of 512 bytes (the allocation map is exactly
# the sectors written); lazy_refcounts: a written-through write flushes data and L2 only, not
# the refcounts (3x fewer flushes, measured; refcounts are repaired when a crashed overlay is
# opened read-write, which qemu-img commit does; reads never need them)
OVERLAY_OPTIONS = "extended_l2=on,cluster_size=16k,lazy_refcounts=on"
# the overlay node's L2 cache in 4 KiB entries (default: a cluster, 16 KiB): a written-through
# write that allocates writes back one 4 KiB L2 piece, not 16 KiB (-8 us per mirrored write at
# p50, measured interleaved; aio=io_uring -4 us, cache.direct+aio=native -9 us: not taken,
# each can make the node fail to open where io_uring or O_DIRECT is not available)
NODE_OPTIONS: dict[str, Any] = {"l2-cache-entry-size": 4096}
# zeros written past a new overlay's end (see _runway)
RUNWAY = 64 << 20
# a run's top layer is rotated past this many bytes on disk (design.md: the failover's
# qemu-img commit of a layer this size takes seconds, the space it holds is at most about
# twice this until two points are committed after the switch, and a rotation costs one drain)
ROTATE_BYTES = 256 << 20


class OverlayServer:
    """Sync overlays under ``root/<item>/<stream>/`` (see module doc). Thread-safe."""

    def __init__(self, root: Path, ca_file: Path, cert_file: Path, key_file: Path, *,
                 host: str = "127.0.0.1", rotate_bytes: int = ROTATE_BYTES) -> None:
        self.root = Path(root)
        self.host = host
        self.rotate_bytes = rotate_bytes
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
                    _runway(rd / f"{d}.qcow2", min(RUNWAY, int(size)))
                atomic_write_json(rd / "run.json", {"stream": stream, "disks": dict(disks),
                                                    "exports": exports, "created": time.time(),
                                                    "writer": writer_dn})
                port = self._daemon(item_id, writer_dn)
                with QmpClient.connect(str(self._qmp(item_id)), timeout=10.0) as q:
                    for i, (d, _) in enumerate(sorted(disks.items())):
                        node = f"ov-{stream[:12]}-{i}"
                        q.execute("blockdev-add", {
                            "driver": "qcow2", "node-name": node,
                            **NODE_OPTIONS,
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
        listener = _listener(self.host)
        port = int(listener.getsockname()[1])
        qmp = self._qmp(item_id)
        qmp.unlink(missing_ok=True)
        authz = {"qom-type": "authz-list", "id": "writer", "policy": "deny",
                 "rules": [{"match": writer_dn, "policy": "allow", "format": "exact"}]}
        args = [DAEMON,
                "--object", f"tls-creds-x509,id=tls0,endpoint=server,dir={tls},verify-peer=on",
                "--object", json.dumps(authz),
                "--chardev", f"socket,id=m0,path={qmp},server=on,wait=off",
                "--monitor", "chardev=m0",
                "--nbd-server", f"addr.type=fd,addr.str={listener.fileno()},"
                                "tls-creds=tls0,tls-authz=writer"]
        if shutil.which(DAEMON) is None:
            listener.close()
            raise PermanentError(f"{DAEMON} is not installed",
                                 hint="Install Debian's qemu-system-common package.")
        # record first, then run (as the VMs' runners): behind the gate the daemon execs only
        # once daemon.json names it, so an agent killed in between leaves no daemon holding
        # the overlays unrecorded
        record = self.item_dir(item_id) / "daemon.json"
        with listener, open(self.item_dir(item_id) / "qsd.log", "ab") as lf:
            proc, gate = spawn_gated(args, stdout=lf, pass_fds=(listener.fileno(),))
        try:
            failpoints.hit("overlay.daemon-spawned")
            tok = process_token(proc.pid)
            if tok is None:
                raise PermanentError(f"{DAEMON} for {item_id} exited at once")
            atomic_write_json(record, {"pid": proc.pid, "token": tok, "port": port,
                                       "writer": writer_dn})
            failpoints.hit("overlay.daemon-recorded")
        except BaseException:
            cancel_gated(proc, gate)
            raise
        open_gate(gate)
        try:
            wait_for_monitor(proc, qmp, 15.0, f"{DAEMON} for {item_id}")
        except DrsiteError:
            proc.kill()   # QMP never answered: nothing was exported through it
            proc.wait()
            record.unlink(missing_ok=True)
            raise
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
            existed = drop_aside(d, "sync overlays")
        self.sweep()
        return existed

    def sweep(self) -> int:
        """Finish removals a crash interrupted (every ``.dropped-*`` directory); how many."""
        return sweep_dropped(self.root, "sync overlays")

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

    # -- rotation (design.md "Rotating a run's overlay") ------------------------------------
    def top_size_bound(self, item_id: str) -> int:
        """An upper bound of :meth:`top_bytes` without the daemon: the newest layer's files'
        sizes (a written offset is never past its file's end). The runway counts in it."""
        runs = self.runs(item_id)
        if not runs:
            return 0
        rec = runs[-1]
        rd = self.run_dir(item_id, str(rec["stream"]))
        top = run_layers(rec)[-1]
        total = 0
        for d in sorted(rec["disks"]):
            with contextlib.suppress(OSError):
                st = layer_path(rd, d, top).stat()
                total += max(st.st_size, st.st_blocks * 512)   # top_bytes' fallback too
        return total

    def top_bytes(self, item_id: str) -> int:
        """How far qcow2 has written into the newest run's newest layer (every disk): its file
        node's highest written offset as the item's daemon counts it. qcow2 allocates clusters
        at increasing offsets, first inside the runway of zeros the layer was made with
        (``_runway``), which the file's size on disk does not tell from data: counted, a fresh
        layer would look full; left out, a small disk's layer would never rotate. The size on
        disk where the daemon does not know the node."""
        runs = self.runs(item_id)
        if not runs:
            return 0
        rec = runs[-1]
        stream = str(rec["stream"])
        rd = self.run_dir(item_id, stream)
        top = run_layers(rec)[-1]
        written: dict[str, int] = {}
        with contextlib.suppress(DrsiteError, OSError), \
                QmpClient.connect(str(self._qmp(item_id)), timeout=10.0) as q:
            for st in q.execute("query-blockstats", {"query-nodes": True}):
                f = (st.get("parent") or {}).get("stats") or {}
                if st.get("node-name") and "wr_highest_offset" in f:
                    written[str(st["node-name"])] = int(f["wr_highest_offset"])
        total = 0
        for i, d in enumerate(sorted(rec["disks"])):
            node = _node(stream, i, top)
            if node in written:
                total += written[node]
                continue
            with contextlib.suppress(OSError):
                total += layer_path(rd, d, top).stat().st_blocks * 512
        return total

    def rotate(self, item_id: str, latest_point: Callable[[str], str | None], *,
               force: bool = False) -> int | None:
        """Past ``rotate_bytes`` (or ``force``): give the run the item's daemon exports a new
        top layer, switched in under the export in one transaction (the primary's
        mirror does not notice). Returns the new layer's number, or None. Steps, each safe to
        crash after: the layer files; ``run.json`` lists the layer (a failover applies it,
        empty or not); the switch; ``switched[n]`` = the newest committed point after the
        switch (what :meth:`retire` compares with)."""
        with self._lock:
            runs = self.runs(item_id)
            if not runs or not self._serving(item_id):
                return None
            # the files' sizes bound what qcow2 wrote (it writes inside a file or extends
            # it): within the threshold, the daemon need not be asked (every 2 s per item)
            if not force and (self.top_size_bound(item_id) <= self.rotate_bytes
                              or self.top_bytes(item_id) <= self.rotate_bytes):
                return None
            rec = runs[-1]
            stream = str(rec["stream"])
            rd = self.run_dir(item_id, stream)
            disks = sorted(rec["disks"])
            with QmpClient.connect(str(self._qmp(item_id)), timeout=10.0) as q:
                tops = {str(e.get("id")): str(e.get("node-name"))
                        for e in q.execute("query-block-exports")}
                top = _layer_of(tops.get(_node(stream, 0, 0)))
                if top is None:
                    return None   # not exported here (an older daemon's run)
                layers = run_layers(rec)
                if layers[-1] != top and top in layers:
                    # listed after the top but never switched in (a crash): never written
                    layers = layers[:layers.index(top) + 1]
                    self._write_run(rd, {**rec, "layers": layers})
                self._tidy(rd, {**rec, "layers": layers})
                n = layers[-1] + 1
                for d in disks:
                    run_tool(["qemu-img", "create", "-q", "-f", "qcow2", "-o",
                              OVERLAY_OPTIONS, str(layer_path(rd, d, n)),
                              str(int(rec["disks"][d]))])
                    _runway(layer_path(rd, d, n), min(RUNWAY, int(rec["disks"][d])))
                rec = {**rec, "layers": [*layers, n]}
                self._write_run(rd, rec)
                failpoints.hit("overlay.rotate-listed")
                added: list[str] = []
                try:
                    actions = []
                    for i, d in enumerate(disks):
                        q.execute("blockdev-add", {"driver": "file", "node-name":
                                                   _file_node(stream, i, n),
                                                   "filename": str(layer_path(rd, d, n))})
                        added.append(_file_node(stream, i, n))
                        q.execute("blockdev-add", {"driver": "qcow2", **NODE_OPTIONS,
                                                   "node-name": _node(stream, i, n),
                                                   "file": _file_node(stream, i, n),
                                                   "backing": None})
                        added.append(_node(stream, i, n))
                        actions.append({"type": "blockdev-snapshot", "data": {
                            "node": _node(stream, i, top), "overlay": _node(stream, i, n)}})
                    q.execute("transaction", {"actions": actions})
                except DrsiteError:
                    for node in reversed(added):
                        with contextlib.suppress(DrsiteError):
                            q.execute("blockdev-del", {"node-name": node})
                    self._write_run(rd, {**rec, "layers": layers})
                    self._tidy(rd, {**rec, "layers": layers})
                    raise
            failpoints.hit("overlay.rotate-switched")
            switched = dict(rec.get("switched") or {})
            switched[str(n)] = latest_point(item_id)
            self._write_run(rd, {**rec, "switched": switched})
        log.info("sync overlay %s of %s rotated to layer %d (after point %s)", stream[:8],
                 item_id, n, switched[str(n)])
        return n

    def retire(self, item_id: str, latest_id: str | None, previous_id: str | None) -> int:
        """Delete the layers no failover can need: those before a layer whose switch came
        before the seal of the item's latest authentic point ``latest_id`` — proven by the
        point before it, ``previous_id``, having been committed after the switch (a VM seals
        one cycle at a time, so the second point committed after the switch was sealed after
        it, and every write of the older layers is in it). Steps, each safe to crash after:
        the daemon drops the older layers' nodes; ``run.json`` stops listing them; the files
        go. Returns how many layers went."""
        if latest_id is None or previous_id is None:
            return 0
        gone = 0
        with self._lock:
            for rec in self.runs(item_id):
                stream = str(rec["stream"])
                rd = self.run_dir(item_id, stream)
                layers = run_layers(rec)
                switched = rec.get("switched") or {}
                proven = [n for n in layers[1:] if str(n) in switched
                          and previous_id > str(switched[str(n)] or "")]
                if not proven:
                    self._tidy(rd, rec)
                    continue
                k = proven[-1]
                old = [n for n in layers if n < k]
                try:
                    self._detach(item_id, stream, len(rec["disks"]), k, old)
                except DrsiteError as e:   # kept (listed, whole): tried again next pass
                    log.warning("sync overlay %s of %s: layers before %d not retired: %s",
                                stream[:8], item_id, k, e)
                    continue
                failpoints.hit("overlay.retire-detached")
                rec = {**rec, "layers": [n for n in layers if n >= k],
                       "switched": {m: p for m, p in switched.items() if int(m) >= k}}
                self._write_run(rd, rec)
                failpoints.hit("overlay.retire-forgotten")
                self._tidy(rd, rec)
                gone += len(old)
                log.info("sync overlay %s of %s: %d layer(s) before layer %d retired (point %s "
                         "was sealed after its switch)", stream[:8], item_id, len(old), k,
                         latest_id)
        return gone

    def _detach(self, item_id: str, stream: str, ndisks: int, k: int, old: list[int]) -> None:
        """In the item's daemon, if it serves the run: layer ``k`` loses its backing and the
        ``old`` layers' nodes go. (Were it unreachable, the files still go: it never reads
        them — the mirror writes whole 512-byte sectors, one subcluster each — and their
        space comes back when it quits.)"""
        if not self._serving(item_id):
            return
        with QmpClient.connect(str(self._qmp(item_id)), timeout=10.0) as q:
            names = {str(n.get("node-name")) for n in q.execute("query-named-block-nodes")}
            for i in range(ndisks):
                if _node(stream, i, k) not in names:
                    continue
                q.execute("blockdev-reopen", {"options": [{
                    "driver": "qcow2", "node-name": _node(stream, i, k),
                    "file": _file_node(stream, i, k), "backing": None}]})
                for n in reversed(old):
                    for node in (_node(stream, i, n), _file_node(stream, i, n) if n else None):
                        if node in names:
                            q.execute("blockdev-del", {"node-name": node})

    def _serving(self, item_id: str) -> bool:
        """The item's daemon runs: this process's, or one an earlier agent process started
        (``daemon.json``, by ``pid:starttime``; it outlives a killed agent and goes on
        serving its run, so it is rotated like ours — everything is read from the daemon)."""
        cur = self._daemons.get(item_id)
        if cur is not None:
            return cur[0].poll() is None
        rec = _read(self.item_dir(item_id) / "daemon.json")
        return rec is not None and process_token(int(rec["pid"])) == rec.get("token")

    def _tidy(self, rd: Path, rec: dict[str, Any]) -> None:
        """Remove the layer files ``run.json`` does not list: created but never listed (so
        never switched in), or no longer listed (retired)."""
        keep = {layer_path(rd, d, n).name for n in run_layers(rec) for d in rec["disks"]}
        for p in rd.glob("*.qcow2"):
            if p.name not in keep:
                p.unlink(missing_ok=True)

    @staticmethod
    def _write_run(rd: Path, rec: dict[str, Any]) -> None:
        atomic_write_json(rd / "run.json", rec)

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

    def note_marked(self, item_id: str, stream: str, point_id: str) -> None:
        """A committed (authentic) point sealed inside run ``stream``: the run began. The
        first such point is kept in ``run.json`` (``marked``) for :meth:`drop_outlived`."""
        with self._lock:
            for rec in self.runs(item_id):
                if rec["stream"] == stream and not rec.get("marked"):
                    self._write_run(self.run_dir(item_id, stream), {**rec, "marked": point_id})

    def drop_outlived(self, item_id: str, latest_id: str, latest_stream: str | None) -> int:
        """Delete the runs the item's latest authentic point ``latest_id`` outlived: a run
        that had begun (a committed point ``marked`` it) while the latest point, newer than
        that one, is not of it. A primary marks every seal while a run is healthy and never
        resumes a run that was not, so that run ended before the latest point's seal and its
        writes are in it (the item went asynchronous, or a later run replaced it). Returns
        how many went."""
        n = 0
        with self._lock:
            for rec in self.runs(item_id):
                marked = rec.get("marked")
                if marked and latest_id > str(marked) and rec["stream"] != latest_stream:
                    self._delete_run(item_id, str(rec["stream"]))
                    n += 1
        return n

    def _drop_unwritten(self, item_id: str) -> None:
        """Runs whose overlays hold nothing and that were provisioned before a run that holds
        something: never begun (a primary never goes back to an older run). An empty run
        after the newest written one may be the one running now: kept."""
        runs = self.runs(item_id)
        written = [any(_allocated(layer_path(self.run_dir(item_id, str(r["stream"])), d, n))
                       for d in r["disks"] for n in run_layers(r)) for r in runs]
        if True not in written:
            return
        newest = len(written) - 1 - written[::-1].index(True)
        for r, w in zip(runs[:newest], written[:newest], strict=True):
            if not w:
                self._delete_run(item_id, str(r["stream"]))

    def _delete_run(self, item_id: str, stream: str) -> None:
        rd = self.run_dir(item_id, stream)
        rec = _read(rd / "run.json") or {}
        layers = run_layers(rec)
        try:
            with QmpClient.connect(str(self._qmp(item_id)), timeout=2.0) as q:
                for i in range(len(rec.get("disks") or {}) or 16):
                    try:
                        q.execute("block-export-del", {"id": _node(stream, i, 0),
                                                       "mode": "hard"})
                    except DrsiteError:
                        if rec:
                            continue
                        break
                    deadline = time.monotonic() + 5.0
                    nodes = [x for n in reversed(layers)
                             for x in (_node(stream, i, n), _file_node(stream, i, n) if n
                                       else None) if x]
                    while nodes and time.monotonic() < deadline:
                        try:
                            q.execute("blockdev-del", {"node-name": nodes[0]})
                            nodes.pop(0)
                        except DrsiteError:
                            time.sleep(0.02)   # the export is still going away
        except DrsiteError:
            pass   # no daemon: nothing exports it
        (rd / "run.json").unlink(missing_ok=True)
        shutil.rmtree(rd, ignore_errors=True)


def _node(stream: str, disk: int, layer: int) -> str:
    """The daemon's qcow2 node of a layer (layer 0's is also its export's id)."""
    return f"ov-{stream[:12]}-{disk}" + (f"-L{layer}" if layer else "")


def _file_node(stream: str, disk: int, layer: int) -> str:
    return f"ovf-{stream[:12]}-{disk}-L{layer}"


def _layer_of(node: str | None) -> int | None:
    if not node:
        return None
    _, sep, tail = node.rpartition("-L")
    return int(tail) if sep and tail.isdigit() else 0


def _allocated(path: Path) -> bool:
    try:
        out = run_tool(["qemu-img", "map", "-U", "--output=json", "-f", "qcow2", str(path)])
    except DrsiteError:
        return True   # cannot tell: keep it
    return any(e.get("present") for e in json.loads(out))


def _runway(path: Path, nbytes: int) -> None:
    """Write ``nbytes`` of zeros past the end of the new overlay ``path`` and fsync. qcow2
    appends the clusters it allocates, so the first ``nbytes`` of them overwrite blocks the
    file system has already allocated and written: the written-through write's
    ``fdatasync`` then needs no journal commit for a block allocation (ext4: 40-60 us less
    at p10/p25 per write at the overlay, measured, ``bench/sync_overlay_options.py``); past
    the runway the overlay grows as before. qcow2 reads only what its tables name, so the
    allocation map (what failover applies) is unchanged."""
    zeros = bytes(1 << 20)
    with open(path, "r+b") as f:
        f.seek(0, os.SEEK_END)
        while nbytes > 0:
            nbytes -= f.write(zeros[:min(nbytes, len(zeros))])
        f.flush()
        os.fsync(f.fileno())


def _listener(host: str) -> socket.socket:
    """The daemon's NBD listening socket, made here and passed down (QEMU 7.2's NBD server
    sets no ``TCP_NODELAY``; Linux copies it from the listener to every accepted socket).
    Without it a reply waits behind the previous unacknowledged one until the client's
    delayed ACK (~40 ms): pipelined mirrored writes (guest queue depth > 1) stalled there,
    330 against 1,300-3,600 writes/s at queue depth 16 (measured, one overlay, TLS).
    Bound here, the port is also never lost to another process between choosing and binding
    it."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.bind((host, 0))
        s.listen(16)
    except OSError:
        s.close()
        raise
    return s


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
