"""Cloud recovery stores in the vault: rows ↔ :class:`~drsite.store.factory.StoreSpec`, the
per-store AES keys (generated here, rotated here), the views the API returns (never a
credential, never a key) and the spec that commands carry to agents.

Where secrets live: the ``stores`` row (``secret``: credentials; ``keys``:
``{"active": KEY_ID, "keys": {KEY_ID: base64}, "created": {KEY_ID: t}}``) and the arguments of
commands that open an item's store (``protect``; the failover commands), which reach agents only
over mTLS. Nothing here logs, records in events or returns a secret.

Also for the failover code: :func:`item_store_spec` is the ``store`` argument of any command
that must open an item's repository (``None`` = the target site's agent store).
"""

from __future__ import annotations

import base64
import secrets
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from drsite.core.errors import InvalidInput, NotFound
from drsite.core.model import validate_name
from drsite.core.states import ItemProtection
from drsite.store.factory import StoreSpec
from drsite.vault import commands, storeacl
from drsite.vault.db.models import Group, Item, Policy, Site, Store
from drsite.vault.policies import agent_settings

CLOUD_STORE_URL = "cloud:"
"""``store_url`` of items replicating to a cloud store: ``cloud:<store name>``."""


def new_key(now: float) -> tuple[str, str]:
    """A fresh AES-256 key: (key id, base64). Key ids are unique and sort by creation time."""
    kid = f"k{int(now)}-{secrets.token_hex(3)}"
    return kid, base64.b64encode(secrets.token_bytes(32)).decode("ascii")


def get_store(s: Session, store_name: str) -> Store:
    row = s.scalars(select(Store).where(Store.name == validate_name("store", store_name))).first()
    if row is None:
        raise NotFound(f"no store {store_name!r}", hint="List stores with 'drsite stores list'.")
    return row


def row_spec(row: Store) -> StoreSpec:
    """The full spec of a row (secrets and keys included)."""
    keys = row.keys or {}
    return StoreSpec.from_dict({"kind": row.kind, "name": row.name, "config": row.config,
                                "secret": row.secret, "keys": keys.get("keys") or {},
                                "active_key_id": keys.get("active")})


def store_view(s: Session, row: Store) -> dict[str, Any]:
    """The API view of a store: redacted (no credential, no key; key ids and the names of the
    secret fields that are set are shown)."""
    keys = row.keys or {}
    groups = sorted(s.scalars(select(Group.name).where(Group.store_id == row.id)))
    return {"name": row.name, "kind": row.kind, "config": dict(row.config),
            "secret_fields": sorted(row.secret or {}),
            "key_ids": sorted(keys.get("keys") or {}), "active_key_id": keys.get("active"),
            "encrypted": bool(keys.get("keys")), "groups": groups,
            "created_at": row.created_at, "updated_at": row.updated_at}


def group_store(s: Session, group: Group | None) -> Store | None:
    if group is None or group.store_id is None:
        return None
    return s.get(Store, group.store_id)


def group_store_spec(s: Session, group: Group | None) -> dict[str, Any] | None:
    """The full spec dict of the group's cloud store (command arguments only), or None."""
    row = group_store(s, group)
    return row_spec(row).to_dict() if row is not None else None


def store_spec(s: Session, store_id: int | None) -> dict[str, Any]:
    """The full spec dict of store ``store_id`` (command arguments only)."""
    row = s.get(Store, store_id) if store_id is not None else None
    if row is None:
        raise NotFound(f"store {store_id} does not exist any more")
    return row_spec(row).to_dict()


def item_store_spec(s: Session, item: Item) -> dict[str, Any] | None:
    """The ``store`` argument of a command that opens ``item``'s repository (or None when the
    item replicates to its target site's agent store)."""
    return group_store_spec(s, s.get(Group, item.group_id))


def check_encryption(s: Session, group: Group, policy: Policy | None) -> None:
    """A policy with ``encryption: true`` is accepted only for a group whose recovery store is a
    cloud store with keys (site stores do not encrypt at rest yet)."""
    if policy is None or not policy.encryption:
        return
    row = group_store(s, group)
    if row is None:
        raise InvalidInput(
            f"policy {policy.name} asks for encryption, but group {group.name} replicates to "
            "its target site's agent store, which does not encrypt at rest",
            hint="Give the group a cloud store ('drsite stores assign STORE --group GROUP'), or use a "
                 "policy with encryption false.")
    if not (row.keys or {}).get("keys"):
        raise InvalidInput(
            f"policy {policy.name} asks for encryption, but store {row.name} has no keys",
            hint="Create the store with encryption on (the default).")


def rotate_keys(row: Store, now: float) -> str:
    """Add a new active key to ``row`` (old keys stay, for reading); returns its id."""
    keys = dict(row.keys or {})
    kid, b64 = new_key(now)
    while kid in (keys.get("keys") or {}):  # pragma: no cover - 24 random bits per second
        kid, b64 = new_key(now)
    row.keys = {"active": kid, "keys": {**(keys.get("keys") or {}), kid: b64},
                "created": {**(keys.get("created") or {}), kid: now}}
    return kid


def push_spec(s: Session, row: Store, now: float) -> int:
    """Send the store's current spec (new credentials, new active key) to the agents of the
    protected items that replicate to it, as a ``protect`` re-send: on an item that already has
    points it only replaces the store spec (the agent reopens the item) and returns the latest
    point. Items held by a job get the spec with the job's next ``protect``. Returns how many
    items were sent it."""
    spec = row_spec(row).to_dict()
    n = 0
    for g in s.scalars(select(Group).where(Group.store_id == row.id)):
        policy = s.get(Policy, g.policy_id) if g.policy_id else None
        for item in s.scalars(select(Item).where(Item.group_id == g.id,
                                                 Item.status == ItemProtection.PROTECTED,
                                                 Item.active_job_id.is_(None))):
            site = s.get(Site, item.target_site_id)
            args: dict[str, Any] = {"vm_id": item.vm_id, "target_site": site.name if site else "",
                                    "store_url": CLOUD_STORE_URL + row.name, "store": spec,
                                    "settings": agent_settings(policy) if policy else {},
                                    "point_key": storeacl.point_key(s, item.id, now)}
            commands.enqueue(s, host_id=item.host_id, kind="protect", item_id=item.id,
                             args=args, now=now)
            n += 1
    return n


def check_spec_dict(kind: str, store_name: str, config: Any, secret: Any) -> StoreSpec:
    """Validate a store's config and secret (keys are the vault's own)."""
    return StoreSpec.from_dict({"kind": kind, "name": store_name, "config": config,
                                "secret": secret})
