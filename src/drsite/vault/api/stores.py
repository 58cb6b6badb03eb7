"""Admin routes for cloud recovery stores (S3, Azure Blob). Credentials and keys are write-only:
no route returns them, no event or log line names them (see ``vault/stores.py``)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response, status
from pydantic import Field
from sqlalchemy import select

from drsite.core.errors import Conflict, InvalidInput
from drsite.vault.api.deps import Admin, Reader, VaultDep, name
from drsite.vault.api.schemas import Strict
from drsite.vault.api.views import job_view
from drsite.vault.audit import record_event
from drsite.vault.db.models import Group, Store
from drsite.vault.jobs.create import start_store_rekey
from drsite.vault.stores import check_spec_dict, get_store, push_spec, rotate_keys, store_view

router = APIRouter()

CLOUD_KINDS = ("s3", "azure")
LOCATION_FIELDS = ("bucket", "container", "prefix", "endpoint_url", "account_url", "account_name")


class StoreIn(Strict):
    name: str
    kind: str
    config: dict[str, Any] = Field(default_factory=dict)
    secret: dict[str, Any] = Field(default_factory=dict)
    encryption: bool = True


class StoreUpdate(Strict):
    """PUT /stores/{name}: ``config`` is merged over the current one (a null value removes a
    field); ``secret`` replaces the credentials as a whole. The kind cannot change."""

    config: dict[str, Any] | None = None
    secret: dict[str, Any] | None = None


@router.get("/stores", summary="List cloud recovery stores (never their credentials or keys)")
def list_stores(vault: VaultDep, _p: Reader) -> list[dict[str, Any]]:
    with vault.db.read() as s:
        return [store_view(s, r) for r in s.scalars(select(Store).order_by(Store.name))]


@router.post("/stores", status_code=status.HTTP_201_CREATED,
             summary="Create a cloud recovery store (the vault generates its encryption key)")
def create_store(body: StoreIn, vault: VaultDep, _p: Admin) -> dict[str, Any]:
    store_name = name("store", body.name)
    if body.kind not in CLOUD_KINDS:
        raise InvalidInput(f"store kind must be one of {', '.join(CLOUD_KINDS)}")
    spec = check_spec_dict(body.kind, store_name, body.config, body.secret)
    now = vault.settings.clock.now()
    with vault.db.tx() as s:
        if s.scalars(select(Store.id).where(Store.name == store_name)).first() is not None:
            raise Conflict(f"store {store_name} exists", hint=f"Change it: drsite stores update {store_name}")
        row = Store(name=store_name, kind=spec.kind, config=dict(spec.config),
                    secret=dict(spec.secret), keys={}, created_at=now, updated_at=now)
        kid = rotate_keys(row, now) if body.encryption else None
        s.add(row)
        s.flush()
        record_event(s, now, "store", store_name,
                     f"created ({spec.location()}"
                     + (f", encrypted with key {kid})" if kid else ", not encrypted)"))
        return store_view(s, row)


@router.get("/stores/{store}", summary="Show a cloud recovery store (never its credentials or keys)")
def show_store(store: str, vault: VaultDep, _p: Reader) -> dict[str, Any]:
    with vault.db.read() as s:
        return store_view(s, get_store(s, store))


@router.put("/stores/{store}", summary="Change a store's configuration or credentials")
def update_store(store: str, body: StoreUpdate, vault: VaultDep, _p: Admin) -> dict[str, Any]:
    now = vault.settings.clock.now()
    with vault.db.tx() as s:
        row = get_store(s, store)
        config = dict(row.config)
        if body.config is not None:
            for k, v in body.config.items():
                if v is None:
                    config.pop(k, None)
                else:
                    config[k] = v
        secret = dict(body.secret) if body.secret is not None else dict(row.secret)
        spec = check_spec_dict(row.kind, row.name, config, secret)
        moved = sorted(k for k in LOCATION_FIELDS if spec.config.get(k) != row.config.get(k))
        if moved:
            used = sorted(s.scalars(select(Group.name).where(Group.store_id == row.id)))
            if used:
                raise Conflict(f"store {row.name} is used by group(s) {', '.join(used)}: its "
                               f"location ({', '.join(moved)}) cannot change",
                               hint="Create another store for the new location.")
        changed = [w for w, new, old in (("config", dict(spec.config), row.config),
                                         ("credentials", dict(spec.secret), row.secret))
                   if new != old]
        row.config, row.secret = dict(spec.config), dict(spec.secret)
        row.updated_at = now
        if changed:
            n = push_spec(s, row, now)
            record_event(s, now, "store", row.name, f"{' and '.join(changed)} changed; sent to "
                         f"the agents of {n} protected item(s)")
        return store_view(s, row)


@router.post("/stores/{store}/rotate-key",
             summary="Make a new encryption key active (old keys are kept for reading)")
def rotate_key(store: str, vault: VaultDep, _p: Admin) -> dict[str, Any]:
    now = vault.settings.clock.now()
    with vault.db.tx() as s:
        row = get_store(s, store)
        if not (row.keys or {}).get("keys"):
            raise Conflict(f"store {row.name} is not encrypted; it has no key to rotate",
                           hint="Create an encrypted store (encryption true) instead.")
        kid = rotate_keys(row, now)
        row.updated_at = now
        n = push_spec(s, row, now)
        record_event(s, now, "store", row.name, f"new active encryption key {kid} (old keys "
                     f"kept for reading); sent to the agents of {n} protected item(s)")
        return store_view(s, row)


@router.post("/stores/{store}/rekey", status_code=status.HTTP_202_ACCEPTED,
             summary="Re-encrypt the store's old objects under its active key (a job)")
def rekey(store: str, vault: VaultDep, _p: Admin) -> dict[str, Any]:
    now = vault.settings.clock.now()
    with vault.db.tx() as s:
        row = get_store(s, store)
        if not (row.keys or {}).get("keys"):
            raise Conflict(f"store {row.name} is not encrypted; there is nothing to re-encrypt",
                           hint="Only stores created with encryption have keys to rotate.")
        job = start_store_rekey(s, row.name, now=now)
        return job_view(s, job)


@router.delete("/stores/{store}", status_code=status.HTTP_204_NO_CONTENT,
               summary="Delete a store unused by any group (its keys are lost with it)")
def delete_store(store: str, vault: VaultDep, _p: Admin) -> Response:
    now = vault.settings.clock.now()
    with vault.db.tx() as s:
        row = get_store(s, store)
        used = sorted(s.scalars(select(Group.name).where(Group.store_id == row.id)))
        if used:
            raise Conflict(f"store {row.name} is used by group(s) {', '.join(used)}",
                           hint="Move or delete those groups first.")
        s.delete(row)
        record_event(s, now, "store", row.name, "deleted (with its keys: its objects cannot be "
                     "decrypted any more)")
    return Response(status_code=status.HTTP_204_NO_CONTENT)
