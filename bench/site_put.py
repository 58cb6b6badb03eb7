"""The site store's put path alone (issue 16: churn through the site store): 8 MiB packs PUT
over mTLS by two threads, as an agent's ``SiteTarget`` ships a cycle, to a store server process
(``bench/churn.py site-server``: uvicorn, the store's atomic durable put). Reports wall
throughput and the server process's CPU seconds per GiB received, and the same for a second
server tree when ``--ref-src`` names one (a ``git archive`` copy's ``src``): runs alternate.

    .venv/bin/python bench/site_put.py [--packs 96] [--rounds 3] [--ref-src /tmp/ref/src]

Reference measured in the same run: the same bytes written by this process as files on the
same filesystem, one ``fsync`` per 8 MiB (what the server's disk work costs without TLS or
HTTP).
"""

from __future__ import annotations

import argparse
import json
import os
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import machine_info, process_cpu_times, workdir

from drsite.sitestore import SiteObjectStore
from drsite.tlsutil import client_context

MiB = 1 << 20
PACK = 8 * MiB
ITEM = "i-0123456789ab"
SRC = Path(__file__).resolve().parent.parent / "src"


def start_server(wd: Path, src: Path) -> tuple[subprocess.Popen[bytes], dict[str, str]]:
    info = wd / "site.json"
    env = {**os.environ, "PYTHONPATH": str(src)}
    proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("churn.py")),
                             "site-server", "--dir", str(wd / "site"), "--info", str(info)],
                            env=env)
    deadline = time.monotonic() + 60
    while not info.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("the site server did not start")
        time.sleep(0.05)
    return proc, json.loads(info.read_text())


def put_all(store: SiteObjectStore, blobs: list[bytes], run: str, threads: int) -> None:
    todo = list(range(len(blobs)))
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                if not todo:
                    return
                i = todo.pop()
            store.put(f"items/{ITEM}/packs/{run}/p{i:05d}", memoryview(blobs[i]))

    ts = [threading.Thread(target=worker) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()


def one(wd: Path, src: Path, blobs: list[bytes], threads: int) -> dict[str, float]:
    proc, info = start_server(wd, src)
    try:
        ctx: ssl.SSLContext = client_context(Path(info["ca"]), Path(info["cert"]),
                                             Path(info["key"]))
        store = SiteObjectStore(info["url"], ctx)
        put_all(store, blobs[:4], "warm", threads)      # connections and imports warm
        (u0, s0), t0 = process_cpu_times(proc.pid), time.perf_counter()
        put_all(store, blobs, "run", threads)
        t1, (u1, s1) = time.perf_counter(), process_cpu_times(proc.pid)
        c0, c1 = u0 + s0, u1 + s1
        store.close()
    finally:
        proc.terminate()
        proc.wait(30)
    gib = len(blobs) * PACK / (1 << 30)
    return {"mib_s": round(len(blobs) * PACK / MiB / (t1 - t0), 1),
            "server_cpu_s_per_gib": round((c1 - c0) / gib, 3),
            "server_user_s_per_gib": round((u1 - u0) / gib, 3)}


def reference(wd: Path, blobs: list[bytes]) -> float:
    """MiB/s of writing the same blobs as files with one fsync each (the disk's share)."""
    d = wd / "ref"
    d.mkdir()
    t0 = time.perf_counter()
    for i, b in enumerate(blobs):
        fd = os.open(d / f"p{i}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, b)
            os.fsync(fd)
        finally:
            os.close(fd)
    return round(len(blobs) * PACK / MiB / (time.perf_counter() - t0), 1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--packs", type=int, default=96)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ref-src", type=Path, default=None,
                    help="a second server tree's src (the A/B's 'before')")
    ap.add_argument("--dir", type=Path, default=None)
    a = ap.parse_args()
    blobs = [os.urandom(PACK) for _ in range(a.packs)]
    trees = [("this", SRC)] + ([("ref", a.ref_src)] if a.ref_src else [])
    runs: list[dict[str, object]] = []
    with workdir(a.dir) as wd:
        info = machine_info(wd)
        for r in range(a.rounds):
            for name, src in (trees if r % 2 == 0 else trees[::-1]):
                sub = wd / f"r{r}-{name}"
                sub.mkdir()
                out: dict[str, object] = {"tree": name, "round": r,
                                          **one(sub, src, blobs, a.threads)}
                out["load1"] = round(os.getloadavg()[0], 2)
                print(json.dumps(out), file=sys.stderr, flush=True)
                runs.append(out)
            sub = wd / f"r{r}-cp"
            sub.mkdir()
            ref = reference(sub, blobs)
            print(json.dumps({"reference_write_fsync_mib_s": ref}), file=sys.stderr, flush=True)
            runs.append({"tree": "write+fsync", "round": r, "mib_s": ref})
    print(json.dumps({"benchmark": "site_put", "machine": info, "packs": a.packs,
                      "threads": a.threads, "runs": runs}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
