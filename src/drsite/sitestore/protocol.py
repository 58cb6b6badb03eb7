"""What the site-store server and client share: paths, limits, and the mapping between drsite
errors and HTTP statuses/JSON bodies. Not responsible for transport or TLS."""

from __future__ import annotations

from typing import Any

from drsite.core import errors as E

OBJECTS = "/store/v1/objects/"
LIST = "/store/v1/list"
ITEMS = "/replica/v1/items/"

MAX_OBJECT = 64 << 20          # largest object body accepted (packs are ~8-16 MiB)
MIN_BLOCK = 512
MAX_BLOCK = 64 << 20

BLOCKS_HEADER = "X-Blocks"
BYTES_READ_HEADER = "X-Bytes-Read"
POINT_HEADER = "X-Point-Id"


def status_of(exc: E.DrsiteError) -> int:
    """HTTP status the server answers a drsite error with."""
    if isinstance(exc, E.InvalidInput):
        return 400
    if isinstance(exc, E.AuthError):
        return 401
    if isinstance(exc, E.NotFound):
        return 404
    if isinstance(exc, E.Conflict):
        return 409
    if exc.transient:
        return 503
    return 500


def _registry() -> dict[str, type[E.DrsiteError]]:
    """code → the class of :mod:`drsite.core.errors` that defines it."""
    out: dict[str, type[E.DrsiteError]] = {}
    for obj in vars(E).values():
        if isinstance(obj, type) and issubclass(obj, E.DrsiteError) and "code" in obj.__dict__:
            out.setdefault(obj.code, obj)
    return out


_BY_CODE = _registry()


def error_from_body(body: Any) -> E.DrsiteError | None:
    """The drsite error a JSON error body (``DrsiteError.to_dict()``) stands for, or ``None``
    if the body is not one of ours with a known code (the caller then maps by HTTP status)."""
    if not isinstance(body, dict):
        return None
    code, message, hint = body.get("code"), body.get("message"), body.get("hint")
    if not isinstance(code, str) or not isinstance(message, str):
        return None
    cls = _BY_CODE.get(code)
    if cls is None:
        return None
    if cls is E.DrsiteError:  # the base's generic code: keep the class the server reported
        cls = E.TransientError if body.get("class") == E.ErrorClass.TRANSIENT.value \
            else E.PermanentError
    return cls(message, hint=hint if isinstance(hint, str) else None)
