"""The vault's half of break-glass failover (issue 14 part 4): the recovery book a store agent
receives beforehand (re-sent only when it changed), and what the vault does with a break-glass
failover the agent reports after the vault was down — recorded once (idempotent), the item
failed over, the old primary fenced, no second failover — and reports it must not believe."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy import select

from drsite.agent.recoverybook import RecoveryBook, apply_reply
from drsite.core.errors import InvalidInput
from drsite.core.states import FailoverState, ItemProtection
from drsite.failover.wire import check_recovery_book, recovery_book_digest
from drsite.vault.db.models import Command, Failover, Group, Item, Store
from drsite.vault.jobs.failover import check_ready
from drsite.vault.testing import Agent, Harness, point, report, vm_info
from tests.integration.test_vault_api import policy_and_group, protect, two_sites
from tests.integration.test_vault_failover_api import fo_result, play, setup
from tests.integration.test_vault_transient_db import _blocked_on_a_lock
from tests.integration.test_vault_trust import security_alerts


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    hh = Harness(tmp_path / "vault")
    yield hh
    hh.close()


def beat(agent: Agent, *, book_digest: str | None = None,
         breakglass: list[dict[str, Any]] | None = None, patches: bool = False) -> Any:
    body: dict[str, Any] = {"host_name": agent.name, "version": "test",
                            "store_url": agent.store_url, "vms": None, "items": [],
                            "recovery_book_digest": book_digest,
                            "recovery_book_patches": patches}
    if breakglass is not None:
        body["breakglass"] = breakglass
    return agent.post("/heartbeat", body)


def bg_record(item_id: str, fid: str = "bg-0123456789ab", **kw: Any) -> dict[str, Any]:
    return {"failover_id": fid, "kind": "unplanned", "item_id": item_id,
            "state": "pending_commit", "requested_at": 1_700_000_100.0, "point_id": "p000001",
            "point_created_at": 1_700_000_000.0, "vm_id": "vm-rec-1", "vm_name": "web1",
            "source_site": "prim", "recovery_site": "sec", "generation": 2, "rto_s": 0.4,
            "notes": [], **kw}


def test_recovery_book_reaches_the_store_agent(h: Harness) -> None:
    a, b = two_sites(h)
    policy_and_group(h)
    h.ok("PUT", "/network-mappings", json={"source_site": "prim", "recovery_site": "sec",
                                           "source_network": "lan", "recovery_network": "dr"})
    item_id = protect(h, a)
    h.ok("POST", "/plans", json={"plans": [{"name": "shop", "groups": [
        {"name": "web", "vms": ["web1"], "post": [{"manual": "check it"}]},
        {"name": "db", "vms": ["db1"]}]}]})
    r = beat(b)
    assert r.status_code == 200, r.text
    book = check_recovery_book(r.json()["recovery_book"])
    entry = book["items"][item_id]
    assert (entry["vm_id"], entry["vm_name"], entry["source_site"], entry["recovery_site"]) \
        == ("vm-1", "web1", "prim", "sec")
    assert entry["vm_spec"]["disks"] == [{"disk_id": "disk0", "size": 1 << 20}]
    assert [m["recovery"] for m in entry["network_map"]] == ["dr"]
    # db1 is not protected: the plan names only what this store can recover
    assert book["plans"]["shop"]["groups"] == [{"name": "web", "items": [item_id]}]
    assert book["plans"]["shop"]["actions"] == ["web: post action"]
    assert "point_key" not in str(book)   # keys travel in the access list only
    # unchanged: not sent again; a host serving no store gets none
    assert "recovery_book" not in beat(b, book_digest=recovery_book_digest(book)).json()
    assert "recovery_book" not in beat(a).json()


def test_a_store_agent_that_takes_patches_gets_what_changed(h: Harness, tmp_path: Path) -> None:
    """At thousands of items the book is megabytes and changes with every item protected: an
    agent that says it takes patches gets only what changed in the book it holds; one that
    does not (an older agent), or holds a book the vault does not know, gets the whole book;
    a patch that does not apply leaves the book and makes the next beat ask for all of it."""
    a, b = two_sites(h)
    policy_and_group(h)
    first = protect(h, a)
    held = RecoveryBook(tmp_path / "book.json")
    r = beat(b, patches=True).json()                        # nothing held: the whole book
    apply_reply(held, r["recovery_book"], r.get("recovery_book_patch"))
    assert set(held.doc["items"]) == {first}                # type: ignore[index]
    second = protect(h, a, "vm-2", "db1")
    r = beat(b, book_digest=held.digest, patches=True).json()
    assert "recovery_book" not in r
    patch = r["recovery_book_patch"]
    assert set(patch["objects"]["items"]["put"]) == {second} and patch["put"] == {}
    apply_reply(held, None, patch)
    whole = check_recovery_book(beat(b).json()["recovery_book"])   # as an older agent sees it
    assert held.doc == whole and held.digest == recovery_book_digest(whole)
    assert RecoveryBook(tmp_path / "book.json").doc == whole       # persisted
    assert "recovery_book" not in beat(b, book_digest=held.digest, patches=True).json()
    # a book the vault never built: the whole book
    assert "recovery_book" in beat(b, book_digest="0" * 64, patches=True).json()
    # a patch of another book is refused: the book stays, the next beat asks for all of it
    stale = RecoveryBook(tmp_path / "stale.json")
    stale.update({**whole, "items": {}, "sync_journals": []})
    apply_reply(stale, None, patch)
    assert stale.doc is not None and stale.doc["items"] == {} and stale.digest is None
    r = beat(b, book_digest=stale.digest, patches=True).json()
    apply_reply(stale, r["recovery_book"], None)
    assert stale.doc == whole and stale.digest == recovery_book_digest(whole)


def test_the_book_names_the_sync_journals_to_keep(h: Harness) -> None:
    """The store host keeps the sync journals of items a failover may still replay —
    protected (or being enabled or taken apart), failing over, failed over and not committed —
    and deletes the others: unprotected, committed, re-protected (a reverse item has an id,
    and a journal, of its own)."""
    a, b = two_sites(h)
    policy_and_group(h)
    item_id = protect(h, a)

    def kept(status: ItemProtection) -> list[str]:
        with h.vault.db.tx() as s:
            it = s.get(Item, item_id)
            assert it is not None
            it.status = status
        return list(check_recovery_book(beat(b).json()["recovery_book"])["sync_journals"])

    for st in (ItemProtection.ENABLING, ItemProtection.PROTECTED, ItemProtection.DISABLING,
               ItemProtection.FAILING_OVER, ItemProtection.FAILED_OVER):
        assert kept(st) == [item_id], st
    for st in (ItemProtection.COMMITTED, ItemProtection.REPROTECTED, ItemProtection.REMOVED,
               ItemProtection.FAILED):
        assert kept(st) == [], st
    # a malformed list is refused with the book (the agent keeps the one in force)
    with pytest.raises(InvalidInput, match="sync_journals"):
        check_recovery_book({"format": 1, "items": {}, "plans": {}, "sync_journals": "all"})


def test_a_reported_breakglass_failover_is_recorded_once(h: Harness) -> None:
    a, b = two_sites(h)
    policy_and_group(h)
    item_id = protect(h, a)
    rec = bg_record(item_id)
    r = beat(b, breakglass=[rec])
    assert r.status_code == 200, r.text
    assert r.json()["breakglass_ack"] == [rec["failover_id"]]
    it = h.ok("GET", f"/items/{item_id}")
    assert it["protection"] == "failed_over"
    fo = h.ok("GET", f"/failovers/{rec['failover_id']}")
    assert (fo["kind"], fo["state"], fo["point_id"], fo["generation"], fo["vm_id"]) \
        == ("unplanned", "pending_commit", "p000001", 2, "vm-rec-1")
    assert fo["result"]["fence"]["state"] == "pending"
    # the old primary is fenced when it is heard of again
    cmds = a.beat()["commands"]
    assert [(c["kind"], c["args"]["failover_id"]) for c in cmds
            if c["kind"] == "failover_fence"] == [("failover_fence", rec["failover_id"])]
    # a lost acknowledgement: reported again → acknowledged, nothing new
    assert beat(b, breakglass=[rec]).json()["breakglass_ack"] == [rec["failover_id"]]
    with h.vault.db.read() as s:
        assert len(list(s.scalars(select(Failover).where(Failover.item_id == item_id)))) == 1
    # no second failover through the vault; the book no longer offers the item
    r = h.call("POST", f"/items/{item_id}/failover/unplanned-failover", "admin", json={})
    assert r.status_code == 409, r.text
    assert item_id not in beat(b).json().get("recovery_book", {"items": {}})["items"]
    assert not security_alerts(h)


def test_breakglass_reports_the_vault_must_not_believe(h: Harness) -> None:
    a, b = two_sites(h)
    policy_and_group(h)
    item_id = protect(h, a)
    # from the item's source host (it does not serve the item's recovery store)
    a.store_url = "https://127.0.0.1:9555"
    r = beat(a, breakglass=[bg_record(item_id, "bg-aaaaaaaaaaaa")])
    assert r.status_code == 200 and r.json()["breakglass_ack"] == ["bg-aaaaaaaaaaaa"]
    assert h.ok("GET", f"/items/{item_id}")["protection"] == "protected"
    # an unknown item; an unfinished failover
    beat(b, breakglass=[bg_record("i-000000000000", "bg-bbbbbbbbbbbb")])
    beat(b, breakglass=[bg_record(item_id, "bg-cccccccccccc", state="starting")])
    assert h.ok("GET", f"/items/{item_id}")["protection"] == "protected"
    # three refused reports, and the source host's store URL: a claim without the store role
    alerts = security_alerts(h)
    assert len(alerts) == 4
    assert len([al for al in alerts if "without the site's store role" in al["message"]]) == 1
    # malformed
    r = beat(b, breakglass=[{"failover_id": "bg-dddddddddddd", "item_id": item_id}])
    assert r.status_code == 400, r.text
    # the vault failed the item over too before it was lost: two VMs may exist → alert
    with h.vault.db.tx() as s:
        item = s.get(Item, item_id)
        assert item is not None
        item.status = ItemProtection.FAILED_OVER
        item.failover_id = "f-000000000001"
    r = beat(b, breakglass=[bg_record(item_id, "bg-eeeeeeeeeeee")])
    assert r.json()["breakglass_ack"] == ["bg-eeeeeeeeeeee"]
    assert any("two recovery VMs may exist" in al["message"] for al in security_alerts(h))
    assert h.call("GET", "/failovers/bg-eeeeeeeeeeee", "admin").status_code == 404


def test_a_vault_failover_waiting_meanwhile_gives_way(h: Harness) -> None:
    """The vault was lost with an unplanned failover job whose command had not reached the
    recovery agent; break-glass ran; the returned vault records it and its own job fails
    instead of starting a second VM."""
    a, b = two_sites(h)
    policy_and_group(h)
    item_id = protect(h, a)
    h.ok("PUT", "/network-mappings", json={"source_site": "prim", "recovery_site": "sec",
                                           "source_network": "lan", "recovery_network": "dr"})
    job = h.ok("POST", f"/items/{item_id}/failover/unplanned-failover", json={})
    for _ in range(3):
        h.tick()
    with h.vault.db.read() as s:
        (sent,) = s.scalars(select(Command).where(Command.kind == "failover"))
        assert sent.status == "pending" and sent.host_id == b.host_id
    rec = bg_record(item_id)
    r = beat(b, breakglass=[rec])
    assert r.json()["breakglass_ack"] == [rec["failover_id"]]
    assert not [c for c in r.json()["commands"] if c["kind"] == "failover"]  # withdrawn
    for _ in range(3):
        h.tick()
    assert h.ok("GET", f"/jobs/{job['id']}")["state"] == "failed"
    it = h.ok("GET", f"/items/{item_id}")
    assert it["protection"] == "failed_over"
    with h.vault.db.read() as s:
        item = s.get(Item, item_id)
        assert item is not None and item.failover_id == rec["failover_id"]
    states = {f["id"]: f["state"] for f in h.ok("GET", f"/items/{item_id}/failovers")}
    assert states[rec["failover_id"]] == "pending_commit"
    assert sorted(states.values()) == ["failed", "pending_commit"]
    # recorded before the job's recovery step even started: the job stops there
    item2 = protect(h, a, "vm-2", "db1")
    job2 = h.ok("POST", f"/items/{item2}/failover/unplanned-failover", json={})
    rec2 = bg_record(item2, "bg-222222222222", vm_name="db1")
    assert beat(b, breakglass=[rec2]).json()["breakglass_ack"] == [rec2["failover_id"]]
    for _ in range(3):
        h.tick()
    done = h.ok("GET", f"/jobs/{job2['id']}")
    assert done["state"] == "failed" and "meanwhile" in done["error"]["message"], done
    with h.vault.db.read() as s:
        assert not list(s.scalars(select(Command).where(Command.kind == "failover",
                                                        Command.item_id == item2)))
        item = s.get(Item, item2)
        assert item is not None and item.failover_id == rec2["failover_id"]
        assert item.status == ItemProtection.FAILED_OVER


def test_breakglass_reports_with_impossible_facts_are_refused(h: Harness) -> None:
    """A report whose facts cannot come from a real break-glass failover: the item's recovery
    store is a cloud store (the site's store host does not hold it), a generation that is not a
    promotion (a failover writes at least 2; a negative or old one makes the old primary's
    agent take the fence for a stale one and leave its VM running). Refused (alert, audited),
    the item untouched, nothing fenced. A point id that is no point id (null, a path) or a
    field of the wrong type is malformed (400), like a missing field."""
    a, b = two_sites(h)
    policy_and_group(h)
    item_id = protect(h, a)
    for n, bad in enumerate(({"generation": 1}, {"generation": 0}, {"generation": -1}), start=1):
        fid = f"bg-00000000000{n}"
        r = beat(b, breakglass=[bg_record(item_id, fid, **bad)])
        assert r.status_code == 200, r.text
        assert r.json()["breakglass_ack"] == [fid], bad
        assert h.ok("GET", f"/items/{item_id}")["protection"] == "protected", bad
        assert h.call("GET", f"/failovers/{fid}", "admin").status_code == 404, bad
    assert len(security_alerts(h)) == 3
    for bad in ({"point_id": None}, {"point_id": "../p1"}, {"generation": "2x"},
                {"generation": 2.5}, {"requested_at": "yesterday"}, {"rto_s": [1]}):
        r = beat(b, breakglass=[bg_record(item_id, "bg-000000000007", **bad)])
        assert r.status_code == 400, (bad, r.text)
    assert h.ok("GET", f"/items/{item_id}")["protection"] == "protected"
    assert not [c for c in a.beat()["commands"] if c["kind"] == "failover_fence"]
    # a generation not above one the vault recorded for the item (an older failover,
    # cancelled at generation 3): going backwards
    with h.vault.db.tx() as s:
        s.add(Failover(id="f-000000000009", item_id=item_id, kind="unplanned",
                       state=FailoverState.CANCELLED, point_id="p000001", generation=3, result={},
                       notes=[], created_at=h.clock.now(), updated_at=h.clock.now()))
    r = beat(b, breakglass=[bg_record(item_id, "bg-0000000000aa", generation=3)])
    assert r.json()["breakglass_ack"] == ["bg-0000000000aa"]
    assert h.ok("GET", f"/items/{item_id}")["protection"] == "protected"
    assert len(security_alerts(h)) == 4
    # the item's recovery store is a cloud store: the site's store host does not hold it
    h.ok("POST", "/stores", json={"name": "offsite", "kind": "s3",
                                  "config": {"bucket": "drsite-dr",
                                             "endpoint_url": "http://127.0.0.1:1"},
                                  "secret": {"access_key": "AKIAEXAMPLE", "secret_key": "s"}})
    with h.vault.db.tx() as s:
        item = s.get(Item, item_id)
        assert item is not None
        group = s.get(Group, item.group_id)
        store = s.scalars(select(Store)).one()
        assert group is not None
        group.store_id = store.id
    r = beat(b, breakglass=[bg_record(item_id, "bg-0000000000bb", generation=4)])
    assert r.json()["breakglass_ack"] == ["bg-0000000000bb"]
    assert h.ok("GET", f"/items/{item_id}")["protection"] == "protected"
    assert len(security_alerts(h)) == 5
    assert not [c for c in a.beat()["commands"] if c["kind"] == "failover_fence"]


def test_one_vm_with_a_bad_configuration_does_not_cost_the_site_its_recovery_book(
        h: Harness) -> None:
    """The store agent takes a book whole or not at all (a malformed one is ignored and the
    old one stays). One protected VM whose host reports a configuration the failover cannot
    use (a disk without a size, a name that is no name) must not keep every other item of the
    site out of the book: a source host would otherwise deny break-glass to items it does not
    own."""
    a, b = two_sites(h)
    policy_and_group(h)
    web = protect(h, a)
    db = protect(h, a, "vm-2", "db1")
    bad = vm_info("vm-2", "db1", labels=["db"])
    bad["disks"] = [{"disk_id": "disk0", "size": None}]
    a.beat(vms=[vm_info("vm-1", "web1"), bad])
    book = check_recovery_book(beat(b).json()["recovery_book"])
    assert web in book["items"]
    # the item keeps the configuration it was protected with, if it had one; else it is left out
    assert db not in book["items"] or book["items"][db]["vm_spec"]["disks"][0]["size"] == 1 << 20
    a.beat(vms=[vm_info("vm-1", "web1"), {**vm_info("vm-2", "db 1"), "labels": ["db"]}])
    book = check_recovery_book(beat(b).json()["recovery_book"])
    assert web in book["items"]


def test_a_breakglass_beat_locks_its_items_in_id_order(tmp_path: Path, pg_url: str) -> None:
    """PostgreSQL: a beat with a break-glass report writes the reported item (and withdraws
    its commands) and, at its end, the items it reports as their host. It locks them all in
    id order before writing any, as the scheduler does: a beat that locked its break-glass
    item first and then waited for an item of lower id could dead-lock with a scheduler tick
    that holds the lower one and waits for the break-glass item."""
    h = Harness(tmp_path / "vault", pg_url)
    try:
        a, b = two_sites(h)
        policy_and_group(h)
        bg_item = protect(h, a)
        # an item host b replicates, with an id below the break-glass item's
        low = "i-000000000000"
        assert low < bg_item
        with h.vault.db.tx() as s:
            src = s.get(Item, bg_item)
            assert src is not None
            s.add(Item(id=low, host_id=b.host_id, vm_id="vm-9", vm_name="db9",
                       group_id=src.group_id, target_site_id=src.target_site_id,
                       status=ItemProtection.PROTECTED, vm_ref=f"{b.host_id}/vm-9", state="new",
                       report=None, acked_seq=0, retry=dict(src.retry), critical_error=None,
                       health_reasons=[], created_at=src.created_at, updated_at=src.updated_at))
        body: dict[str, Any] = {
            "host_name": b.name, "version": "test", "store_url": b.store_url, "vms": None,
            "items": [{"item_id": low, "report": report(low, "vm-9", "db9",
                                                         last_point_time=h.clock.now()),
                       "new_points": [point(low, 1, h.clock.now())]}],
            "breakglass": [bg_record(bg_item)]}
        out: dict[str, Any] = {}

        def send() -> None:
            out["reply"] = b.post("/heartbeat", body)

        url = pg_url.replace("+psycopg", "")
        with psycopg.connect(url) as holder:
            # another writer (a scheduler tick: id order) holds the low item
            holder.execute("SELECT id FROM items WHERE id = %s FOR UPDATE", (low,))
            t = threading.Thread(target=send)
            t.start()
            _blocked_on_a_lock(pg_url)
            # the beat waits for the low item holding no item of higher id: the holder can
            # still take the break-glass item (old order: the beat held it → this tick and
            # the beat dead-locked)
            with psycopg.connect(url) as tick:
                got = tick.execute("SELECT id FROM items WHERE id = %s FOR UPDATE NOWAIT",
                                   (bg_item,)).fetchall()
                assert got == [(bg_item,)]
                tick.rollback()
            holder.rollback()
        t.join(30)
        r = out["reply"]
        assert r.status_code == 200, r.text
        assert r.json()["breakglass_ack"] == [bg_record(bg_item)["failover_id"]]
        assert h.ok("GET", f"/items/{bg_item}")["protection"] == "failed_over"
        with h.vault.db.read() as s:
            got_low = s.get(Item, low)
            assert got_low is not None and got_low.last_point_time == h.clock.now()
    finally:
        h.close()


def test_a_failover_step_reads_the_status_a_breakglass_beat_commits(tmp_path: Path,
                                                                     pg_url: str) -> None:
    """PostgreSQL: a break-glass report commits "failed over" while a vault failover job's
    step is between reading the item and writing it. The step reads the item locked: it waits
    for that commit, sees the break-glass failover and fails ("meanwhile"), sending nothing.
    Read unlocked, it saw "protected", sent the recovery host a failover and overwrote the
    status with "failing_over" once the report committed (the item no longer said who holds it)."""
    h = Harness(tmp_path / "vault", pg_url)
    try:
        a, _b = two_sites(h)
        policy_and_group(h)
        item_id = protect(h, a)
        h.ok("PUT", "/network-mappings", json={"source_site": "prim", "recovery_site": "sec",
                                               "source_network": "lan", "recovery_network": "dr"})
        h.tick()   # this process holds the controller lease from here on
        with h.vault.db.tx() as s:
            # the VM's configuration is snapshotted already (a first step that wrote it would
            # hold the item from then on, and the race would be closed by accident)
            it = s.get(Item, item_id)
            assert it is not None
            check_ready(s, it, "unplanned", "latest", keep=True)
        job = h.ok("POST", f"/items/{item_id}/failover/unplanned-failover", json={})
        fid = bg_record(item_id)["failover_id"]
        errors: list[BaseException] = []

        def run_jobs() -> None:
            try:
                h.vault.runner.tick()
            except BaseException as exc:   # reported by the test below
                errors.append(exc)

        url = pg_url.replace("+psycopg", "")
        with psycopg.connect(url) as breakglass:
            # what the report's transaction writes (breakglass.apply_reports), not committed yet
            breakglass.execute("UPDATE items SET status = 'failed_over', failover_id = %s "
                               "WHERE id = %s", (fid, item_id))
            t = threading.Thread(target=run_jobs)
            t.start()
            _blocked_on_a_lock(pg_url)   # the job's step waits for the item
            breakglass.commit()
        t.join(30)
        assert not t.is_alive() and not errors, errors
        for _ in range(2):
            h.tick()
        done = h.ok("GET", f"/jobs/{job['id']}")
        assert done["state"] == "failed" and "meanwhile" in done["error"]["message"], done
        with h.vault.db.read() as s:
            item = s.get(Item, item_id)
            assert item is not None
            assert (item.status, item.failover_id) == (ItemProtection.FAILED_OVER, fid)
            assert not list(s.scalars(select(Command).where(Command.kind == "failover",
                                                            Command.item_id == item_id)))
    finally:
        h.close()


def _enabling_with_its_first_point(h: Harness) -> tuple[Agent, Agent, dict[str, Any],
                                                        dict[str, Any]]:
    """Two sites; an item whose EnableProtection job runs, its protect command running and its
    first point catalogued. Returns the agents, the POST /items reply and the command."""
    a, b = two_sites(h)
    policy_and_group(h)
    out = h.ok("POST", "/items", json={"vm_id": "vm-1", "group": "g1"})
    item_id = str(out["item_id"])
    h.store_beat()
    h.tick()
    (cmd,) = [c for c in a.beat(vms=[vm_info("vm-1", "web1")])["commands"]
              if c["kind"] == "protect"]
    assert a.result(cmd["command_id"], "running", progress=5).status_code == 200
    a.beat(vms=[vm_info("vm-1", "web1")],
           items=[{"item_id": item_id, "report": report(item_id, "vm-1", "web1",
                                                         last_point_time=h.clock.now()),
                   "new_points": [point(item_id, 1, h.clock.now())]}])
    return a, b, out, cmd


@pytest.mark.parametrize("then", ["finish", "cancel"])
def test_a_breakglass_failover_while_protection_is_enabled_is_kept(h: Harness, then: str) -> None:
    """The item's first point is committed, its EnableProtection job has not finished, and a
    break-glass failover of it is reported. The job must not make it "protected" again
    (cycles would be scheduled for a VM that runs on the recovery site), nor, when cancelled,
    delete the points its recovery VM came from."""
    a, b, out, cmd = _enabling_with_its_first_point(h)
    item_id = str(out["item_id"])
    rec = bg_record(item_id)
    assert beat(b, breakglass=[rec]).json()["breakglass_ack"] == [rec["failover_id"]]
    assert h.ok("GET", f"/items/{item_id}")["protection"] == "failed_over"
    if then == "finish":
        assert a.result(cmd["command_id"], "succeeded").status_code == 200
    else:
        h.ok("POST", f"/jobs/{out['job_id']}/cancel")
    for _ in range(3):
        h.tick()
    job = h.job(out["job_id"])
    assert job["state"] == ("failed" if then == "finish" else "cancelled"), job
    it = h.ok("GET", f"/items/{item_id}")
    assert it["protection"] == "failed_over", it
    with h.vault.db.read() as s:
        item = s.get(Item, item_id)
        assert item is not None and item.failover_id == rec["failover_id"]
        kinds = [c.kind for c in s.scalars(select(Command).where(Command.item_id == item_id))]
        assert "unprotect" not in kinds, kinds
    assert h.entries(f"/items/{item_id}/points")   # its points are kept


def test_a_breakglass_failover_during_a_cancel_is_not_handed_back(h: Harness) -> None:
    """A vault failover is being cancelled: the source has taken the item back ("protected")
    and the job waits for the source's first replication. Meanwhile the recovery store's host
    reports a break-glass failover of the item. The cancel job must not make it "protected"
    again on its next ask (that hid the running recovery VM, gave the old primary its store
    writes back and dropped the fence)."""
    a, b, item = setup(h)
    h.ok("POST", f"/items/{item}/failover/unplanned-failover", json={})
    play(h, b, "failover", fo_result("pending_commit"))
    job = h.ok("POST", f"/items/{item}/failover/cancel", json={})
    play(h, b, "failover_cancel", fo_result("cancelled", generation=3))
    play(h, a, "failover_resume_source", {"generation": 3, "powered_on": False, "resync": True})
    assert h.job(job["id"])["state"] == "running"
    assert h.ok("GET", f"/items/{item}")["protection"] == "protected"
    rec = bg_record(item, "bg-0a0a0a0a0a0a", generation=4)
    assert beat(b, breakglass=[rec]).json()["breakglass_ack"] == [rec["failover_id"]]
    for _ in range(3):
        h.tick()
    done = h.job(job["id"])
    assert done["state"] == "failed" and "meanwhile" in done["error"]["message"], done
    it = h.ok("GET", f"/items/{item}")
    assert it["protection"] == "failed_over", it
    with h.vault.db.read() as s:
        row = s.get(Item, item)
        assert row is not None and row.failover_id == rec["failover_id"]


def test_an_unprotect_queued_by_a_rollback_is_withdrawn_by_a_breakglass_failover(
        h: Harness) -> None:
    """EnableProtection cancelled after its first point: the rollback queued "unprotect" (with
    the points deleted) for the source host, which is down. A break-glass failover of the item
    is reported before it returns: the unprotect is withdrawn (the recovery VM came from those
    points), the rollback ends without retiring the item, and the source never receives it."""
    a, b, out, _cmd = _enabling_with_its_first_point(h)
    item_id = str(out["item_id"])
    h.ok("POST", f"/jobs/{out['job_id']}/cancel")
    h.tick()
    with h.vault.db.read() as s:
        (unprotect,) = s.scalars(select(Command).where(Command.item_id == item_id,
                                                       Command.kind == "unprotect"))
        assert unprotect.status == "pending"
        unprotect_id = unprotect.id
    assert h.job(out["job_id"])["state"] == "cancelling"
    rec = bg_record(item_id)
    assert beat(b, breakglass=[rec]).json()["breakglass_ack"] == [rec["failover_id"]]
    for _ in range(2):
        h.tick()
    job = h.job(out["job_id"])
    assert job["state"] == "cancelled", job
    assert h.ok("GET", f"/items/{item_id}")["protection"] == "failed_over"
    assert not [c for c in a.beat(vms=[vm_info("vm-1", "web1")])["commands"]
                if c["kind"] == "unprotect"]
    with h.vault.db.read() as s:
        got = s.get(Command, unprotect_id)
        assert got is not None and got.status == "failed" and got.sent_at is None
    assert h.entries(f"/items/{item_id}/points")


def test_a_breakglass_failover_of_the_reverse_item_is_not_overwritten(h: Harness) -> None:
    """Re-protect after a committed planned failover: the reverse item (recovery site → old
    primary's site) is "enabling" until its first point is catalogued. A break-glass failover
    of the reverse item reported meanwhile (by the old primary's site store) is kept: the
    re-protect job fails instead of marking the reverse item "protected"."""
    a, b, item = setup(h)
    assert h.set_store("prim", "hv1").status_code == 200   # the old primary's store role
    h.ok("POST", f"/items/{item}/failover/planned-failover", json={})
    play(h, a, "failover_prepare", {"point_id": "p000000000002", "fingerprints": {"d0": "x"}})
    play(h, b, "failover", fo_result("pending_commit", point_id="p000000000002"))
    job = h.ok("POST", f"/items/{item}/failover/commit", json={"create_reverse_mapping": True})
    play(h, b, "failover_commit", fo_result("committed", point_id="p000000000002"))
    cmd = play(h, a, "reprotect_seed", {"base_point_id": "p1", "base_bytes_local": 100,
                                        "disk_bytes": 1000})
    rev_id = cmd["args"]["rev_item_id"]
    a.beat(store_url="https://127.0.0.1:9555", vms=[vm_info("vm-1", "web1")])
    h.tick()
    h.store_beat()
    play(h, b, "protect", {"report": {"bytes_sent": 10}})
    assert h.job(job["id"])["state"] == "running"
    b.beat(store_url="https://127.0.0.1:9443", items=[{
        "item_id": rev_id, "report": report(rev_id, "rvm-1", "web1"),
        "new_points": [point(rev_id, 1, h.clock.now())]}])
    assert h.ok("GET", f"/items/{rev_id}")["protection"] == "enabling"
    rec = bg_record(rev_id, "bg-0b0b0b0b0b0b", source_site="sec", recovery_site="prim")
    a.store_url = "https://127.0.0.1:9555"
    assert beat(a, breakglass=[rec]).json()["breakglass_ack"] == [rec["failover_id"]]
    assert h.ok("GET", f"/items/{rev_id}")["protection"] == "failed_over"
    for _ in range(2):
        h.tick()
    done = h.job(job["id"])
    assert done["state"] == "failed" and rev_id in done["error"]["message"], done
    assert h.ok("GET", f"/items/{rev_id}")["protection"] == "failed_over"
