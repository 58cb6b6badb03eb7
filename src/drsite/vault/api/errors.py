"""Error responses: every error is JSON ``{"code","class","message","hint"}``.

Statuses: 400 invalid input, 401 auth failed, 403 forbidden (role), 404 not found, 409
conflict, 422 malformed body (shape or type), 503 transient. Validation messages name the
fields and the problem but never echo the submitted values (they may hold secrets).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from drsite.core.errors import AuthError, Conflict, DrsiteError, InvalidInput, NotFound

log = logging.getLogger(__name__)


class Forbidden(AuthError):
    """Authenticated, but the token's role does not allow the call."""

    code = "forbidden"
    default_hint = "Use a token with a higher role (admin > operator > reader)."


def status_for(err: DrsiteError) -> int:
    if isinstance(err, Forbidden):
        return 403
    if isinstance(err, AuthError):
        return 401
    if isinstance(err, NotFound):
        return 404
    if isinstance(err, Conflict):
        return 409
    if isinstance(err, InvalidInput):
        return 400
    if err.transient:
        return 503
    return 400


def error_body(code: str, message: str, hint: str = "", cls: str = "permanent") -> dict[str, str]:
    return {"code": code, "class": cls, "message": message, "hint": hint}


def _describe(errors: list[Any]) -> str:
    parts = []
    for e in errors[:10]:
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body") or "body"
        parts.append(f"{loc}: {e.get('msg', 'invalid')}")
    return "; ".join(parts)


def install(app: FastAPI) -> None:
    @app.exception_handler(DrsiteError)
    async def _drsite(_req: Request, exc: DrsiteError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if status_for(exc) == 401 else None
        return JSONResponse(exc.to_dict(), status_code=status_for(exc), headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_req: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(error_body("invalid_input", f"request refused: {_describe(list(exc.errors()))}",
                                       "Check the request body against /openapi.json."),
                            status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_req: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse(error_body(code, str(exc.detail)), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _internal(req: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error on %s %s", req.method, req.url.path)
        return JSONResponse(error_body("internal", f"internal error: {type(exc).__name__}",
                                       "See the vault's log.", "transient"), status_code=500)
