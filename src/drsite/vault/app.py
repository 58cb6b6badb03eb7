"""The vault's ASGI application.

``create_app(settings)`` bootstraps the data directory (CA, server certificate, schema, first
admin token), builds the FastAPI app (OpenAPI at ``/openapi.json``) and, while the app runs
(its lifespan), resumes jobs left by a previous process and runs the background loop (job
runner, scheduler, health) unless ``settings.background`` is False — then tests drive
``app.state.vault.tick()`` themselves with an injected clock.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI

from drsite import __version__
from drsite.vault.api import (
    agent,
    audit,
    drills,
    errors,
    failover,
    history,
    inventory,
    operations,
    protection,
    public,
    stores,
    tokens,
    vm_lifecycle,
)
from drsite.vault.context import Vault, bootstrap
from drsite.vault.settings import VaultSettings

API_PREFIX = "/api/v1"


def create_app(settings: VaultSettings, vault: Vault | None = None, *,
               routers: Sequence[APIRouter] = ()) -> FastAPI:
    """The vault app for ``settings`` (or around an already bootstrapped ``vault``).

    ``routers`` are mounted after the API: the dashboard (:mod:`drsite.web`) sits above the
    vault and is added by whoever assembles the process (``drsite vault serve``), so the vault
    never imports it."""
    v = vault or bootstrap(settings)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        v.start()
        try:
            yield
        finally:
            v.stop()

    app = FastAPI(title="drsite vault", version=__version__, lifespan=lifespan,
                  description="Control plane of drsite: sites, hosts, policies, protection groups, "
                              "protected items, recovery points, jobs, alerts.")
    app.state.vault = v
    errors.install(app)
    app.add_middleware(audit.AuditMiddleware)  # every mutating or refused call → audit trail
    for r in (public.router, inventory.router, protection.router, operations.router, tokens.router,
              agent.router, stores.router, failover.router, drills.router, audit.router, history.router,
              vm_lifecycle.router):
        app.include_router(r, prefix=API_PREFIX)
    for r in routers:
        app.include_router(r)
    return app
