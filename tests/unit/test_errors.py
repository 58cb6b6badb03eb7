"""The error codec of ``drsite.core.errors``: code ↔ class ↔ HTTP status ↔ exit code, the wire
form and its decoding (known, contradicting, unknown and malformed bodies), the table in
``docs/control-plane.md``, and the HTTP clients that decode with it."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx
import pytest

from drsite.agent.link import vault_error
from drsite.client.api import error_from_response
from drsite.core import errors as E

DOC = Path(__file__).resolve().parents[2] / "docs" / "control-plane.md"

# the contract, written out: code → (class, HTTP status, exit code)
EXPECTED: dict[str, tuple[type[E.DrsiteError], int, int]] = {
    "error": (E.PermanentError, 500, 2),
    "invalid_input": (E.InvalidInput, 400, 2),
    "method_not_allowed": (E.MethodNotAllowed, 405, 2),
    "auth_failed": (E.AuthError, 401, 2),
    "forbidden": (E.Forbidden, 403, 2),
    "not_found": (E.NotFound, 404, 2),
    "vm_not_found": (E.VmNotFound, 404, 2),
    "object_not_found": (E.ObjectNotFound, 404, 2),
    "conflict": (E.Conflict, 409, 2),
    "object_exists": (E.ObjectExists, 409, 2),
    "interrupted": (E.OperationInterrupted, 409, 2),
    "fenced": (E.Fenced, 409, 2),
    "broken_chain": (E.BrokenChain, 500, 2),
    "corrupt_data": (E.CorruptData, 500, 2),
    "invalid_replica_state": (E.InvalidReplicaState, 500, 2),
    "point_not_authentic": (E.PointNotAuthentic, 500, 2),
    "secret_unreadable": (E.SecretUnreadable, 500, 2),
    "tracking_lost": (E.TrackingLost, 500, 2),
    "hypervisor_error": (E.HypervisorError, 500, 2),
    "transient": (E.TransientError, 503, 75),
    "internal": (E.InternalError, 500, 75),
    "network": (E.NetworkError, 503, 75),
    "low_disk": (E.LowDiskSpace, 503, 75),
    "low_memory": (E.LowMemory, 503, 75),
    "busy": (E.Busy, 503, 75),
    "command_interrupted": (E.CommandInterrupted, 503, 75),
    "peer_unavailable": (E.PeerUnavailable, 503, 75),
    "grant_pending": (E.GrantPending, 503, 75),
    "standby": (E.StandbyVault, 503, 75),
}


def test_registry_is_the_contract() -> None:
    assert set(E.ERROR_CLASSES) == set(EXPECTED)
    for code, (cls, status, exit_code) in EXPECTED.items():
        assert E.ERROR_CLASSES[code] is cls and cls.code == code
        assert cls.http_status == status, code
        assert cls.exit_code == exit_code, code
        assert cls.exit_code == (E.EXIT_TRANSIENT if cls.error_class is E.ErrorClass.TRANSIENT
                                 else E.EXIT_PERMANENT)
        assert issubclass(cls, E.TransientError if exit_code == 75 else E.PermanentError)


@pytest.mark.parametrize("code", sorted(EXPECTED))
def test_every_class_round_trips(code: str) -> None:
    cls = E.ERROR_CLASSES[code]
    for hint in (None, "", "do this next"):
        err = cls(f"something about {code}", hint=hint)
        wire = err.to_dict()
        assert wire == {"code": code, "class": cls.error_class.value,
                        "message": f"something about {code}",
                        "hint": cls.default_hint if hint is None else hint}
        back = E.from_dict(wire)
        assert type(back) is cls and back.to_dict() == wire
        # a known code wins over the status it came with (the vault answers 422 invalid_input)
        assert type(E.from_dict(wire, http_status=418)) is cls
        assert back.exit_code == cls.exit_code and back.http_status == cls.http_status


def test_docs_table_is_the_registry() -> None:
    rows = re.findall(r"^\| `(\w+)` \| `(\w+)` \((permanent|transient)\) \| (\d+) \| (\d+) \|$",
                      DOC.read_text(), flags=re.M)
    assert rows, "the error table is missing from docs/control-plane.md"
    table = {code: (name, klass, int(status), int(exit_code))
             for code, name, klass, status, exit_code in rows}
    assert len(table) == len(rows), "a code appears twice in the table"
    assert table == {code: (cls.__name__, cls.error_class.value, cls.http_status, cls.exit_code)
                     for code, cls in E.ERROR_CLASSES.items()}


def test_contradicting_class_wins_and_keeps_the_code() -> None:
    """A sender that gave up on a transient fault reports it permanent: retrying stops."""
    err = E.from_dict({"code": "network", "class": "permanent", "message": "gave up",
                       "hint": "h"})
    assert type(err) is E.PermanentError and not err.transient and err.exit_code == 2
    assert err.to_dict() == {"code": "network", "class": "permanent", "message": "gave up",
                             "hint": "h"}
    err = E.from_dict({"code": "vm_not_found", "class": "transient", "message": "m"})
    assert type(err) is E.TransientError and err.code == "vm_not_found" and err.transient


def test_unknown_codes() -> None:
    # a newer peer's code: the reported class, the code kept for forwarding
    err = E.from_dict({"code": "quota_exceeded", "class": "transient", "message": "slow down",
                       "hint": "wait"}, http_status=400)
    assert type(err) is E.TransientError and err.exit_code == 75
    assert err.to_dict() == {"code": "quota_exceeded", "class": "transient",
                             "message": "slow down", "hint": "wait"}
    err = E.from_dict({"code": "quota_exceeded", "class": "permanent", "message": "no"})
    assert type(err) is E.PermanentError and err.code == "quota_exceeded"
    # no class either: by HTTP status, still keeping code, message and hint
    for status, cls in ((400, E.InvalidInput), (401, E.AuthError), (403, E.Forbidden),
                        (404, E.NotFound), (405, E.MethodNotAllowed), (409, E.Conflict),
                        (422, E.InvalidInput), (500, E.InternalError), (502, E.NetworkError),
                        (503, E.NetworkError), (504, E.NetworkError), (418, E.PermanentError),
                        (None, E.PermanentError)):
        err = E.from_dict({"code": "odd", "message": "m", "hint": "h"}, http_status=status)
        assert type(err) is cls, status
        assert (err.code, err.message, err.hint) == ("odd", "m", "h")
        assert type(E.from_dict({}, http_status=status)) is cls
    assert E.class_for_status(503).error_class is E.ErrorClass.TRANSIENT


@pytest.mark.parametrize("body", [None, [], "text", 7, {"code": 5, "class": ["x"], "message": 3,
                                                         "hint": {"a": 1}},
                                  {"code": "", "message": ""}, {"class": "sideways"}])
def test_malformed_bodies_decode_without_raising(body: Any) -> None:
    err = E.from_dict(body, http_status=404)
    assert type(err) is E.NotFound and err.message and err.hint == E.NotFound.default_hint
    err = E.from_dict(body)
    assert type(err) is E.PermanentError and "no message" in err.message


def test_missing_message_names_code_and_status() -> None:
    err = E.from_dict({"code": "fenced"}, http_status=409)
    assert type(err) is E.Fenced and "fenced" in err.message and "409" in err.message


def test_codes_are_defined_in_core_only_and_once() -> None:
    with pytest.raises(TypeError, match=r"outside drsite\.core\.errors"):
        class _Elsewhere(E.PermanentError):
            code = "elsewhere"

    class Refinement(E.NotFound):  # a local refinement travels as the code it inherits
        pass

    assert Refinement("x").to_dict()["code"] == "not_found"
    assert type(E.from_dict(Refinement("x").to_dict())) is E.NotFound
    assert "elsewhere" not in E.ERROR_CLASSES
    with pytest.raises(TypeError, match="already taken"):
        type("Again", (E.PermanentError,), {"code": "fenced", "__module__": E.__name__})
    assert E.ERROR_CLASSES["fenced"] is E.Fenced


# --------------------------------------------------------------------------- HTTP clients


def _response(status: int, body: Any = None, *, text: str | None = None) -> httpx.Response:
    req = httpx.Request("POST", "https://vault.invalid/api/v1/items/i1/resync")
    if text is not None:
        return httpx.Response(status, text=text, request=req)
    if body is None:
        return httpx.Response(status, request=req)
    return httpx.Response(status, json=body, request=req)


@pytest.mark.parametrize("code", ["fenced", "corrupt_data", "forbidden", "interrupted",
                                  "broken_chain", "low_disk", "internal"])
def test_vault_client_raises_every_class(code: str) -> None:
    """The client knew 9 codes: ``fenced`` and ``corrupt_data`` arrived as generic errors."""
    cls = E.ERROR_CLASSES[code]
    sent = cls("what happened", hint="what to do").to_dict()
    for decode in (error_from_response, lambda r: vault_error(r, "/heartbeat")):
        err = decode(_response(cls.http_status, sent))
        assert type(err) is cls and err.to_dict() == sent


def test_vault_client_bodies_that_are_not_ours() -> None:
    err = error_from_response(_response(422, {"detail": [{"loc": ["body", "x"]}]}))
    assert type(err) is E.InvalidInput and err.message.startswith("request refused:")
    err = error_from_response(_response(409, {"detail": {"code": "fenced", "message": "old",
                                                         "class": "permanent", "hint": ""}}))
    assert type(err) is E.Fenced and err.message == "old"
    err = error_from_response(_response(404, {"detail": "Not Found"}))
    assert type(err) is E.NotFound and err.message == "Not Found"
    err = error_from_response(_response(502, text="<html>bad gateway</html>"))
    assert type(err) is E.NetworkError and err.transient
    assert err.message == "HTTP 502 from POST /api/v1/items/i1/resync"
    err = vault_error(_response(500), "/heartbeat")
    assert type(err) is E.InternalError and err.transient and "/heartbeat" in err.message
