"""Recovery book patches (``failover.wire.book_patch`` / ``apply_book_patch``): what changed
between the book an agent holds and the vault's, applied only to that book, and adopted only if
the result is the vault's book digest for digest."""

from __future__ import annotations

import copy
import random
from typing import Any

import pytest

from drsite.core.errors import InvalidInput
from drsite.failover.wire import apply_book_patch, book_patch, recovery_book_digest


def entry(n: int, size: int = 1 << 20) -> dict[str, Any]:
    return {"vm_id": f"vm-{n}", "vm_name": f"web{n}", "source_site": "prim",
            "recovery_site": "sec", "network_map": [],
            "vm_spec": {"name": f"web{n}", "vcpus": 1, "memory_mib": 512, "nics": [],
                        "disks": [{"disk_id": "d0", "size": size}]}}


def book(ids: list[int], plans: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"format": 1, "site": "sec", "items": {f"i-{n}": entry(n) for n in ids},
            "plans": plans or {}, "sync_journals": sorted(f"i-{n}" for n in ids)}


def roundtrip(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    patch = book_patch(old, new, recovery_book_digest(old), recovery_book_digest(new))
    before = copy.deepcopy(old)
    out = apply_book_patch(old, patch)
    assert old == before   # the held book is not changed in place
    assert out == new and recovery_book_digest(out) == recovery_book_digest(new)
    return patch


def test_an_item_added_travels_alone() -> None:
    old = book(list(range(1000)))
    new = book(list(range(1001)))
    patch = roundtrip(old, new)
    assert set(patch["objects"]["items"]["put"]) == {"i-1000"}
    assert patch["names"]["sync_journals"] == {"add": ["i-1000"], "drop": []}
    assert patch["put"] == {} and len(str(patch)) < 1000 < len(str(new)) // 100


def test_random_changes_roundtrip() -> None:
    rng = random.Random(7)
    old = book(list(range(50)), {"shop": {"groups": [{"name": "g", "items": ["i-1"]}],
                                          "actions": []}})
    for _ in range(200):
        new = copy.deepcopy(old)
        for _ in range(rng.randint(0, 4)):
            n = rng.randint(0, 80)
            what = rng.random()
            if what < 0.4:
                new["items"][f"i-{n}"] = entry(n, size=rng.choice([1, 2, 4]) << 20)
            elif what < 0.7:
                new["items"].pop(f"i-{n}", None)
            elif what < 0.85:
                new["plans"][f"p{n}"] = {"groups": [{"name": "g", "items": [f"i-{n}"]}],
                                         "actions": []}
            else:
                new["site"] = rng.choice(["sec", "dr"])
        new["sync_journals"] = sorted(new["items"])
        roundtrip(old, new)
        old = new


def test_a_patch_that_does_not_make_the_vaults_book_is_refused() -> None:
    old = book([1, 2])
    new = book([1, 2, 3])
    patch = book_patch(old, new, recovery_book_digest(old), recovery_book_digest(new))
    with pytest.raises(InvalidInput, match="digest"):
        apply_book_patch(book([1]), patch)                    # applied to another book
    bad = copy.deepcopy(patch)
    bad["objects"]["items"]["put"]["i-3"]["vm_id"] = 7       # malformed entry
    with pytest.raises(InvalidInput, match="i-3"):
        apply_book_patch(old, bad)
    with pytest.raises(InvalidInput, match="malformed"):
        apply_book_patch(old, {"base": "x"})
    bad = copy.deepcopy(patch)
    bad["objects"]["items"]["put"]["../x"] = entry(9)         # a name that is not one
    with pytest.raises(InvalidInput):
        apply_book_patch(old, bad)
