"""Error responses: every error is JSON ``DrsiteError.to_dict()``, ``{"code","class","message",
"hint"}``, with the class's ``http_status`` (the table in ``docs/control-plane.md``).

Besides the classes' own statuses: 422 for a body of the wrong shape or type (code
``invalid_input``), an unexpected exception is 500 ``internal`` (transient), and the database
failing for the moment (a lost connection, a deadlock, too many connections:
``db.database.transient_db_error``) is 503 ``busy`` with ``Retry-After``. Validation
messages name the fields and the problem but never echo the submitted values (they may hold
secrets).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as SaTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException

from drsite.core.errors import (
    Busy,
    DrsiteError,
    InternalError,
    InvalidInput,
    StandbyVault,
    class_for_status,
)
from drsite.vault.db.database import transient_db_error

RETRY_AFTER_S = 1
# PostgreSQL's "cannot execute … in a read-only transaction": a write reached a hot standby
READ_ONLY_SQLSTATE = "25006"

log = logging.getLogger(__name__)


def _describe(errors: list[Any]) -> str:
    parts = []
    for e in errors[:10]:
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body") or "body"
        parts.append(f"{loc}: {e.get('msg', 'invalid')}")
    return "; ".join(parts)


def _answer(err: DrsiteError, status: int | None = None,
            headers: dict[str, str] | None = None) -> JSONResponse:
    status = err.http_status if status is None else status
    if status == 401:
        headers = {**(headers or {}), "WWW-Authenticate": "Bearer"}
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

    async def _database(req: Request, exc: Exception) -> JSONResponse:
        # handled inside the middleware stack (not as a bare Exception at its top), so the
        # audit trail records what the client got
        if getattr(getattr(exc, "orig", None), "sqlstate", None) == READ_ONLY_SQLSTATE:
            # the vault checks its role before each write; this is the database saying it
            # first (a promotion or demotion in between)
            return _answer(StandbyVault("this vault's database is a hot standby and takes no "
                                        "writes"))
        if transient_db_error(exc):
            # the database failed for the moment (a connection it ended, a deadlock, too many
            # connections): the client is told when to retry, never handed a 500
            log.warning("%s %s: the database failed for the moment (%s: %s); answered 503",
                        req.method, req.url.path, type(exc).__name__,
                        str(exc).splitlines()[0] if str(exc) else "")
            return _answer(Busy("the vault's database did not complete this request",
                                hint="Retry after the Retry-After delay; "
                                     "drsite's agents retry on their own, its CLI retries "
                                     "reads."),
                           headers={"Retry-After": str(RETRY_AFTER_S)})
        return _internal_error(req, exc)

    app.add_exception_handler(DBAPIError, _database)
    app.add_exception_handler(SaTimeoutError, _database)

    @app.exception_handler(Exception)
    async def _internal(req: Request, exc: Exception) -> JSONResponse:
        return _internal_error(req, exc)


def _internal_error(req: Request, exc: Exception) -> JSONResponse:
    log.exception("internal error on %s %s", req.method, req.url.path, exc_info=exc)
    return _answer(InternalError(f"internal error: {type(exc).__name__}",
                                 hint="See the vault's log."))
