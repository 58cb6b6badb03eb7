"""The latency budget of a QEMU VM's synchronous mirror, kept outside the agent
(``syncmirror.begin``).

QEMU's active mirror (``copy-mode: write-blocking``) completes a guest write only once the
recovery site's NBD export acknowledged it; QEMU's NBD client has no I/O timeout, so a hung or
black-holed recovery site would hang the guest's writes for good. This process, started by
the driver when a mirror run begins (``python -I -S syncwatch.py CONFIG_JSON``, its own
session), probes the run's export: an NBD ``FLUSH`` on its own TLS connection (the host's
certificate), one at a time, ``budget/4`` apart. A probe that is not answered within the
budget, or a connection that cannot be made, means the recovery site no longer acknowledges
in time: it ``yank`` s the run's NBD nodes through the VM's second QMP monitor (an
out-of-band command: it runs even while the main loop waits on the block layer). QEMU's NBD
client then fails its in-flight requests (``reconnect-delay: 0``), the mirror job fails, and
the guest's writes complete on the primary alone — asynchronous mode, with the dirty bitmaps
recording as always. It writes ``syncwatch.json`` (``{stream, state: suspended, reason, at}``)
in the VM directory first, so the driver's status names the cause.

A guest write therefore waits at most about ``budget + budget/4`` plus the yank (measured in
``bench/sync_latency_qemu.py``) when the recovery site stops answering; a slow but answering
site (probes answered, single big writes slower than the budget) is not caught here.

It exits when its QEMU is gone, when ``syncwatch.json`` or ``syncrun.json`` no longer name its
run (the driver ended it), or after yanking. Standard library only (``holdwatch.py``'s rule).
Responsible for: noticing a silent recovery site and cutting the mirror loose. Not
responsible for: beginning or ending runs (the driver), the status (the driver).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import ssl
import struct
import sys
import time
from typing import Any

_OPT_MAGIC = 0x49484156454F5054        # "IHAVEOPT"
_REP_MAGIC = 0x3E889045565A9
_REQ_MAGIC = 0x25609513
_SIMPLE_REPLY = 0x67446698
_OPT_STARTTLS, _OPT_GO = 5, 7
_REP_ACK, _REP_INFO = 1, 3
_CMD_DISC, _CMD_FLUSH = 2, 3


def _recv(s: Any, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("the NBD server closed the connection")
        buf += chunk
    return buf


def _option(s: Any, opt: int, data: bytes) -> list[tuple[int, bytes]]:
    s.sendall(struct.pack(">QII", _OPT_MAGIC, opt, len(data)) + data)
    replies = []
    while True:
        magic, ropt, rtype, length = struct.unpack(">QIII", _recv(s, 20))
        payload = _recv(s, length)
        if magic != _REP_MAGIC or ropt != opt:
            raise ConnectionError("NBD option reply out of order")
        if rtype & 0x80000000:
            raise ConnectionError(f"NBD option {opt} refused ({rtype:#x}): {payload[:200]!r}")
        replies.append((rtype, payload))
        if rtype == _REP_ACK:
            return replies


def connect(cfg: dict[str, Any], timeout: float) -> ssl.SSLSocket:
    """An NBD+TLS transmission-phase connection to the run's first export."""
    raw = socket.create_connection((cfg["host"], int(cfg["port"])), timeout=timeout)
    try:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if _recv(raw, 16) != b"NBDMAGICIHAVEOPT":
            raise ConnectionError("not an NBD server")
        _recv(raw, 2)
        raw.sendall(struct.pack(">I", 3))   # fixed newstyle, no zeroes
        _option(raw, _OPT_STARTTLS, b"")
        ctx = ssl.create_default_context(cafile=cfg["ca_file"])
        ctx.load_cert_chain(cfg["cert_file"], cfg["key_file"])
        ctx.check_hostname = False
        s = ctx.wrap_socket(raw, server_hostname=cfg["host"])
        name = str(cfg["exports"][0]).encode()
        _option(s, _OPT_GO, struct.pack(">I", len(name)) + name + struct.pack(">H", 0))
        return s
    except BaseException:
        raw.close()
        raise


def flush(s: ssl.SSLSocket, handle: int) -> None:
    s.sendall(struct.pack(">IHHQQI", _REQ_MAGIC, 0, _CMD_FLUSH, handle, 0, 0))
    magic, err, h = struct.unpack(">IIQ", _recv(s, 16))
    if magic != _SIMPLE_REPLY or h != handle:
        raise ConnectionError("unexpected NBD reply")
    if err:
        raise ConnectionError(f"the NBD server failed a flush (errno {err})")


def _read_json(path: str) -> Any:
    try:
        with open(path, "rb") as f:
            return json.loads(f.read())
    except (OSError, ValueError):
        return None


def _write_json(path: str, obj: dict[str, Any]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _alive(pid: int, token: str) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return False
    fields = stat[stat.rfind(")") + 2:].split()
    return bool(fields) and fields[0] not in ("Z", "X") and f"{pid}:{fields[19]}" == token


def _ours(cfg: dict[str, Any]) -> bool:
    """The driver still runs this run (it removes or replaces the record when it ends it)."""
    run = _read_json(os.path.join(cfg["vm_dir"], "syncrun.json"))
    return isinstance(run, dict) and run.get("stream") == cfg["stream"] and \
        _alive(int(cfg["pid"]), str(cfg["token"]))


def monitor(cfg: dict[str, Any]) -> tuple[socket.socket, Any]:
    """The VM's second QMP monitor, in capabilities mode with out-of-band commands on. Opened
    at start and kept: QEMU sends a new client's greeting from its main loop, which may be
    the very thing waiting on the silent recovery site (only out-of-band commands run then)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10.0)
    s.connect(cfg["watch_socket"])
    f = s.makefile("rwb")
    f.readline()
    f.write(b'{"execute":"qmp_capabilities","arguments":{"enable":["oob"]}}\n')
    f.flush()
    f.readline()
    return s, f


def yank(cfg: dict[str, Any], mon: Any, reason: str) -> None:
    """Record why, then cut the run's NBD connections (QMP ``yank``, out of band)."""
    if not _ours(cfg):
        return
    _write_json(os.path.join(cfg["vm_dir"], "syncwatch.json"),
                {"stream": cfg["stream"], "state": "suspended", "reason": reason,
                 "at": time.time()})
    instances = [{"type": "block-node", "node-name": n} for n in cfg["nodes"]]
    mon.write(json.dumps({"exec-oob": "yank", "id": "y",
                          "arguments": {"instances": instances}}).encode() + b"\n")
    mon.flush()
    while True:
        msg = json.loads(mon.readline() or b"{}")
        if msg.get("id") == "y" or not msg:
            break
    print(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} sync mirror run {cfg['stream'][:8]} cut "
          f"loose: {reason}", file=sys.stderr, flush=True)


def watch(cfg: dict[str, Any]) -> str:
    """Probe until the run ends (returns "ended") or the budget is broken (returns why)."""
    budget = int(cfg["budget_ms"]) / 1000.0
    pause = max(0.005, budget / 4)
    s: ssl.SSLSocket | None = None
    handle = 0
    try:
        while _ours(cfg):
            t0 = time.monotonic()
            try:
                if s is None:
                    s = connect(cfg, budget)
                s.settimeout(budget)
                handle += 1
                flush(s, handle)
            except (OSError, ValueError, struct.error) as e:
                took = (time.monotonic() - t0) * 1000
                if isinstance(e, TimeoutError | socket.timeout):
                    return (f"the recovery site did not answer within the latency budget of "
                            f"{cfg['budget_ms']} ms")
                return f"the recovery site's export failed after {took:.0f} ms: {e}"
            time.sleep(pause)
        return "ended"
    finally:
        if s is not None:
            with contextlib.suppress(OSError):
                s.close()


def main(argv: list[str]) -> int:
    cfg = json.loads(argv[1])
    sock, mon = monitor(cfg)
    print("ready", flush=True)   # the driver waits for this before the run counts as begun
    sys.stdout.close()
    try:
        reason = watch(cfg)
        if reason != "ended":
            yank(cfg, mon, reason)
    finally:
        sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
