"""`drsite hosts show|reissue` and the VM commands find their host by id or name: revoked
hosts are never picked for work, but can be shown and re-issued."""

from __future__ import annotations

import pytest

from drsite.cli.resources import resolve_host
from drsite.core.errors import InvalidInput, NotFound

HOSTS = [
    {"id": "h1", "name": "hv1", "site": "a", "revoked": False},
    {"id": "h2", "name": "hv2", "site": "a", "revoked": True},
    {"id": "h3", "name": "hv1", "site": "b", "revoked": True},
    {"id": "h4", "name": "hv4", "site": "b", "revoked": False},
]


def test_work_never_goes_to_a_revoked_host() -> None:
    with pytest.raises(NotFound):
        resolve_host(HOSTS, "hv2", None)
    with pytest.raises(NotFound):
        resolve_host(HOSTS, "h2", None)
    assert resolve_host(HOSTS, "hv1", None)["id"] == "h1"  # the live one of the two hv1s
    assert resolve_host(HOSTS, None, "b")["id"] == "h4"  # the site's one live host


def test_a_revoked_host_can_be_shown_and_reissued() -> None:
    assert resolve_host(HOSTS, "hv2", None, revoked=True)["id"] == "h2"
    assert resolve_host(HOSTS, "h3", None, revoked=True)["id"] == "h3"
    assert resolve_host(HOSTS, "hv1", "b", revoked=True)["id"] == "h3"
    # a live host of that name wins over a revoked one
    assert resolve_host(HOSTS, "hv1", "a", revoked=True)["id"] == "h1"
    assert resolve_host(HOSTS, "hv1", None, revoked=True)["id"] == "h1"
    with pytest.raises(NotFound):
        resolve_host(HOSTS, "nope", None, revoked=True)
    with pytest.raises(InvalidInput):
        resolve_host(HOSTS, None, None, revoked=True)
