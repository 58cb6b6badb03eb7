"""The wire form of failover arguments: what the vault sends agents in failover commands
(network map rows, IP rules, VM specs) and how both sides parse it.

Shared by the vault (validating a mapping or a plan before it sends anything) and the agent
(building the library's objects from a command). Responsible for: parsing and validation
(``InvalidInput`` naming the field). Not responsible for: applying a mapping (``network``).
"""

from __future__ import annotations

from typing import Any

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
