"""The vault's CPU per operation under a fixed, simulated steady state (issue 13): a figure that
does not depend on the box's load, for A/B runs of two trees.

In-process (``drsite.vault.testing.Harness``: the real routes and database, fake clock, no TLS,
no background thread): ``--items`` protected items on ``--hosts`` source hosts (written into
the database, each with its first point and a last cycle spread over the last 30 s), a store
host with the site's store role, a 30 s policy. For ``--seconds`` simulated seconds: a controller
round (``Vault.tick``) every 0.25 s; every 2 s every source host beats with the items whose
cycle ended since (report and new point), and the store host beats (``--store-digest``: with
the digests of the list and book it holds, as the agent does; default: the list's only, as
``bench/scale.py``'s generator did before v4-scale); every command a reply carries is answered
``running`` then ``succeeded``; every ``--reads-every`` simulated seconds an operator reads
``GET /items`` and ``GET /health`` (a reader token). Printed per kind of call: calls, process
CPU per call, SQL
statements per call. The drsite imported is the first on ``sys.path``: run a tree with
``PYTHONPATH=TREE/src``.

    .venv/bin/python bench/vault_ops.py [--items 1000] [--hosts 40] [--seconds 40] [--store-digest]
"""

from __future__ import annotations

import argparse
import collections
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import event, insert

import drsite
from drsite.core.states import ItemProtection
from drsite.failover.wire import recovery_book_digest
from drsite.sitestore.acl import acl_digest
from drsite.vault.db.models import Group, Item, Point, Vm
from drsite.vault.testing import Agent, Harness, point, report, vm_info

KINDS = ("tick", "heartbeat", "result", "store_beat", "items", "health")


class Meter:
    """CPU seconds, calls and SQL statements per kind of call."""

    def __init__(self, h: Harness) -> None:
        self.cpu: collections.defaultdict[str, float] = collections.defaultdict(float)
        self.calls: collections.Counter[str] = collections.Counter()
        self.stmts: collections.Counter[str] = collections.Counter()
        self.kind = ""
        event.listen(h.vault.db.engine, "before_cursor_execute", self._count)

    def _count(self, *_a: Any) -> None:
        if self.kind:
            self.stmts[self.kind] += 1

    def run(self, kind: str, fn: Callable[..., Any], *a: Any, **kw: Any) -> Any:
        self.kind = kind
        c0 = time.process_time()
        try:
            return fn(*a, **kw)
        finally:
            self.cpu[kind] += time.process_time() - c0
            self.calls[kind] += 1
            self.kind = ""


def store_site(h: Harness) -> Agent:
    """Sites prod and dr, dr's store host (registered, with the store role), policy p30 and a
    group g prod → dr that matches no VM (items are written into the database directly)."""
    h.site("prod")
    h.site("dr")
    store = h.register("dr", "dr-store")
    assert h.set_store("dr", "dr-store").status_code == 200
    h.ok("POST", "/policies", json={"name": "p30", "frequency_s": 30})
    h.ok("POST", "/groups", json={"name": "g", "site": "prod", "target_site": "dr",
                                  "policy": "p30", "match": {"labels": ["nobody"]}})
    return store


def populate(h: Harness, n: int, n_hosts: int) -> tuple[Agent, list[Agent],
                                                         dict[str, list[dict[str, Any]]]]:
    store = store_site(h)
    hosts = [h.register("prod", f"hv{k:03d}") for k in range(n_hosts)]
    now = h.clock.now()
    per = n // n_hosts
    inv = {a.host_id: [vm_info(f"vm-{k}-{i}", f"web{k:03d}{i:03d}") for i in range(per)]
           for k, a in enumerate(hosts)}
    items: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    with h.vault.db.tx() as s:
        g = s.query(Group).filter(Group.name == "g").one()
        vms, rows, pts = [], [], []
        for k, a in enumerate(hosts):
            for i, v in enumerate(inv[a.host_id]):
                iid, spread = f"i{k:03d}{i:03d}", float((k * per + i) % 30)
                vms.append({"host_id": a.host_id, "vm_id": v["vm_id"], "name": v["name"],
                            "info": v, "present": True, "first_seen": now, "last_seen": now,
                            "auto_protect_blocked": False})
                row = {"id": iid, "host_id": a.host_id, "vm_id": v["vm_id"],
                       "vm_name": v["name"], "group_id": g.id, "target_site_id": g.target_site_id,
                       "status": ItemProtection.PROTECTED, "vm_ref": f"{a.host_id}/{v['vm_id']}",
                       "state": "protected", "report": report(iid, v["vm_id"], v["name"]),
                       "acked_seq": 1, "last_point_time": now - spread,
                       "last_cycle_sent_at": now - spread, "last_retention_at": now,
                       "last_scrub_at": now, "retry": {}, "health": "normal",
                       "health_reasons": [], "created_at": now - 3600, "updated_at": now,
                       "lineage_id": iid}
                rows.append(row)
                items[a.host_id].append(row)
                pts.append({"item_id": iid, "point_id": "p000001", "seq": 1,
                            "created_at": now - 60, "consistency": "crash",
                            "bytes_written": 4096, "info": point(iid, 1, now - 60)})
        s.execute(insert(Vm), vms)
        s.execute(insert(Item), rows)
        s.execute(insert(Point), pts)
    for a in hosts:
        a.beat(vms=inv[a.host_id])
    store.beat(store_url="https://127.0.0.1:9443")
    return store, hosts, items


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--items", type=int, default=1000)
    ap.add_argument("--hosts", type=int, default=40)
    ap.add_argument("--seconds", type=float, default=40.0)
    ap.add_argument("--store-digest", action="store_true")
    ap.add_argument("--reads-every", type=float, default=1.0,
                    help="simulated seconds between two operator reads (GET /items, GET "
                         "/health with a reader token, as bench/scale.py's probe)")
    a = ap.parse_args(argv)
    print(f"drsite from {drsite.__file__}; load {Path('/proc/loadavg').read_text().split()[:3]}")
    with tempfile.TemporaryDirectory(prefix="vault-ops-") as tmp:
        h = Harness(Path(tmp) / "vault")
        try:
            store, hosts, items = populate(h, a.items, a.hosts)
            m = Meter(h)
            seq: dict[str, int] = collections.defaultdict(lambda: 1)
            ended: dict[str, list[str]] = collections.defaultdict(list)
            by_id = {r["id"]: r for rows in items.values() for r in rows}
            acl: dict[str, Any] | None = None
            reader = h.hdr(h.token("reader", "probe"))
            next_read = h.clock.now()
            book: str | None = None

            def post(agent: Agent, kind: str, path: str, body: Any) -> Any:
                h.peer = agent.cert_der
                try:
                    return m.run(kind, h.client.post, f"/api/v1/agent{path}", json=body)
                finally:
                    h.peer = None

            end, k = h.clock.now() + a.seconds, 0
            while h.clock.now() < end:
                h.clock.advance(0.25)
                k += 1
                m.run("tick", h.tick)
                if h.clock.now() >= next_read:
                    next_read += a.reads_every
                    for kind, path in (("items", "/api/v1/items"), ("health", "/api/v1/health")):
                        r = m.run(kind, h.client.get, path, headers=reader)
                        assert r.status_code == 200, r.text
                if k % 8:
                    continue
                for agent in hosts:   # every 2 s
                    beat_items = []
                    for iid in ended.pop(agent.host_id, []):
                        r, sq = by_id[iid], seq[iid]
                        beat_items.append({"item_id": iid, "report": report(
                            iid, r["vm_id"], r["vm_name"], cycles=sq,
                            last_point_id=f"p{sq:06d}", last_point_time=h.clock.now()),
                            "new_points": [point(iid, sq, h.clock.now())]})
                    reply = post(agent, "heartbeat", "/heartbeat", {
                        "host_name": agent.name, "version": "ops", "store_url": None,
                        "vms": None, "items": beat_items, "held": []}).json()
                    for c in reply.get("commands") or []:
                        for status in ("running", "succeeded"):
                            post(agent, "result", f"/commands/{c['command_id']}/result",
                                 {"status": status, "progress": 100.0, "result": {}})
                        if c["kind"] == "cycle":
                            seq[c["item_id"]] += 1
                            ended[agent.host_id].append(c["item_id"])
                out = post(store, "store_beat", "/heartbeat", {
                    "host_name": store.name, "version": "ops",
                    "store_url": "https://127.0.0.1:9443", "vms": None, "items": [], "held": [],
                    "store_acl_digest": acl_digest(acl) if acl is not None else None,
                    "recovery_book_digest": book if a.store_digest else None}).json()
                if out.get("store_acl") is not None:
                    acl = out["store_acl"]
                if out.get("recovery_book") is not None:
                    book = recovery_book_digest(out["recovery_book"])
            total = sum(m.cpu[kind] for kind in KINDS)
            print(f"{a.items} items, {a.hosts} hosts, {a.seconds:.0f} simulated s: vault CPU "
                  f"{total:.2f} s; load {Path('/proc/loadavg').read_text().split()[:3]}")
            for kind in KINDS:
                n = max(1, m.calls[kind])
                print(f"  {kind:10} calls {m.calls[kind]:6}  CPU {m.cpu[kind]:7.2f} s  per call "
                      f"{1000 * m.cpu[kind] / n:7.2f} ms  statements per call "
                      f"{m.stmts[kind] / n:5.1f}")
        finally:
            h.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
