"""Network mappings: source network → recovery network (and test network) per pair of sites,
with the IP rule applied at failover. Validated here with the same parser agents use
(:mod:`drsite.failover.wire`), so a bad rule is refused when it is set, not at failover.

Re-protect needs the way back: for every network of the VM, a mapping from the recovery site to
the source site of the network the VM runs on after failover (:func:`ensure_reverse_mappings`
checks it, or creates it by inverting the forward mapping when asked), so that a failback is
never refused half-way for a mapping nobody asked for."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from drsite.core.errors import Conflict, InvalidInput, NotFound
from drsite.core.model import validate_name
from drsite.failover.wire import ip_rule_from_dict
from drsite.vault.audit import record_event
from drsite.vault.db.models import Host, Item, NetworkMapping, Site, Vm


def _site(s: Session, name: str) -> Site:
    site = s.scalars(select(Site).where(Site.name == validate_name("site", name))).first()
    if site is None:
        raise NotFound(f"no site {name!r}", hint="List sites with 'drsite sites list'.")
    return site


def _check_rule(rule: dict[str, Any]) -> dict[str, Any]:
    ip_rule_from_dict(rule)  # InvalidInput on a bad rule
    return dict(rule)


def set_network_mapping(s: Session, *, source_site: str, recovery_site: str, source_network: str,
                        recovery_network: str, test_network: str | None,
                        ip_rule: dict[str, Any] | None, now: float) -> NetworkMapping:
    """Create or replace the mapping of ``source_network`` from one site to another."""
    src, dst = _site(s, source_site), _site(s, recovery_site)
    if src.id == dst.id:
        raise InvalidInput("a network mapping goes from one site to another")
    for n in (source_network, recovery_network, test_network):
        if n is not None:
            validate_name("network", n)
    rule = _check_rule(ip_rule or {"kind": "keep"})
    row = s.scalars(select(NetworkMapping).where(
        NetworkMapping.source_site_id == src.id, NetworkMapping.recovery_site_id == dst.id,
        NetworkMapping.source_network == source_network)).first()
    if row is None:
        row = NetworkMapping(source_site_id=src.id, recovery_site_id=dst.id,
                             source_network=source_network, recovery_network=recovery_network,
                             test_network=test_network, ip_rule=rule, created_at=now)
        s.add(row)
    else:
        row.recovery_network, row.test_network, row.ip_rule = recovery_network, test_network, rule
    s.flush()
    record_event(s, now, "network", f"{source_site}/{source_network}",
                 f"mapped to {recovery_site}/{recovery_network} (test: {test_network})")
    return row


def network_mapping_view(s: Session, row: NetworkMapping) -> dict[str, Any]:
    names = {x.id: x.name for x in s.scalars(select(Site))}
    return {"id": row.id, "source_site": names.get(row.source_site_id),
            "recovery_site": names.get(row.recovery_site_id), "source_network": row.source_network,
            "recovery_network": row.recovery_network, "test_network": row.test_network,
            "ip_rule": row.ip_rule}


def _mapping(s: Session, src: int, dst: int, network: str) -> NetworkMapping | None:
    return s.scalars(select(NetworkMapping).where(
        NetworkMapping.source_site_id == src, NetworkMapping.recovery_site_id == dst,
        NetworkMapping.source_network == network)).first()


def _nic_networks(s: Session, item: Item) -> list[str]:
    """The network of each NIC of the item's VM: the inventory's last report, else the spec the
    vault kept for failover."""
    vm = s.scalars(select(Vm).where(Vm.host_id == item.host_id, Vm.vm_id == item.vm_id)).first()
    nics = (vm.info or {}).get("nics") if vm is not None and vm.info else None
    if not nics:
        nics = (item.vm_spec or {}).get("nics") or []
    return [str(n["network"]) for n in nics if n.get("network")]


def inverted_rule(s: Session, rule: dict[str, Any], *, site_id: int, network: str
                  ) -> dict[str, Any]:
    """The IP rule that undoes ``rule`` (addresses go back to what they were): keep stays
    keep, a subnet rule swaps its subnets, fixed addresses become each VM's address on
    ``network`` before failover (inventory of the site ``site_id``; VMs not found keep theirs)."""
    kind = rule.get("kind", "keep")
    if kind == "subnet":
        out = {"kind": "subnet", "source": rule["target"], "target": rule["source"]}
        if rule.get("allow_resize"):
            out["allow_resize"] = True
        return out
    if kind == "fixed":
        names = sorted(dict(rule.get("addresses") or {}))
        back: dict[str, str] = {}
        for vm in s.scalars(select(Vm).join(Host, Host.id == Vm.host_id)
                            .where(Host.site_id == site_id, Vm.name.in_(names))):
            for nic in (vm.info or {}).get("nics") or []:
                if nic.get("network") == network and nic.get("ip"):
                    back[vm.name] = str(nic["ip"])
        return {"kind": "fixed", "addresses": back} if back else {"kind": "keep"}
    return {"kind": "keep"}


def ensure_reverse_mappings(s: Session, item: Item, *, create: bool, now: float) -> list[str]:
    """Re-protect's prerequisite: every network of ``item``'s VM has a mapping back (recovery
    site → source site, from the network it was mapped to). With ``create``, missing ones are
    made by inverting the forward mappings (same test network); else ``Conflict`` naming them
    and the commands that map them. Returns the networks whose reverse mapping was created."""
    host = s.get(Host, item.host_id)
    if host is None:
        return []
    src, dst = host.site_id, item.target_site_id
    names = {x.id: x.name for x in s.scalars(select(Site))}
    missing: list[NetworkMapping] = []
    for network in _nic_networks(s, item):
        fwd = _mapping(s, src, dst, network)
        if fwd is None or _mapping(s, dst, src, fwd.recovery_network) is not None:
            continue
        if all(m.id != fwd.id for m in missing):
            missing.append(fwd)
    if not missing:
        return []
    if not create:
        cmds = "; ".join(
            f"drsite network map --from-site {names[dst]} --to-site {names[src]} --network "
            f"{m.recovery_network} --recovery-network {m.source_network}" for m in missing)
        raise Conflict(
            f"re-protect of {item.vm_name} needs a network mapping back from site {names[dst]} "
            f"to site {names[src]} for network(s) "
            f"{', '.join(m.recovery_network for m in missing)}, which the failback will use",
            hint=f"Map them ({cmds}), or let re-protect invert the forward mappings: add "
                 "--create-reverse-mapping to 'drsite failover commit' or 'drsite failover "
                 "reprotect'.")
    made: list[str] = []
    for fwd in missing:
        set_network_mapping(s, source_site=names[dst], recovery_site=names[src],
                            source_network=fwd.recovery_network,
                            recovery_network=fwd.source_network, test_network=fwd.test_network,
                            ip_rule=inverted_rule(s, dict(fwd.ip_rule), site_id=src,
                                                  network=fwd.source_network), now=now)
        made.append(fwd.recovery_network)
    return made
