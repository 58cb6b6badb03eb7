"""Which VMs belong to which protection group, and which group protects a new VM.

A group matches a VM of its own site when the VM's name is in ``match.vm_names``, or its host's
name is in ``match.hosts``, or one of its labels is in ``match.labels`` (labels come from the
agent's inventory, key ``labels``). A group with an empty match has no automatic members: VMs
join it only through ``POST /items``. When several groups match a VM, the oldest group wins.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from drsite.core.states import FAILOVER_ITEM_STATUSES, LIVE_ITEM_STATUSES
from drsite.vault.db.models import Group, Host, Item, Vm


def normalise_match(match: dict[str, Any] | None) -> dict[str, list[str]]:
    m = match or {}
    return {k: sorted({str(v) for v in (m.get(k) or [])}) for k in ("vm_names", "hosts", "labels")}


def vm_matches(group: Group, vm: Vm, host: Host) -> bool:
    if host.site_id != group.site_id:
        return False
    m = normalise_match(group.match)
    labels = vm.info.get("labels") or []
    labels = [str(x) for x in labels] if isinstance(labels, list) else []
    return (vm.name in m["vm_names"] or host.name in m["hosts"]
            or any(label in m["labels"] for label in labels))


def group_for_vm(groups: Sequence[Group], vm: Vm, host: Host) -> Group | None:
    """The oldest group with a policy that matches ``vm``, or None."""
    for g in sorted(groups, key=lambda g: g.id):
        if g.policy_id is not None and vm_matches(g, vm, host):
            return g
    return None


def vm_ref(host_id: str, vm_id: str) -> str:
    return f"{host_id}/{vm_id}"


def active_item_for_vm(s: Session, host_id: str, vm_id: str) -> Item | None:
    return s.scalars(select(Item).where(Item.vm_ref == vm_ref(host_id, vm_id))).first()


def items_by_vm(s: Session) -> dict[str, Item]:
    """Items that still stand for their VM — protected or in a failover — by VM name (newest
    wins: a re-protected VM's reverse item). Recovery plans find their items through this."""
    out: dict[str, Item] = {}
    statuses = LIVE_ITEM_STATUSES | FAILOVER_ITEM_STATUSES
    for it in s.scalars(select(Item).where(Item.status.in_(statuses))
                        .order_by(Item.created_at)):
        out[it.vm_name] = it
    return out
