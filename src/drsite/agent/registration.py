"""Registering a host with the vault, and the identity that registration leaves on disk.

Registration makes a fresh EC key and a CSR on this host (the private key never leaves it),
sends the CSR with a one-time registration key to ``POST /api/v1/agent/register`` and stores
what the vault returns. Files in the agent's data directory (each replaced atomically, mode
0600)::

    agent.key   the host's private key
    agent.pem   its certificate, signed by the vault's CA (clientAuth + serverAuth)
    ca.pem      the vault's CA certificate (trust anchor for the vault and for peer agents)
    agent.json  {"host_id", "site", "vault_url", "host_name", "registered_at"}; written last,
                so its presence means a complete registration

Registering a host that is already registered (its data directory holds ``agent.json``) needs a
re-issue key for that host (``drsite hosts reissue HOST`` on the vault's side): the request names
the host id, the vault replaces the host's certificate, and the new key and certificate are staged
as ``agent.key.next`` / ``agent.pem.next`` and then renamed over the old ones. A crash between the
two renames is rolled forward by :meth:`AgentIdentity.load` (the old certificate no longer works
once the vault answered, so forward is the only way). A site key never re-registers a host.

Trust on first contact is never silent: the caller passes the vault's CA (a file the operator
copied from the vault), or the SHA-256 fingerprint of that CA as the vault prints it — then the
certificate chain the vault presents is fetched once without verification, the CA whose
fingerprint matches is taken, and registration proceeds over a verified connection. Blind
trust needs ``insecure_first_contact=True`` and is logged with the fingerprint it trusted.

Responsible for: the key, the CSR, the trust decision, the files. Not responsible for: the
heartbeat or anything the daemon does (see :mod:`drsite.agent.daemon`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from drsite import pki, tlsutil
from drsite.agent.link import vault_error
from drsite.core.errors import (
    AuthError,
    Conflict,
    InvalidInput,
    NetworkError,
    NotFound,
    classify_os_error,
)
from drsite.fsutil import atomic_write_bytes, atomic_write_json, fsync_dir, read_json

log = logging.getLogger(__name__)

KEY_FILE = "agent.key"
CERT_FILE = "agent.pem"
CA_FILE = "ca.pem"
IDENTITY_FILE = "agent.json"
NEXT = ".next"  # suffix of a staged key/certificate during a re-registration
REGISTER_PATH = "/api/v1/agent/register"
_ENCODING_DER = 2  # _ssl.ENCODING_DER (not exported by the ssl module before 3.13)


@dataclass(frozen=True)
class AgentIdentity:
    """Who this host is to the vault: host id, site, vault URL and the files of its certificate.

    Responsible for: locating and loading the registration's files and building TLS contexts
    from them. Not responsible for: renewing the certificate or talking to the vault.
    """

    data_dir: Path
    host_id: str
    site: str
    vault_url: str
    host_name: str
    # every vault of a pair (issue 14), the one registered with first; () = only that one
    other_vaults: tuple[str, ...] = ()

    @property
    def vault_urls(self) -> list[str]:
        """The vaults this host follows (``VaultLink``): the one it registered with, then the
        others of its pair."""
        out = [self.vault_url.rstrip("/")]
        for u in self.other_vaults:
            if u.rstrip("/") not in out:
                out.append(u.rstrip("/"))
        return out

    @property
    def key_file(self) -> Path:
        return self.data_dir / KEY_FILE

    @property
    def cert_file(self) -> Path:
        return self.data_dir / CERT_FILE

    @property
    def ca_file(self) -> Path:
        return self.data_dir / CA_FILE

    @staticmethod
    def load(data_dir: Path) -> AgentIdentity:
        """The identity registered in ``data_dir`` (``NotFound`` if this host never registered,
        ``InvalidInput`` if the files are incomplete)."""
        path = Path(data_dir) / IDENTITY_FILE
        _finish_swap(Path(data_dir))
        try:
            raw: Any = read_json(path)
        except FileNotFoundError:
            raise NotFound(f"this host is not registered: {path} does not exist",
                           hint="Run 'drsite agent register --vault URL --key KEY --data DIR' "
                                "first.") from None
        except OSError as e:
            raise classify_os_error(e, f"agent identity {path}") from e
        except ValueError as e:
            raise InvalidInput(f"agent identity {path} is damaged: {e}") from e
        if not isinstance(raw, dict) or not all(isinstance(raw.get(k), str)
                                                for k in ("host_id", "site", "vault_url")):
            raise InvalidInput(f"agent identity {path} is incomplete",
                               hint="Register again into an empty data directory.")
        others = raw.get("vault_urls")
        if not isinstance(others, list) or not all(isinstance(u, str) for u in others):
            others = []
        ident = AgentIdentity(Path(data_dir), raw["host_id"], raw["site"], raw["vault_url"],
                              str(raw.get("host_name") or raw["host_id"]),
                              tuple(u for u in others if u.rstrip("/") != raw["vault_url"].rstrip("/")))
        for f in (ident.key_file, ident.cert_file, ident.ca_file):
            if not f.is_file():
                raise InvalidInput(f"registration file {f} is missing",
                                   hint="Register again into an empty data directory.")
        return ident

    def client_context(self) -> ssl.SSLContext:
        """TLS client context presenting this host's certificate, trusting only the vault's CA."""
        return tlsutil.client_context(self.ca_file, self.cert_file, self.key_file)


# --------------------------------------------------------------------------------- trust


def normalize_fingerprint(fingerprint: str) -> str:
    """``"SHA256:AB:CD:…"`` / ``"sha256:abcd…"`` / ``"abcd…"`` → 64 lowercase hex digits."""
    fp = fingerprint.strip().lower()
    if fp.startswith("sha256:"):
        fp = fp[len("sha256:"):]
    fp = fp.replace(":", "").replace(" ", "")
    if len(fp) != 64 or any(c not in "0123456789abcdef" for c in fp):
        raise InvalidInput(f"{fingerprint!r} is not a SHA-256 fingerprint",
                           hint="Copy the CA fingerprint the vault printed (64 hex digits).")
    return fp


def der_fingerprint(der: bytes) -> str:
    """SHA-256 of a DER certificate, 64 lowercase hex digits."""
    return hashlib.sha256(der).hexdigest()


def pem_fingerprint(pem: bytes) -> str:
    """SHA-256 fingerprint of the first certificate of a PEM blob."""
    cert = x509.load_pem_x509_certificate(pem)
    return der_fingerprint(cert.public_bytes(serialization.Encoding.DER))


def _host_port(vault_url: str) -> tuple[str, int]:
    url = httpx.URL(vault_url)
    if url.scheme != "https" or not url.host:
        raise InvalidInput(f"vault URL {vault_url!r} must be https://HOST:PORT")
    return url.host, url.port or 443


def _unverified_chain_der(sock: ssl.SSLSocket) -> list[bytes]:
    """The certificates the peer sent (leaf first), unverified. Python ≥ 3.13 has a public
    method; 3.10–3.12 have the same one on the internal ``_sslobj``."""
    public = getattr(sock, "get_unverified_chain", None)
    raw: Any = public() if public is not None else sock._sslobj.get_unverified_chain()  # type: ignore[attr-defined]
    out: list[bytes] = []
    for c in raw or []:
        out.append(c if isinstance(c, bytes) else c.public_bytes(_ENCODING_DER))
    if not out:
        leaf = sock.getpeercert(binary_form=True)
        if leaf:
            out.append(leaf)
    return out


def fetch_ca_by_fingerprint(vault_url: str, fingerprint: str, *, timeout: float = 10.0) -> bytes:
    """Fetch the certificate chain the vault presents (unverified), pick the CA certificate
    whose SHA-256 matches ``fingerprint`` and return it as PEM.

    Raises ``AuthError`` when no certificate of the chain matches (wrong fingerprint, or a
    machine in the middle), ``NetworkError`` when the vault cannot be reached. The returned CA
    is then used to verify the vault normally; nothing is trusted without the match.
    """
    want = normalize_fingerprint(fingerprint)
    host, port = _host_port(vault_url)
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # only to read the chain; trust comes from the fingerprint
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw, \
                ctx.wrap_socket(raw, server_hostname=host) as tls:
            chain = _unverified_chain_der(tls)
    except (OSError, ssl.SSLError) as e:
        raise NetworkError(f"cannot fetch the certificate chain of {vault_url}: {e}") from e
    seen = [der_fingerprint(der) for der in chain]
    for der, fp in zip(chain, seen, strict=True):
        if fp != want:
            continue
        cert = x509.load_der_x509_certificate(der)
        try:
            is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except x509.ExtensionNotFound:
            is_ca = False
        if not is_ca:
            raise AuthError(f"the certificate with fingerprint {want} presented by {vault_url} "
                            "is not a CA certificate",
                            hint="Pass the fingerprint of the vault's CA, not of its server "
                                 "certificate.")
        log.info("vault CA at %s matches the fingerprint given (sha256 %s)", vault_url, want)
        return ssl.DER_cert_to_PEM_cert(der).encode()
    raise AuthError(f"no certificate presented by {vault_url} has the fingerprint {want} "
                    f"(presented: {', '.join(seen) or 'none'})",
                    hint="Check the fingerprint the vault printed; if it is right, something "
                         "between this host and the vault is presenting another certificate. "
                         "Or pass --ca-file with the vault's CA.")


def fetch_ca_insecure(vault_url: str, *, timeout: float = 10.0) -> bytes:
    """The CA certificate the vault presents, trusted blindly (explicit opt-in only)."""
    host, port = _host_port(vault_url)
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw, \
                ctx.wrap_socket(raw, server_hostname=host) as tls:
            chain = _unverified_chain_der(tls)
    except (OSError, ssl.SSLError) as e:
        raise NetworkError(f"cannot fetch the certificate chain of {vault_url}: {e}") from e
    for der in reversed(chain):
        cert = x509.load_der_x509_certificate(der)
        try:
            if cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
                log.warning("trusting the vault CA at %s WITHOUT verification (insecure first "
                            "contact); its sha256 fingerprint is %s — compare it with the one "
                            "the vault printed", vault_url, der_fingerprint(der))
                return ssl.DER_cert_to_PEM_cert(der).encode()
        except x509.ExtensionNotFound:
            continue
    raise AuthError(f"the vault at {vault_url} does not present its CA certificate",
                    hint="Pass --ca-file with the vault's CA (DATA/pki/ca.pem on the vault).")


# --------------------------------------------------------------------------------- register


def _check_issued(cert_pem: bytes, ca_pem: bytes, key_pem: bytes) -> None:
    """The returned certificate must be signed by the CA we trust and carry our public key."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    ca = x509.load_pem_x509_certificate(ca_pem)
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as e:
        raise AuthError(f"the certificate the vault returned is not signed by its CA: {e}") from e
    key = serialization.load_pem_private_key(key_pem, password=None)
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if cert.public_key().public_bytes(*spki) != key.public_key().public_bytes(*spki):
        raise AuthError("the certificate the vault returned is not for this host's key")


def _finish_swap(data_dir: Path) -> None:
    """Roll an interrupted re-registration forward: a staged certificate (and key, if it was
    not renamed yet) replaces the current one. Nothing to do without ``agent.pem.next``."""
    pem_next = data_dir / (CERT_FILE + NEXT)
    if not pem_next.exists():
        return
    key_next = data_dir / (KEY_FILE + NEXT)
    try:
        if key_next.exists():
            os.replace(key_next, data_dir / KEY_FILE)
        os.replace(pem_next, data_dir / CERT_FILE)
        fsync_dir(data_dir)
    except OSError as e:
        raise classify_os_error(e, f"agent data directory {data_dir}") from e


def _existing(data_dir: Path, vault_url: str) -> AgentIdentity | None:
    if not (data_dir / IDENTITY_FILE).exists():
        return None
    existing = AgentIdentity.load(data_dir)
    if existing.vault_url.rstrip("/") != vault_url:
        raise Conflict(f"{data_dir} already holds the registration of host {existing.host_id} "
                       f"(site {existing.site}) with the vault at {existing.vault_url}",
                       hint="Use another --data directory, or remove this one to register again.")
    return existing


def register(vault_url: str, key: str, data_dir: Path, *, host_name: str | None = None,
             ca_pem: bytes | None = None, insecure_first_contact: bool = False,
             timeout: float = 30.0, other_vaults: tuple[str, ...] = ()) -> AgentIdentity:
    """Register this host with the vault and store its identity in ``data_dir``.

    ``ca_pem``: the vault's CA (from ``--ca-file``, or from :func:`fetch_ca_by_fingerprint`).
    Without it, ``insecure_first_contact=True`` must be passed to trust whatever CA the vault
    presents (logged with its fingerprint); otherwise ``InvalidInput``. ``host_name`` defaults
    to the registered name (re-registration) or the machine's host name.

    When ``data_dir`` already holds a registration with this vault, ``key`` must be a re-issue
    key for that host (``drsite hosts reissue HOST``): a fresh key pair and certificate replace
    the old ones (the CA already trusted is used when none is given). A site key is refused by
    the vault (``Conflict``): it never takes over an existing host.

    ``other_vaults``: the other vault(s) of a pair (issue 14), kept in ``agent.json`` so the
    agent follows whichever is active; a re-registration without them keeps the ones held.

    Errors: ``Conflict`` if ``data_dir`` holds the registration of another vault, or the key
    cannot re-register this host; ``AuthError`` if the registration key is refused (used,
    expired or unknown) or the vault's certificate is not trusted; ``NetworkError`` if the vault
    cannot be reached. Nothing is written unless the registration succeeded.
    """
    data_dir = Path(data_dir)
    vault_url = vault_url.rstrip("/")
    existing = _existing(data_dir, vault_url)
    if not other_vaults and existing is not None:
        other_vaults = existing.other_vaults
    if not key:
        raise InvalidInput("empty registration key",
                           hint="Create one with 'drsite vault registration-key --site SITE'.")
    if existing is not None:
        host_name = host_name or existing.host_name
        if host_name != existing.host_name:
            raise Conflict(f"{data_dir} is host {existing.host_name} ({existing.host_id}); it "
                           f"cannot register as {host_name}",
                           hint="Re-register it under its own name, or use another --data "
                                "directory for another host.")
        if ca_pem is None:
            ca_pem = existing.ca_file.read_bytes()
    host_name = host_name or socket.gethostname()
    if ca_pem is None:
        if not insecure_first_contact:
            raise InvalidInput("the vault's CA is not known: refusing to trust the vault blindly",
                               hint="Pass --ca-file with the vault's CA certificate, or "
                                    "--ca-fingerprint with the SHA-256 fingerprint the vault "
                                    "printed.")
        ca_pem = fetch_ca_insecure(vault_url, timeout=timeout)
    try:
        trusted_fp = pem_fingerprint(ca_pem)
    except ValueError as e:
        raise InvalidInput(f"the CA given is not a PEM certificate: {e}") from e
    ctx = ssl.create_default_context(cadata=ca_pem.decode())
    key_pem, csr_pem = pki.make_key_and_csr(host_name)
    body: dict[str, Any] = {"key": key, "host_name": host_name, "csr_pem": csr_pem.decode()}
    if existing is not None:
        body["host_id"] = existing.host_id
    try:
        with httpx.Client(verify=ctx, timeout=timeout) as http:
            resp = http.post(vault_url + REGISTER_PATH, json=body)
    except httpx.ConnectError as e:
        if "CERTIFICATE_VERIFY_FAILED" in str(e) or "certificate verify failed" in str(e):
            raise AuthError(f"the vault at {vault_url} presents a certificate not signed by the "
                            f"CA given (sha256 {trusted_fp}): {e}",
                            hint="Check --ca-file / --ca-fingerprint and the vault URL.") from e
        raise NetworkError(f"cannot reach the vault at {vault_url}: {e}",
                           hint="Is the vault running? Check the URL.") from e
    except httpx.HTTPError as e:
        raise NetworkError(f"registration request to {vault_url} failed: {e}") from e
    if resp.status_code in (401, 403):
        err = vault_error(resp, REGISTER_PATH)
        raise AuthError(f"the vault refused the registration key: {err.message}",
                        hint="Registration keys are one-time and expire; ask an admin for a new "
                             "one ('drsite vault registration-key --site SITE', or 'drsite hosts "
                             "reissue HOST' for a registered host).")
    if resp.status_code >= 400:
        raise vault_error(resp, REGISTER_PATH)
    try:
        out = resp.json()
        host_id, site = str(out["host_id"]), str(out["site"])
        cert_pem = str(out["cert_pem"]).encode()
        returned_ca = str(out.get("ca_pem") or ca_pem.decode()).encode()
    except (ValueError, KeyError, TypeError) as e:
        raise InvalidInput(f"the vault's registration answer is malformed: {e}") from e
    if pem_fingerprint(returned_ca) != trusted_fp:
        raise AuthError("the vault returned a CA other than the one this host trusts",
                        hint="Check --ca-file / --ca-fingerprint.")
    _check_issued(cert_pem, ca_pem, key_pem)
    if existing is not None and host_id != existing.host_id:
        raise AuthError(f"the vault re-registered host {host_id}, not {existing.host_id}",
                        hint="Nothing was changed here; ask an admin to check the host.")
    try:
        if existing is not None:
            # stage both, then rename: load() rolls a half-done rename forward
            atomic_write_bytes(data_dir / (KEY_FILE + NEXT), key_pem)
            atomic_write_bytes(data_dir / (CERT_FILE + NEXT), cert_pem)
            _finish_swap(data_dir)
        else:
            atomic_write_bytes(data_dir / KEY_FILE, key_pem)  # mkstemp: mode 0600
            atomic_write_bytes(data_dir / CERT_FILE, cert_pem)
        atomic_write_bytes(data_dir / CA_FILE, ca_pem)
        atomic_write_json(data_dir / IDENTITY_FILE, {
            "host_id": host_id, "site": site, "vault_url": vault_url, "host_name": host_name,
            "vault_urls": [vault_url, *[u.rstrip("/") for u in other_vaults]],
            "registered_at": time.time()})
    except OSError as e:
        raise classify_os_error(e, f"agent data directory {data_dir}") from e
    log.info("%s host %s (%s) in site %s with the vault at %s",
             "re-registered" if existing is not None else "registered", host_id, host_name, site,
             vault_url)
    return AgentIdentity(data_dir, host_id, site, vault_url, host_name,
                         tuple(u.rstrip("/") for u in other_vaults))


__all__ = ["AgentIdentity", "fetch_ca_by_fingerprint", "fetch_ca_insecure",
           "normalize_fingerprint", "register"]
