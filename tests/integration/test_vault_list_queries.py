"""The operator's list and health reads cost a fixed number of SQL statements, whatever the
fleet (issue 13): ``GET /items`` (a page with its total, each item's host, group, policy, site
and store damage) and ``GET /health`` must not query per row. A fleet three times larger, on
more hosts, with more damaged items, must cost the same statements — an N+1 (a per-item
lookup of its host, policy or newest damaged point) fails this test.

Also: damaged points are read through the partial index ``ix_points_damaged``, not by a scan of
the whole catalogue (which grows with items x retained points)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio.to_thread
import psycopg
import pytest
from fastapi.responses import JSONResponse
from sqlalchemy import event, select, text, update

from drsite.vault.db.database import loads_json
from drsite.vault.db.models import Item, Point
from drsite.vault.testing import Harness, point, vm_info


def fleet(h: Harness, hosts: int, per_host: int, damaged: int) -> list[str]:
    """``hosts`` source hosts of ``per_host`` VMs each under one policy (items enabling), three
    points per item, the newest point of ``damaged`` items marked damaged; the item ids."""
    h.site("prim")
    h.site("sec")
    dr = h.register("sec", "dr1")
    assert h.set_store("sec", "dr1").status_code == 200
    dr.beat(store_url="https://127.0.0.1:9443")
    for i in range(hosts):
        h.register("prim", f"hv{i}").beat(vms=[
            vm_info(f"vm-{i}-{j}", f"vm{i:02d}x{j:03d}", labels=["all"]) for j in range(per_host)])
    h.ok("POST", "/policies", json={"name": "p", "frequency_s": 300})
    h.ok("POST", "/groups", json={"name": "g", "site": "prim", "target_site": "sec",
                                   "policy": "p", "match": {"labels": ["all"]}})
    h.tick()
    ids = [i["id"] for i in h.entries("/items")]
    assert len(ids) == hosts * per_host
    now = h.clock.now()
    with h.vault.db.tx() as s:
        for item_id in ids:
            for seq in (1, 2, 3):
                p = point(item_id, seq, now - 60 * (3 - seq))
                s.add(Point(item_id=item_id, point_id=p["point_id"], seq=seq,
                            created_at=p["created_at"], consistency="crash", bytes_written=4096,
                            info=p))
        s.flush()
        s.execute(update(Point).where(Point.item_id.in_(ids[:damaged]), Point.seq == 3)
                  .values(damage={"reason": "checksum mismatch", "found_at": now, "by": "scrub"}))
    return ids


def statements(h: Harness, path: str) -> tuple[list[str], dict[str, Any]]:
    """The SQL statements ``GET path`` ran (not the deferred token touch), and its body."""
    seen: list[str] = []

    def count(_conn: Any, _cur: Any, stmt: str, *_a: Any) -> None:
        if not threading.current_thread().name.startswith("drsite-later"):
            seen.append(stmt)

    h.ok("GET", path)  # the token's last_used_at is touched once, off the request path
    event.listen(h.vault.db.engine, "before_cursor_execute", count)
    try:
        body = h.ok("GET", path)
    finally:
        event.remove(h.vault.db.engine, "before_cursor_execute", count)
    return seen, body


@pytest.mark.parametrize("path", ["/items?limit=100", "/health"])
def test_list_and_health_statements_do_not_grow_with_the_fleet(
        vault_harnesses: Callable[[str], Harness], path: str) -> None:
    small_h, big_h = vault_harnesses("small"), vault_harnesses("big")
    fleet(small_h, hosts=2, per_host=5, damaged=1)
    fleet(big_h, hosts=6, per_host=5, damaged=5)
    small, small_body = statements(small_h, path)
    big, big_body = statements(big_h, path)
    if path.startswith("/items"):
        assert small_body["total"] == 10 and big_body["total"] == 30
        assert len(big_body["entries"]) == 30
        # what the queries fed: each item's host, group, policy and damage
        assert {e["source_host"] for e in big_body["entries"]} == {f"hv{i}" for i in range(6)}
        assert all(e["group"] == "g" and e["policy"] == "p" and e["target_site"] == "sec"
                   for e in big_body["entries"])
        assert sum(1 for e in big_body["entries"] if e["damaged_points"] == ["p000003"]) == 5
    else:
        assert big_body["agents"]["up"] == 7
    assert len(big) == len(small), (small, big)
    assert len(small) <= 16, small


def test_damaged_points_are_read_through_their_partial_index(tmp_path: Path) -> None:
    h = Harness(tmp_path / "vault")
    try:
        fleet(h, hosts=1, per_host=3, damaged=1)
        with h.vault.db.read() as s:
            plan = " ".join(str(r[-1]) for r in s.execute(text(
                "EXPLAIN QUERY PLAN SELECT item_id, point_id, damage FROM points "
                "WHERE damage IS NOT NULL")))
        assert "ix_points_damaged" in plan, plan
    finally:
        h.close()


def test_loose_reads_take_no_transaction_on_postgresql(vault_harnesses: Callable[[str], Harness]) -> None:
    """The token check and ``GET /health`` read through ``Database.read_loose``: on PostgreSQL
    each statement runs on its own (no BEGIN and ROLLBACK round trips: two of the three a
    token check cost); on SQLite it is a read transaction, as ``read()``. Either way it reads
    what was committed, and the API answers the same."""
    h = vault_harnesses("loose")
    fleet(h, hosts=1, per_host=2, damaged=0)
    with h.vault.db.read_loose() as s:
        assert s.execute(text("SELECT count(*) FROM items")).scalar_one() == 2
        raw = s.connection().connection.dbapi_connection
        if h.vault.db.sqlite:
            assert raw is not None and raw.in_transaction
        else:
            assert isinstance(raw, psycopg.Connection) and raw.autocommit
            assert raw.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    with h.vault.db.read() as s:   # read() keeps its snapshot
        s.execute(text("SELECT 1"))
        raw = s.connection().connection.dbapi_connection
        if not h.vault.db.sqlite:
            assert isinstance(raw, psycopg.Connection) and not raw.autocommit
            assert raw.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
    assert h.ok("GET", "/health")["agents"]["up"] == 2
    assert h.call("GET", "/health", token="drst_not-a-token").status_code == 401


def test_a_listed_item_is_the_item_as_its_own_page_shows_it(
        vault_harnesses: Callable[[str], Harness]) -> None:
    """``GET /items`` reads plain columns (``itemfacts.ItemRow``), ``GET /items/{id}`` the ORM
    row: each entry of the list must be the item's own page, field for field — whatever it
    holds (damage, a critical error, retries, a failed scrub, a report with agent issues, a
    late source host). A column the list forgot or read wrong fails here."""
    h = vault_harnesses("rows")
    ids = fleet(h, hosts=2, per_host=3, damaged=1)
    now = h.clock.now()
    with h.vault.db.tx() as s:
        s.execute(update(Item).where(Item.id == ids[1]).values(
            critical_error={"code": "chain_broken", "message": "broken chain", "hint": "resync"},
            state="critical"))
        s.execute(update(Item).where(Item.id == ids[2]).values(
            retry={"failures": 2, "last_error": {"message": "store full"},
                   "next_attempt_at": now + 60}, last_point_time=now - 7200,
            scrub={"error": {"message": "unreachable"}}, last_scrub_at=now - 5))
        s.execute(update(Item).where(Item.id == ids[3]).values(
            report={"item_id": ids[3], "state": "protected",
                    "agent_issues": ["sync mode suspended: peer slow"]}))
    h.clock.advance(3 * h.vault.settings.agent_down_after_s)   # every source host is late
    listed = h.entries("/items")
    assert sorted(e["id"] for e in listed) == sorted(ids)
    for entry in listed:
        assert entry == h.ok("GET", f"/items/{entry['id']}"), entry["id"]
    shown = {e["id"]: e for e in listed}
    assert shown[ids[0]]["damaged_points"] == ["p000003"]
    assert shown[ids[1]]["state"] == "critical" and shown[ids[1]]["health"] == "critical"
    assert shown[ids[2]]["last_error"] == {"message": "store full"}
    assert any("source agent" in r for r in shown[ids[4]]["health_reasons"])


@pytest.mark.parametrize("path", ["/items", "/health"])
def test_hot_reads_check_the_token_in_one_worker_thread(
        vault_harnesses: Callable[[str], Harness], path: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``GET /items`` and ``GET /health`` check the token, read and render in one worker
    thread (not three hops: the token dependency, the route, FastAPI's response validation —
    each a wait for the GIL in a busy vault), and still refuse a missing, unknown or agent
    caller (401, audited) and render what Starlette's ``JSONResponse`` would."""
    h = vault_harnesses("hops")
    fleet(h, hosts=1, per_host=2, damaged=0)
    reader = h.token("reader", "ro")
    hops: list[str] = []
    real = anyio.to_thread.run_sync

    async def counted(func: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        hops.append(getattr(func, "__name__", repr(func)))
        return await real(func, *args, **kw)

    monkeypatch.setattr(anyio.to_thread, "run_sync", counted)
    r = h.call("GET", path, token=reader)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert len(hops) == 1, hops
    assert r.content == JSONResponse(r.json()).body
    for token in (None, "drst_not-a-token"):
        refused = h.call("GET", path, token=token)
        assert refused.status_code == 401 and refused.json()["code"] == "auth_failed"
    h.peer = h.agents[0].cert_der   # an agent's certificate is no operator token
    try:
        assert h.call("GET", path, token=None).status_code == 401
    finally:
        h.peer = None
    trail = h.ok("GET", "/audit?limit=50")["entries"]
    assert [e for e in trail if e["action"] == f"GET /api/v1{path}" and e["outcome"] == "refused"
            and e["error_code"] == "auth_failed"]
    assert h.call("GET", "/items?limit=0", token=reader).status_code == 400


def test_json_columns_read_as_json_loads_reads_them(
        vault_harnesses: Callable[[str], Harness]) -> None:
    """JSON columns are decoded by ``db.loads_json`` (``{}`` and ``[]`` without the decoder):
    the values are what ``json.loads`` gives, and each read a new object (changing one read's
    value changes no other's)."""
    h = vault_harnesses("json")
    ids = fleet(h, hosts=1, per_host=2, damaged=0)
    nested = {"failures": 1, "last_error": {"message": "é {} []", "hint": None}, "at": [1.5, []]}
    with h.vault.db.tx() as s:
        s.execute(update(Item).where(Item.id == ids[0]).values(retry={}, health_reasons=[]))
        s.execute(update(Item).where(Item.id == ids[1]).values(retry=nested,
                                                                health_reasons=["a", "[]"]))
    with h.vault.db.read() as s:
        rows = {r.id: r for r in s.execute(select(Item.id, Item.retry, Item.health_reasons))}
        again = {r.id: r for r in s.execute(select(Item.id, Item.retry, Item.health_reasons))}
    assert rows[ids[0]].retry == {} and rows[ids[0]].health_reasons == []
    assert rows[ids[1]].retry == nested and rows[ids[1]].health_reasons == ["a", "[]"]
    assert rows[ids[0]].retry is not again[ids[0]].retry
    rows[ids[0]].retry["x"] = 1
    rows[ids[0]].health_reasons.append("x")
    assert again[ids[0]].retry == {} and again[ids[0]].health_reasons == []
    assert loads_json("{}") == {} and loads_json(b"[]") == [] and loads_json(" {}") == {}
    assert loads_json("null") is None and loads_json('{"a": [1]}') == {"a": [1]}
