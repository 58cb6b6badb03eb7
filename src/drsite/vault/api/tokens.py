"""Admin routes for operator API tokens (the secret is returned once, by create)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response, status
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from drsite.core.errors import Conflict, NotFound
from drsite.vault.api.deps import Admin, VaultDep, name
from drsite.vault.api.schemas import TokenIn
from drsite.vault.api.views import token_view
from drsite.vault.audit import record_event
from drsite.vault.auth import create_token, parse_role
from drsite.vault.db.models import ApiToken

router = APIRouter()


def _token(s: Session, token_name: str) -> ApiToken:
    tok = s.scalars(select(ApiToken).where(ApiToken.name == name("token", token_name))).first()
    if tok is None:
        raise NotFound(f"no token {token_name!r}")
    return tok


@router.get("/tokens", summary="List API tokens (never their secrets)")
def list_tokens(vault: VaultDep, _p: Admin) -> list[dict[str, Any]]:
    with vault.db.read() as s:
        return [token_view(t) for t in s.scalars(select(ApiToken).order_by(ApiToken.name))]


@router.post("/tokens", status_code=status.HTTP_201_CREATED,
             summary="Create an API token; the response is the only place its secret appears")
def new_token(body: TokenIn, vault: VaultDep, _p: Admin) -> dict[str, Any]:
    token_name = name("token", body.name)
    role = parse_role(body.role)
    now = vault.settings.clock.now()
    with vault.db.tx() as s:
        if s.scalars(select(ApiToken.id).where(ApiToken.name == token_name)).first() is not None:
            raise Conflict(f"token {token_name} exists")
        secret = create_token(s, token_name, role, now)
        record_event(s, now, "token", token_name, f"created ({role.value})")
        return {**token_view(_token(s, token_name)), "token": secret}


@router.get("/tokens/{token}", summary="Show a token (never its secret)")
def show_token(token: str, vault: VaultDep, _p: Admin) -> dict[str, Any]:
    with vault.db.read() as s:
        return token_view(_token(s, token))


@router.delete("/tokens/{token}", status_code=status.HTTP_204_NO_CONTENT, summary="Delete a token")
def delete_token(token: str, vault: VaultDep, _p: Admin) -> Response:
    now = vault.settings.clock.now()
    with vault.db.tx() as s:
        tok = _token(s, token)
        if tok.role == "admin":
            admins = s.scalar(select(func.count()).select_from(ApiToken).where(ApiToken.role == "admin"))
            if int(admins or 0) <= 1:
                raise Conflict("cannot delete the last admin token",
                               hint="Create another admin token first.")
        s.delete(tok)
        record_event(s, now, "token", tok.name, "deleted")
    return Response(status_code=status.HTTP_204_NO_CONTENT)
