"""The recovery book the vault hands every store-serving agent beforehand, for break-glass
failover when no vault answers (``drsite agent failover``; issue 14 part 4).

For the store host of a site (the holder of its store role, ``storerole``): every item that
replicates to that site's agent store and is protected (or was in the middle of a failover),
with what an unplanned failover needs of the vault — the VM's configuration as last reported,
the source and recovery sites' names, the network map between them — and every recovery plan,
its groups narrowed to those items. The point keys are not in it: they are in the store's access
list already (``storeacl``). ``sync_journals`` lists the items whose sync journals the store
host keeps (those a failover may still replay); it deletes the others.

It goes in the heartbeat reply when the agent's ``recovery_book_digest`` differs (so an
unchanged book costs nothing but the digest), and the agent keeps it in a 0600 file.

Responsible for: building the book. Not responsible for: using it (the agent's
``breakglass``), or what the vault does with a break-glass report (``vault/breakglass.py``).
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from drsite.core.errors import InvalidInput
from drsite.core.states import LIVE_ITEM_STATUSES, ItemProtection
from drsite.failover.wire import BOOK_FORMAT, recovery_book_digest, vm_spec_from_dict
from drsite.vault.db.models import Host, Item, NetworkMapping, RecoveryPlan, Site, Vm
from drsite.vault.storeacl import serves_store, site_store_items

log = logging.getLogger(__name__)

# what break-glass may fail over: protected items, and those a failover was running on when
# the vault was lost (the agent resumes or finishes it)
BOOK_STATUSES = frozenset({ItemProtection.PROTECTED, ItemProtection.FAILING_OVER})
# whose sync journals the store host keeps: a failover may still replay them (the others'
# are deleted there: unprotected, committed, re-protected; see the agent's storeservice)
JOURNAL_STATUSES = LIVE_ITEM_STATUSES | {ItemProtection.FAILING_OVER, ItemProtection.FAILED_OVER}


def _vm_spec(vm: Vm | None, item: Item) -> dict[str, Any] | None:
    """The VM's configuration as its host last reported it, else as kept in the item (the VM
    is gone, or what its host reports is no usable configuration); None without either. The
    agent takes a book whole or not at all: one VM's bad inventory must not cost the site's
    other items their entries."""
    kept = dict(item.vm_spec) if item.vm_spec else None
    candidates: list[dict[str, Any] | None] = [kept]
    if vm is not None:
        info = vm.info or {}
        candidates.insert(0, {
            "name": vm.name, "vcpus": info.get("vcpus") or 1,
            "memory_mib": info.get("memory_mib") or 512,
            "nics": [{"network": n.get("network"), "mac": n.get("mac"), "ip": n.get("ip")}
                     for n in info.get("nics") or [] if isinstance(n, dict)],
            "disks": [{"disk_id": d.get("disk_id"), "size": d.get("size")}
                      for d in info.get("disks") or [] if isinstance(d, dict)]})
    for spec in candidates:
        if spec is None:
            continue
        try:
            vm_spec_from_dict(spec)
        except InvalidInput as e:
            # built at every heartbeat: debug, not a warning per beat
            log.debug("item %s: VM configuration left out of the recovery book: %s", item.id, e)
            continue
        return spec
    return None


def book(s: Session, host: Host) -> dict[str, Any]:
    """The recovery book of the store ``host`` serves (format: ``failover.wire``). A fixed
    number of queries, whatever the number of items (it is built at every heartbeat)."""
    sites = {st.id: st.name for st in s.scalars(select(Site))}
    every = site_store_items(s, host.site_id)
    todo = [it for it in every if it.status in BOOK_STATUSES]
    src_ids = sorted({it.host_id for it in todo})
    hosts = {h.id: h for h in s.scalars(select(Host).where(Host.id.in_(src_ids)))} if todo else {}
    vms = {(v.host_id, v.vm_id): v for v in s.scalars(
        select(Vm).where(Vm.host_id.in_(src_ids)))} if todo else {}
    maps: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for m in s.scalars(select(NetworkMapping).where(
            NetworkMapping.recovery_site_id == host.site_id)
            .order_by(NetworkMapping.source_network)):
        maps.setdefault((m.source_site_id, m.recovery_site_id), []).append(
            {"source": m.source_network, "recovery": m.recovery_network,
             "test": m.test_network, "ip_rule": dict(m.ip_rule)})
    items: dict[str, Any] = {}
    for it in todo:
        src = hosts.get(it.host_id)
        spec = _vm_spec(vms.get((it.host_id, it.vm_id)), it)
        if src is None or spec is None:
            continue  # nothing to recover from without its configuration
        items[it.id] = {"vm_id": it.vm_id, "vm_name": it.vm_name, "vm_spec": spec,
                        "source_site": sites.get(src.site_id, str(src.site_id)),
                        "recovery_site": sites.get(it.target_site_id, str(it.target_site_id)),
                        "network_map": maps.get((src.site_id, it.target_site_id), [])}
    by_name = {entry["vm_name"]: item_id for item_id, entry in items.items()}
    plans: dict[str, Any] = {}
    for p in s.scalars(select(RecoveryPlan).order_by(RecoveryPlan.name)):
        groups, actions = [], []
        for g in p.spec.get("groups", []):
            ids = [by_name[v] for v in g.get("vms", []) if v in by_name]
            if ids:
                groups.append({"name": g.get("name"), "items": ids})
            actions += [f"{g.get('name')}: {kind} action" for kind in ("pre", "post")
                        for _ in g.get(kind) or []]
        if groups:
            plans[p.name] = {"groups": groups, "actions": actions}
    return {"format": BOOK_FORMAT, "site": sites.get(host.site_id, str(host.site_id)),
            "items": items, "plans": plans,
            "sync_journals": sorted(it.id for it in every if it.status in JOURNAL_STATUSES)}


def reply_fields(s: Session, host: Host, agent_digest: str | None) -> dict[str, Any]:
    """``{"recovery_book": book}`` for a store-serving host whose book differs, else nothing."""
    if not serves_store(s, host):
        return {}   # a store_url without the site's store role is only a claim (storerole)
    doc = book(s, host)
    if agent_digest is not None and agent_digest == recovery_book_digest(doc):
        return {}
    return {"recovery_book": doc}
