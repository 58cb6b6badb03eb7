"""Routes without authentication: the version, the Prometheus metrics, and the vault's role in
a pair (what the peer vault's fence asks: ``vault/pairfence.py``)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response

from drsite import __version__
from drsite.vault.api.deps import VaultDep
from drsite.vault.metrics import CONTENT_TYPE, render

router = APIRouter()


@router.get("/version", summary="The vault's version")
def version() -> dict[str, str]:
    return {"version": __version__}


@router.get("/metrics", summary="Prometheus metrics (text format)")
def metrics(vault: VaultDep) -> Response:
    return Response(render(vault.db, vault.settings), media_type=CONTENT_TYPE)


@router.get("/vault/state", summary="This vault's role in a pair: active, standby or fenced, "
                                    "with its database's timeline and the lease epoch")
def vault_state(vault: VaultDep) -> dict[str, Any]:
    """No secret: the peer vault of a pair asks it before it writes (over TLS checked against
    the pair's CA), and agents or load balancers may too."""
    return vault.state()
