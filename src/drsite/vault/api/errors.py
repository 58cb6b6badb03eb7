"""Error responses: every error is JSON ``DrsiteError.to_dict()``, ``{"code","class","message",
"hint"}``, with the class's ``http_status`` (the table in ``docs/control-plane.md``).

Besides the classes' own statuses: 422 for a body of the wrong shape or type (code
``invalid_input``), and an unexpected exception is 500 ``internal`` (transient). Validation
messages name the fields and the problem but never echo the submitted values (they may hold
secrets).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from drsite.core.errors import (
    DrsiteError,
    InternalError,
    InvalidInput,
    StandbyVault,
    class_for_status,
)

# PostgreSQL's "cannot execute … in a read-only transaction": a write reached a hot standby
READ_ONLY_SQLSTATE = "25006"

log = logging.getLogger(__name__)


def _describe(errors: list[Any]) -> str:
    parts = []
    for e in errors[:10]:
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body") or "body"
        parts.append(f"{loc}: {e.get('msg', 'invalid')}")
    return "; ".join(parts)


def _answer(err: DrsiteError, status: int | None = None) -> JSONResponse:
    status = err.http_status if status is None else status
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(err.to_dict(), status_code=status, headers=headers)


def install(app: FastAPI) -> None:
    @app.exception_handler(DrsiteError)
    async def _drsite(_req: Request, exc: DrsiteError) -> JSONResponse:
        return _answer(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_req: Request, exc: RequestValidationError) -> JSONResponse:
        return _answer(InvalidInput(f"request refused: {_describe(list(exc.errors()))}",
                                    hint="Check the request body against /openapi.json."),
                       status=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_req: Request, exc: StarletteHTTPException) -> JSONResponse:
        # the router's own answers (unknown path 404, wrong method 405, ...): the class of
        # the status, the status kept as the router chose it
        return _answer(class_for_status(exc.status_code)(str(exc.detail), hint=""),
                       status=exc.status_code)

    @app.exception_handler(Exception)
    async def _internal(req: Request, exc: Exception) -> JSONResponse:
        if getattr(getattr(exc, "orig", None), "sqlstate", None) == READ_ONLY_SQLSTATE:
            # the vault checks its role before each write; this is the database saying it
            # first (a promotion or demotion in between)
            return _answer(StandbyVault("this vault's database is a hot standby and takes no "
                                        "writes"))
        log.exception("internal error on %s %s", req.method, req.url.path)
        return _answer(InternalError(f"internal error: {type(exc).__name__}",
                                     hint="See the vault's log."))
