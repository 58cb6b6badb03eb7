"""Operator reads (``GET /items``, ``GET /health``) of a busy vault, in process (issue 13): CPU
per read, SQL statements per read, and the reads' latency while agent traffic keeps the process
busy — figures for A/B runs of two trees on a shared box (run each tree with
``PYTHONPATH=TREE/src``, interleaved).

``drsite.vault.testing.Harness`` (the real routes and database, SQLite, no TLS, fake clock):
``--items`` protected items on ``--hosts`` source hosts (``bench/vault_ops.populate``). Then:

1. *quiet*: ``--calls`` reads of each path, one after the other, nothing else running: process
   CPU and statements per read (the work of one read, whatever the box's load);
2. *busy* (``--busy-seconds``): ``--agents`` threads post heartbeats with a changed item
   report, as fast as the vault answers them, and a thread runs a controller round
   (``Vault.tick``) every 0.25 s, while a probe reads ``/items`` and ``/health`` in turn
   (0.1 s apart): the probe's latency p50/p99 and the agent posts served. The process is
   bound by the GIL there, as the vault at 1,000 items is (0.9 cores): what a read waits for
   besides its own work.

    PYTHONPATH=TREE/src .venv/bin/python bench/api_reads.py [--items 1000] [--hosts 40]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from fastapi import Request
from sqlalchemy import event

import drsite
from drsite.vault.testing import Harness, report

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vault_ops import populate

PATHS = ("/api/v1/items", "/api/v1/health")


def pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--items", type=int, default=1000)
    ap.add_argument("--hosts", type=int, default=40)
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--agents", type=int, default=6)
    ap.add_argument("--busy-seconds", type=float, default=30.0)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--switch-interval", type=float, default=None,
                    help="sys.setswitchinterval for the busy phase (default: the tree's)")
    a = ap.parse_args(argv)
    load = Path("/proc/loadavg").read_text().split()[:3]
    print(f"drsite from {drsite.__file__}; load {load}", flush=True)
    out: dict[str, Any] = {"tree": drsite.__file__, "load_before": load, "items": a.items}
    with tempfile.TemporaryDirectory(prefix="api-reads-") as tmp:
        h = Harness(Path(tmp) / "vault")
        try:
            _store, hosts, items = populate(h, a.items, a.hosts)
            hdr = h.hdr(h.token("reader", "probe"))
            stmts = [0]
            event.listen(h.vault.db.engine, "before_cursor_execute",
                         lambda *_: stmts.__setitem__(0, stmts[0] + 1))
            for path in PATHS:   # warm up
                assert h.client.get(path, headers=hdr).status_code == 200
            # 1. quiet: the work of one read
            for path in PATHS:
                s0, c0 = stmts[0], time.process_time()
                for _ in range(a.calls):
                    r = h.client.get(path, headers=hdr)
                    assert r.status_code == 200, r.text
                cpu = (time.process_time() - c0) / a.calls
                n = (stmts[0] - s0) / a.calls
                out[f"quiet{path}"] = {"cpu_ms": 1000 * cpu, "statements": n,
                                       "bytes": len(r.content)}
                print(f"  quiet {path:16} CPU {1000 * cpu:6.2f} ms per read, "
                      f"{n:4.1f} statements, {len(r.content)} bytes", flush=True)
            # 2. busy: agents post as fast as they are answered, the controller ticks
            halt = threading.Event()
            served, failed = [0], [0]
            lock = threading.Lock()

            def agent_loop(k: int) -> None:
                mine = hosts[k::a.agents]
                i = 0
                while not halt.is_set():
                    agent = mine[i % len(mine)]
                    rows = items[agent.host_id]
                    i += 1
                    body = {"host_name": agent.name, "version": "reads", "store_url": None,
                            "vms": None, "held": [],
                            "items": [{"item_id": r["id"], "report": report(
                                r["id"], r["vm_id"], r["vm_name"], cycles=i)}
                                for r in rows[:3]]}
                    resp = h.client.post("/api/v1/agent/heartbeat", json=body,
                                         headers={"x-bench-peer": agent.host_id})
                    with lock:
                        served[0] += resp.status_code == 200
                        failed[0] += resp.status_code != 200

            certs = {ag.host_id: ag.cert_der for ag in hosts}

            def peer_of(request: Request) -> bytes | None:   # this thread's agent certificate
                return certs.get(request.headers.get("x-bench-peer", ""))

            from drsite.vault.api.deps import peer_cert
            h.app.dependency_overrides[peer_cert] = peer_of

            def ticker() -> None:
                while not halt.is_set():
                    h.tick()
                    halt.wait(0.25)

            threads = [threading.Thread(target=agent_loop, args=(k,), daemon=True)
                       for k in range(a.agents)]
            threads.append(threading.Thread(target=ticker, daemon=True))
            lat: dict[str, list[float]] = {p: [] for p in PATHS}
            if a.switch_interval is not None:
                sys.setswitchinterval(a.switch_interval)
            out["switch_interval"] = sys.getswitchinterval()
            c0, w0 = time.process_time(), time.monotonic()
            for t in threads:
                t.start()
            while time.monotonic() - w0 < a.busy_seconds:
                for path in PATHS:
                    t0 = time.perf_counter()
                    r = h.client.get(path, headers=hdr)
                    lat[path].append(time.perf_counter() - t0)
                    assert r.status_code == 200, r.text
                    time.sleep(0.1)
            halt.set()
            for t in threads:
                t.join(30)
            win = time.monotonic() - w0
            cpu = time.process_time() - c0
            out["busy"] = {"seconds": win, "cpu_cores": cpu / win, "beats_per_s": served[0] / win,
                           **{f"{p}_{k}": v for p in PATHS for k, v in (
                               ("n", len(lat[p])), ("p50_ms", 1000 * pct(lat[p], 50)),
                               ("p99_ms", 1000 * pct(lat[p], 99)),
                               ("mean_ms", 1000 * statistics.fmean(lat[p])))}}
            print(f"  busy {win:.0f} s (switch interval {1000 * sys.getswitchinterval():.1f} ms): "
                  f"process {cpu / win:.2f} cores, {served[0] / win:.1f} "
                  f"agent posts/s served, "
                  f"{failed[0]} failed", flush=True)
            for p in PATHS:
                print(f"  busy {p:16} p50 {1000 * pct(lat[p], 50):6.1f} ms  p99 "
                      f"{1000 * pct(lat[p], 99):6.1f} ms  mean "
                      f"{1000 * statistics.fmean(lat[p]):6.1f} ms  (n={len(lat[p])})", flush=True)
        finally:
            h.close()
    out["load_after"] = Path("/proc/loadavg").read_text().split()[:3]
    print(f"  load after {out['load_after']}")
    if a.json is not None:
        with open(a.json, "a") as f:
            f.write(json.dumps(out) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
