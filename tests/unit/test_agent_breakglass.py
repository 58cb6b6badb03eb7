"""The agent's break-glass bookkeeping (issue 14 part 4): the recovery book file, the report
queue until the vault acknowledges, and a vault failover command refused while a break-glass
failover the vault has not recorded holds the item (it would start a second VM)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from drsite.agent import breakglass
from drsite.agent.failover import FailoverCommands, FailoverHost
from drsite.agent.link import Command
from drsite.agent.recoverybook import RecoveryBook, apply_reply
from drsite.core.errors import Conflict, InvalidInput, NotFound
from drsite.failover.wire import BOOK_FORMAT, BREAKGLASS_MAX_REPORTS
from drsite.fsutil import atomic_write_json

ITEM = "i-0123456789ab"


def book_doc() -> dict[str, Any]:
    return {"format": BOOK_FORMAT, "site": "sec", "plans": {},
            "items": {ITEM: {"vm_id": "vm-1", "vm_name": "web1", "source_site": "prim",
                             "recovery_site": "sec", "network_map": [],
                             "vm_spec": {"name": "web1", "vcpus": 1, "memory_mib": 512,
                                         "nics": [], "disks": [{"disk_id": "d0",
                                                                "size": 1 << 20}]}}}}


def test_recovery_book_is_kept_0600_and_a_bad_one_ignored(tmp_path: Path) -> None:
    book = RecoveryBook(tmp_path / "recovery-book.json")
    assert book.doc is None and book.digest is None
    with pytest.raises(NotFound, match="not in this host's recovery book"):
        book.entry(ITEM)
    assert book.update(book_doc()) and not book.update(book_doc())
    assert (tmp_path / "recovery-book.json").stat().st_mode & 0o777 == 0o600
    again = RecoveryBook(tmp_path / "recovery-book.json")   # a restarted agent
    assert again.digest == book.digest and again.entry(ITEM)["vm_name"] == "web1"
    with pytest.raises(InvalidInput):
        book.update({"format": BOOK_FORMAT, "items": {ITEM: {"vm_id": 1}}, "plans": {}})
    apply_reply(book, {"format": 99})                          # logged, ignored
    assert book.entry(ITEM)["vm_id"] == "vm-1"


def _bg(tmp_path: Path, fid: str, state: str | None) -> None:
    atomic_write_json(tmp_path / "breakglass" / f"{ITEM}.json",
                      {"failover_id": fid, "item_id": ITEM, "point": "latest",
                       "reported": False,
                       "record": {"failover_id": fid, "item_id": ITEM, "state": state}
                       if state else None})
    if state:
        (tmp_path / "failover" / "failovers").mkdir(parents=True, exist_ok=True)
        atomic_write_json(tmp_path / "failover" / "failovers" / f"{fid}.json",
                          {"failover_id": fid, "item_id": ITEM, "state": state,
                           "kind": "unplanned", "requested_at": 0.0, "steps": ["promoted"]})


def test_reports_until_acknowledged(tmp_path: Path) -> None:
    (tmp_path / "breakglass").mkdir()
    assert breakglass.pending_reports(tmp_path) == []
    _bg(tmp_path, "bg-000000000001", None)                     # not finished: not reported
    assert breakglass.pending_reports(tmp_path) == []
    _bg(tmp_path, "bg-000000000001", "pending_commit")
    assert [r["failover_id"] for r in breakglass.pending_reports(tmp_path)] == ["bg-000000000001"]
    breakglass.mark_reported(tmp_path, ["bg-someoneelse"])
    assert breakglass.pending_reports(tmp_path)
    breakglass.mark_reported(tmp_path, ["bg-000000000001"])
    assert breakglass.pending_reports(tmp_path) == []


def test_vault_failover_refused_while_breakglass_holds_the_item(tmp_path: Path) -> None:
    (tmp_path / "breakglass").mkdir()
    _bg(tmp_path, "bg-000000000001", "pending_commit")
    host = cast(FailoverHost, SimpleNamespace(data_dir=tmp_path))
    cmds = FailoverCommands(host)
    cmd = Command("c1", "failover", ITEM, {"kind": "unplanned", "failover_id": "f-1"})
    with pytest.raises(Conflict, match="break-glass failover bg-000000000001"):
        cmds.handle(cmd)
    # cancelled (through the vault, once it recorded it): the item may fail over again
    atomic_write_json(tmp_path / "failover" / "failovers" / "bg-000000000001.json",
                      {"failover_id": "bg-000000000001", "item_id": ITEM, "state": "cancelled",
                       "kind": "unplanned", "requested_at": 0.0, "steps": ["promoted"]})
    assert breakglass.active_failover(tmp_path, ITEM) is None


def test_reports_go_at_most_a_heartbeats_worth_at_a_time(tmp_path: Path) -> None:
    """A plan failed over by break-glass on a large site: more finished failovers than one
    heartbeat may carry (the vault refuses the whole heartbeat beyond that: 422, every beat,
    so the agent would never reach the vault again). They go in batches, oldest items first,
    each until acknowledged."""
    folder = tmp_path / "breakglass"
    folder.mkdir()
    n = BREAKGLASS_MAX_REPORTS + 5
    for i in range(n):
        item, fid = f"i-{i:012d}", f"bg-{i:012d}"
        atomic_write_json(folder / f"{item}.json",
                          {"failover_id": fid, "item_id": item, "point": "latest",
                           "reported": False, "record": {"failover_id": fid, "item_id": item,
                                                         "state": "pending_commit"}})
    first = breakglass.pending_reports(tmp_path)
    assert len(first) == BREAKGLASS_MAX_REPORTS
    breakglass.mark_reported(tmp_path, [r["failover_id"] for r in first])
    rest = breakglass.pending_reports(tmp_path)
    assert [r["failover_id"] for r in rest] == [f"bg-{i:012d}" for i in range(
        BREAKGLASS_MAX_REPORTS, n)]
