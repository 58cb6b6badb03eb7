"""``drsite agent failover`` refuses while a vault answers — over real TLS with the agent's
certificate, against every vault the host follows (a pair: ``--vault`` A and B): the refusal
names each vault asked and which answered (it used to name only the first URL, even when that
one was the dead one and the standby answered), and a 5xx or an unreachable vault is no answer."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from drsite import tlsutil
from drsite.agent.breakglass import refuse_while_a_vault_answers, vault_answers
from drsite.agent.registration import CA_FILE, CERT_FILE, KEY_FILE, AgentIdentity
from drsite.core.errors import Conflict
from drsite.pki import CertificateAuthority, make_key_and_csr

USE = "failover unplanned i-1"


def version_app(status: int) -> Starlette:
    async def version(_: Request) -> JSONResponse:
        return JSONResponse({"version": "t"}, status_code=status)
    return Starlette(routes=[Route("/api/v1/version", version)])


class Vaults:
    """A CA, an agent identity it signed, and HTTPS servers of the vault's version route."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.ca = CertificateAuthority.load_or_create(tmp / "ca")
        cert, key = self.ca.issue_server_cert(hostnames=["localhost"], ips=["127.0.0.1"])
        (tmp / "server.pem").write_bytes(cert)
        (tmp / "server.key").write_bytes(key)
        self.agent_dir = tmp / "agent"
        self.agent_dir.mkdir()
        key_pem, csr = make_key_and_csr("h-sec")
        (self.agent_dir / KEY_FILE).write_bytes(key_pem)
        (self.agent_dir / CERT_FILE).write_bytes(self.ca.sign_csr(csr, common_name="h-sec",
                                                                  site="sec"))
        (self.agent_dir / CA_FILE).write_bytes(self.ca.cert_path.read_bytes())
        self.servers: list[tlsutil.ServerHandle] = []

    def serve(self, status: int = 200) -> str:
        h = tlsutil.start_in_thread(version_app(status), host="127.0.0.1", port=0,
                                    certfile=self.tmp / "server.pem",
                                    keyfile=self.tmp / "server.key",
                                    cafile=self.ca.cert_path, client_cert="optional")
        self.servers.append(h)
        return h.url

    def identity(self, *urls: str) -> AgentIdentity:
        return AgentIdentity(self.agent_dir, "h-sec", "sec", urls[0], "b", tuple(urls[1:]))


@pytest.fixture
def vaults(tmp_path: Path) -> Iterator[Vaults]:
    v = Vaults(tmp_path)
    yield v
    for h in v.servers:
        h.stop()


def dead_url() -> str:
    """An HTTPS URL on a local port nobody listens on (connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"https://127.0.0.1:{port}"


def test_the_refusal_names_every_vault_asked_and_which_answered(vaults: Vaults) -> None:
    a, b = dead_url(), vaults.serve()   # site A lost, B (the standby) answers
    ident = vaults.identity(a, b)
    assert vault_answers(ident, timeout=5) == {a: False, b: True}
    with pytest.raises(Conflict) as e:
        refuse_while_a_vault_answers(ident, USE, timeout=5)
    msg, hint = e.value.message, e.value.hint or ""
    assert msg.startswith(f"the vault at {b} answers ({a} did not)"), msg
    assert "break-glass is for when no vault does" in msg
    assert f"drsite {USE}" in hint and "--force" in hint and "drsite vault promote" in hint


def test_both_vaults_answering_are_both_named(vaults: Vaults) -> None:
    a, b = vaults.serve(), vaults.serve()
    with pytest.raises(Conflict) as e:
        refuse_while_a_vault_answers(vaults.identity(a, b), USE, timeout=5)
    assert e.value.message.startswith(f"the vaults at {a}, {b} answer: "), e.value.message


def test_one_vault_answering_names_it_without_the_pair_hint(vaults: Vaults) -> None:
    a = vaults.serve()
    with pytest.raises(Conflict) as e:
        refuse_while_a_vault_answers(vaults.identity(a), USE, timeout=5)
    assert e.value.message.startswith(f"the vault at {a} answers: "), e.value.message
    assert "promote" not in (e.value.hint or "")


def test_no_vault_answering_lets_break_glass_run(vaults: Vaults) -> None:
    """Unreachable, a 5xx (a vault that cannot serve), and a vault whose certificate the agent
    does not trust: none of them answers, so nothing is refused."""
    broken = vaults.serve(503)
    stranger_ca = CertificateAuthority.load_or_create(vaults.tmp / "other-ca")
    cert, key = stranger_ca.issue_server_cert(hostnames=["localhost"], ips=["127.0.0.1"])
    (vaults.tmp / "o.pem").write_bytes(cert)
    (vaults.tmp / "o.key").write_bytes(key)
    h = tlsutil.start_in_thread(version_app(200), host="127.0.0.1", port=0,
                                certfile=vaults.tmp / "o.pem", keyfile=vaults.tmp / "o.key",
                                cafile=stranger_ca.cert_path, client_cert="optional")
    vaults.servers.append(h)
    ident = vaults.identity(dead_url(), broken, h.url)
    assert set(vault_answers(ident, timeout=5).values()) == {False}
    refuse_while_a_vault_answers(ident, USE, timeout=5)  # no Conflict
