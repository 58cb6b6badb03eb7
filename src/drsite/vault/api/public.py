"""Routes without authentication: the version and the Prometheus metrics."""

from __future__ import annotations

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
