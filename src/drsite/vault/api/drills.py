"""Drill routes: list and show drills (of plans and of protection groups), start one by hand
(``vault/drills.py``)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, status
from pydantic import BaseModel, ConfigDict

from drsite.vault import drills
from drsite.vault.api.deps import Operator, Reader, VaultDep

router = APIRouter()


class DrillIn(BaseModel):
    """A drill of a recovery plan or of a protection group (exactly one of them)."""

    model_config = ConfigDict(extra="forbid")
    plan: str | None = None
    group: str | None = None
    boot_timeout_s: float | None = None
    probe: dict[str, Any] | None = None


@router.get("/drills", summary="Drills, newest first (optionally of one plan or one group)")
def list_drills(vault: VaultDep, _p: Reader, plan: str | None = None, group: str | None = None,
                limit: int = 100) -> list[dict[str, Any]]:
    with vault.db.read() as s:
        return drills.list_drills(s, plan, max(1, min(limit, 1000)), group=group)


@router.get("/drills/{drill_id}", summary="A drill with its report (per VM: point, RPO, RTO, checks)")
def show_drill(drill_id: str, vault: VaultDep, _p: Reader) -> dict[str, Any]:
    with vault.db.read() as s:
        return drills.drill_view(drills.get_drill(s, drill_id))


@router.post("/drills", status_code=status.HTTP_202_ACCEPTED,
             summary="Run a drill of a plan or a group now (test failover, verify, boot, probe, "
                     "cleanup)")
def run_drill(body: DrillIn, vault: VaultDep, _p: Operator) -> dict[str, Any]:
    now = vault.settings.clock.now()
    override: dict[str, Any] = {}
    if body.boot_timeout_s is not None or body.probe is not None:
        from_body = {k: v for k, v in body.model_dump().items()
                     if v is not None and k not in ("plan", "group")}
        override = drills.validate_override(from_body)
    with vault.db.tx() as s:
        d = drills.start_drill(s, body.plan, group_name=body.group, trigger="hand", now=now,
                               drill=override)
        return {"drill_id": d.id, "job_id": d.job_id}
