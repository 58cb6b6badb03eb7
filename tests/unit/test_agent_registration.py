"""Agent registration against a fake vault over real TLS: trust on first contact (CA file or
fingerprint, never blind by default), one-time keys, files and their modes."""

from __future__ import annotations

import json
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from drsite.agent.process import agent_register
from drsite.agent.registration import AgentIdentity, normalize_fingerprint, register
from drsite.agent.testing import FakeVault
from drsite.core.errors import AuthError, Conflict, InvalidInput, NotFound
from drsite.pki import CertificateAuthority, cert_identity


@pytest.fixture
def vault(tmp_path: Path) -> Iterator[FakeVault]:
    v = FakeVault(tmp_path / "vault")
    v.start()
    yield v
    v.stop()


def test_register_with_ca_file_writes_identity(vault: FakeVault, tmp_path: Path) -> None:
    data = tmp_path / "agent"
    key = vault.registration_key("site-a")
    ident = agent_register(vault.url, key, data, "host-one", ca_file=vault.ca_file)
    assert ident.site == "site-a" and ident.host_id in vault.hosts
    meta = json.loads((data / "agent.json").read_text())
    assert meta["host_id"] == ident.host_id and meta["vault_url"] == vault.url
    assert meta["site"] == "site-a"
    assert stat.S_IMODE((data / "agent.key").stat().st_mode) == 0o600
    assert (data / "ca.pem").read_bytes() == vault.ca.ca_pem
    cert = cert_identity((data / "agent.pem").read_bytes())
    assert cert.common_name == ident.host_id and cert.site == "site-a"
    assert AgentIdentity.load(data) == ident
    assert ident.client_context() is not None


def test_register_with_fingerprint(vault: FakeVault, tmp_path: Path) -> None:
    fp = ":".join(vault.ca_fingerprint[i:i + 2] for i in range(0, 64, 2)).upper()
    ident = agent_register(vault.url, vault.registration_key("site-b"), tmp_path / "a", "h",
                           ca_fingerprint="SHA256:" + fp)
    assert ident.site == "site-b"
    assert (tmp_path / "a" / "ca.pem").read_bytes() == vault.ca.ca_pem


def test_wrong_fingerprint_is_refused_and_key_not_spent(vault: FakeVault, tmp_path: Path) -> None:
    key = vault.registration_key("site-a")
    with pytest.raises(AuthError, match="fingerprint"):
        agent_register(vault.url, key, tmp_path / "a", "h", ca_fingerprint="ab" * 32)
    assert not (tmp_path / "a" / "agent.json").exists()
    # the key never reached the vault: still usable with the right trust
    agent_register(vault.url, key, tmp_path / "a", "h", ca_fingerprint=vault.ca_fingerprint)


def test_other_ca_file_is_refused(vault: FakeVault, tmp_path: Path) -> None:
    other = CertificateAuthority.load_or_create(tmp_path / "other")
    with pytest.raises(AuthError, match="not signed by the CA"):
        agent_register(vault.url, vault.registration_key("site-a"), tmp_path / "a", "h",
                       ca_file=other.cert_path)


def test_ca_file_and_fingerprint_must_agree(vault: FakeVault, tmp_path: Path) -> None:
    with pytest.raises(AuthError):
        agent_register(vault.url, vault.registration_key("site-a"), tmp_path / "a", "h",
                       ca_file=vault.ca_file, ca_fingerprint="cd" * 32)


def test_no_trust_given_is_refused(vault: FakeVault, tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="refusing to trust"):
        register(vault.url, vault.registration_key("site-a"), tmp_path / "a", host_name="h")


def test_insecure_first_contact_is_explicit(vault: FakeVault, tmp_path: Path,
                                            caplog: pytest.LogCaptureFixture) -> None:
    ident = register(vault.url, vault.registration_key("site-a"), tmp_path / "a", host_name="h",
                     insecure_first_contact=True)
    assert ident.site == "site-a"
    assert vault.ca_fingerprint in caplog.text and "WITHOUT verification" in caplog.text


def test_reused_key_is_refused_with_a_clear_error(vault: FakeVault, tmp_path: Path) -> None:
    key = vault.registration_key("site-a")
    agent_register(vault.url, key, tmp_path / "a", "h1", ca_file=vault.ca_file)
    with pytest.raises(AuthError) as ei:
        agent_register(vault.url, key, tmp_path / "b", "h2", ca_file=vault.ca_file)
    assert "refused the registration key" in ei.value.message
    assert "one-time" in ei.value.hint
    assert not (tmp_path / "b" / "agent.json").exists()
    assert not (tmp_path / "b" / "agent.key").exists()


def test_registered_directory_is_not_overwritten(vault: FakeVault, tmp_path: Path) -> None:
    data = tmp_path / "a"
    agent_register(vault.url, vault.registration_key("site-a"), data, "h", ca_file=vault.ca_file)
    files = {f: (data / f).read_bytes() for f in ("agent.key", "agent.pem", "agent.json")}
    # a site key never registers a host again (the vault refuses it)
    with pytest.raises(Conflict, match="does not re-register"):
        agent_register(vault.url, vault.registration_key("site-a"), data, "h",
                       ca_file=vault.ca_file)
    # another vault: refused here, before anything is sent
    with pytest.raises(Conflict, match="already holds"):
        agent_register("https://127.0.0.1:9", "k", data, "h", ca_file=vault.ca_file)
    # another name: refused here too
    with pytest.raises(Conflict, match="cannot register as"):
        agent_register(vault.url, "k", data, "other", ca_file=vault.ca_file)
    assert {f: (data / f).read_bytes() for f in files} == files


def test_reissue_key_replaces_key_and_certificate(vault: FakeVault, tmp_path: Path) -> None:
    data = tmp_path / "a"
    first = agent_register(vault.url, vault.registration_key("site-a"), data, "h",
                           ca_file=vault.ca_file)
    old_key, old_pem = (data / "agent.key").read_bytes(), (data / "agent.pem").read_bytes()
    # no CA and no name needed: the host's registration has both
    again = agent_register(vault.url, vault.reissue_key(first.host_id), data, None)
    assert again == first
    assert (data / "agent.key").read_bytes() != old_key
    assert (data / "agent.pem").read_bytes() != old_pem
    assert cert_identity((data / "agent.pem").read_bytes()).common_name == first.host_id
    assert vault.hosts[first.host_id].fingerprint == cert_identity((data / "agent.pem")
                                                                   .read_bytes()).fingerprint
    assert stat.S_IMODE((data / "agent.key").stat().st_mode) == 0o600
    assert not list(data.glob("*.next"))


def test_a_half_done_swap_is_rolled_forward(vault: FakeVault, tmp_path: Path) -> None:
    data = tmp_path / "a"
    ident = agent_register(vault.url, vault.registration_key("site-a"), data, "h",
                           ca_file=vault.ca_file)
    # as if the process died after renaming the new key but before renaming the certificate
    (data / "agent.pem.next").write_bytes(b"new certificate")
    (data / "agent.key").write_bytes(b"new key")
    assert AgentIdentity.load(data) == ident
    assert (data / "agent.pem").read_bytes() == b"new certificate"
    assert (data / "agent.key").read_bytes() == b"new key"
    assert not (data / "agent.pem.next").exists()
    # and before either rename
    (data / "agent.key.next").write_bytes(b"key 2")
    (data / "agent.pem.next").write_bytes(b"cert 2")
    AgentIdentity.load(data)
    assert (data / "agent.key").read_bytes() == b"key 2"
    assert (data / "agent.pem").read_bytes() == b"cert 2"


def test_unreachable_vault_and_unregistered_dir(tmp_path: Path, vault: FakeVault) -> None:
    from drsite.core.errors import NetworkError

    with pytest.raises(NetworkError):
        register("https://127.0.0.1:9", "k", tmp_path / "a", host_name="h",
                 ca_pem=vault.ca.ca_pem, timeout=2)
    with pytest.raises(NotFound, match="not registered"):
        AgentIdentity.load(tmp_path / "nothing")


def test_normalize_fingerprint() -> None:
    h = "0123456789abcdef" * 4
    assert normalize_fingerprint(h.upper()) == h
    assert normalize_fingerprint("sha256:" + ":".join(h[i:i + 2] for i in range(0, 64, 2))) == h
    with pytest.raises(InvalidInput):
        normalize_fingerprint("abc")
