"""Control-plane scale benchmark: one vault, many protected items, simulated agents.

A real vault process (``drsite vault serve``, HTTPS, 127.0.0.1) on SQLite and/or PostgreSQL (a
throw-away cluster started like ``tests/pg.py`` does); on PostgreSQL optionally with several API
worker processes (``--workers N``: ``vault serve --workers N``, one of them the controller). A
load generator — one asyncio thread, httpx with keep-alive, one client certificate per simulated
host obtained through the real registration route — speaks the agent protocol as ``drsite agent``
does today (``--protocol push``): a long poll on the command channel (``POST
/agent/commands/wait``), heartbeats every ``--heartbeat`` seconds with what changed (the VM
inventory when it changed, an item's report when it changed and its new recovery points (seq >
the vault's ack); everything every 15th beat) and the ids of the commands it holds; it answers
commands like the agent (a ``running`` post after the next heartbeat while it runs, then the
final result): ``protect`` → after
``--initial-seconds`` a first point; ``cycle``/``resync`` → after ``--cycle-seconds`` a new point;
``retention``, ``update_settings``, ``unprotect`` → succeeded at once. (``--protocol poll``: the
agent before the command channel — full heartbeats, commands in their replies only.) No data
moves: this measures the control plane only. One more simulated host in the target site serves
a (never contacted) store: it holds the site's store role (``PUT /sites/dr/store-host``), reports
its URL and confirms the access list the vault sends (and keeps the recovery book's digest, as
the agent does: an unchanged book is not sent again), so the vault has a recovery store to point
items at.

Setup: sites ``prod`` and ``dr``; a policy (frequency ``--frequency``, no app-consistent
points); a group of site ``prod`` matching the label ``bench`` with that policy — every VM the
agents report carries the label, so the vault protects each one on its own (EnableProtection
jobs started by the heartbeat handler). The measured window (``--duration`` s) starts once every
item is ``protected`` and no job is active.

Measured in the window:

- **cycles on time**. For each item, cycle *k* is due at the vault's own anchor + frequency: the
  anchor of the first cycle is the creation time of the item's first point (the vault sets
  ``last_cycle_sent_at`` to it when protection finalizes), afterwards the time cycle *k−1* was
  due (the scheduler anchors each cycle to its due time, so lateness never stretches the period;
  a slot missed by more than a period is dropped and the next one counts from the time the late
  cycle was queued). A cycle is *on time* when the simulated agent received it (command channel
  or heartbeat reply) no later than due + 1 s (``--protocol poll``: due + 1 s + heartbeat
  interval, since commands then wait for the next heartbeat); also reported: *queued on time*
  (the vault queued it by due + 1 s — the scheduler's share) and *received by due + 1 s*.
  Counted: every cycle due in [window start, window end − 1 s − heartbeat]; one that was never
  received by then counts as late (after an item's last queued cycle, every further frequency
  slot in that range counts as one late cycle). Also reported: scheduler lag (queued − due),
  delivery lag (received − queued), and the mean interval between consecutive cycles of an item.
- **API latency** of ``GET /api/v1/items`` (its first page: 100 items by VM name, with the total
  — the list endpoints are paginated) and ``GET /api/v1/health`` with a reader token, from a
  separate thread (own keep-alive connection, sequential: items, health, 0.5 s pause, …),
  client-side time to the full body: p50 / p99 / max.
- **vault CPU and memory** from ``/proc/PID/stat`` (utime + stime over the window, the
  supervisor and its workers together) and ``/proc/PID/statm`` (RSS of all of them at the end,
  peak sampled each second); CPU per 1,000 items; for PostgreSQL also the server's CPU
  (postmaster and its backends); the **generator's CPU** (getrusage, self).

    .venv/bin/python bench/scale.py [--quick] [--items N] [--hosts N] [--engines sqlite,postgresql]
                                    [--workers N] [--duration S] [--json FILE] [--profile DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import resource
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from benchlib import BENCH_DIR, machine_info, workdir, write_json
from sqlalchemy import create_engine, text

from drsite import tlsutil
from drsite.failover.wire import recovery_book_digest
from drsite.pki import make_key_and_csr
from drsite.sitestore.acl import acl_digest

REPO = BENCH_DIR.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


# ----------------------------------------------------------------------------- /proc helpers

def proc_cpu(pid: int, children: bool = False) -> float:
    """CPU seconds (user + system) of ``pid``; with ``children`` also its reaped children's."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # fields[0] is state (field 3): utime = field 14, stime 15, cutime 16, cstime 17
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / CLK_TCK


def proc_rss(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * PAGE


def _ppid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def pg_statements(db_url: str, *, reset: bool, top: int = 25) -> list[dict[str, Any]]:
    """``pg_stat_statements`` of the vault's database (the server preloads it with
    ``--pg-stat-statements``): reset at the window's start, the ``top`` statements by total
    time at its end (calls, total and mean ms, rows, shared blocks hit and read)."""
    import psycopg

    with psycopg.connect(db_url.replace("+psycopg", ""), autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        if reset:
            conn.execute("SELECT pg_stat_statements_reset()")
            return []
        rows = conn.execute(
            "SELECT calls, total_exec_time, mean_exec_time, rows, shared_blks_hit, "
            "shared_blks_read, query FROM pg_stat_statements WHERE dbid = (SELECT oid FROM "
            "pg_database WHERE datname = current_database()) ORDER BY total_exec_time DESC "
            "LIMIT %s", (top,)).fetchall()
    return [{"calls": r[0], "total_ms": round(r[1], 1), "mean_ms": round(r[2], 3), "rows": r[3],
             "blks_hit": r[4], "blks_read": r[5], "query": " ".join(str(r[6]).split())[:400]}
            for r in rows]


def postmaster_pid(port: int) -> int | None:
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{d}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if cmd and cmd[0].endswith(b"/postgres") and b"-p" in cmd and str(port).encode() in cmd:
            return int(d)
    return None


def tree_cpu(root: int) -> float:
    """CPU seconds of ``root`` (with reaped children) plus its live children (PostgreSQL's
    backends are direct children of the postmaster)."""
    total = proc_cpu(root, children=True)
    for d in os.listdir("/proc"):
        if d.isdigit() and _ppid(int(d)) == root:
            with contextlib.suppress(OSError):
                total += proc_cpu(int(d))
    return total


def children(root: int) -> list[int]:
    return [int(d) for d in os.listdir("/proc") if d.isdigit() and _ppid(int(d)) == root]


def vault_cpu(root: int) -> float:
    """CPU seconds of the vault: the process and its (worker) children, live or reaped."""
    total = proc_cpu(root, children=True)
    for pid in children(root):
        with contextlib.suppress(OSError):
            total += proc_cpu(pid)
    return total


def vault_rss(root: int) -> int:
    total = proc_rss(root)
    for pid in children(root):
        with contextlib.suppress(OSError):
            total += proc_rss(pid)
    return total


def self_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    v = sorted(values)
    k = max(0, min(len(v) - 1, math.ceil(q / 100.0 * len(v)) - 1))  # nearest rank
    return v[k]


# ----------------------------------------------------------------------------- simulated agents

@dataclass
class SimItem:
    item_id: str
    vm_id: str
    vm_name: str
    state: str = "initial_replication"
    seq: int = 0
    ack: int = 0
    points: list[dict[str, Any]] = field(default_factory=list)  # not yet acked
    first_point_at: float | None = None
    last_point_time: float | None = None
    cycles: int = 0
    received: list[tuple[str, float]] = field(default_factory=list)  # (cycle command id, time)
    updated_at: float = field(default_factory=time.time)  # when the report last changed

    def report(self) -> dict[str, Any]:
        last = self.points[-1]["point_id"] if self.points else (f"p{self.seq:06d}" if self.seq else None)
        return {"item_id": self.item_id, "vm_id": self.vm_id, "vm_name": self.vm_name,
                "state": self.state, "health": "normal", "health_reasons": [], "step": "",
                "progress": 100.0 if self.seq else 0.0, "bytes_total": 0, "bytes_done": 0,
                "bytes_sent": 4096 * self.seq, "bytes_stored": 2048 * self.seq,
                "bytes_compared": 0, "cycles": self.cycles, "resyncs": 0,
                "initial_resumed_from": 0, "last_point_id": last,
                "last_point_time": self.last_point_time, "last_app_point_time": None,
                "rpo_s": None, "resync_reason": "", "last_error": None, "next_attempt_at": None,
                "updated_at": self.updated_at}

    def new_point(self) -> dict[str, Any]:
        self.seq += 1
        now = time.time()
        p = {"point_id": f"p{self.seq:06d}", "item_id": self.item_id, "seq": self.seq,
             "created_at": now, "consistency": "crash",
             "kind": "initial" if self.seq == 1 else "delta", "cycle_id": f"c{self.seq}",
             "base_point_id": None if self.seq == 1 else f"p{self.seq - 1:06d}",
             "disk_sizes": {"disk0": 1 << 30}, "bytes_written": 4096, "bytes_stored": 2048,
             "meta": {}}
        self.points.append(p)
        self.last_point_time = self.updated_at = now
        if self.first_point_at is None:
            self.first_point_at = now
        self.state = "protected"
        return p


@dataclass
class Stats:
    heartbeats: int = 0
    heartbeat_errors: int = 0
    result_posts: int = 0
    result_errors: int = 0
    commands: dict[str, int] = field(default_factory=dict)
    hb_latency: list[float] = field(default_factory=list)  # in the window only
    loop_lag_max: float = 0.0
    errors: list[str] = field(default_factory=list)

    def error(self, what: str) -> None:
        if len(self.errors) < 20:
            self.errors.append(what)


FULL_HEARTBEAT_EVERY = 15  # like the agent: a full heartbeat every 15 (else what changed)
CHANNEL_WAIT_S = 20.0
SOON_GAP_S = 0.5  # like the agent (drsite.agent.daemon.SOON_GAP_S)


class SimHost:
    """One host speaking the agent protocol. ``push`` (the agent today): commands come on the
    long-poll channel (and in heartbeat replies), heartbeats carry what changed (the inventory
    when it changed, an item when its report changed or it has unacked points; everything every
    ``FULL_HEARTBEAT_EVERY`` beats) and the ids of the commands it holds; ``poll`` (the agent
    before the command channel): full heartbeats, commands in their replies only. A host
    serving a store confirms the access list the vault sends it."""

    def __init__(self, name: str, base_url: str, ctx: ssl.SSLContext, vms: list[dict[str, Any]],
                 store_url: str | None, gen: Generator) -> None:
        self.name, self.vms, self.store_url, self.gen = name, vms, store_url, gen
        self.push = gen.a.protocol == "push"
        self.client = httpx.AsyncClient(base_url=base_url + "/api/v1/agent", verify=ctx,
                                        timeout=60.0,
                                        limits=httpx.Limits(max_connections=4,
                                                            max_keepalive_connections=4))
        self.items: dict[str, SimItem] = {}
        self.accepted: set[str] = set()
        self.held: set[str] = set()  # accepted, final result not confirmed yet
        # accepted and not finished -> when its last ``running`` was posted (0: never): as the
        # agent's ``post_progress``, at the end of each heartbeat, first time then every 10 s
        self.inflight: dict[str, float] = {}
        self.store_acl: dict[str, Any] | None = None
        self.book_digest: str | None = None  # the recovery book's, like the agent keeps it
        self.beats = 0
        self.sent_reports: dict[str, str] = {}  # item id -> the report digest the vault has
        self.sent_vms = False
        # like the agent's beat_soon: the vault asked for a heartbeat on the channel
        self.soon = asyncio.Event()

    async def close(self) -> None:
        await self.client.aclose()

    def payload(self) -> tuple[dict[str, Any], dict[str, str]]:
        """The heartbeat, and the report digests it carries (kept once the vault answers)."""
        full = not self.push or self.beats % FULL_HEARTBEAT_EVERY == 0
        items, digests = [], {}
        for it in self.items.values():
            report = it.report()
            digest = json.dumps(report, sort_keys=True)
            new = [p for p in it.points if p["seq"] > it.ack]
            if not full and not new and self.sent_reports.get(it.item_id) == digest:
                continue
            digests[it.item_id] = digest
            items.append({"item_id": it.item_id, "report": report, "new_points": new,
                          "removed_points": []})
        body: dict[str, Any] = {"host_name": self.name, "version": "bench",
                                "store_url": self.store_url,
                                "vms": self.vms if full or not self.sent_vms else None,
                                "items": items}
        if self.push:
            body["held"] = sorted(self.held)
        if self.store_acl is not None:
            body["store_acl_digest"] = acl_digest(self.store_acl)
        if self.book_digest is not None:
            body["recovery_book_digest"] = self.book_digest
        return body, digests

    async def run(self, stop: asyncio.Event, offset: float) -> None:
        await asyncio.sleep(offset)
        st = self.gen.stats
        if self.push:
            self.gen.spawn(self.channel(stop))
        while not stop.is_set():
            t0 = time.perf_counter()
            body, digests = self.payload()
            try:
                r = await self.client.post("/heartbeat", json=body)
                if r.status_code != 200:
                    st.heartbeat_errors += 1
                    st.error(f"heartbeat {self.name}: HTTP {r.status_code} {r.text[:200]}")
                else:
                    st.heartbeats += 1
                    if self.gen.in_window:
                        st.hb_latency.append(time.perf_counter() - t0)
                    self.beats += 1
                    self.sent_reports.update(digests)
                    self.sent_vms = True
                    self.on_reply(r.json())
                    await self.post_progress()
            except httpx.HTTPError as e:
                st.heartbeat_errors += 1
                st.error(f"heartbeat {self.name}: {type(e).__name__}: {e}")
            await self.pause(stop, t0)

    async def pause(self, stop: asyncio.Event, began: float) -> None:
        """Like the agent: the next heartbeat one interval after this one ended, or sooner
        when asked (``soon``), at least ``SOON_GAP_S`` after the last one began."""
        waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self.soon.wait())]
        await asyncio.wait(waits, timeout=self.gen.a.heartbeat,
                           return_when=asyncio.FIRST_COMPLETED)
        for w in waits:
            w.cancel()
        if self.soon.is_set() and not stop.is_set():
            self.soon.clear()
            await asyncio.sleep(max(0.0, began + SOON_GAP_S - time.perf_counter()))

    async def channel(self, stop: asyncio.Event) -> None:
        """The long poll: commands as soon as the vault has them."""
        st = self.gen.stats
        while not stop.is_set():
            try:
                r = await self.client.post("/commands/wait", json={"timeout_s": CHANNEL_WAIT_S},
                                           timeout=CHANNEL_WAIT_S + 15.0)
            except httpx.HTTPError as e:
                st.error(f"channel {self.name}: {type(e).__name__}: {e}")
                await asyncio.sleep(1.0)
                continue
            if r.status_code != 200:
                st.error(f"channel {self.name}: HTTP {r.status_code} {r.text[:200]}")
                await asyncio.sleep(1.0)
                continue
            out = r.json()
            if out.get("heartbeat") is True:
                self.soon.set()
            self.take(out.get("commands") or [])

    def on_reply(self, reply: dict[str, Any]) -> None:
        for item_id, seq in (reply.get("ack") or {}).items():
            it = self.items.get(item_id)
            if it is not None:
                it.ack = int(seq or 0)
                it.points = [p for p in it.points if p["seq"] > it.ack]
        if reply.get("store_acl") is not None:
            self.store_acl = reply["store_acl"]
        if reply.get("recovery_book") is not None:
            self.book_digest = recovery_book_digest(reply["recovery_book"])
        self.take(reply.get("commands") or [])

    def take(self, cmds: list[dict[str, Any]]) -> None:
        now = time.time()
        for cmd in cmds:
            cid, kind, item_id = cmd["command_id"], cmd["kind"], cmd["item_id"]
            if cid in self.accepted:
                continue  # re-delivered while queued/running: the agent ignores it
            self.accepted.add(cid)
            self.held.add(cid)
            self.inflight[cid] = 0.0
            self.gen.stats.commands[kind] = self.gen.stats.commands.get(kind, 0) + 1
            if kind == "protect" and item_id not in self.items:
                vm_id = cmd["args"]["vm_id"]
                name = next((v["name"] for v in self.vms if v["vm_id"] == vm_id), vm_id)
                self.items[item_id] = SimItem(item_id, vm_id, name)
            if kind == "cycle" and item_id in self.items:
                self.items[item_id].received.append((cid, now))
            self.gen.spawn(self.execute(cid, kind, item_id, cmd.get("args") or {}))

    async def post_result(self, cid: str, status: str, progress: float,
                          result: dict[str, Any] | None = None) -> None:
        st = self.gen.stats
        if status != "running":
            self.inflight.pop(cid, None)   # no running post after the final one
        body = {"status": status, "progress": progress, "result": result or {}, "error": None}
        for attempt in range(5):
            try:
                r = await self.client.post(f"/commands/{cid}/result", json=body)
            except httpx.HTTPError as e:
                st.result_errors += 1
                st.error(f"result {cid}: {type(e).__name__}: {e}")
                await asyncio.sleep(1.0 + attempt)
                continue
            st.result_posts += 1
            if r.status_code >= 500:
                st.result_errors += 1
                st.error(f"result {cid}: HTTP {r.status_code}")
                await asyncio.sleep(1.0 + attempt)
                continue
            if status == "running" and r.status_code == 409:
                return   # it ended meanwhile (the final post won the race): the agent ignores it
            if r.status_code >= 300:
                st.result_errors += 1
                st.error(f"result {cid}: HTTP {r.status_code} {r.text[:200]}")
            elif status != "running":
                self.held.discard(cid)
            return

    async def post_progress(self) -> None:
        """``running`` for the commands still in flight, as the agent posts them after each
        heartbeat (``lanes.post_progress``): the first time, then every 10 s. A command taken
        from the channel that ends before the next heartbeat posts only its final result."""
        now = time.monotonic()
        for cid, last in list(self.inflight.items()):
            if cid in self.inflight and (last == 0.0 or now - last >= 10.0):
                self.inflight[cid] = now
                await self.post_result(cid, "running", 0.0)

    async def execute(self, cid: str, kind: str, item_id: str, args: dict[str, Any]) -> None:
        try:
            await self._execute(cid, kind, item_id, args)
        finally:
            self.inflight.pop(cid, None)

    async def _execute(self, cid: str, kind: str, item_id: str, args: dict[str, Any]) -> None:
        a = self.gen.a
        it = self.items.get(item_id)
        if kind in ("protect", "cycle", "resync") and it is not None:
            await asyncio.sleep(a.initial_seconds if kind == "protect" else a.cycle_seconds)
            p = it.new_point()
            if kind != "protect":
                it.cycles += 1
            await self.post_result(cid, "succeeded", 100.0, {"point": p, "report": it.report()})
        elif kind == "retention":
            await self.post_result(cid, "succeeded", 100.0, {"deleted_points": []})
        elif kind == "update_settings":
            await self.post_result(cid, "succeeded", 100.0, {"settings": args.get("settings")})
        elif kind == "unprotect":
            self.items.pop(item_id, None)
            await self.post_result(cid, "succeeded", 100.0, {"deleted_points": []})
        else:
            await self.post_result(cid, "succeeded", 100.0, {})


class Generator:
    """All simulated hosts on one asyncio loop (in a thread of its own)."""

    def __init__(self, a: argparse.Namespace) -> None:
        self.a = a
        self.stats = Stats()
        self.hosts: list[SimHost] = []
        self.in_window = False
        self._tasks: set[asyncio.Task[None]] = set()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stop: asyncio.Event | None = None
        self.thread: threading.Thread | None = None
        self.ready = threading.Event()

    def spawn(self, coro: Any) -> None:
        t = asyncio.ensure_future(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    async def _lag(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            t0 = time.perf_counter()
            await asyncio.sleep(0.1)
            lag = time.perf_counter() - t0 - 0.1
            if self.in_window:
                self.stats.loop_lag_max = max(self.stats.loop_lag_max, lag)

    async def _main(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.stop = asyncio.Event()
        self.ready.set()
        n = len(self.hosts)
        runs = [asyncio.ensure_future(h.run(self.stop, self.a.heartbeat * i / n))
                for i, h in enumerate(self.hosts)]
        lag = asyncio.ensure_future(self._lag(self.stop))
        await asyncio.gather(*runs, lag)
        for t in list(self._tasks):
            t.cancel()
        with contextlib.suppress(Exception):
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for h in self.hosts:
            await h.close()

    def start(self) -> None:
        self.thread = threading.Thread(target=lambda: asyncio.run(self._main()), name="agents",
                                       daemon=True)
        self.thread.start()
        self.ready.wait(10)

    def shutdown(self) -> None:
        if self.thread is None or not self.thread.is_alive():
            return
        if self.loop is not None and self.stop is not None:
            self.loop.call_soon_threadsafe(self.stop.set)
        if self.thread is not None:
            self.thread.join(30)


# ----------------------------------------------------------------------------- operator probe

class Probe(threading.Thread):
    """Sequential GET /items and GET /health (reader token) on one keep-alive connection, plus
    /proc samples of the vault once a second."""

    def __init__(self, base: str, ca: Path, token: str, vault_pid: int, pause: float) -> None:
        super().__init__(name="probe", daemon=True)
        self.client = httpx.Client(base_url=base + "/api/v1", verify=tlsutil.client_context(ca),
                                   headers={"Authorization": f"Bearer {token}"}, timeout=60.0)
        self.pid, self.pause = vault_pid, pause
        self.lat: dict[str, list[float]] = {"/items": [], "/health": []}
        self.errors = 0
        self.items_bytes = 0
        self.items_count = 0
        self.rss_peak = 0
        self.halt = threading.Event()

    def run(self) -> None:
        last_sample = 0.0
        while not self.halt.is_set():
            for path in ("/items", "/health"):
                t0 = time.perf_counter()
                try:
                    r = self.client.get(path)
                    body = r.content
                    dt = time.perf_counter() - t0
                    if r.status_code != 200:
                        self.errors += 1
                        continue
                except httpx.HTTPError:
                    self.errors += 1
                    continue
                self.lat[path].append(dt)
                if path == "/items":
                    self.items_bytes = len(body)
                    with contextlib.suppress(ValueError, KeyError):
                        self.items_count = int(r.json()["total"])
                if time.monotonic() - last_sample >= 1.0:
                    last_sample = time.monotonic()
                    with contextlib.suppress(OSError):
                        self.rss_peak = max(self.rss_peak, vault_rss(self.pid))
            self.halt.wait(self.pause)
        self.client.close()


# ----------------------------------------------------------------------------- vault process

@contextlib.contextmanager
def vault_process(data: Path, port: int, db_url: str | None, heartbeat: float,
                  log: Path, workers: int = 1) -> Iterator[subprocess.Popen[bytes]]:
    exe = Path(sys.executable).with_name("drsite")
    cmd = ([str(exe)] if exe.exists() else [sys.executable, "-m", "drsite.cli.main"])
    cmd += ["vault", "serve", "--data", str(data), "--listen", f"127.0.0.1:{port}",
            "--heartbeat-interval", str(heartbeat)]
    if db_url:
        cmd += ["--db", db_url]
    if workers > 1:
        cmd += ["--workers", str(workers)]
    with open(log, "wb") as lf:
        proc = subprocess.Popen(cmd, stdout=lf, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def wait_vault(base: str, ca: Path, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"vault exited ({proc.returncode}): {log.read_text()[-2000:]}")
        if ca.exists():
            try:
                r = httpx.get(base + "/api/v1/version", verify=tlsutil.client_context(ca), timeout=2)
                if r.status_code == 200:
                    return
            except (httpx.HTTPError, ssl.SSLError, OSError):
                pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"vault did not come up: {log.read_text()[-2000:]}")
        time.sleep(0.2)


# ----------------------------------------------------------------------------- one engine

def admin_client(base: str, ca: Path, token: str) -> httpx.Client:
    return httpx.Client(base_url=base + "/api/v1", verify=tlsutil.client_context(ca),
                        headers={"Authorization": f"Bearer {token}"}, timeout=120.0)


def ok(r: httpx.Response) -> Any:
    if r.status_code >= 300:
        raise RuntimeError(f"{r.request.method} {r.request.url.path}: {r.status_code} {r.text[:500]}")
    return r.json() if r.content else None


def register(adm: httpx.Client, base: str, ca: Path, d: Path, site: str,
             host: str) -> ssl.SSLContext:
    key = ok(adm.post(f"/sites/{site}/registration-keys", json={"ttl_s": 600}))["key"]
    key_pem, csr = make_key_and_csr(host)
    r = httpx.post(base + "/api/v1/agent/register", verify=tlsutil.client_context(ca),
                   json={"key": key, "host_name": host, "csr_pem": csr.decode()}, timeout=30)
    body = ok(r)
    (d / f"{host}.key").write_bytes(key_pem)
    os.chmod(d / f"{host}.key", 0o600)
    (d / f"{host}.pem").write_bytes(body["cert_pem"].encode())
    return tlsutil.client_context(ca, d / f"{host}.pem", d / f"{host}.key")


def vm_dict(i: int) -> dict[str, Any]:
    return {"vm_id": f"vm-{i:05d}", "name": f"bench-{i:05d}", "vcpus": 2, "memory_mib": 2048,
            "nics": [{"network": "lan", "mac": f"52:54:00:{i >> 16 & 255:02x}:{i >> 8 & 255:02x}:"
                      f"{i & 255:02x}", "ip": None}],
            "disks": [{"disk_id": "disk0", "size": 1 << 30}], "power": "running",
            "labels": ["bench"]}


def analyse_cycles(gen: Generator, db_url: str, w0: float, w1: float, a: argparse.Namespace
                   ) -> dict[str, Any]:
    """On-time share of the cycles due in [w0, w1 - tol] (see the module docstring)."""
    # the rule: received by due + 1 s; an agent that only polls (commands in heartbeat
    # replies) may wait one heartbeat interval more
    tol = 1.0 if a.protocol == "push" else 1.0 + a.heartbeat
    eng = create_engine(db_url)
    with eng.connect() as c:
        rows = c.execute(text("SELECT id, item_id, created_at, sent_at FROM commands "
                              "WHERE kind = 'cycle'")).all()
    eng.dispose()
    by_item: dict[str, list[tuple[str, float, float | None]]] = {}
    for cid, item_id, created, sent in rows:
        by_item.setdefault(item_id, []).append((cid, created, sent))
    due_n = on_time = never = queued_on_time = within_1s = 0
    late: list[float] = []  # received - due, for every counted cycle that was received
    sched_lag: list[float] = []
    deliver_lag: list[float] = []
    intervals: list[float] = []
    worst: list[tuple[float, str]] = []
    items = [it for h in gen.hosts for it in h.items.values()]
    for it in items:
        if it.first_point_at is None:
            continue
        got = dict(it.received)
        cyc = sorted(by_item.get(it.item_id, []), key=lambda r: r[1])
        anchor = it.first_point_at
        prev_recv: float | None = None
        for cid, created, _sent in cyc:
            due = anchor + a.frequency
            recv = got.get(cid)
            if w0 <= due <= w1 - tol:
                due_n += 1
                sched_lag.append(created - due)
                if created <= due + 1.0:
                    queued_on_time += 1
                if recv is not None and recv <= due + 1.0:
                    within_1s += 1
                if recv is None:
                    never += 1
                    worst.append((float("inf"), it.item_id))
                else:
                    late.append(recv - due)
                    deliver_lag.append(recv - created)
                    worst.append((recv - due, it.item_id))
                    if recv <= due + tol:
                        on_time += 1
                if recv is not None and prev_recv is not None:
                    intervals.append(recv - prev_recv)
            if recv is not None:
                prev_recv = recv
            anchor = due if created - due <= a.frequency else created
        due = anchor + a.frequency
        while due <= w1 - tol:  # slots after the last queued cycle: due, never queued
            if due >= w0:
                due_n += 1
                never += 1
                worst.append((float("inf"), it.item_id))
            due += a.frequency
    worst.sort(reverse=True)
    return {"tolerance_s": tol, "due": due_n, "on_time": on_time, "never_received": never,
            "on_time_share": on_time / due_n if due_n else float("nan"),
            "queued_on_time": queued_on_time,
            "queued_on_time_share": queued_on_time / due_n if due_n else float("nan"),
            "received_within_1s": within_1s,
            "received_within_1s_share": within_1s / due_n if due_n else float("nan"),
            "late_p50": pct(late, 50), "late_p99": pct(late, 99), "late_max": max(late, default=0.0),
            "sched_lag_p50": pct(sched_lag, 50), "sched_lag_p99": pct(sched_lag, 99),
            "sched_lag_max": max(sched_lag, default=0.0),
            "deliver_lag_p50": pct(deliver_lag, 50), "deliver_lag_p99": pct(deliver_lag, 99),
            "interval_mean": statistics.fmean(intervals) if intervals else float("nan"),
            "interval_p99": pct(intervals, 99),
            "cycle_commands_total": len(rows),
            "worst": [(round(x, 2) if x != float("inf") else "never", i) for x, i in worst[:5]]}


def run_engine(engine: str, a: argparse.Namespace, root: Path) -> dict[str, Any]:
    d = root / engine
    d.mkdir()
    out: dict[str, Any] = {"engine": engine}
    with contextlib.ExitStack() as stack:
        pg_pid: int | None = None
        db_url: str | None = None
        if engine == "postgresql":
            sys.path.insert(0, str(REPO))
            from tests.pg import fresh_database, postgres_cluster

            server = stack.enter_context(postgres_cluster(settings=(
                ("shared_preload_libraries=pg_stat_statements",) if a.pg_stat_statements else ())))
            db_url = fresh_database(server)
            pg_pid = postmaster_pid(int(server.rsplit(":", 1)[1].split("/")[0]))
            out["pg_note"] = ("PostgreSQL 15 cluster as tests/pg.py starts it (fsync=off, "
                              "synchronous_commit=off, full_page_writes=off)")
        port = free_port()
        data = d / "vault"
        log = d / "vault.log"
        base = f"https://127.0.0.1:{port}"
        ca = data / "pki" / "ca.pem"
        workers = a.workers if engine == "postgresql" else 1
        out["workers"] = workers
        proc = stack.enter_context(vault_process(data, port, db_url, a.heartbeat, log, workers))
        t_start = time.perf_counter()
        wait_vault(base, ca, proc, log)
        token = (data / "admin.token").read_text().strip()
        adm = stack.enter_context(admin_client(base, ca, token))
        for site in ("prod", "dr"):
            ok(adm.post("/sites", json={"name": site, "description": "bench"}))
        ok(adm.post("/policies", json={"name": "bench", "frequency_s": a.frequency,
                                       "app_consistent_every_s": None,
                                       "initial_replication_start": None,
                                       "rpo_threshold_s": max(300.0, 4 * a.frequency)}))
        ok(adm.post("/groups", json={"name": "bench", "site": "prod", "target_site": "dr",
                                     "policy": "bench", "match": {"labels": ["bench"]}}))
        reader = ok(adm.post("/tokens", json={"name": "bench-reader", "role": "reader"}))["token"]
        gen = Generator(a)
        certs = d / "certs"
        certs.mkdir()
        ctx = register(adm, base, ca, certs, "dr", "dr-store")
        # a store is served by the holder of its site's store role, which an admin assigns
        ok(adm.put("/sites/dr/store-host", json={"host": "dr-store"}))
        gen.hosts.append(SimHost("dr-store", base, ctx, [], "https://127.0.0.1:9/bench-store", gen))
        per_host: list[list[dict[str, Any]]] = [[] for _ in range(a.hosts)]
        for i in range(a.items):
            per_host[i % a.hosts].append(vm_dict(i))
        for h in range(a.hosts):
            name = f"h{h:03d}"
            ctx = register(adm, base, ca, certs, "prod", name)
            gen.hosts.append(SimHost(name, base, ctx, per_host[h], None, gen))
        out["setup_register_s"] = time.perf_counter() - t_start
        gen.start()
        stack.callback(gen.shutdown)
        # every item protected and no job active
        t_prot = time.perf_counter()
        deadline = time.monotonic() + a.setup_timeout
        setup_errors: list[str] = []
        while True:
            time.sleep(3)
            try:
                n_items = ok(adm.get("/items", params={"limit": 1}))["total"]
                protected = ok(adm.get("/items", params={"limit": 1,
                                                         "protection": "protected"}))["total"]
                active = ok(adm.get("/jobs", params={"state": "active", "limit": 1}))["total"]
                failed = ok(adm.get("/items", params={"limit": 1,
                                                      "protection": "failed"}))["total"]
            except (RuntimeError, httpx.HTTPError) as e:
                # a transient refusal (HTTP 5xx, a dropped connection) while the vault is
                # loaded: recorded and asked again, not the end of a long setup
                if "transient" not in str(e) and not isinstance(e, httpx.HTTPError):
                    raise
                setup_errors.append(str(e)[:300])
                print(f"  [{engine}] setup poll failed, asking again: {str(e)[:200]}", flush=True)
                continue
            print(f"  [{engine}] {time.perf_counter() - t_prot:5.0f} s: {protected}/{a.items} "
                  f"protected, {n_items} items, jobs active: {active}, items failed: {failed}",
                  flush=True)
            if protected >= a.items and not active:
                break
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"{engine}: only {protected}/{a.items} items protected after "
                                   f"{a.setup_timeout} s; errors: {gen.stats.errors[:5]}")
        out["protect_all_s"] = time.perf_counter() - t_prot
        out["setup_errors"] = setup_errors
        # the measured window
        probe = Probe(base, ca, reader, proc.pid, a.probe_pause)
        if db_url is not None and a.pg_stat_statements:
            pg_statements(db_url, reset=True)
        out["load_before"] = os.getloadavg()
        cpu0, gcpu0 = vault_cpu(proc.pid), self_cpu()
        pg0 = tree_cpu(pg_pid) if pg_pid else None
        rss0 = vault_rss(proc.pid)
        w0 = time.time()
        gen.in_window = True
        hb0, res0 = gen.stats.heartbeats, gen.stats.result_posts
        probe.start()
        time.sleep(a.duration)
        w1 = time.time()
        gen.in_window = False
        cpu1, gcpu1 = vault_cpu(proc.pid), self_cpu()
        pg1 = tree_cpu(pg_pid) if pg_pid else None
        rss1 = vault_rss(proc.pid)
        out["load_after"] = os.getloadavg()
        if db_url is not None and a.pg_stat_statements:
            out["pg_statements"] = pg_statements(db_url, reset=False)
        hb1, res1 = gen.stats.heartbeats, gen.stats.result_posts
        lat = {k: list(v) for k, v in probe.lat.items()}
        rss_peak = probe.rss_peak
        if a.profile is not None:
            # after the window, under the same load (agents and probe still running), so the
            # sampler's pauses do not distort the measured figures
            a.profile.mkdir(parents=True, exist_ok=True)
            spy_exe = Path(sys.executable).with_name("py-spy")
            print(f"  [{engine}] profiling the vault for {a.profile_seconds:.0f} s", flush=True)
            if spy_exe.exists():
                subprocess.run([str(spy_exe), "record", "-o",
                                str(a.profile / f"vault-{engine}.txt"), "-f", "raw", "-r", "50",
                                "-d", str(int(a.profile_seconds)), "--subprocesses", "--pid",
                                str(proc.pid)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.STDOUT, check=False)
            else:   # the window's figures are not lost for want of a profiler
                print(f"  [{engine}] no profile: {spy_exe} is not installed "
                      "(.venv/bin/pip install py-spy)", flush=True)
        probe.halt.set()
        probe.join(120)
        gen.shutdown()
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        win = w1 - w0
        out.update({
            "window_s": win, "items": a.items, "hosts": a.hosts, "frequency_s": a.frequency,
            "heartbeat_s": a.heartbeat,
            "vault_cpu_s": cpu1 - cpu0, "vault_cpu_cores": (cpu1 - cpu0) / win,
            "vault_cores_per_1000_items": (cpu1 - cpu0) / win / a.items * 1000,
            "vault_rss_start": rss0, "vault_rss_end": rss1,
            "vault_rss_peak": max(rss_peak, rss0, rss1),
            "gen_cpu_s": gcpu1 - gcpu0, "gen_cpu_cores": (gcpu1 - gcpu0) / win,
            "pg_cpu_s": (pg1 - pg0) if pg0 is not None and pg1 is not None else None,
            "heartbeats_per_s": (hb1 - hb0) / win, "results_per_s": (res1 - res0) / win,
            "hb_p50": pct(gen.stats.hb_latency, 50), "hb_p99": pct(gen.stats.hb_latency, 99),
            "gen_loop_lag_max": gen.stats.loop_lag_max,
            "heartbeat_errors": gen.stats.heartbeat_errors, "result_errors": gen.stats.result_errors,
            "errors_sample": gen.stats.errors[:5], "commands": dict(gen.stats.commands),
            "probe_errors": probe.errors, "items_body_bytes": probe.items_bytes,
            "items_listed": probe.items_count,
        })
        for path, ls in lat.items():
            key = path.strip("/")
            out[f"{key}_n"] = len(ls)
            out[f"{key}_p50"] = pct(ls, 50)
            out[f"{key}_p99"] = pct(ls, 99)
            out[f"{key}_max"] = max(ls, default=float("nan"))
        out["cycles"] = analyse_cycles(gen, db_url or f"sqlite:///{data / 'vault.db'}", w0, w1, a)
    return out


# ----------------------------------------------------------------------------- output

def _load(t: Any) -> str:
    return "/".join(f"{x:.2f}" for x in t)


def summary(r: dict[str, Any], goal_p99: float) -> str:
    c = r["cycles"]
    mb = 1024 * 1024
    lines = [
        f"[{r['engine']}{' x' + str(r['workers']) + ' workers' if r.get('workers', 1) > 1 else ''}] "
        f"{r['items']} items on {r['hosts']} hosts (+1 store host), frequency "
        f"{r['frequency_s']:.0f} s, heartbeat {r['heartbeat_s']:.1f} s, window {r['window_s']:.0f} s "
        f"(all protected after {r['protect_all_s']:.0f} s)",
        f"  cycles on time: {c['on_time']}/{c['due']} = {100 * c['on_time_share']:.1f} % "
        f"(tolerance {c['tolerance_s']:.1f} s; never received {c['never_received']}); received - due "
        f"p50 {c['late_p50']:.2f} s, p99 {c['late_p99']:.2f} s, max {c['late_max']:.2f} s",
        f"  queued by due + 1 s: {c['queued_on_time']}/{c['due']} = "
        f"{100 * c['queued_on_time_share']:.1f} %; received by due + 1 s: "
        f"{c['received_within_1s']}/{c['due']} = {100 * c['received_within_1s_share']:.1f} %",
        f"  scheduler lag (queued - due) p50 {c['sched_lag_p50']:.2f} s p99 {c['sched_lag_p99']:.2f} s "
        f"max {c['sched_lag_max']:.2f} s; delivery (received - queued) p50 "
        f"{c['deliver_lag_p50']:.2f} s p99 {c['deliver_lag_p99']:.2f} s; mean interval between an "
        f"item's cycles {c['interval_mean']:.2f} s (p99 {c['interval_p99']:.2f} s)",
        f"  GET /items  p50 {1000 * r['items_p50']:.0f} ms p99 {1000 * r['items_p99']:.0f} ms max "
        f"{1000 * r['items_max']:.0f} ms (n={r['items_n']}, {r['items_body_bytes'] / mb:.2f} MiB "
        f"body) — goal p99 ≤ {1000 * goal_p99:.0f} ms",
        f"  GET /health p50 {1000 * r['health_p50']:.0f} ms p99 {1000 * r['health_p99']:.0f} ms max "
        f"{1000 * r['health_max']:.0f} ms (n={r['health_n']})",
        f"  heartbeat POST p50 {1000 * r['hb_p50']:.0f} ms p99 {1000 * r['hb_p99']:.0f} ms; "
        f"{r['heartbeats_per_s']:.1f} heartbeats/s, {r['results_per_s']:.1f} result posts/s",
        f"  vault CPU {r['vault_cpu_s']:.1f} s = {r['vault_cpu_cores']:.2f} cores "
        f"({r['vault_cores_per_1000_items']:.3f} per 1,000 items); RSS "
        f"{r['vault_rss_start'] / mb:.0f} → {r['vault_rss_end'] / mb:.0f} MiB (peak "
        f"{r['vault_rss_peak'] / mb:.0f}); generator CPU {r['gen_cpu_s']:.1f} s = "
        f"{r['gen_cpu_cores']:.2f} cores (loop lag max {1000 * r['gen_loop_lag_max']:.0f} ms)"
        + (f"; PostgreSQL CPU {r['pg_cpu_s']:.1f} s" if r.get("pg_cpu_s") is not None else ""),
        f"  errors: heartbeats {r['heartbeat_errors']}, results {r['result_errors']}, probe "
        f"{r['probe_errors']} {r['errors_sample'] or ''}",
        f"  load average (1/5/15 min) before the window {_load(r['load_before'])}, after "
        f"{_load(r['load_after'])}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--items", type=int, default=None, help="protected items (default 1000)")
    ap.add_argument("--hosts", type=int, default=None, help="simulated source hosts (default 40)")
    ap.add_argument("--frequency", type=float, default=30.0, help="policy frequency, s")
    ap.add_argument("--heartbeat", type=float, default=2.0, help="heartbeat interval, s")
    ap.add_argument("--protocol", choices=("push", "poll"), default="push",
                    help="push: the agent today (long-poll command channel, heartbeats with "
                         "what changed); poll: commands in full heartbeats' replies only")
    ap.add_argument("--duration", type=float, default=None,
                    help="measured window per engine, s (default 150)")
    ap.add_argument("--engines", default="sqlite,postgresql")
    ap.add_argument("--workers", type=int, default=1,
                    help="API worker processes of the vault on PostgreSQL (vault serve --workers)")
    ap.add_argument("--initial-seconds", type=float, default=2.0,
                    help="simulated initial replication time")
    ap.add_argument("--cycle-seconds", type=float, default=1.0, help="simulated cycle time")
    ap.add_argument("--probe-pause", type=float, default=0.5,
                    help="pause after each GET /items + GET /health pair, s")
    ap.add_argument("--setup-timeout", type=float, default=600.0)
    ap.add_argument("--quick", action="store_true", help="100 items, 10 hosts, 60 s")
    ap.add_argument("--goal-p99-ms", type=float, default=200.0)
    ap.add_argument("--goal-on-time", type=float, default=100.0,
                    help="goal: share of cycles on time, percent")
    ap.add_argument("--profile", type=Path, default=None,
                    help="after the window, py-spy record the vault under the same load into "
                         "DIR/vault-ENGINE.txt (raw format)")
    ap.add_argument("--profile-seconds", type=float, default=30.0)
    ap.add_argument("--pg-stat-statements", action="store_true",
                    help="PostgreSQL: preload pg_stat_statements and record the window's top "
                         "statements by total time in the JSON")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    a.items = a.items or (100 if a.quick else 1000)
    a.hosts = a.hosts or (10 if a.quick else 40)
    a.duration = a.duration or (60.0 if a.quick else 150.0)
    engines = [e for e in a.engines.split(",") if e]
    for e in engines:
        if e not in ("sqlite", "postgresql"):
            ap.error(f"unknown engine {e}")
    goal = a.goal_p99_ms / 1000.0
    results: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    with workdir(a.workdir, keep=a.keep) as root:
        for e in engines:
            print(f"=== scale: {e}", flush=True)
            r = run_engine(e, a, root)
            print(summary(r, goal), flush=True)
            results.append(r)
            if a.json is not None:  # partial results survive a failure of the next engine
                write_json(a.json, {"engines": results, "partial": True})
    met = {r["engine"]: {"on_time": r["cycles"]["on_time_share"] >= a.goal_on_time / 100.0,
                         "p99": max(r["items_p99"], r["health_p99"]) <= goal} for r in results}
    write_json(a.json, {"engines": results, "goal_p99_s": goal, "met": met, "quick": a.quick,
                        "wall_s": time.perf_counter() - t0, "machine": machine_info()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
