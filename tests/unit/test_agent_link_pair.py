"""The agent's link to a vault pair (issue 14 part 2): it sends to the vault that answered
last; a ``standby`` refusal or an unreachable vault sends it to the other at once, and it
stays there; the vault's other answers are not a reason to switch."""

from __future__ import annotations

import ssl
from collections import Counter
from typing import Any

import httpx
import pytest

from drsite.agent.link import VaultLink
from drsite.core.errors import AuthError, NetworkError, StandbyVault

A, B = "https://vault-a:8443", "https://vault-b:8443"
BEAT: dict[str, Any] = {"host_name": "hv1", "version": "t", "vms": [], "items": []}


class Pair:
    """Two fake vaults: each ``active``, ``standby`` or ``down``."""

    def __init__(self) -> None:
        self.role = {"vault-a": "active", "vault-b": "standby"}
        self.calls: Counter[str] = Counter()
        self.refuse: str | None = None  # a host whose active answers 401

    def handler(self, req: httpx.Request) -> httpx.Response:
        host = req.url.host
        self.calls[host] += 1
        role = self.role[host]
        if role == "down":
            raise httpx.ConnectError("connection refused", request=req)
        if role == "standby":
            return httpx.Response(503, json={"code": "standby", "class": "transient",
                                             "message": "this vault is the standby; the active "
                                                        "vault is elsewhere", "hint": "h"})
        if self.refuse == host:
            return httpx.Response(401, json={"code": "auth_failed", "class": "permanent",
                                             "message": "revoked", "hint": ""})
        return httpx.Response(200, json={"commands": [], "ack": {}})


@pytest.fixture
def pair() -> Pair:
    return Pair()


def link(p: Pair, urls: list[str]) -> VaultLink:
    return VaultLink(urls, ssl.create_default_context(), transport=httpx.MockTransport(p.handler))


def test_follows_the_active_vault_and_stays_there(pair: Pair) -> None:
    ln = link(pair, [B, A])  # the standby first: one refusal, then the active
    ln.heartbeat(BEAT)
    assert ln.vault_url == A and pair.calls == {"vault-b": 1, "vault-a": 1}
    for _ in range(3):
        ln.heartbeat(BEAT)
    assert pair.calls == {"vault-b": 1, "vault-a": 4}  # remembered: no more refusals
    # site A lost, B promoted: the next call fails over by itself
    pair.role = {"vault-a": "down", "vault-b": "active"}
    ln.heartbeat(BEAT)
    assert ln.vault_url == B
    ln.heartbeat(BEAT)
    assert pair.calls["vault-a"] == 5 and pair.calls["vault-b"] == 3


def test_every_vault_refusing_raises_the_standby_error(pair: Pair) -> None:
    pair.role = {"vault-a": "down", "vault-b": "standby"}
    ln = link(pair, [A, B])
    with pytest.raises(StandbyVault, match="standby"):
        ln.heartbeat(BEAT)
    pair.role = {"vault-a": "down", "vault-b": "down"}
    with pytest.raises(NetworkError, match="cannot reach"):
        ln.heartbeat(BEAT)


def test_other_errors_are_the_answer_not_a_reason_to_switch(pair: Pair) -> None:
    pair.refuse = "vault-a"
    ln = link(pair, [A, B])
    with pytest.raises(AuthError, match="revoked"):
        ln.heartbeat(BEAT)
    assert pair.calls == {"vault-a": 1} and ln.vault_url == A


def test_urls_deduplicated_and_one_needed() -> None:
    ln = VaultLink([A + "/", A, B], ssl.create_default_context())
    assert ln.vault_urls == [A, B]
    with pytest.raises(Exception, match="at least one"):
        VaultLink([], ssl.create_default_context())
