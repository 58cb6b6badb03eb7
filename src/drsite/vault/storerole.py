"""The store role of a site: which host serves the site's agent store (``sites.store_host_id``).

Serving a site's store is a role the vault grants, never a claim. The rule:

- A host serves its site's store only when an admin assigned it the role
  (``PUT /api/v1/sites/{site}/store-host``: ``drsite sites set-store SITE HOST``; audited like
  every mutating call, and an event). ``drsite up`` assigns it to the store agents it starts.
  Registration keys never carry the role: a registration key gives no store.
- One store host per site. Moving the role while items replicate to the current store host
  is refused (409) unless ``force``: their points stay on the old host's store, which no
  longer serves them (its agent gets an empty access list), and they must be protected anew
  to replicate to the new one.
- A ``store_url`` in the heartbeat of a host without the role is kept as the host's claim
  (``hosts list`` shows it) and never acted on (``storeacl``, ``recoverybook``,
  ``breakglass``); a new claim raises one security alert and an audit entry.

Responsible for: assigning the role and judging claims. Not responsible for: what a store
host receives (``storeacl``, ``recoverybook``).
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy.orm import Session

from drsite.core.errors import Conflict, InvalidInput
from drsite.vault.audit import AuditEntry, record_audit, record_event
from drsite.vault.db.models import Host, Site
from drsite.vault.storeacl import has_store_role, site_store_items
from drsite.vault.trust import raise_security_alert

log = logging.getLogger(__name__)


def assign(s: Session, site: Site, host: Host | None, *, force: bool, now: float) -> dict[str, Any]:
    """Give ``site``'s store role to ``host`` (None: to nobody). Idempotent. Refused
    (``Conflict``) when items replicate to the current store host and ``force`` is not set;
    returns what changed (``moved_items``: the items left behind on the old store host)."""
    if host is not None:
        if host.site_id != site.id:
            raise InvalidInput(f"host {host.name} is not in site {site.name}",
                               hint="A site's store host is one of its own hosts: "
                                    "'drsite hosts list'.")
        if host.revoked_at is not None:
            raise InvalidInput(f"host {host.name} is revoked",
                               hint="Register a host in the site, then 'drsite sites set-store "
                                    f"{site.name} HOST'.")
    new_id = host.id if host is not None else None
    old_id = site.store_host_id
    if old_id == new_id:
        return {"site": site.name, "store_host": new_id, "changed": False, "moved_items": []}
    old = s.get(Host, old_id) if old_id is not None else None
    items = [it.id for it in site_store_items(s, site.id)] if old is not None else []
    if items and not force:
        shown = ", ".join(items[:5]) + (", ..." if len(items) > 5 else "")
        raise Conflict(
            f"{len(items)} item(s) replicate to the store of host {old.name if old else old_id} "
            f"in site {site.name} ({shown}); moving the store role does not move their points",
            hint=f"Re-run with --force ('drsite sites set-store {site.name} "
                 f"{host.name if host else '--none'} --force'): their points stay on the old "
                 "host's store, which stops serving them, and each item must be protected anew "
                 "('drsite items unprotect ITEM', then 'drsite items protect VM --group GROUP').")
    site.store_host_id = new_id
    what = (f"store role moved from {old.name if old else old_id or 'nobody'} to "
            f"{host.name if host else 'nobody'}")
    if items:
        what += (f"; {len(items)} item(s) left on the old store (protect them anew): "
                 + ", ".join(items[:20]))
    record_event(s, now, "site", site.name, what)
    log.info("site %s: %s", site.name, what)
    return {"site": site.name, "store_host": new_id, "changed": True, "moved_items": items}


def judge_claim(s: Session, host: Host, claimed: str | None, now: float) -> None:
    """``host`` newly claims to serve a store at ``claimed``: nothing when it holds the store
    role; else one security alert (refreshed, not repeated, while open) and an audit entry.
    Called only when the claim changed, so a claim costs one alert, not one per heartbeat."""
    if claimed is None or host.revoked_at is not None or has_store_role(s, host):
        return
    site = s.get(Site, host.site_id)
    site_name = site.name if site is not None else str(host.site_id)
    message = (f"host {host.name} ({host.id}) of site {site_name} claims to serve a store at "
               f"{claimed} without the site's store role: ignored (no access list, no recovery "
               "book, no break-glass). If it should serve the site's store: 'drsite sites "
               f"set-store {site_name} {host.name}'")
    if raise_security_alert(s, now, f"store_claim:{host.id}", host.name, message):
        log.warning("%s", message)
    record_audit(s, AuditEntry(at=now, actor_kind="host", actor=host.id, action="agent.store_claim",
                               target=f"site={site_name}", outcome="refused",
                               detail={"store_url": claimed}))
