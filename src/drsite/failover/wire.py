"""The wire form of failover arguments: what the vault sends agents in failover commands
(network map rows, IP rules, VM specs) and how both sides parse it.

Shared by the vault (validating a mapping or a plan before it sends anything) and the agent
(building the library's objects from a command). Responsible for: parsing and validation
(``InvalidInput`` naming the field). Not responsible for: applying a mapping (``network``).
"""

from __future__ import annotations

from typing import Any, TypeGuard

from blake3 import blake3

from drsite.core.errors import InvalidInput
from drsite.core.model import DiskSpec, Nic, VmSpec, validate_name
from drsite.failover.network import (
    FixedAddress,
    IpRule,
    KeepAddress,
    NetworkMap,
    NetworkMapping,
    SubnetRule,
)
from drsite.store.format import canonical_json


def ip_rule_from_dict(d: dict[str, Any] | None) -> IpRule:
    """``{"kind": "keep"}`` | ``{"kind": "subnet", "source", "target"}`` |
    ``{"kind": "fixed", "addresses": {vm: ip}}`` → the library's rule (``InvalidInput``)."""
    d = d or {"kind": "keep"}
    kind = d.get("kind", "keep")
    if kind == "keep":
        return KeepAddress()
    if kind == "subnet":
        return SubnetRule(str(d.get("source")), str(d.get("target")),
                          bool(d.get("allow_resize", False)))
    if kind == "fixed":
        addrs = d.get("addresses")
        if not isinstance(addrs, dict):
            raise InvalidInput("a fixed IP rule needs 'addresses': {vm name: address}")
        return FixedAddress({str(k): str(v) for k, v in addrs.items()})
    raise InvalidInput(f"unknown IP rule kind {kind!r}; known: keep, subnet, fixed")


def network_map_from_args(rows: list[dict[str, Any]] | None) -> NetworkMap:
    return NetworkMap(tuple(
        NetworkMapping(str(r["source"]), str(r["recovery"]),
                       str(r["test"]) if r.get("test") else None, ip_rule_from_dict(r.get("ip_rule")))
        for r in rows or []))


def vm_spec_from_dict(d: dict[str, Any]) -> VmSpec:
    try:
        return VmSpec(name=validate_name("VM", str(d["name"])), vcpus=int(d.get("vcpus") or 1),
                      memory_mib=int(d.get("memory_mib") or 512),
                      nics=tuple(Nic(str(n["network"]), n.get("mac"), n.get("ip"))
                                 for n in d.get("nics") or []),
                      disks=tuple(DiskSpec(str(x["disk_id"]), int(x["size"]))
                                  for x in d.get("disks") or []))
    except (KeyError, TypeError, ValueError) as e:
        raise InvalidInput(f"invalid VM spec in the command: {e}") from None


# ------------------------------------------------------------------------ the recovery book

BOOK_FORMAT = 1
# break-glass failovers one heartbeat reports at most (the vault refuses a heartbeat with more)
BREAKGLASS_MAX_REPORTS = 100


def recovery_book_digest(doc: dict[str, Any]) -> str:
    """The digest of a recovery book (``docs/control-plane.md``, "Break-glass failover"): what
    a store-serving agent sends back so the vault re-sends the book only when it changed."""
    return str(blake3(canonical_json(doc)).hexdigest())


def _check_book_item(item_id: Any, entry: Any) -> None:
    validate_name("item", str(item_id))
    if not isinstance(entry, dict):
        raise InvalidInput(f"recovery book: item {item_id} is not an object")
    for key in ("vm_id", "vm_name", "source_site", "recovery_site"):
        if not isinstance(entry.get(key), str):
            raise InvalidInput(f"recovery book: item {item_id} lacks {key!r}")
    vm_spec_from_dict(dict(entry.get("vm_spec") or {}))
    network_map_from_args(entry.get("network_map"))


def check_recovery_book(doc: Any) -> dict[str, Any]:
    """Validate a recovery book's shape (``InvalidInput`` naming what is wrong):
    ``{"format": 1, "site", "items": {ITEM: {"vm_id", "vm_name", "vm_spec", "source_site",
    "recovery_site", "network_map"}}, "plans": {NAME: {"groups": [{"name", "items": [ITEM]}],
    "actions": [str]}}, "sync_journals": [ITEM]}`` (the last optional: from vaults that
    delete sync journals)."""
    if not isinstance(doc, dict) or doc.get("format") != BOOK_FORMAT:
        raise InvalidInput("recovery book: not an object of format 1")
    items, plans = doc.get("items"), doc.get("plans")
    if not isinstance(items, dict) or not isinstance(plans, dict):
        raise InvalidInput("recovery book: 'items' and 'plans' must be objects")
    for item_id, entry in items.items():
        _check_book_item(item_id, entry)
    journals = doc.get("sync_journals")
    if journals is not None and not (isinstance(journals, list)
                                     and all(isinstance(i, str) for i in journals)):
        raise InvalidInput("recovery book: 'sync_journals' must be a list of item ids")
    for name, plan in plans.items():
        groups = plan.get("groups") if isinstance(plan, dict) else None
        if not isinstance(groups, list) or not all(
                isinstance(g, dict) and isinstance(g.get("items"), list) for g in groups):
            raise InvalidInput(f"recovery book: plan {name} has no list of groups of items")
    return doc


# A book patch: what changed between the book an agent holds (``base``, its digest) and the
# vault's (``digest``), so a store host of thousands of items is not sent the whole book (MBs)
# each time one item changes. Per top-level key: objects (items, plans) by their keys, sorted
# lists of names (sync_journals) by their members, anything else whole. An agent applies a
# patch only to the book whose digest is ``base`` and adopts the result only if its digest is
# ``digest``; otherwise it asks for the whole book (it sends no digest).

def _is_name_set(v: Any) -> TypeGuard[list[str]]:
    return isinstance(v, list) and all(isinstance(x, str) for x in v) and v == sorted(set(v))


def book_patch(old: dict[str, Any], new: dict[str, Any], base: str, digest: str
               ) -> dict[str, Any]:
    """The patch that turns ``old`` (digest ``base``) into ``new`` (digest ``digest``)."""
    put: dict[str, Any] = {}
    objects: dict[str, dict[str, Any]] = {}
    names: dict[str, dict[str, list[str]]] = {}
    for key, value in new.items():
        before = old.get(key)
        if key in old and before == value:
            continue
        if isinstance(value, dict) and isinstance(before, dict):
            objects[key] = {"put": {k: v for k, v in value.items()
                                    if k not in before or before[k] != v},
                            "drop": sorted(k for k in before if k not in value)}
        elif _is_name_set(value) and _is_name_set(before):
            was, now = set(before), set(value)
            names[key] = {"add": sorted(now - was), "drop": sorted(was - now)}
        else:
            put[key] = value
    return {"base": base, "digest": digest, "put": put, "objects": objects, "names": names,
            "drop": sorted(k for k in old if k not in new)}


def apply_book_patch(doc: dict[str, Any], patch: Any) -> dict[str, Any]:
    """``doc`` with ``patch`` applied and checked (``InvalidInput`` if the patch is malformed,
    or the result's digest is not the patch's ``digest``); ``doc`` itself is not changed.
    Only what the patch brings is validated: ``doc`` was, when it was adopted."""
    try:
        put = dict(patch["put"])
        objects = {str(k): (dict(v["put"]), [str(x) for x in v["drop"]])
                   for k, v in dict(patch["objects"]).items()}
        names = {str(k): ([str(x) for x in v["add"]], {str(x) for x in v["drop"]})
                 for k, v in dict(patch["names"]).items()}
        dropped = [str(k) for k in patch["drop"]]
        digest = str(patch["digest"])
    except (KeyError, TypeError, ValueError) as e:
        raise InvalidInput(f"recovery book patch: malformed ({type(e).__name__}: {e})") from None
    out = {k: v for k, v in doc.items() if k not in dropped}
    out.update(put)
    for key, (changed, gone) in objects.items():
        cur = out.get(key)
        if not isinstance(cur, dict):
            raise InvalidInput(f"recovery book patch: {key!r} is not an object in the book")
        merged = {k: v for k, v in cur.items() if k not in gone}
        merged.update(changed)
        out[key] = merged
    for key, (add, removed) in names.items():
        cur = out.get(key)
        if not _is_name_set(cur):
            raise InvalidInput(f"recovery book patch: {key!r} is not a list of names in the book")
        out[key] = sorted((set(cur) - removed) | set(add))
    # what the patch brought (the rest was checked when the book was adopted)
    if out.get("format") != BOOK_FORMAT or not isinstance(out.get("items"), dict) \
            or not isinstance(out.get("plans"), dict):
        raise InvalidInput("recovery book patch: the result is not a book of format 1")
    brought = out["items"] if "items" in put else objects.get("items", ({}, []))[0]
    for item_id, entry in brought.items():
        _check_book_item(item_id, entry)
    if "plans" in put or "plans" in objects or "sync_journals" in put:
        check_recovery_book({**out, "items": {}})
    if recovery_book_digest(out) != digest:
        raise InvalidInput("recovery book patch: the result's digest is not the vault's")
    return out
