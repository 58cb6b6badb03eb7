"""The vault CA: creation, reload, permissions, issuing, CSR checks, identities."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from drsite.core.errors import AuthError, InvalidInput, PermanentError
from drsite.pki import CertificateAuthority, cert_identity, make_key_and_csr


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority.load_or_create(tmp_path / "ca")


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_create_then_load_is_idempotent(tmp_path: Path) -> None:
    d = tmp_path / "ca"
    a = CertificateAuthority.load_or_create(d, name="test CA")
    key_bytes = (d / "ca.key").read_bytes()
    b = CertificateAuthority.load_or_create(d)
    assert a.ca_pem == b.ca_pem == (d / "ca.pem").read_bytes()
    assert (d / "ca.key").read_bytes() == key_bytes
    cert = x509.load_pem_x509_certificate(a.ca_pem)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "test CA"
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert cert.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert bc.ca
    days = (cert.not_valid_after_utc - cert.not_valid_before_utc).days
    assert 3649 <= days <= 3651
    # a certificate signed by the first instance verifies with the reloaded one
    _, csr = make_key_and_csr("h1")
    assert b.verify_issued(a.sign_csr(csr, common_name="h1", site="s1")).common_name == "h1"
    # no temp files left behind
    assert sorted(p.name for p in d.iterdir()) == [".ca.lock", "ca.key", "ca.pem"]


def test_key_is_private(tmp_path: Path) -> None:
    d = tmp_path / "ca"
    CertificateAuthority.load_or_create(d)
    assert _mode(d / "ca.key") == 0o600
    assert _mode(d) & 0o077 == 0
    os.chmod(d / "ca.key", 0o644)
    CertificateAuthority.load_or_create(d)  # loading tightens a loosened key
    assert _mode(d / "ca.key") == 0o600


def test_certificate_without_key_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "ca"
    CertificateAuthority.load_or_create(d)
    (d / "ca.key").unlink()
    with pytest.raises(PermanentError, match="key"):
        CertificateAuthority.load_or_create(d)


def test_key_without_certificate_starts_afresh(tmp_path: Path) -> None:
    """A crash between the two writes leaves a key only: no agent can hold a cert from it."""
    d = tmp_path / "ca"
    first = CertificateAuthority.load_or_create(d)
    (d / "ca.pem").unlink()
    second = CertificateAuthority.load_or_create(d)
    assert second.ca_pem != first.ca_pem
    assert CertificateAuthority.load_or_create(d).ca_pem == second.ca_pem


def test_mismatched_key_is_refused(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    CertificateAuthority.load_or_create(a)
    CertificateAuthority.load_or_create(b)
    (a / "ca.key").write_bytes((b / "ca.key").read_bytes())
    with pytest.raises(PermanentError, match="does not match"):
        CertificateAuthority.load_or_create(a)


def test_sign_csr_sets_identity_extensions_and_chain(ca: CertificateAuthority) -> None:
    key_pem, csr_pem = make_key_and_csr("whatever-the-agent-asked")
    cert_pem = ca.sign_csr(csr_pem, common_name="host-1", site="site-a", days=30)
    cert = x509.load_pem_x509_certificate(cert_pem)
    ca_cert = x509.load_pem_x509_certificate(ca.ca_pem)
    cert.verify_directly_issued_by(ca_cert)  # raises if the chain is wrong
    # the subject comes from the vault, not from the CSR
    ident = cert_identity(cert_pem)
    assert (ident.common_name, ident.site) == ("host-1", "site-a")
    assert ident.serial == cert.serial_number
    assert ident.fingerprint == cert.fingerprint(hashes.SHA256()).hex()
    # the private key matches the certificate
    key = serialization.load_pem_private_key(key_pem, password=None)
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    assert key.public_key().public_bytes(serialization.Encoding.DER, pub) == \
        cert.public_key().public_bytes(serialization.Encoding.DER, pub)
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH}
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(i) for i in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    # expiry set from days
    assert abs(ident.not_after - (time.time() + 30 * 86400)) < 120
    assert ca.verify_issued(cert.public_bytes(serialization.Encoding.DER)) == ident


def test_identity_from_der_and_pem(ca: CertificateAuthority) -> None:
    _, csr = make_key_and_csr("x")
    pem = ca.sign_csr(csr, common_name="h2", site="s2")
    der = x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)
    assert cert_identity(pem) == cert_identity(der)
    with pytest.raises(InvalidInput):
        cert_identity(b"not a certificate")
    with pytest.raises(InvalidInput):
        cert_identity(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")


def test_server_cert_sans_and_usage(ca: CertificateAuthority) -> None:
    cert_pem, key_pem = ca.issue_server_cert(hostnames=["vault.local", "localhost"],
                                             ips=["127.0.0.1", "::1"], days=10)
    cert = x509.load_pem_x509_certificate(cert_pem)
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(ca.ca_pem))
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["vault.local", "localhost"]
    assert [str(i) for i in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert cert_identity(cert_pem).common_name == "vault.local"
    assert b"PRIVATE KEY" in key_pem
    with pytest.raises(InvalidInput):
        ca.issue_server_cert(hostnames=[], ips=["not-an-ip"])
    with pytest.raises(InvalidInput):
        ca.issue_server_cert(hostnames=[], ips=[])


def test_expired_certificate(ca: CertificateAuthority) -> None:
    _, csr = make_key_and_csr("old")
    pem = ca.sign_csr(csr, common_name="old", site="s", days=-1)
    cert = x509.load_pem_x509_certificate(pem)
    assert cert.not_valid_after_utc.timestamp() < time.time()
    assert cert.not_valid_before_utc < cert.not_valid_after_utc
    with pytest.raises(AuthError, match="expired"):
        ca.verify_issued(pem)


def test_cert_from_another_ca_is_not_verified(tmp_path: Path, ca: CertificateAuthority) -> None:
    other = CertificateAuthority.load_or_create(tmp_path / "other")
    _, csr = make_key_and_csr("h")
    with pytest.raises(AuthError, match="not issued"):
        ca.verify_issued(other.sign_csr(csr, common_name="h", site="s"))


def _csr_with(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "h")]))
           .sign(key, hashes.SHA256()))
    return csr.public_bytes(serialization.Encoding.PEM)


def test_bad_csrs_refused(ca: CertificateAuthority) -> None:
    with pytest.raises(InvalidInput, match="malformed"):
        ca.sign_csr(b"garbage", common_name="h", site="s")
    with pytest.raises(InvalidInput, match="malformed"):
        ca.sign_csr(b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
                    common_name="h", site="s")
    # a CSR whose signature does not match its key: flip a byte of the signature
    _, csr_pem = make_key_and_csr("h")
    der = bytearray(x509.load_pem_x509_csr(csr_pem).public_bytes(serialization.Encoding.DER))
    der[-5] ^= 0x55
    tampered = x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(InvalidInput, match="signature"):
        ca.sign_csr(tampered, common_name="h", site="s")
    # weak keys
    with pytest.raises(InvalidInput, match="curve"):
        ca.sign_csr(_csr_with(ec.generate_private_key(ec.SECP256K1())), common_name="h", site="s")
    with pytest.raises(InvalidInput, match="bits"):
        ca.sign_csr(_csr_with(rsa.generate_private_key(65537, 1024)), common_name="h", site="s")
    # RSA 2048 is fine
    ca.sign_csr(_csr_with(rsa.generate_private_key(65537, 2048)), common_name="h", site="s")
    # names are validated
    _, good = make_key_and_csr("h")
    with pytest.raises(InvalidInput):
        ca.sign_csr(good, common_name="../evil", site="s")
    with pytest.raises(InvalidInput):
        ca.sign_csr(good, common_name="h", site="a/b")
