"""Network mappings: source network → recovery network (and test network) per pair of sites,
with the IP rule applied at failover. Validated here with the same parser agents use
(:mod:`drsite.failover.wire`), so a bad rule is refused when it is set, not at failover."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from drsite.core.errors import InvalidInput, NotFound
from drsite.core.model import validate_name
from drsite.failover.wire import ip_rule_from_dict
from drsite.vault.audit import record_event
from drsite.vault.db.models import NetworkMapping, Site


def _site(s: Session, name: str) -> Site:
    site = s.scalars(select(Site).where(Site.name == validate_name("site", name))).first()
    if site is None:
        raise NotFound(f"no site {name!r}", hint="List sites with GET /api/v1/sites.")
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
