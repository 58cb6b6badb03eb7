"""Synchronous mode of a QEMU VM: QEMU's active mirror to the recovery site's overlay
(``QemuHypervisor.set_sync``/``sync_status`` and the seal; invariants in ``design.md``).

A *run* is one ``blockdev-mirror`` per disk (``sync: none``, ``copy-mode: write-blocking``)
into an NBD+TLS export of a fresh sparse qcow2 *overlay* on the recovery site (its
``qemu-storage-daemon`` flushes each write before answering: ``writethrough``). A guest write
completes only once the overlay holds it, so

    the point sealed when the run began (or any later seal of the run) + the overlay
    == the disks as the guest last saw them acknowledged.

Runs begin at a seal, under a write hold (QMP ``stop``): the seal's transaction and the
mirror's start are one instant for the guest, the seal's mark is ``{stream, seq: 0}``; every
later seal of the run is ``{stream, seq: n}``. A run ends when its mirror fails (the recovery
site refused, dropped or — via ``syncwatch`` — stopped answering within the budget: the
guest's writes then complete on the primary alone and the dirty bitmaps record them as
always), when QEMU stops, or when synchronous mode is left. An overlay is never reused: the
agent provisions a new one (a new ``stream``) and the next seal begins a run on it.

Every function runs under the VM's lock. Responsible for: the QMP side of a run, the
watchdog process, the run's record. Not responsible for: the overlay (the recovery site),
the seal's transaction or the hold (``driver``/``hold``).
"""

from __future__ import annotations

import json
import os
import select
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from drsite.core.errors import DrsiteError, InvalidInput, NetworkError
from drsite.fsutil import read_record, write_record
from drsite.hypervisors.qemu import syncwatch
from drsite.hypervisors.qemu.layout import QemuVmConfig, VmDir
from drsite.hypervisors.qemu.qmp import QmpClient
from drsite.hypervisors.qemu.runner import Runner, root_node

TLS_OBJECT = "drsite-synctls"
ADD_GUARD_S = 2.0             # at least: a run start's handshake on a loaded host, not a stall
WATCHDOG_START_S = 10.0
NODE = "drsite-sync{}"        # NBD node and mirror job of disk i
_CONFIG_KEYS = ("item_id", "host", "port", "budget_ms", "ca_file", "cert_file", "key_file",
                "stream", "exports")

Watchers = dict[Path, "subprocess.Popen[bytes]"]


def check_config(config: dict[str, Any], cfg: QemuVmConfig) -> dict[str, Any]:
    """The configuration ``set_sync`` stores: the file VM's fields plus the overlay run the
    recovery site provisioned (``stream``, ``exports``: disk id → NBD export name)."""
    missing = [k for k in _CONFIG_KEYS if k not in config]
    if missing:
        raise InvalidInput(f"sync configuration of {cfg.name} lacks {', '.join(missing)}")
    exports = dict(config["exports"])
    if sorted(exports) != sorted(d.disk_id for d in cfg.disks):
        raise InvalidInput(f"sync overlay exports {sorted(exports)} do not match the disks of "
                           f"{cfg.name}")
    budget = int(config["budget_ms"])
    if not 1 <= budget <= 60_000 or not 0 < int(config["port"]) < 65536:
        raise InvalidInput(f"bad sync configuration for {cfg.name}")
    return {**{k: config[k] for k in _CONFIG_KEYS}, "exports": exports, "used": False}


def store_config(paths: VmDir, conf: dict[str, Any] | None) -> None:
    """Write (or remove) ``sync.json`` and QEMU's TLS directory (``ca-cert.pem``,
    ``client-cert.pem``, ``client-key.pem``; 0600)."""
    if conf is None:
        paths.sync_config.unlink(missing_ok=True)
        shutil.rmtree(paths.sync_tls, ignore_errors=True)
        return
    paths.sync_tls.mkdir(mode=0o700, exist_ok=True)
    for src, name in ((conf["ca_file"], "ca-cert.pem"), (conf["cert_file"], "client-cert.pem"),
                      (conf["key_file"], "client-key.pem")):
        dst = paths.sync_tls / name
        tmp = dst.with_suffix(".tmp")
        shutil.copyfile(src, tmp)
        os.chmod(tmp, 0o600)
        os.replace(tmp, dst)
    write_record(paths.sync_config, conf)
    os.chmod(paths.sync_config, 0o600)


def healthy(q: QmpClient, paths: VmDir, runner: Runner) -> dict[str, Any] | None:
    """The run record when its mirror jobs all live in ``runner`` without error, else None."""
    run = read_record(paths.sync_run)
    if run is None or run.get("runner") != runner.token:
        return None
    if (read_record(paths.sync_watch) or {}).get("stream") == run["stream"]:
        return None   # the watchdog cut it loose (the job may still be winding down)
    jobs = {str(j.get("device")): j for j in q.execute("query-block-jobs")}
    for name in run["jobs"]:
        j = jobs.get(name)
        if j is None or j.get("status") not in ("running", "ready") or \
                j.get("io-status", "ok") != "ok":
            return None
    return run


def probe(conf: dict[str, Any], timeout: float) -> str | None:
    """Whether the recovery site answers an NBD flush on the run's export within
    ``timeout`` (before the VM is stopped: a blockdev-add to a silent site would hold the
    stopped VM). None when it does, else why not."""
    wcfg = {**conf, "exports": list(conf["exports"].values())}
    t0 = time.monotonic()
    try:
        s = syncwatch.connect(wcfg, timeout)
        try:
            syncwatch.flush(s, 1)
        finally:
            s.close()
    except (OSError, ValueError) as e:
        return (f"the recovery site's sync overlay did not answer "
                f"({(time.monotonic() - t0) * 1000:.0f} ms): {e}")
    return None


def end(q: QmpClient | None, paths: VmDir, watchers: Watchers, *, forget: bool = True) -> None:
    """Stop the run's watchdog, cancel its mirror jobs and delete its NBD nodes (a job that
    already failed is gone; its node stays until this). Idempotent."""
    w = watchers.pop(paths.dir, None)
    run = read_record(paths.sync_run)
    if forget:
        paths.sync_run.unlink(missing_ok=True)   # the watchdog exits on its next probe
    if w is not None:
        w.kill()
        w.wait()
    if q is None or run is None:
        return
    for job in run.get("jobs", []):
        with suppress(DrsiteError):
            q.execute("block-job-cancel", {"device": job, "force": True})
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline:
        live = {str(j.get("device")) for j in q.execute("query-block-jobs")}
        if not live & set(run.get("jobs", [])):
            break
        time.sleep(0.01)
    for node in run.get("nodes", []):
        with suppress(DrsiteError):
            q.execute("blockdev-del", {"node-name": node})


def begin(q: QmpClient, paths: VmDir, cfg: QemuVmConfig, conf: dict[str, Any],
          runner: Runner, watchers: Watchers) -> dict[str, Any]:
    """Start the run of ``conf``'s overlay now (the VM's writes are held by the caller):
    an NBD node per disk, a write-blocking mirror per disk, the watchdog. Returns the run
    record. On failure everything started is undone and the error raised."""
    end(q, paths, watchers)
    with suppress(DrsiteError):
        q.execute("object-del", {"id": TLS_OBJECT})   # the certificate files may be new
    q.execute("object-add", {"qom-type": "tls-creds-x509", "id": TLS_OBJECT,
                             "dir": str(paths.sync_tls), "endpoint": "client",
                             "verify-peer": True})
    nodes = [NODE.format(i) for i in range(len(cfg.disks))]
    run = {"stream": conf["stream"], "seq": 0, "runner": runner.token, "nodes": [],
           "jobs": [], "started": time.time(), "budget_ms": int(conf["budget_ms"])}
    roots = _roots(q)
    old = [d.disk_id for i, d in enumerate(cfg.disks) if roots.get(f"vd{i}") != root_node(d.node)]
    if old or not paths.watch_socket.exists():
        # a QEMU started before synchronous mode existed: a mirror on the disk's own node
        # would make every later seal's fleece job fail (design.md, synchronous mode 1)
        raise InvalidInput(f"VM {cfg.name} runs without the pass-through root node and the "
                           "watchdog's monitor that synchronous mode needs",
                           hint="Power the VM off and on again (drsite vms stop, drsite vms "
                                "start) to run it with them.")
    try:
        for i, (d, node) in enumerate(zip(cfg.disks, nodes, strict=True)):
            with _guarded_connection(q, conf, node) as fdname:
                q.execute("blockdev-add", {
                    "driver": "nbd", "node-name": node, "export": conf["exports"][d.disk_id],
                    "server": {"type": "fd", "str": fdname},
                    "tls-hostname": str(conf["host"]),
                    "tls-creds": TLS_OBJECT, "reconnect-delay": 0})
            run["nodes"].append(node)
            write_record(paths.sync_run, run)   # end() must find what exists
            q.execute("blockdev-mirror", {
                "job-id": node, "device": roots.get(f"vd{i}", d.node), "target": node,
                "sync": "none",
                "copy-mode": "write-blocking", "on-target-error": "report"})
            run["jobs"].append(node)
            write_record(paths.sync_run, run)
    except BaseException:
        end(q, paths, watchers)
        raise
    paths.sync_watch.unlink(missing_ok=True)
    conf["used"] = True
    write_record(paths.sync_config, conf)
    try:
        _start_watchdog(paths, conf, run, runner, watchers)
    except BaseException:
        end(q, paths, watchers)
        raise
    return run


@contextmanager
def _guarded_connection(q: QmpClient, conf: dict[str, Any], name: str) -> Iterator[str]:
    """A TCP connection to the overlay, opened here and handed to QEMU (``getfd`` as
    ``name``) for the NBD node's ``blockdev-add``, which does the TLS handshake and the NBD
    negotiation in QEMU's main loop and waits for ever on a site that accepted the
    connection and went silent (checked on QEMU 7.2: in-band QMP stops answering, and
    ``yank`` does not end it). Our copy of the socket bounds it: if the add has not
    returned within ``ADD_GUARD_S`` (at least the budget), it is shut down; QEMU reads EOF
    and the add fails. Yields the fd's name."""
    budget_s = int(conf["budget_ms"]) / 1000.0
    limit = max(budget_s, ADD_GUARD_S)
    try:
        sock = socket.create_connection((str(conf["host"]), int(conf["port"])), timeout=limit)
    except OSError as e:
        raise NetworkError(f"the recovery site's sync overlay at {conf['host']}:{conf['port']}"
                           f" refused or did not answer the connection: {e}") from e
    lock = threading.Lock()
    state = {"done": False, "cut": False}

    def cut() -> None:
        with lock:
            if not state["done"]:
                state["cut"] = True
                with suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    timer = threading.Timer(limit, cut)
    handed = False
    try:
        q.execute("getfd", {"fdname": name}, fds=[sock.fileno()])
        handed = True
        timer.start()
        try:
            yield name
        except DrsiteError as e:
            if state["cut"]:
                raise NetworkError(f"the recovery site's sync overlay did not complete the NBD "
                                   f"handshake within {limit:.1f} s: {e}") from e
            raise
        finally:
            with lock:
                state["done"] = True
            timer.cancel()
    finally:
        if handed:
            with suppress(DrsiteError):   # not consumed by a failed add
                q.execute("closefd", {"fdname": name})
        sock.close()   # QEMU holds its own descriptor of the connection


def _roots(q: QmpClient) -> dict[str, str]:
    """Device id → the root node under it (the mirror must sit on top: while a frozen view
    lives that is the fleece filter above the disk's node, not the node itself)."""
    out: dict[str, str] = {}
    for b in q.execute("query-block"):
        qdev = str(b.get("qdev") or "")
        node = (b.get("inserted") or {}).get("node-name")
        parts = qdev.split("/")
        if node and len(parts) > 3 and parts[1:3] == ["machine", "peripheral"]:
            out[parts[3]] = str(node)
    return out


def _start_watchdog(paths: VmDir, conf: dict[str, Any], run: dict[str, Any], runner: Runner,
                    watchers: Watchers) -> None:
    wcfg = {"vm_dir": str(paths.dir), "stream": run["stream"], "host": conf["host"],
            "port": conf["port"], "exports": [conf["exports"][k] for k in sorted(conf["exports"])],
            "budget_ms": int(conf["budget_ms"]), "ca_file": str(paths.sync_tls / "ca-cert.pem"),
            "cert_file": str(paths.sync_tls / "client-cert.pem"),
            "key_file": str(paths.sync_tls / "client-key.pem"),
            "watch_socket": str(paths.watch_socket), "nodes": run["nodes"],
            "pid": runner.pid, "token": runner.token}
    with open(paths.log, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", syncwatch.__file__, json.dumps(wcfg)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log,
            start_new_session=True)
    watchers[paths.dir] = proc
    # the run counts as begun once its watchdog holds the monitor (a stall before that would
    # find no one to cut it loose)
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], WATCHDOG_START_S)
    line = proc.stdout.readline() if ready else b""
    proc.stdout.close()
    if line.strip() != b"ready":
        raise NetworkError(f"the sync watchdog did not start in {WATCHDOG_START_S:.0f} s "
                           f"(exit {proc.poll()}); see {paths.log}")


def not_begun(paths: VmDir, conf: dict[str, Any], reason: str) -> None:
    """Record why a seal could not begin the run of ``conf`` (the status says so)."""
    write_record(paths.sync_watch, {"stream": conf["stream"], "state": "suspended",
                                    "reason": reason, "at": time.time()})


def next_mark(q: QmpClient, paths: VmDir, runner: Runner) -> dict[str, Any] | None:
    """The seal's mark while a healthy run goes on (``seq`` +1), or None."""
    run = healthy(q, paths, runner)
    if run is None:
        return None
    run["seq"] = int(run["seq"]) + 1
    write_record(paths.sync_run, run)
    return {"stream": run["stream"], "seq": run["seq"]}


def status(q: QmpClient | None, paths: VmDir, runner: Runner | None) -> dict[str, Any] | None:
    """``sync_status`` of the contract (states as the file VM's mirror)."""
    conf = read_record(paths.sync_config)
    if conf is None:
        return None
    base: dict[str, Any] = {"item_id": conf.get("item_id"), "budget_ms": conf.get("budget_ms"),
                            "base": 0, "kind": "overlay"}
    if runner is None or runner.kind != "vm" or q is None:
        return None
    run = healthy(q, paths, runner)
    if run is not None:
        return {**base, "state": "in_sync", "reason": "", "stream": run["stream"],
                "seq": run["seq"]}
    old = read_record(paths.sync_run)
    watch = read_record(paths.sync_watch) or {}
    if not conf.get("used"):
        if watch.get("stream") == conf["stream"]:   # the last seal could not begin it
            return {**base, "state": "suspended", "stream": conf["stream"], "seq": 0,
                    "reason": str(watch.get("reason"))}
        return {**base, "state": "starting", "stream": conf["stream"], "seq": 0,
                "reason": "waiting for the next seal to begin the mirror"}
    if old is not None and old.get("runner") == runner.token:
        reason = str(watch.get("reason")) if watch.get("stream") == old.get("stream") else \
            "the mirror to the recovery site failed (the recovery site refused or dropped it)"
    elif old is not None:
        reason = "the VM's QEMU restarted: the mirror run ended with it"
    else:
        reason = str(watch.get("reason") or "the mirror run ended; a new overlay is needed")
    return {**base, "state": "suspended", "reason": reason,
            "stream": (old or {}).get("stream", conf["stream"]), "seq": (old or {}).get("seq", 0)}
