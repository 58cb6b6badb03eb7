"""The wire form of failover arguments: what the vault sends agents in failover commands
(network map rows, IP rules, VM specs) and how both sides parse it.

Shared by the vault (validating a mapping or a plan before it sends anything) and the agent
(building the library's objects from a command). Responsible for: parsing and validation
(``InvalidInput`` naming the field). Not responsible for: applying a mapping (``network``).
"""

from __future__ import annotations

from typing import Any

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
        validate_name("item", str(item_id))
        if not isinstance(entry, dict):
            raise InvalidInput(f"recovery book: item {item_id} is not an object")
        for key in ("vm_id", "vm_name", "source_site", "recovery_site"):
            if not isinstance(entry.get(key), str):
                raise InvalidInput(f"recovery book: item {item_id} lacks {key!r}")
        vm_spec_from_dict(dict(entry.get("vm_spec") or {}))
        network_map_from_args(entry.get("network_map"))
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
