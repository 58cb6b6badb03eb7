"""The one error hierarchy of drsite, and its codec.

Every error carries a class: *permanent* errors are never retried (the item goes Critical and
an operator must act), *transient* errors are retried on the seed's schedule (see
:mod:`drsite.core.retry`). Adapters translate library exceptions into these at the edge, so
code above them only ever sees ``DrsiteError`` subclasses.

The codec: each class below names a stable ``code`` (what travels over a wire: the vault API,
the site store, agent command results, the file guest's control socket), its ``error_class``,
the ``http_status`` a server answers it with and the ``exit_code`` of a command that ends with
it (``docs/control-plane.md`` has the table). ``DrsiteError.to_dict()`` encodes,
:func:`from_dict` decodes; the registry code → class fills itself as classes are defined.
Codes are defined here only (a subclass elsewhere may refine a class for local handling, but
travels as the code it inherits), so every process that decodes knows every code.
"""

from __future__ import annotations

import errno
from collections.abc import Mapping
from enum import StrEnum
from types import MappingProxyType
from typing import Any


class ErrorClass(StrEnum):
    PERMANENT = "permanent"
    TRANSIENT = "transient"


# exit codes of the ``drsite`` CLI and ``python -m drsite.agent`` (0 ok and 1 "the job ended
# badly" are the CLI's own): scripts tell "an operator must act" from "try again later"
EXIT_PERMANENT = 2
EXIT_TRANSIENT = 75  # EX_TEMPFAIL (sysexits.h)

_BY_CODE: dict[str, type[DrsiteError]] = {}


class DrsiteError(Exception):
    """Base of every drsite error.

    ``hint`` tells an operator what to do next; ``code`` is a stable machine-readable name.
    A direct instance travels as the generic permanent code ``error``.
    """

    code: str = "error"
    error_class: ErrorClass = ErrorClass.PERMANENT
    http_status: int = 500
    exit_code: int = EXIT_PERMANENT
    default_hint: str = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "code" not in cls.__dict__:
            return  # travels as the code it inherits
        if cls.__module__ != __name__:
            raise TypeError(f"{cls.__qualname__} defines error code {cls.code!r} outside "
                            f"{__name__}: codes travel over wires, so every process must know "
                            "them; define the class there")
        if cls.code in _BY_CODE:
            raise TypeError(f"error code {cls.code!r} of {cls.__qualname__} is already "
                            f"taken by {_BY_CODE[cls.code].__qualname__}")
        _BY_CODE[cls.code] = cls

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint if hint is not None else self.default_hint

    @property
    def transient(self) -> bool:
        return self.error_class is ErrorClass.TRANSIENT

    def to_dict(self) -> dict[str, str]:
        """The wire form ``{"code", "class", "message", "hint"}`` (:func:`from_dict` reverses it)."""
        return {"code": self.code, "class": self.error_class.value, "message": self.message,
                "hint": self.hint}

    def __str__(self) -> str:
        return self.message


class PermanentError(DrsiteError):
    """Not retried. The item goes Critical until an operator acts. Servers answer a permanent
    error that is not the caller's fault (damaged or inconsistent data) with 500: the body's
    class says not to retry."""

    code = "error"
    error_class = ErrorClass.PERMANENT
    http_status = 500
    exit_code = EXIT_PERMANENT


class TransientError(DrsiteError):
    """Retried after 1, 2, 4, 8, 10 minutes, then every 30 minutes."""

    code = "transient"
    error_class = ErrorClass.TRANSIENT
    http_status = 503
    exit_code = EXIT_TRANSIENT


# --- permanent ------------------------------------------------------------------------------

class InvalidInput(PermanentError):
    code = "invalid_input"
    http_status = 400  # the vault answers a body of the wrong shape or type with 422
    default_hint = "Check the value and try again."


class MethodNotAllowed(InvalidInput):
    """An HTTP route was called with a method it does not serve."""

    code = "method_not_allowed"
    http_status = 405
    default_hint = "Check the method against the API description (/openapi.json)."


class NotFound(PermanentError):
    code = "not_found"
    http_status = 404


class VmNotFound(NotFound):
    code = "vm_not_found"
    default_hint = "Check that the VM still exists on its host, or disable protection for it."


class ObjectNotFound(NotFound):
    code = "object_not_found"
    default_hint = "The recovery store is missing data; run a resync to repair the item."


class BrokenChain(PermanentError):
    """A recovery point refers to data that is missing or does not follow its base."""

    code = "broken_chain"
    default_hint = ("Run a resync ('drsite items resync ITEM') to rebuild the chain from "
                    "checksums.")


class CorruptData(PermanentError):
    """Data read back does not match its hash: bit rot, truncation or tampering."""

    code = "corrupt_data"
    default_hint = ("Nothing was restored from the damaged data. 'drsite items verify ITEM --all' "
                    "shows which points are affected; 'drsite items resync ITEM' repairs the "
                    "newest point from the source (the scrub moves damaged objects aside).")


class PointNotAuthentic(PermanentError):
    """A recovery point (its manifest) or a generation record does not carry a valid MAC under
    the item's point key: it was written or altered by someone who does not hold the key (the
    store's directory or the bucket's credentials), or before points were authenticated."""

    code = "point_not_authentic"
    default_hint = ("Do not fail over to this point. Check who can write the recovery store "
                    "(see 'drsite audit list'); protect the VM anew ('drsite items unprotect ITEM', "
                    "then 'drsite items protect VM --group GROUP') to write "
                    "a new authenticated full copy.")


class InvalidReplicaState(PermanentError):
    code = "invalid_replica_state"
    default_hint = "Inspect the replica; a resync or re-protect rebuilds it."


class AuthError(PermanentError):
    code = "auth_failed"
    http_status = 401
    default_hint = "Check the certificate, token or key, then retry."


class Forbidden(AuthError):
    """Authenticated, but the token's role does not allow the call."""

    code = "forbidden"
    http_status = 403
    default_hint = "Use a token with a higher role (admin > operator > reader)."


class Conflict(PermanentError):
    code = "conflict"
    http_status = 409
    default_hint = "Another operation holds this object; wait for it or cancel it."


class ObjectExists(Conflict):
    code = "object_exists"
    default_hint = "Objects in a recovery store are immutable; write a new key instead."


class OperationInterrupted(Conflict):
    """An agent stopped a command half-way because the item is being unprotected."""

    code = "interrupted"
    default_hint = "The item is being unprotected; protect it again to resume replication."


class Fenced(PermanentError):
    """A writer with an older generation tried to act after a newer promotion."""

    code = "fenced"
    http_status = 409
    default_hint = "This side was demoted by a failover; re-protect it before using it again."


class SecretUnreadable(PermanentError):
    """A secret sealed at rest cannot be opened: its master key is missing or wrong, or the
    sealed value was altered."""

    code = "secret_unreadable"
    default_hint = ("Restore the vault's master key file (DATA/master.key, or the file "
                    "DRSITE_MASTER_KEY_FILE names) from its backup.")


class TrackingLost(PermanentError):
    """Change tracking cannot be trusted; the item needs a resync (not a full copy)."""

    code = "tracking_lost"
    default_hint = "A resync by checksums will run in the resync window, or start it by hand."


class HypervisorError(PermanentError):
    """The hypervisor (QEMU's QMP, an NBD export) refused an operation for good or broke its
    protocol; repeating the same request will not help."""

    code = "hypervisor_error"
    default_hint = "See the message and the hypervisor's log; fix the VM's state, then retry."


# --- transient ------------------------------------------------------------------------------

class InternalError(TransientError):
    """A server hit an unexpected exception (a bug, or a fault no adapter classified) while
    answering; its log has the details. Retrying the request may succeed."""

    code = "internal"
    http_status = 500


class NetworkError(TransientError):
    code = "network"
    default_hint = "The peer is unreachable; drsite retries on its own."


class LowDiskSpace(TransientError):
    code = "low_disk"
    default_hint = "Free space on the recovery store; drsite retries on its own."


class LowMemory(TransientError):
    code = "low_memory"
    default_hint = "The host is short of memory; drsite retries on its own."


class Busy(TransientError):
    code = "busy"
    default_hint = "Another step holds this resource; drsite retries on its own."


class CommandInterrupted(TransientError):
    """An agent restarted (or crashed) while it held a command it cannot resume by itself
    (its arguments carried secrets the agent does not keep); the sender sends it again."""

    code = "command_interrupted"
    default_hint = "Nothing to do: the vault sends the command again at once."


class PeerUnavailable(TransientError):
    """A peer site's service is known to be unreachable (its circuit breaker is open): the
    call was not even tried, so nothing waits on a hung or partitioned peer."""

    code = "peer_unavailable"
    default_hint = ("The other site's agent or store does not answer; drsite tries again on "
                    "its own. Check that site's agent and the link between the sites.")


class GrantPending(TransientError):
    """A site store refused an item's writes because the access list its agent holds does
    not grant them yet, while the vault has granted them (a list in flight: after a failover
    was cancelled, or before the store's agent heartbeated again). Retried as soon as the
    store's agent confirms the list."""

    code = "grant_pending"
    default_hint = ("Nothing to do: replication resumes once the recovery store's agent "
                    "holds the item's grant (its next heartbeat).")


class StandbyVault(TransientError):
    """This vault is the standby of a pair (its database is a hot standby of the active
    vault's): it answers reads, never writes. The message names the active vault when the
    standby knows it; agents that know both vaults turn to the other one by themselves."""

    code = "standby"
    http_status = 503
    default_hint = ("Send the request to the active vault; if the active site is lost, make "
                    "this vault active with 'drsite vault promote'.")


# --- the codec ------------------------------------------------------------------------------

_CLASSES = frozenset(c.value for c in ErrorClass)

ERROR_CLASSES: Mapping[str, type[DrsiteError]] = MappingProxyType(_BY_CODE)
"""code → class, every code of drsite (read-only view of the registry)."""


def class_for_status(http_status: int | None) -> type[DrsiteError]:
    """The class an HTTP error status stands for when the body names no code we know (a
    proxy's answer, a body-less ``HEAD``); without a status, a plain permanent error."""
    if http_status is None:
        return PermanentError
    exact: dict[int, type[DrsiteError]] = {
        400: InvalidInput, 401: AuthError, 403: Forbidden, 404: NotFound,
        405: MethodNotAllowed, 409: Conflict, 422: InvalidInput, 500: InternalError}
    if http_status in exact:
        return exact[http_status]
    if http_status >= 500:
        return NetworkError  # bad gateway, unavailable, gateway timeout: the path to the server
    return PermanentError


def from_dict(body: Any, *, http_status: int | None = None) -> DrsiteError:
    """The error a wire body (``DrsiteError.to_dict()``) stands for.

    A known ``code`` gives its class. The body's ``class`` decides retrying, so it wins where
    it disagrees (a sender that gave up on a transient fault reports it permanent): then, as
    for an unknown or missing code, the error is a plain ``PermanentError`` or
    ``TransientError`` as reported, else by ``http_status`` (:func:`class_for_status`); a code
    without its own class stays on the instance, so forwarding the error keeps it. Message and
    hint are kept as sent; a missing message is replaced by one naming the code and status.
    Never raises: anything that is not a dict decodes as an error without a body.
    """
    d: Mapping[str, Any] = body if isinstance(body, Mapping) else {}
    code = d.get("code") if isinstance(d.get("code"), str) else ""
    message, hint = d.get("message"), d.get("hint")
    reported = d.get("class") if isinstance(d.get("class"), str) else None
    if not isinstance(message, str) or not message:
        status = f" (HTTP {http_status})" if http_status is not None else ""
        message = f"error {code or 'without a code'}{status}, no message given"
    cls = _BY_CODE.get(code) if code else None
    if cls is None or (reported in _CLASSES and reported != cls.error_class):
        if reported == ErrorClass.TRANSIENT:
            cls = TransientError
        elif reported == ErrorClass.PERMANENT:
            cls = PermanentError
        else:
            cls = class_for_status(http_status)
    err = cls(message, hint=hint if isinstance(hint, str) else None)
    if code and code != cls.code:
        err.code = code  # a code without a class here (a newer peer's), or of the other class
    return err


def classify_os_error(exc: OSError, what: str) -> DrsiteError:
    """Translate an ``OSError`` into the drsite hierarchy (used by adapters at the edge)."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return LowDiskSpace(f"{what}: no space left ({exc.strerror})")
    if exc.errno == errno.ENOMEM:
        return LowMemory(f"{what}: out of memory ({exc.strerror})")
    if exc.errno == errno.ENOENT:
        return NotFound(f"{what}: not found")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return AuthError(f"{what}: permission denied")
    if exc.errno in (errno.ECONNREFUSED, errno.ECONNRESET, errno.ETIMEDOUT, errno.EPIPE,
                     errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EAGAIN, errno.EINTR):
        return NetworkError(f"{what}: {exc.strerror}")
    if exc.errno == errno.EIO:
        return TransientError(f"{what}: I/O error ({exc.strerror})")
    return PermanentError(f"{what}: {exc.strerror or exc}")
