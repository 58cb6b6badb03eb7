"""Store grants at scale (issue 13): a job waiting for its item's store grant must not rebuild
the store's whole access list. Protecting N items at once had each of the N waiting jobs build
the list of all N items on every runner pass (N²: 1,000 items protected in 100 s, 2,000 in
571 s). Now the list the store agent holds is read by its digest from the lists this process
built, and a list built elsewhere is built again once per pass, not once per job.

And the security property this must keep: a source may write only once the store agent holds a
list granting it, with its current certificate — an item newer than the held list, or a source
whose certificate changed since, stays pending."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event

from drsite.core.states import ItemProtection
from drsite.failover.wire import recovery_book_digest
from drsite.sitestore.acl import acl_digest
from drsite.vault import recoverybook, storeacl
from drsite.vault.db.models import Host, Item
from drsite.vault.testing import Agent, Harness, vm_info


def forget_lists() -> None:
    """This process knows no list: they were all built by another vault process."""
    with storeacl._CACHE:
        storeacl._DOCS.clear()
        storeacl._BY_DIGEST.clear()
        storeacl._TRIED.clear()


def waiting_fleet(h: Harness, n: int) -> tuple[Agent, Agent, list[str]]:
    """``n`` items of one source host protected at once, their jobs waiting for the grant; the
    store agent received and confirmed the list that holds them all (no time has passed: every
    grant is inside the confirmation margin, so only the exact check can confirm it)."""
    h.site("prim")
    h.site("sec")
    a = h.register("prim", "hv1")
    b = h.register("sec", "dr1")
    assert h.set_store("sec", "dr1").status_code == 200
    a.beat(vms=[vm_info(f"vm-{i}", f"web{i:03d}") for i in range(n)])
    b.beat(store_url="https://127.0.0.1:9443")
    h.ok("POST", "/policies", json={"name": "p1", "frequency_s": 30})
    h.ok("POST", "/groups", json={"name": "g1", "site": "prim", "target_site": "sec",
                                   "policy": "p1"})
    for i in range(n):
        h.ok("POST", "/items", json={"vm_id": f"vm-{i}", "group": "g1"})
    with h.vault.db.read() as s:
        ids = sorted(i.id for i in s.query(Item))
    assert len(ids) == n
    h.store_beat()
    return a, b, ids


def one_pass(h: Harness, ids: list[str], monkeypatch: pytest.MonkeyPatch
             ) -> tuple[list[str | None], list[int], int]:
    """:func:`storeacl.grant_pending` for every item, as one runner pass asks its waiting jobs:
    the answers, the SQL statements of each call, and how many times the list was built."""
    builds = [0]
    real = storeacl._site_store_rows

    def counted(s: Any, site_id: int) -> Any:
        builds[0] += 1
        return real(s, site_id)

    monkeypatch.setattr(storeacl, "_site_store_rows", counted)
    seen: list[str] = []

    def count(_conn: Any, _cur: Any, stmt: str, *_a: Any) -> None:
        if not threading.current_thread().name.startswith("drsite-later"):
            seen.append(stmt)

    answers: list[str | None] = []
    per_call: list[int] = []
    event.listen(h.vault.db.engine, "before_cursor_execute", count)
    try:
        for item_id in ids:
            with h.vault.db.read() as s:   # one transaction per job, as the runner does
                item = s.get(Item, item_id)
                assert item is not None
                before = len(seen)
                answers.append(storeacl.grant_pending(s, item, h.clock.now()))
                per_call.append(len(seen) - before)
    finally:
        event.remove(h.vault.db.engine, "before_cursor_execute", count)
        monkeypatch.setattr(storeacl, "_site_store_rows", real)
    return answers, per_call, builds[0]


def test_waiting_jobs_do_not_rebuild_the_list_per_job(
        vault_harnesses: Callable[[str], Harness], monkeypatch: pytest.MonkeyPatch) -> None:
    """A pass over N waiting jobs builds the store's list at most once (when another process
    built the one its agent holds), and each job's check costs the same statements whatever
    the fleet: 4 items and 16 items."""
    got: dict[int, tuple[list[int], list[int]]] = {}
    for n in (4, 16):
        h = vault_harnesses(f"fleet{n}")
        _a, _b, ids = waiting_fleet(h, n)
        forget_lists()   # the heartbeats ran in another vault process
        answers, first, builds = one_pass(h, ids, monkeypatch)
        assert answers == [None] * n   # the held list grants every item
        assert builds == 1, builds
        answers, second, builds = one_pass(h, ids, monkeypatch)
        assert answers == [None] * n and builds == 0   # the held list is known now
        got[n] = (first, second)
    small, big = got[4], got[16]
    # the one build is in the first call; every other call costs the same, fleet or not
    assert set(small[0][1:]) == set(big[0][1:]) == set(small[1]) == set(big[1]), got
    assert max(small[1]) <= 6, small


def test_a_held_list_confirms_only_what_it_grants(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The held list is known by its digest, but it confirms only the grants it holds: an item
    made after it (its list not sent yet) and a source whose certificate was re-issued since
    wait for the next list; a list built elsewhere is learnt again once the store host's state
    changes (the next heartbeat), never taken on trust."""
    h = Harness(tmp_path / "vault")
    try:
        a, b, ids = waiting_fleet(h, 2)
        a.beat(vms=[vm_info(f"vm-{i}", f"web{i:03d}") for i in range(3)])
        new = str(h.ok("POST", "/items", json={"vm_id": "vm-2", "group": "g1"})["item_id"])
        answers, _calls, builds = one_pass(h, [*ids, new], monkeypatch)
        assert answers[:2] == [None, None] and answers[2] is not None and builds == 0
        # another process built the held list; the current one (with the new item) differs:
        # nothing is confirmed, and the pass builds the list once
        forget_lists()
        answers, _calls, builds = one_pass(h, [*ids, new], monkeypatch)
        assert all(x is not None for x in answers) and builds == 1
        h.store_beat()   # the list with the new item is sent and confirmed (elsewhere)
        forget_lists()
        answers, _calls, builds = one_pass(h, [*ids, new], monkeypatch)
        assert answers == [None] * 3 and builds == 1
        # a re-issued certificate of the source: the held list names the old one
        with h.vault.db.tx() as s:
            src = s.get(Host, a.host_id)
            assert src is not None
            src.cert_fingerprint = "0" * 64
        answers, _calls, builds = one_pass(h, [*ids, new], monkeypatch)
        assert all(x is not None for x in answers) and builds == 0
        h.store_beat()   # the list with the new certificate
        answers, _calls, _builds = one_pass(h, [*ids, new], monkeypatch)
        assert answers == [None] * 3
        assert b.store_acl is not None and b.store_acl["hosts"][a.host_id]["fingerprint"] == "0" * 64
    finally:
        h.close()


def store_beat_cost(h: Harness, b: Agent, books: dict[str, Any],
                    monkeypatch: pytest.MonkeyPatch) -> tuple[int, int, int, int]:
    """One heartbeat of the store host ``b`` as its agent sends it (the digests of the list
    and of the book it holds, ``books[b.host_id]``): its SQL statements, the rows they returned
    (PostgreSQL counts them; SQLite says -1 for a SELECT), and how many times the list and the
    book were built."""
    builds = {"list": 0, "book": 0}
    real_rows, real_build = storeacl._site_store_rows, recoverybook._build

    def rows(s: Any, site_id: int) -> Any:
        builds["list"] += 1
        return real_rows(s, site_id)

    def build(*a: Any) -> Any:
        builds["book"] += 1
        return real_build(*a)

    monkeypatch.setattr(storeacl, "_site_store_rows", rows)
    monkeypatch.setattr(recoverybook, "_build", build)
    seen = [0, 0]

    def count(_conn: Any, cursor: Any, stmt: str, *_a: Any) -> None:
        if threading.current_thread().name.startswith("drsite-later"):
            return
        seen[0] += 1
        if stmt.lstrip().upper().startswith("SELECT") and (cursor.rowcount or 0) > 0:
            seen[1] += cursor.rowcount

    book = books.get(b.host_id)
    body = {"host_name": b.name, "version": "test", "store_url": b.store_url, "vms": None,
            "items": [], "held": [],
            "store_acl_digest": acl_digest(b.store_acl) if b.store_acl is not None else None,
            "recovery_book_digest": recovery_book_digest(book) if book is not None else None}
    event.listen(h.vault.db.engine, "after_cursor_execute", count)
    try:
        r = b.post("/heartbeat", body)
    finally:
        event.remove(h.vault.db.engine, "after_cursor_execute", count)
        monkeypatch.setattr(storeacl, "_site_store_rows", real_rows)
        monkeypatch.setattr(recoverybook, "_build", real_build)
    assert r.status_code == 200, r.text
    out = r.json()
    if out.get("store_acl") is not None:
        b.store_acl = out["store_acl"]
    if out.get("recovery_book") is not None:
        books[b.host_id] = out["recovery_book"]
    return seen[0], seen[1], builds["list"], builds["book"]


def test_a_store_heartbeat_costs_the_same_whatever_the_items(
        vault_harnesses: Callable[[str], Harness], monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 13: the store host's heartbeat read every item of its site (and built the recovery
    book from all of them) at every beat — 1.2 s of CPU per beat at 1,000 items. Now, with
    nothing changed, a beat costs the same statements and rows for 4 and 16 items and builds
    neither the list nor the book; an item that goes from enabling to protected changes the
    book (built once) but not the list (its writer did not change)."""
    got: dict[int, list[tuple[int, int]]] = {}
    for n in (4, 16):
        h = vault_harnesses(f"beat{n}")
        _a, b, ids = waiting_fleet(h, n)
        books: dict[str, Any] = {}
        store_beat_cost(h, b, books, monkeypatch)   # the book reaches the agent
        costs = []
        for _ in range(2):
            h.clock.advance(2.0)
            stmts, rows, lists, built = store_beat_cost(h, b, books, monkeypatch)
            assert (lists, built) == (0, 0)
            costs.append((stmts, rows))
        with h.vault.db.tx() as s:   # one item is protected now
            item = s.get(Item, ids[0])
            assert item is not None and item.status == ItemProtection.ENABLING
            item.status = ItemProtection.PROTECTED
        h.clock.advance(2.0)
        _stmts, _rows, lists, built = store_beat_cost(h, b, books, monkeypatch)
        assert (lists, built) == (0, 1)
        assert ids[0] in books[b.host_id]["items"]
        got[n] = costs
    assert got[4] == got[16], got
