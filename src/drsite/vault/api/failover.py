"""Operator routes for failover: item actions, failover records, recovery plans (apply with a
diff), network mappings, resuming a job that waits for an operator."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response, status
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select

from drsite.core.actions import ITEM_ACTIONS, PLAN_ACTIONS, FailoverAction
from drsite.core.errors import InvalidInput, NotFound
from drsite.vault import network_mappings, recovery_plans
from drsite.vault.api.deps import Admin, Operator, Reader, VaultDep, name
from drsite.vault.api.views import failover_view, job_view
from drsite.vault.db.models import Failover, NetworkMapping
from drsite.vault.jobs import create, item_actions

router = APIRouter()


class ActionIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    point: str | None = Field(None, description="latest | latest_app | latest_group "
                                                "(multi-VM consistent) | a point id")
    vm_name: str | None = Field(None, description="name of the recovery/test VM")
    notes: str | None = Field(None, max_length=2000, description="cleanup: what was observed")
    reprotect: bool = Field(True, description="commit of a planned failover: re-protect at once")
    create_reverse_mapping: bool = Field(False, description="re-protect (and a commit that "
                                         "re-protects): create the missing network mappings "
                                         "back by inverting the forward ones")
    shutdown_timeout: float | None = Field(None, gt=0, le=3600)


class PlansIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    plans: list[dict[str, Any]]
    dry_run: bool = False
    prune: bool = False


class MappingIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    source_site: str
    recovery_site: str
    source_network: str
    recovery_network: str
    test_network: str | None = None
    ip_rule: dict[str, Any] | None = None


def _args(body: ActionIn | None) -> dict[str, Any]:
    return {k: v for k, v in (body.model_dump() if body else {}).items() if v is not None}


@router.post("/items/{item_id}/failover/{action}", status_code=status.HTTP_202_ACCEPTED,
             summary=f"Run a failover action on one item ({', '.join(ITEM_ACTIONS)})")
def item_action(item_id: str, action: str, vault: VaultDep, _p: Operator,
                body: ActionIn | None = None) -> dict[str, Any]:
    act = FailoverAction.parse(action, ITEM_ACTIONS)
    with vault.db.tx() as s:
        job = item_actions.start_item_action(s, name("item id", item_id), act, _args(body),
                                             vault.settings.clock.now())
        return job_view(s, job)


@router.get("/items/{item_id}/failovers", summary="Failovers of an item, newest first")
def item_failovers(item_id: str, vault: VaultDep, _p: Reader) -> list[dict[str, Any]]:
    with vault.db.read() as s:
        rows = s.scalars(select(Failover).where(Failover.item_id == name("item id", item_id))
                         .order_by(Failover.created_at.desc()))
        return [failover_view(f) for f in rows]


@router.get("/failovers", summary="All failovers, newest first")
def list_failovers(vault: VaultDep, _p: Reader, limit: int = 100) -> list[dict[str, Any]]:
    if not 1 <= limit <= 1000:
        raise InvalidInput("limit must be between 1 and 1000")
    with vault.db.read() as s:
        return [failover_view(f) for f in
                s.scalars(select(Failover).order_by(Failover.created_at.desc()).limit(limit))]


@router.get("/failovers/{failover_id}", summary="Show a failover (state, point, VM, RTO)")
def show_failover(failover_id: str, vault: VaultDep, _p: Reader) -> dict[str, Any]:
    with vault.db.read() as s:
        fo = s.get(Failover, name("failover id", failover_id))
        if fo is None:
            raise NotFound(f"no failover {failover_id!r}")
        return failover_view(fo)


@router.post("/jobs/{job_id}/resume", status_code=status.HTTP_202_ACCEPTED,
             summary="Resume a job waiting for an operator (a recovery plan's manual action)")
def resume(job_id: str, vault: VaultDep, _p: Operator) -> dict[str, Any]:
    with vault.db.tx() as s:
        return job_view(s, create.resume_job(s, job_id, vault.settings.clock.now()))


# ------------------------------------------------------------------------------ plans

@router.get("/plans", summary="List recovery plans with their groups and actions")
def list_plans(vault: VaultDep, _p: Reader) -> list[dict[str, Any]]:
    with vault.db.read() as s:
        return recovery_plans.list_plans(s)


@router.get("/plans/{plan}", summary="Show a recovery plan")
def show_plan(plan: str, vault: VaultDep, _p: Reader) -> dict[str, Any]:
    with vault.db.read() as s:
        return recovery_plans.plan_view(s, plan)


@router.post("/plans", summary="Create or update recovery plans from documents; returns the diff "
                                "(dry_run: change nothing). Admin: plans run scripts.")
def apply_plans(body: PlansIn, vault: VaultDep, _p: Admin) -> dict[str, Any]:
    with vault.db.tx() as s:
        diff = recovery_plans.apply_plans(s, body.plans, vault.settings.clock.now(), dry_run=body.dry_run,
                               prune=body.prune)
        return {"dry_run": body.dry_run, "changes": diff}


@router.delete("/plans/{plan}", status_code=status.HTTP_204_NO_CONTENT, summary="Delete a plan")
def delete_plan(plan: str, vault: VaultDep, _p: Admin) -> Response:
    with vault.db.tx() as s:
        recovery_plans.delete_plan(s, plan, vault.settings.clock.now())
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post("/plans/{plan}/{action}", status_code=status.HTTP_202_ACCEPTED,
             summary=f"Run an action on a whole plan ({', '.join(PLAN_ACTIONS)})")
def plan_action(plan: str, action: str, vault: VaultDep, _p: Operator,
                body: ActionIn | None = None) -> dict[str, Any]:
    act = FailoverAction.parse(action, PLAN_ACTIONS)
    with vault.db.tx() as s:
        job = recovery_plans.start_plan_action(s, plan, act, _args(body), vault.settings.clock.now())
        return job_view(s, job)


# ------------------------------------------------------------------------------ network mappings

@router.get("/network-mappings", summary="List network mappings")
def list_mappings(vault: VaultDep, _p: Reader) -> list[dict[str, Any]]:
    with vault.db.read() as s:
        return [network_mappings.network_mapping_view(s, r) for r in
                s.scalars(select(NetworkMapping).order_by(NetworkMapping.id))]


@router.put("/network-mappings", summary="Create or replace the mapping of a source network")
def put_mapping(body: MappingIn, vault: VaultDep, _p: Operator) -> dict[str, Any]:
    with vault.db.tx() as s:
        row = network_mappings.set_network_mapping(
            s, source_site=body.source_site, recovery_site=body.recovery_site,
            source_network=body.source_network, recovery_network=body.recovery_network,
            test_network=body.test_network, ip_rule=body.ip_rule, now=vault.settings.clock.now())
        return network_mappings.network_mapping_view(s, row)


@router.delete("/network-mappings/{mapping_id}", status_code=status.HTTP_204_NO_CONTENT,
               summary="Delete a network mapping")
def delete_mapping(mapping_id: int, vault: VaultDep, _p: Operator) -> Response:
    with vault.db.tx() as s:
        row = s.get(NetworkMapping, mapping_id)
        if row is None:
            raise NotFound(f"no network mapping {mapping_id}")
        s.delete(row)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
