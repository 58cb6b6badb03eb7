"""A store host whose disk is full when the vault sends a new store access list or recovery
book: the new one cannot be persisted, so it is not used (a list in force is always the one on
disk) — and the heartbeat goes on (its commands are accepted, the old list stays in force, the
digest the vault is told stays the old one, so the next heartbeat brings the new one again)."""

from __future__ import annotations

import errno
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from drsite.agent import recoverybook, storeacl
from drsite.agent.recoverybook import RecoveryBook
from drsite.agent.storeservice import StoreService
from drsite.failover.wire import recovery_book_digest
from drsite.sitestore.acl import StoreAcl, acl_digest


def _full(*_a: Any, **_k: Any) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


def entry(n: int) -> dict[str, Any]:
    return {"vm_id": f"vm-{n}", "vm_name": f"web{n}", "source_site": "prim",
            "recovery_site": "sec", "network_map": [],
            "vm_spec": {"name": f"web{n}", "vcpus": 1, "memory_mib": 512, "nics": [],
                        "disks": [{"disk_id": "d0", "size": 1 << 20}]}}


def book(ids: list[int]) -> dict[str, Any]:
    return {"format": 1, "site": "sec", "items": {f"i-{n}": entry(n) for n in ids},
            "plans": {}, "sync_journals": sorted(f"i-{n}" for n in ids)}


def acl(items: list[str]) -> dict[str, Any]:
    return {"format": 1, "store_host": "h-store",
            "hosts": {"h-src": {"fingerprint": "ab" * 32, "serial": "1"}},
            "items": {i: {"writer": "h-src", "readers": ["h-src", "h-store"]} for i in items},
            "revoked": {"hosts": [], "serials": [], "fingerprints": []}}


def test_a_book_that_cannot_be_persisted_is_not_adopted_and_does_not_raise(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    b = RecoveryBook(tmp_path / "book.json")
    recoverybook.apply_reply(b, book([1]))
    old = b.digest
    assert old == recovery_book_digest(book([1]))
    monkeypatch.setattr(recoverybook, "atomic_write_bytes", _full)
    recoverybook.apply_reply(b, book([1, 2]))          # the whole book
    assert b.digest == old and b.doc == book([1])
    assert "cannot keep the vault's recovery book" in caplog.text
    monkeypatch.undo()
    recoverybook.apply_reply(b, book([1, 2]))          # the next heartbeat brings it again
    assert b.digest == recovery_book_digest(book([1, 2]))
    assert RecoveryBook(tmp_path / "book.json").digest == b.digest   # and it is on disk


def test_an_access_list_that_cannot_be_persisted_is_not_used_and_does_not_raise(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from drsite.sitestore import acl as acl_mod

    lst = StoreAcl(tmp_path / "acl.json")
    svc = cast(StoreService, SimpleNamespace(acl=lst))
    assert storeacl.apply_reply(svc, acl(["i-1"])) is True
    old = lst.digest
    monkeypatch.setattr(acl_mod, "atomic_write_bytes", _full)
    assert storeacl.apply_reply(svc, acl(["i-1", "i-2"])) is False
    assert lst.digest == old and lst.state is not None and set(lst.state.items) == {"i-1"}
    assert "cannot keep the vault's store access list" in caplog.text
    monkeypatch.undo()
    assert storeacl.apply_reply(svc, acl(["i-1", "i-2"])) is True
    assert lst.digest == acl_digest(acl(["i-1", "i-2"]))
    assert StoreAcl(tmp_path / "acl.json").digest == lst.digest
