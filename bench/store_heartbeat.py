"""The store host's heartbeat against the number of items it stores (issue 13).

In-process (``drsite.vault.testing.Harness``: the real app, routes and database, no TLS), on
SQLite and/or PostgreSQL (a throw-away cluster, as ``tests/pg.py`` starts it). N items of one
store site (``--items 100,1000,5000``, 25 per source host) are written straight into the
database as protected items with their VMs; the store host then beats like its agent: it keeps
the access list and the recovery book it received and sends their digests back. Measured per
beat, for each scenario:

- ``steady``: nothing changed since the last beat;
- ``status``: one item moved from ``enabling`` to ``protected`` since the last beat (what every
  beat sees while a fleet is being protected);
- ``new``: one new item (``enabling``) since the last beat (its grant must reach the store);

the SQL statements of the beat, the rows they returned (PostgreSQL: the cursor's row count;
SQLite does not count a SELECT's rows), the beat's CPU time (``time.process_time`` of this
process: the vault's request thread and the test client, not the box's load; with SQLite the
database's work too, with PostgreSQL not — the server is another process) and its wall time,
the reply's size;
and, with ``--profile``, the top functions of the ``steady`` and ``status`` beats at the
largest N (cProfile).

    .venv/bin/python bench/store_heartbeat.py [--items 100,1000,5000] [--engines sqlite,postgresql]
                                              [--beats 10] [--profile] [--json FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import pstats
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchlib import BENCH_DIR, machine_info, write_json
from sqlalchemy import event, insert, update
from vault_ops import store_site

from drsite.core.states import ItemProtection
from drsite.failover.wire import recovery_book_digest
from drsite.sitestore.acl import acl_digest
from drsite.vault.db.models import Group, Host, Item, Vm
from drsite.vault.heartbeat import Beat, apply_heartbeat
from drsite.vault.testing import Agent, Harness, vm_info

REPO = BENCH_DIR.parent
PER_HOST = 25


class StoreAgent:
    """The store host's agent: keeps the list and the book it received, sends their digests."""

    def __init__(self, agent: Agent, store_url: str) -> None:
        self.agent, self.store_url = agent, store_url
        self.acl: dict[str, Any] | None = None
        self.book: dict[str, Any] | None = None
        self.acl_digest: str | None = None
        self.book_digest: str | None = None

    def body(self) -> dict[str, Any]:
        return {"host_name": self.agent.name, "version": "bench", "store_url": self.store_url,
                "vms": None, "items": [], "held": [], "store_acl_digest": self.acl_digest,
                "recovery_book_digest": self.book_digest}

    def take(self, out: dict[str, Any]) -> None:
        """The reply's list and book, kept with their digests (the agent's work, not timed)."""
        if out.get("store_acl") is not None:
            self.acl = out["store_acl"]
            self.acl_digest = acl_digest(out["store_acl"])
        if out.get("recovery_book") is not None:
            self.book = out["recovery_book"]
            self.book_digest = recovery_book_digest(out["recovery_book"])

    def beat(self) -> tuple[dict[str, Any], int]:
        """One heartbeat; the reply and its size (the reply is taken by :meth:`take`)."""
        r = self.agent.post("/heartbeat", self.body())
        assert r.status_code == 200, r.text
        out: dict[str, Any] = r.json()
        return out, len(r.content)


class Counter:
    """SQL statements and the rows they returned (PostgreSQL), while ``on``."""

    def __init__(self, h: Harness) -> None:
        self.h, self.on = h, False
        self.statements: list[str] = []
        self.rows = 0
        event.listen(h.vault.db.engine, "after_cursor_execute", self._after)

    def _after(self, _conn: Any, cursor: Any, stmt: str, *_a: Any) -> None:
        if not self.on or threading.current_thread().name.startswith("drsite-later"):
            return
        self.statements.append(" ".join(stmt.split())[:160])
        rc = getattr(cursor, "rowcount", -1)
        if stmt.lstrip().upper().startswith("SELECT") and isinstance(rc, int) and rc > 0:
            self.rows += rc

    @contextlib.contextmanager
    def counting(self) -> Iterator[None]:
        self.statements, self.rows, self.on = [], 0, True
        try:
            yield
        finally:
            self.on = False


def populate(h: Harness, n: int) -> tuple[StoreAgent, Agent, int]:
    """Sites, a store host with the store role, a policy and a group, and ``n`` protected
    items of ``ceil(n / 25)`` source hosts written into the database directly."""
    store = store_site(h)
    sources = [h.register("prod", f"hv{k:03d}") for k in range((n + PER_HOST - 1) // PER_HOST)]
    now = h.clock.now()
    with h.vault.db.tx() as s:
        group = s.query(Group).filter(Group.name == "g").one()
        gid, target = group.id, group.target_site_id
        vms, items = [], []
        for i in range(n):
            src = sources[i // PER_HOST]
            vm_id, name = f"vm-{i:05d}", f"web{i:05d}"
            vms.append({"host_id": src.host_id, "vm_id": vm_id, "name": name,
                        "info": vm_info(vm_id, name), "present": True, "first_seen": now,
                        "last_seen": now, "auto_protect_blocked": False})
            items.append({"id": f"i{i:05d}", "host_id": src.host_id, "vm_id": vm_id,
                          "vm_name": name, "group_id": gid, "target_site_id": target,
                          "status": ItemProtection.PROTECTED, "vm_ref": f"{src.host_id}/{vm_id}",
                          "state": "protected", "report": None, "acked_seq": 1,
                          "last_point_time": now, "retry": {}, "health": "normal",
                          "health_reasons": [], "created_at": now - 3600, "updated_at": now,
                          "lineage_id": f"i{i:05d}"})
        s.execute(insert(Vm), vms)
        s.execute(insert(Item), items)
    agent = StoreAgent(store, "https://127.0.0.1:9443")
    agent.take(agent.beat()[0])   # the first list (point keys made) and book
    agent.take(agent.beat()[0])   # confirmed
    return agent, sources[0], gid


def change(h: Harness, scenario: str, k: int, n: int, gid: int, src: Agent) -> None:
    """What happens to the store's items before beat ``k`` of ``scenario``."""
    now = h.clock.now()
    with h.vault.db.tx() as s:
        if scenario == "status":   # an item of the store moves enabling -> protected
            s.execute(update(Item).where(Item.id == f"i{k % n:05d}").values(
                status=ItemProtection.PROTECTED, updated_at=now))
        elif scenario == "new":    # a new item, its grant to be sent
            vm_id = f"vm-new-{k:05d}"
            target = s.get(Group, gid).target_site_id  # type: ignore[union-attr]
            s.add(Vm(host_id=src.host_id, vm_id=vm_id, name=f"new{k:05d}",
                     info=vm_info(vm_id, f"new{k:05d}"), present=True, first_seen=now,
                     last_seen=now, auto_protect_blocked=False))
            s.add(Item(id=f"n{k:05d}", host_id=src.host_id, vm_id=vm_id, vm_name=f"new{k:05d}",
                       group_id=gid, target_site_id=target, status=ItemProtection.ENABLING,
                       vm_ref=f"{src.host_id}/{vm_id}", state="new", report=None, acked_seq=0,
                       retry={}, health="normal", health_reasons=[], created_at=now,
                       updated_at=now, lineage_id=f"n{k:05d}"))


def unchange(h: Harness, agent: StoreAgent, scenario: str, k: int, n: int) -> None:
    """``status``: the item goes back to enabling (an unmeasured beat takes it in)."""
    if scenario == "status":
        with h.vault.db.tx() as s:
            s.execute(update(Item).where(Item.id == f"i{k % n:05d}").values(
                status=ItemProtection.ENABLING))
        h.clock.advance(2.0)
        agent.take(agent.beat()[0])


def measure(h: Harness, agent: StoreAgent, counter: Counter, scenario: str, beats: int,
            gid: int, src: Agent, n: int) -> dict[str, Any]:
    stmts, rows, cpu, wall, size = [], [], [], [], []
    example: list[str] = []
    for k in range(beats):
        unchange(h, agent, scenario, k, n)
        h.clock.advance(2.0)
        change(h, scenario, k, n, gid, src)
        with counter.counting():
            c0, w0 = time.process_time(), time.perf_counter()
            out, nbytes = agent.beat()
            c1, w1 = time.process_time(), time.perf_counter()
        agent.take(out)
        stmts.append(len(counter.statements))
        rows.append(counter.rows)
        cpu.append((c1 - c0) * 1000)
        wall.append((w1 - w0) * 1000)
        size.append(nbytes)
        example = counter.statements
    return {"statements": statistics.median(stmts), "statements_max": max(stmts),
            "rows": statistics.median(rows), "cpu_ms_median": round(statistics.median(cpu), 2),
            "cpu_ms_min": round(min(cpu), 2), "wall_ms_median": round(statistics.median(wall), 2),
            "reply_bytes_median": int(statistics.median(size)), "example_statements": example}


def profile_beats(h: Harness, agent: StoreAgent, scenario: str, beats: int, gid: int,
                  src: Agent, n: int) -> str:
    """The vault's side of ``beats`` beats of ``scenario`` in this thread, under cProfile."""
    prof = cProfile.Profile()
    for k in range(beats):
        unchange(h, agent, scenario, k + beats, n)
        h.clock.advance(2.0)
        change(h, scenario, k + beats, n, gid, src)
        profiled_beat(h, agent, prof)
    return top(prof)


def profiled_beat(h: Harness, agent: StoreAgent, prof: cProfile.Profile) -> None:
    """:func:`apply_heartbeat` of the store host's beat in this thread (the route's thread is
    out of cProfile's sight), with the digests the agent holds."""
    beat = Beat(host_name=agent.agent.name, version="bench", store_url=agent.store_url,
                vms=None, items=[], held=[], store_acl_digest=agent.acl_digest,
                recovery_book_digest=agent.book_digest)
    with h.vault.db.tx() as s:
        host = s.get(Host, agent.agent.host_id)
        assert host is not None
        prof.enable()
        try:
            reply = apply_heartbeat(s, host, beat, h.vault.settings)
        finally:
            prof.disable()
    agent.take(reply)


def top(prof: cProfile.Profile, n: int = 18) -> str:
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(n * 3)
    return "\n".join(line for line in out.getvalue().splitlines()
                     if "/drsite/" in line or "sqlalchemy" in line or "function calls" in line
                     or "cumtime" in line)


def run(engine: str, n: int, beats: int, profile: bool, server: str | None) -> dict[str, Any]:
    sys.path.insert(0, str(REPO))
    from tests.pg import fresh_database

    with tempfile.TemporaryDirectory(prefix="storehb-") as tmp:
        db_url = fresh_database(server) if server is not None else None
        h = Harness(Path(tmp) / "vault", db_url)
        try:
            t0 = time.perf_counter()
            agent, src, gid = populate(h, n)
            setup_s = time.perf_counter() - t0
            counter = Counter(h)
            out: dict[str, Any] = {"engine": engine, "items": n, "setup_s": round(setup_s, 1)}
            for scenario in ("steady", "status", "new"):
                out[scenario] = measure(h, agent, counter, scenario, beats, gid, src, n)
                if profile and scenario != "new":
                    out[scenario]["profile"] = profile_beats(h, agent, scenario, beats, gid,
                                                             src, n)
            return out
        finally:
            h.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--items", default="100,1000,5000")
    ap.add_argument("--engines", default="sqlite,postgresql")
    ap.add_argument("--beats", type=int, default=10)
    ap.add_argument("--profile", action="store_true", help="cProfile the largest N's beats")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    sizes = [int(x) for x in a.items.split(",")]
    results: list[dict[str, Any]] = []
    print(f"load {Path('/proc/loadavg').read_text().split()[:3]}", flush=True)
    with contextlib.ExitStack() as stack:
        server = None
        if "postgresql" in a.engines:
            sys.path.insert(0, str(REPO))
            from tests.pg import postgres_cluster
            server = stack.enter_context(postgres_cluster())
        for engine in a.engines.split(","):
            for n in sizes:
                r = run(engine, n, a.beats, a.profile and n == max(sizes),
                        server if engine == "postgresql" else None)
                results.append(r)
                for sc in ("steady", "status", "new"):
                    m = r[sc]
                    print(f"{engine:10} N={n:5} {sc:6}: {m['statements']:4} statements "
                          f"(max {m['statements_max']}), rows {m['rows']:6}, CPU "
                          f"{m['cpu_ms_median']:7.2f} ms (min {m['cpu_ms_min']:.2f}), wall "
                          f"{m['wall_ms_median']:7.2f} ms, reply {m['reply_bytes_median']} B",
                          flush=True)
                    if "profile" in m:
                        print(m["profile"], flush=True)
    print(f"load {Path('/proc/loadavg').read_text().split()[:3]}", flush=True)
    if a.json:
        write_json(a.json, {"machine": machine_info(), "results": results,
                            "load": Path("/proc/loadavg").read_text().split()[:3]})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
