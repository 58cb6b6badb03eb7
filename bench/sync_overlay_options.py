"""The recovery side of a mirrored write alone (issue 18): one ``qemu-storage-daemon`` as
``sitestore.syncoverlay`` runs it (NBD over TLS with a client certificate, listener with
``TCP_NODELAY``), one overlay export per variant of the overlay's image / node / export
options, and one NBD+TLS connection per export; 4 KiB writes at random offsets at queue depth
1, the variants in turn (random order each round), so the box's load falls on all alike.
Prints p10/p25/p50/p90 of the write's round trip (Python's client included, the same for
all) and the bytes the overlay's allocation map holds afterwards.

    .venv/bin/python bench/sync_overlay_options.py [--n 1000] [--variants a,b,...]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository

from benchlib import machine_info, workdir

from drsite.hypervisors.qemu import syncwatch
from drsite.hypervisors.qemu.qmp import QmpClient, wait_for_monitor
from drsite.sitestore.syncoverlay import OVERLAY_OPTIONS, RUNWAY, _runway
from drsite.sitestore.testing import make_test_certs

SIZE = 256 << 20
IO = 4096
_REQ, _REPLY, _WRITE = 0x25609513, 0x67446698, 1

# name -> image creation options (qemu-img -o), qcow2 node options, file node options, export
# options, runway (bytes of zeros past the new image's end, as syncoverlay provisions)
VARIANTS: dict[str, dict[str, Any]] = {
    "before": {},
    "after": {"node": {"l2-cache-entry-size": 4096}},
    "io_uring": {"node": {"l2-cache-entry-size": 4096}, "file": {"aio": "io_uring"}},
    "direct": {"node": {"l2-cache-entry-size": 4096},
               "file": {"aio": "native", "cache": {"direct": True}}},
    "runway": {"node": {"l2-cache-entry-size": 4096}, "runway": RUNWAY},
    "prealloc_full": {"node": {"l2-cache-entry-size": 4096},
                      "img": OVERLAY_OPTIONS + ",preallocation=full"},
    "no_flush": {"export": {"writethrough": False}},   # not durable: the round trip alone
}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--variants",
                    default="before,after,runway,io_uring,direct,prealloc_full,no_flush")
    ap.add_argument("--dir", type=Path, default=None)
    a = ap.parse_args()
    names = a.variants.split(",")
    with workdir(a.dir) as wd:
        res: dict[str, Any] = {"machine": machine_info(wd), "load_avg_before": os.getloadavg()}
        certs = make_test_certs(wd / "pki")
        tls = wd / "tls"
        tls.mkdir()
        for src, name in ((certs.ca_file, "ca-cert.pem"), (certs.server_cert, "server-cert.pem"),
                          (certs.server_key, "server-key.pem")):
            shutil.copyfile(src, tls / name)
        lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        lsock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(16)
        port = lsock.getsockname()[1]
        qmp = wd / "qmp.sock"
        proc = subprocess.Popen(
            ["qemu-storage-daemon",
             "--object", f"tls-creds-x509,id=tls0,endpoint=server,dir={tls},verify-peer=on",
             "--chardev", f"socket,id=m0,path={qmp},server=on,wait=off", "--monitor", "chardev=m0",
             "--nbd-server", f"addr.type=fd,addr.str={lsock.fileno()},tls-creds=tls0"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True, pass_fds=(lsock.fileno(),))
        lsock.close()
        socks: dict[str, Any] = {}
        try:
            wait_for_monitor(proc, qmp, 15.0, "qemu-storage-daemon")
            with QmpClient.connect(str(qmp), timeout=60) as q:
                for name in names:
                    v = VARIANTS[name]
                    img = wd / f"{name}.qcow2"
                    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o",
                                    v.get("img", OVERLAY_OPTIONS), str(img), str(SIZE)],
                                   check=True)
                    if v.get("runway"):
                        _runway(img, int(v["runway"]))
                    q.execute("blockdev-add", {
                        "driver": "qcow2", "node-name": name, **v.get("node", {}),
                        "file": {"driver": "file", "filename": str(img), **v.get("file", {})}})
                    q.execute("block-export-add", {
                        "type": "nbd", "id": name, "node-name": name, "name": name,
                        "writable": True, "writethrough": True, **v.get("export", {})})
            for name in names:
                socks[name] = syncwatch.connect({
                    "host": "127.0.0.1", "port": port, "ca_file": str(certs.ca_file),
                    "cert_file": str(certs.client_cert), "key_file": str(certs.client_key),
                    "exports": [name]}, 10.0)
            buf = os.urandom(IO)
            lat: dict[str, list[float]] = {n: [] for n in names}
            rng = random.Random(18)
            order = list(names)
            for i in range(a.n):
                off = rng.randrange(SIZE // IO) * IO
                rng.shuffle(order)
                for name in order:
                    s = socks[name]
                    t0 = time.perf_counter()
                    s.sendall(struct.pack(">IHHQQI", _REQ, 0, _WRITE, i, off, IO) + buf)
                    magic, err, handle = struct.unpack(">IIQ", syncwatch._recv(s, 16))
                    lat[name].append(time.perf_counter() - t0)
                    if magic != _REPLY or err or handle != i:
                        raise SystemExit(f"{name}: bad reply {magic:#x} {err} {handle}")
            res["load_avg_after"] = os.getloadavg()
        finally:
            for s in socks.values():
                s.close()
            try:   # a clean quit flushes the no_flush variant's metadata for the map below
                with QmpClient.connect(str(qmp), timeout=10) as q:
                    q.execute("quit")
                proc.wait(30)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        out: dict[str, Any] = {}
        for name in names:
            xs = sorted(lat[name])
            mapped = json.loads(subprocess.run(
                ["qemu-img", "map", "--output=json", "-f", "qcow2", str(wd / f"{name}.qcow2")],
                check=True, capture_output=True, text=True).stdout)
            out[name] = {f"p{p}_us": round(xs[len(xs) * p // 100] * 1e6) for p in (10, 25, 50, 90)}
            out[name]["present_bytes"] = sum(e["length"] for e in mapped if e.get("present"))
        res["variants"] = out
        print(json.dumps(res, indent=2, default=str))
        return 0


if __name__ == "__main__":
    sys.exit(main())
