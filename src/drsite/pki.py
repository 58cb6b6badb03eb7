"""The vault's own certificate authority and the X.509 helpers agents use with it.

The vault keeps one CA (``ca.pem`` + ``ca.key``, EC P-256, valid 10 years) in its data
directory. At registration an agent sends a CSR made by :func:`make_key_and_csr`; the vault signs
it with :meth:`CertificateAuthority.sign_csr` into a certificate whose subject says who the agent
is (CN = host id, O = site). The same certificate is the agent's TLS client certificate towards
the vault and its server certificate when it serves its recovery store.

Responsible for: creating/loading the CA durably (atomic, fsynced writes, key file 0600),
issuing server certificates, signing CSRs after checking them, and reading a certificate's
identity. Not responsible for: revocation (no CRL/OCSP: certificates expire), storing issued
certificates (the vault's database does), TLS itself (:mod:`drsite.tlsutil`).

Every error leaves this module as a :mod:`drsite.core.errors` class: ``InvalidInput`` for a bad
CSR/certificate/argument, ``PermanentError`` for an unusable CA directory.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import ipaddress
import logging
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from drsite.core.errors import AuthError, InvalidInput, PermanentError, classify_os_error
from drsite.core.model import validate_name
from drsite.fsutil import atomic_write_bytes

log = logging.getLogger(__name__)

CA_CERT = "ca.pem"
CA_KEY = "ca.key"
CA_LOCK = ".ca.lock"
CA_DAYS = 3650
_BACKDATE = dt.timedelta(minutes=5)   # tolerate small clock skew between vault and agents
_MIN_RSA_BITS = 2048
_EC_CURVES = (ec.SECP256R1, ec.SECP384R1)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _validity(days: int, ca_not_after: dt.datetime | None) -> tuple[dt.datetime, dt.datetime]:
    """``(not_before, not_after)``: backdated a little for skew; ``days`` may be negative (an
    already expired certificate, for tests); never past the issuing CA's own expiry."""
    now = _now()
    not_after = now + dt.timedelta(days=days)
    if ca_not_after is not None and not_after > ca_not_after:
        not_after = ca_not_after
    not_before = min(now - _BACKDATE, not_after - dt.timedelta(days=1))
    return not_before, not_after


def _load_cert(data: bytes, what: str = "certificate") -> x509.Certificate:
    """A certificate from PEM or DER bytes; ``InvalidInput`` if it is neither."""
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_certificate(data)
        return x509.load_der_x509_certificate(data)
    except (ValueError, TypeError) as exc:
        raise InvalidInput(f"{what} is not a valid X.509 certificate: {exc}") from exc


def _check_public_key(key: object) -> None:
    """Accept EC P-256/P-384 and RSA >= 2048 bits; refuse anything weaker or stranger."""
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, _EC_CURVES):
            raise InvalidInput(f"CSR key uses curve {key.curve.name}; use P-256 or P-384")
        return
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < _MIN_RSA_BITS:
            raise InvalidInput(f"CSR RSA key has {key.key_size} bits; at least {_MIN_RSA_BITS}")
        return
    raise InvalidInput(f"CSR key type {type(key).__name__} is not accepted; use EC P-256")


def _attr(name: x509.Name, oid: x509.ObjectIdentifier) -> str:
    values = name.get_attributes_for_oid(oid)
    if not values:
        return ""
    v = values[0].value
    return v.decode(errors="replace") if isinstance(v, bytes) else str(v)


@dataclass(frozen=True)
class CertIdentity:
    """Who a certificate names: ``common_name`` (an agent's host id, or a server's name),
    ``site`` (the subject's O, empty if absent), ``serial``, ``not_after`` (POSIX seconds) and the
    SHA-256 ``fingerprint`` of its DER (lower-case hex). Says nothing about whether the
    certificate is trusted: TLS (or :meth:`CertificateAuthority.verify_issued`) decides that."""

    common_name: str
    site: str
    serial: int
    not_after: float
    fingerprint: str

    def __str__(self) -> str:
        return (f"CN={self.common_name} O={self.site} serial={self.serial:x} "
                f"sha256={self.fingerprint[:16]}")


def cert_identity(cert: bytes) -> CertIdentity:
    """The identity of a certificate given as DER or PEM bytes. ``InvalidInput`` if unparsable.
    Does not check trust or validity."""
    c = _load_cert(cert)
    return CertIdentity(
        common_name=_attr(c.subject, NameOID.COMMON_NAME),
        site=_attr(c.subject, NameOID.ORGANIZATION_NAME),
        serial=c.serial_number,
        not_after=c.not_valid_after_utc.timestamp(),
        fingerprint=c.fingerprint(hashes.SHA256()).hex(),
    )


def make_key_and_csr(common_name: str) -> tuple[bytes, bytes]:
    """A new EC P-256 private key and a CSR for it: ``(key_pem, csr_pem)``.

    The CSR's subject is only a suggestion: the vault sets the real subject when it signs.
    The key is returned unencrypted; the caller stores it with mode 0600.
    """
    if not common_name or len(common_name) > 64:
        raise InvalidInput(f"invalid certificate common name {common_name!r}")
    key = _new_key()
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
           .sign(key, hashes.SHA256()))
    return _key_pem(key), csr.public_bytes(serialization.Encoding.PEM)


@contextlib.contextmanager
def _ca_dir_locked(directory: Path) -> Iterator[None]:
    """``directory`` (created 0700) under its CA lock: two processes never create or install
    two CAs at once. OS errors become drsite errors naming the directory."""
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(directory / CA_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)
    except OSError as exc:
        raise classify_os_error(exc, f"CA directory {directory}") from exc


class CertificateAuthority:
    """The vault's CA: a self-signed EC P-256 root that signs agent and server certificates.

    Responsible for: its key and certificate on disk (``ca.key`` mode 0600, written atomically
    and fsynced), issuing certificates with the right extensions, and checking CSRs (parsable,
    valid self-signature, acceptable key) before signing. Not responsible for: deciding *who*
    may get a certificate (the registration-key check is the vault's), revocation, or keeping
    a record of what it issued.
    """

    def __init__(self, directory: Path, cert: x509.Certificate,
                 key: ec.EllipticCurvePrivateKey) -> None:
        self.directory = Path(directory)
        self._cert = cert
        self._key = key
        self.ca_pem: bytes = cert.public_bytes(serialization.Encoding.PEM)

    @property
    def cert_path(self) -> Path:
        return self.directory / CA_CERT

    @property
    def certificate(self) -> x509.Certificate:
        return self._cert

    @classmethod
    def load_or_create(cls, directory: Path, *, name: str = "drsite vault CA") -> CertificateAuthority:
        """Load the CA in ``directory``, or create it there if it has none yet.

        Idempotent: a second call loads what the first wrote. A crash between writing the key and
        the certificate leaves no certificate, so no agent can hold one from that key: the CA is
        created afresh. A certificate without its key is refused (``PermanentError``): replacing
        it would orphan every agent certificate.
        """
        directory = Path(directory)
        cert_path, key_path = directory / CA_CERT, directory / CA_KEY
        with _ca_dir_locked(directory):
            if cert_path.exists():
                return cls._load(directory, cert_path, key_path)
            return cls._create(directory, name, cert_path, key_path)

    @classmethod
    def install(cls, directory: Path, cert_pem: bytes, key_pem: bytes) -> CertificateAuthority:
        """Write a CA held elsewhere (the vault's database: a standby vault taking over) into
        ``directory``, which has none yet, and load it (key and certificate checked to match).
        Key first, then the certificate, as :meth:`load_or_create`; an existing CA there is
        loaded, not replaced (the caller compares it)."""
        directory = Path(directory)
        cert_path, key_path = directory / CA_CERT, directory / CA_KEY
        with _ca_dir_locked(directory):
            if not cert_path.exists():
                atomic_write_bytes(key_path, key_pem)
                os.chmod(key_path, 0o600)
                atomic_write_bytes(cert_path, cert_pem)
                os.chmod(cert_path, 0o644)
            return cls._load(directory, cert_path, key_path)

    def key_pem(self) -> bytes:
        """The CA's private key (PEM, unencrypted): only for sealing it into the database."""
        return _key_pem(self._key)

    @classmethod
    def _load(cls, directory: Path, cert_path: Path, key_path: Path) -> CertificateAuthority:
        if not key_path.exists():
            raise PermanentError(f"CA certificate {cert_path} exists but its key {key_path} is "
                                 "missing", hint="Restore ca.key from a backup of the vault's "
                                 "data directory; agents cannot be re-issued without it.")
        mode = stat.S_IMODE(key_path.stat().st_mode)
        if mode & 0o077:
            log.warning("CA key %s had mode %o; tightening to 0600", key_path, mode)
            os.chmod(key_path, 0o600)
        cert = _load_cert(cert_path.read_bytes(), f"CA certificate {cert_path}")
        try:
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        except (ValueError, TypeError) as exc:
            raise PermanentError(f"CA key {key_path} is unreadable: {exc}") from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise PermanentError(f"CA key {key_path} is not an EC key")
        pub = serialization.PublicFormat.SubjectPublicKeyInfo
        if (key.public_key().public_bytes(serialization.Encoding.DER, pub)
                != cert.public_key().public_bytes(serialization.Encoding.DER, pub)):
            raise PermanentError(f"CA key {key_path} does not match certificate {cert_path}")
        return cls(directory, cert, key)

    @classmethod
    def _create(cls, directory: Path, name: str, cert_path: Path,
                key_path: Path) -> CertificateAuthority:
        key = _new_key()
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name),
                             x509.NameAttribute(NameOID.ORGANIZATION_NAME, "drsite")])
        not_before, not_after = _validity(CA_DAYS, None)
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (x509.CertificateBuilder()
                .subject_name(subject).issuer_name(subject)
                .public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(not_before).not_valid_after(not_after)
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                             key_encipherment=False, data_encipherment=False,
                                             key_agreement=False, key_cert_sign=True,
                                             crl_sign=True, encipher_only=False,
                                             decipher_only=False), critical=True)
                .add_extension(ski, critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                               critical=False)
                .sign(key, hashes.SHA256()))
        # key first (mkstemp creates 0600 files), then the certificate: see load_or_create
        atomic_write_bytes(key_path, _key_pem(key))
        os.chmod(key_path, 0o600)
        atomic_write_bytes(cert_path, cert.public_bytes(serialization.Encoding.PEM))
        os.chmod(cert_path, 0o644)
        log.info("created CA %r in %s (sha256 %s)", name, directory,
                 cert.fingerprint(hashes.SHA256()).hex()[:16])
        return cls(directory, cert, key)

    # -- issuing -----------------------------------------------------------------------------

    def _leaf(self, subject: x509.Name, public_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey,
              *, days: int, eku: list[x509.ObjectIdentifier],
              san: list[x509.GeneralName]) -> x509.Certificate:
        not_before, not_after = _validity(days, self._cert.not_valid_after_utc)
        is_rsa = isinstance(public_key, rsa.RSAPublicKey)
        ca_ski = self._cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        b = (x509.CertificateBuilder()
             .subject_name(subject).issuer_name(self._cert.subject)
             .public_key(public_key)
             .serial_number(x509.random_serial_number())
             .not_valid_before(not_before).not_valid_after(not_after)
             .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
             .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                          key_encipherment=is_rsa, data_encipherment=False,
                                          key_agreement=False, key_cert_sign=False,
                                          crl_sign=False, encipher_only=False,
                                          decipher_only=False), critical=True)
             .add_extension(x509.ExtendedKeyUsage(eku), critical=False)
             .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
             .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
                            critical=False))
        if san:
            b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return b.sign(self._key, hashes.SHA256())

    def issue_server_cert(self, *, hostnames: list[str], ips: list[str],
                          days: int = 825) -> tuple[bytes, bytes]:
        """A new key and a server certificate (serverAuth) for ``hostnames``/``ips`` as SANs:
        ``(cert_pem, key_pem)``. The CN is the first name given. ``InvalidInput`` for a bad IP
        or when no name at all is given."""
        if not hostnames and not ips:
            raise InvalidInput("a server certificate needs at least one hostname or IP")
        san: list[x509.GeneralName] = [x509.DNSName(h) for h in hostnames]
        for ip in ips:
            try:
                san.append(x509.IPAddress(ipaddress.ip_address(ip)))
            except ValueError as exc:
                raise InvalidInput(f"invalid IP address {ip!r} for a server certificate") from exc
        cn = (hostnames or ips)[0]
        key = _new_key()
        cert = self._leaf(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]),
                          key.public_key(), days=days, eku=[ExtendedKeyUsageOID.SERVER_AUTH],
                          san=san)
        return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)

    def sign_csr(self, csr_pem: bytes, *, common_name: str, site: str, days: int = 365) -> bytes:
        """Sign an agent's CSR into its certificate (PEM).

        The subject is set here (CN = ``common_name``, the host id; O = ``site``), never taken
        from the CSR. The certificate carries clientAuth and serverAuth (an agent's store server
        uses the same certificate) and SANs ``DNS:localhost``, ``IP:127.0.0.1``. Refused with
        ``InvalidInput``: a malformed CSR, one whose self-signature does not verify (so the
        requester does not hold the key), a weak key, bad names.
        """
        validate_name("host", common_name)
        validate_name("site", site)
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except (ValueError, TypeError) as exc:
            raise InvalidInput(f"certificate signing request is malformed: {exc}") from exc
        try:
            valid = csr.is_signature_valid
        except (ValueError, InvalidSignature) as exc:
            raise InvalidInput(f"certificate signing request signature is unusable: {exc}") from exc
        if not valid:
            raise InvalidInput("certificate signing request signature is invalid",
                               hint="The CSR was not signed by the key it carries; make a new one.")
        pub = csr.public_key()
        _check_public_key(pub)
        assert isinstance(pub, ec.EllipticCurvePublicKey | rsa.RSAPublicKey)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                             x509.NameAttribute(NameOID.ORGANIZATION_NAME, site)])
        cert = self._leaf(subject, pub, days=days,
                          eku=[ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH],
                          san=[x509.DNSName("localhost"),
                               x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
        log.info("signed certificate for host %s of site %s (serial %x, %d days)", common_name,
                 site, cert.serial_number, days)
        return cert.public_bytes(serialization.Encoding.PEM)

    def verify_issued(self, cert: bytes, *, at: float | None = None) -> CertIdentity:
        """The identity of ``cert`` (DER or PEM) if this CA issued it and it is valid at ``at``
        (default now); ``AuthError`` otherwise. For checks outside TLS (TLS verifies the chain
        itself); does not check revocation (there is none)."""
        c = _load_cert(cert)
        try:
            c.verify_directly_issued_by(self._cert)
        except (ValueError, TypeError, InvalidSignature) as exc:
            raise AuthError("certificate was not issued by this vault's CA") from exc
        when = dt.datetime.fromtimestamp(at, dt.UTC) if at is not None else _now()
        if not c.not_valid_before_utc <= when <= c.not_valid_after_utc:
            raise AuthError("certificate is expired or not yet valid",
                            hint="Re-register the agent to get a new certificate.")
        return cert_identity(cert)
