"""The one error hierarchy of drsite.

Every error carries a class: *permanent* errors are never retried (the item goes Critical and
an operator must act), *transient* errors are retried on the seed's schedule (see
:mod:`drsite.core.retry`). Adapters translate library exceptions into these at the edge, so
code above them only ever sees ``DrsiteError`` subclasses.
"""

from __future__ import annotations

from enum import StrEnum


class ErrorClass(StrEnum):
    PERMANENT = "permanent"
    TRANSIENT = "transient"


class DrsiteError(Exception):
    """Base of every drsite error.

    ``hint`` tells an operator what to do next; ``code`` is a stable machine-readable name.
    """

    error_class: ErrorClass = ErrorClass.PERMANENT
    code: str = "error"
    default_hint: str = ""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint if hint is not None else self.default_hint

    @property
    def transient(self) -> bool:
        return self.error_class is ErrorClass.TRANSIENT

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code, "class": self.error_class.value, "message": self.message,
                "hint": self.hint}

    def __str__(self) -> str:
        return self.message


class PermanentError(DrsiteError):
    """Not retried. The item goes Critical until an operator acts."""

    error_class = ErrorClass.PERMANENT


class TransientError(DrsiteError):
    """Retried after 1, 2, 4, 8, 10 minutes, then every 30 minutes."""

    error_class = ErrorClass.TRANSIENT
    code = "transient"


# --- permanent ------------------------------------------------------------------------------

class InvalidInput(PermanentError):
    code = "invalid_input"
    default_hint = "Check the value and try again."


class NotFound(PermanentError):
    code = "not_found"


class VmNotFound(NotFound):
    code = "vm_not_found"
    default_hint = "Check that the VM still exists on its host, or disable protection for it."


class ObjectNotFound(NotFound):
    code = "object_not_found"
    default_hint = "The recovery store is missing data; run a resync to repair the item."


class BrokenChain(PermanentError):
    """A recovery point refers to data that is missing or does not follow its base."""

    code = "broken_chain"
    default_hint = "Run a resync ('drsite resync ITEM') to rebuild the chain from checksums."


class CorruptData(PermanentError):
    """Data read back does not match its hash: bit rot, truncation or tampering."""

    code = "corrupt_data"
    default_hint = "The damaged object was quarantined; run a resync to repair the item."


class InvalidReplicaState(PermanentError):
    code = "invalid_replica_state"
    default_hint = "Inspect the replica; a resync or re-protect rebuilds it."


class AuthError(PermanentError):
    code = "auth_failed"
    default_hint = "Check the certificate, token or key, then retry."


class Conflict(PermanentError):
    code = "conflict"
    default_hint = "Another operation holds this object; wait for it or cancel it."


class ObjectExists(Conflict):
    code = "object_exists"
    default_hint = "Objects in a recovery store are immutable; write a new key instead."


class Fenced(PermanentError):
    """A writer with an older generation tried to act after a newer promotion."""

    code = "fenced"
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


# --- transient ------------------------------------------------------------------------------

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


def classify_os_error(exc: OSError, what: str) -> DrsiteError:
    """Translate an ``OSError`` into the drsite hierarchy (used by adapters at the edge)."""
    import errno

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
