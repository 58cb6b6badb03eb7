"""Operator routes for sites, registration keys, hosts and the VM inventory."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, status
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from drsite.core.errors import Conflict, InvalidInput, NotFound
from drsite.vault import fencing, storerole
from drsite.vault.api.deps import Admin, Reader, VaultDep, name, note, text
from drsite.vault.api.schemas import RegistrationKeyIn, ReissueIn, SiteIn, StoreHostIn
from drsite.vault.api.views import host_view, site_names, site_view, store_roles, vm_view
from drsite.vault.audit import record_event
from drsite.vault.auth import create_registration_key
from drsite.vault.db.models import Host, Item, Site, Vm
from drsite.vault.health import agent_up

router = APIRouter()

MIN_KEY_TTL_S, MAX_KEY_TTL_S = 60, 30 * 86400


def get_site(s: Session, site_name: str) -> Site:
    site = s.scalars(select(Site).where(Site.name == name("site", site_name))).first()
    if site is None:
        raise NotFound(f"no site {site_name!r}", hint="List sites with 'drsite sites list'.")
    return site


@router.get("/sites", summary="List sites")
def list_sites(vault: VaultDep, _p: Reader) -> list[dict[str, Any]]:
    with vault.db.read() as s:
        counts = dict(s.execute(select(Host.site_id, func.count()).where(Host.revoked_at.is_(None))
                                .group_by(Host.site_id)).all())
        rows = s.scalars(select(Site).order_by(Site.name))
        return [site_view(site, counts.get(site.id, 0)) for site in rows]


@router.post("/sites", status_code=status.HTTP_201_CREATED, summary="Create a site")
def create_site(body: SiteIn, vault: VaultDep, _p: Admin) -> dict[str, Any]:
    site_name = name("site", body.name)
    description = text("description", body.description)
    now = vault.settings.clock.now()
    with vault.db.tx() as s:
        if s.scalars(select(Site.id).where(Site.name == site_name)).first() is not None:
            raise Conflict(f"site {site_name} exists")
        site = Site(name=site_name, description=description, created_at=now)
        s.add(site)
        s.flush()
        record_event(s, now, "site", site_name, "created")
        return site_view(site, 0)


@router.get("/sites/{site}", summary="Show a site")
def show_site(site: str, vault: VaultDep, _p: Reader) -> dict[str, Any]:
    with vault.db.read() as s:
        row = get_site(s, site)
        n = len(s.scalars(select(Host.id).where(Host.site_id == row.id, Host.revoked_at.is_(None))).all())
        return site_view(row, n)


@router.post("/sites/{site}/registration-keys", status_code=status.HTTP_201_CREATED,
             summary="Create a one-time registration key for a host of the site")
def registration_key(site: str, vault: VaultDep, _p: Admin,
                     body: RegistrationKeyIn | None = None) -> dict[str, Any]:
    ttl = (body or RegistrationKeyIn()).ttl_s
    if not MIN_KEY_TTL_S <= ttl <= MAX_KEY_TTL_S:
        raise InvalidInput(f"ttl_s must be between {MIN_KEY_TTL_S} and {MAX_KEY_TTL_S} seconds")
    now = vault.settings.clock.now()
    with vault.db.tx() as s:
        row = get_site(s, site)
        key, expires = create_registration_key(s, row.id, float(ttl), now)
        record_event(s, now, "registration_key", row.name, f"created, expires in {ttl} s")
        return {"key": key, "expires_at": expires, "site": row.name}


@router.put("/sites/{site}/store-host",
            summary="Give the site's store role to one of its hosts (or to none)")
def set_store_host(site: str, body: StoreHostIn, request: Request, vault: VaultDep,
                   _p: Admin) -> dict[str, Any]:
    """Only the holder of a site's store role serves the site's store (``storerole``). Refused
    (409) while items replicate to the current store host, unless ``force``."""
    now = vault.settings.clock.now()
    with vault.db.tx() as s:
        row = get_site(s, site)
        host = None
        if body.host is not None:
            wanted = name("host", body.host)
            host = s.get(Host, wanted) or s.scalars(select(Host).where(
                Host.site_id == row.id, Host.name == wanted)).first()
            if host is None:
                raise NotFound(f"no host {wanted!r} in site {row.name}",
                               hint="List hosts with 'drsite hosts list'.")
        out = storerole.assign(s, row, host, force=body.force, now=now)
        note(request).update({"store_host": out["store_host"], "force": body.force,
                              "moved_items": len(out["moved_items"])})
        return {**out, "store_host_name": host.name if host is not None else None}


@router.get("/hosts", summary="List registered hosts")
def list_hosts(vault: VaultDep, _p: Reader) -> list[dict[str, Any]]:
    now = vault.settings.clock.now()
    with vault.db.read() as s:
        sites = site_names(s)
        roles = store_roles(s)
        return [host_view(h, sites.get(h.site_id, ""), now, vault.settings, roles)
                for h in s.scalars(select(Host).order_by(Host.site_id, Host.name))]


def get_host(s: Session, host_id: str) -> Host:
    host = s.get(Host, name("host id", host_id))
    if host is None:
        raise NotFound(f"no host {host_id!r}", hint="List hosts with 'drsite hosts list'.")
    return host


@router.get("/hosts/{host_id}", summary="Show a host")
def show_host(host_id: str, vault: VaultDep, _p: Reader) -> dict[str, Any]:
    now = vault.settings.clock.now()
    with vault.db.read() as s:
        h = get_host(s, host_id)
        return host_view(h, site_names(s).get(h.site_id, ""), now, vault.settings,
                         store_roles(s))


@router.delete("/hosts/{host_id}", summary="Revoke a host (its certificate stops working)")
def revoke_host(host_id: str, vault: VaultDep, _p: Admin) -> dict[str, Any]:
    now = vault.settings.clock.now()
    with vault.db.tx() as s:
        h = get_host(s, host_id)
        if h.revoked_at is None:
            h.revoked_at = now
            record_event(s, now, "host", h.name, "revoked")
        return host_view(h, site_names(s).get(h.site_id, ""), now, vault.settings,
                         store_roles(s))


@router.post("/hosts/{host_id}/reissue", status_code=status.HTTP_201_CREATED,
             summary="A one-time key that replaces this host's certificate (and nothing else)")
def reissue_host(host_id: str, vault: VaultDep, _p: Admin,
                 body: ReissueIn | None = None) -> dict[str, Any]:
    ttl = (body or ReissueIn()).ttl_s
    if not MIN_KEY_TTL_S <= ttl <= MAX_KEY_TTL_S:
        raise InvalidInput(f"ttl_s must be between {MIN_KEY_TTL_S} and {MAX_KEY_TTL_S} seconds")
    now = vault.settings.clock.now()
    with vault.db.tx() as s:
        h = get_host(s, host_id)
        key, expires = create_registration_key(s, h.site_id, float(ttl), now, host_id=h.id)
        record_event(s, now, "host", h.name, f"re-issue key created (expires in {ttl} s): the "
                     "host's certificate is replaced when the host registers with it")
        return {"key": key, "expires_at": expires, "host_id": h.id, "host": h.name,
                "site": site_names(s).get(h.site_id, "")}


@router.get("/vms", summary="VM inventory reported by the agents (VMs no longer reported, "
                            "e.g. deleted ones, with ?all=true)")
def list_vms(vault: VaultDep, _p: Reader, all: bool = False) -> list[dict[str, Any]]:
    with vault.db.read() as s:
        sites = site_names(s)
        hosts = {h.id: h for h in s.scalars(select(Host))}
        items = {ref: iid for ref, iid in s.execute(select(Item.vm_ref, Item.id)
                                                    .where(Item.vm_ref.is_not(None)))}
        warnings = fencing.vm_warnings(s)
        now = vault.settings.clock.now()
        down = {h.id: _down_warning(h, now) for h in hosts.values()
                if not agent_up(h, now, vault.settings)}
        out = []
        for vm in s.scalars(select(Vm).order_by(Vm.name, Vm.id)):
            host = hosts[vm.host_id]
            if host.revoked_at is not None or not (vm.present or all):
                continue
            # a host that does not heartbeat: its VMs' power is what it last said, not now
            warn = "; ".join(w for w in (warnings.get((host.id, vm.vm_id)), down.get(host.id))
                             if w) or None
            view = vm_view(vm, host, sites.get(host.site_id, ""),
                           items.get(f"{host.id}/{vm.vm_id}"), warning=warn)
            view["host_up"] = host.id not in down
            out.append(view)
        return out


def _down_warning(host: Host, now: float) -> str:
    if host.last_heartbeat is None:
        return f"host {host.name} never reported: power unknown"
    ago = max(0.0, now - host.last_heartbeat)
    when = f"{ago:.0f} s" if ago < 120 else f"{ago / 60:.0f} min"
    return f"host {host.name} down (no heartbeat for {when}): power is as it last reported"
