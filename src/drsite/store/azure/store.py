"""``AzureBlobObjectStore``: the object-store contract over one Azure Blob container, with
azure-storage-blob. One block blob per drsite object under ``<prefix><key>`` (the same packs +
manifests layout as the local store; see ``store/design.md``)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from azure.core.exceptions import (
    AzureError,
    ClientAuthenticationError,
    HttpResponseError,
    ResourceExistsError,
    ResourceModifiedError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.storage.blob import BlobServiceClient, ContainerClient

from drsite.core.errors import (
    AuthError,
    DrsiteError,
    InvalidInput,
    NetworkError,
    ObjectExists,
    ObjectNotFound,
    PermanentError,
)
from drsite.store.contract import validate_key, validate_prefix

# Pinned so the wire protocol does not change under us with a library upgrade, and so Azurite
# (whose releases lag the service) accepts it: Azurite 3.35.0 supports up to 2025-11-05.
DEFAULT_API_VERSION = "2025-11-05"
MiB = 1024 * 1024

_AUTH_CODES = {"AuthenticationFailed", "AuthorizationFailure", "AuthorizationPermissionMismatch",
               "InsufficientAccountPermissions", "AccountIsDisabled", "InvalidAuthenticationInfo"}


def map_azure_error(exc: Exception, what: str) -> DrsiteError:
    """Translate an azure-core exception into the drsite hierarchy (no credentials in messages:
    only the error code and the first line of the service's message are kept)."""
    if isinstance(exc, HttpResponseError):
        code = str(getattr(exc, "error_code", None) or "")
        status = exc.status_code or 0
        first = (exc.reason or "")
        msg = f"{what}: {code or status} {first}".rstrip()
        if isinstance(exc, ResourceNotFoundError) or status == 404:
            if code == "ContainerNotFound":
                return PermanentError(msg, hint="Create the container or fix its name.")
            return ObjectNotFound(msg)
        if isinstance(exc, (ResourceExistsError, ResourceModifiedError)) or status in (409, 412):
            return ObjectExists(msg)
        if isinstance(exc, ClientAuthenticationError) or code in _AUTH_CODES \
                or status in (401, 403):
            return AuthError(msg, hint="Check the store's account key, SAS or role assignment.")
        if status >= 500 or status in (408, 429) or code in ("ServerBusy", "OperationTimedOut"):
            return NetworkError(msg)
        if status == 416:
            return InvalidInput(msg)
        return PermanentError(msg)
    if isinstance(exc, (ServiceRequestError, ServiceResponseError)):
        return NetworkError(f"{what}: {type(exc).__name__}")
    if isinstance(exc, AzureError):
        return NetworkError(f"{what}: {type(exc).__name__}")
    if isinstance(exc, (OSError, TimeoutError)):
        return NetworkError(f"{what}: {type(exc).__name__}: {exc}")
    return PermanentError(f"{what}: {type(exc).__name__}: {exc}")


class AzureBlobObjectStore:
    """An :class:`~drsite.store.contract.ObjectStore` on one Azure Blob container under
    ``prefix``, with block blobs.

    Responsible for: the contract's semantics on Blob Storage — no-overwrite puts as a
    conditional write (``If-None-Match: *``, atomic on the service), overwrite puts, ranged
    downloads (offset/length), sorted listings by ``name_starts_with``, idempotent deletes,
    large uploads in blocks (``max_single_put_size``; the blob appears at commit only), and
    translating azure-core errors into ``drsite.core.errors``. The API version is pinned.

    Not responsible for: retries (the SDK's retry policy is turned off; ``RetryingStore``
    retries), creating the container (an operator's job, or :meth:`create_container` in tests),
    encryption or rate limits (wrappers). Credentials stay in the SDK client, never in logs,
    ``repr`` or error messages.
    """

    def __init__(self, container: str, prefix: str = "", *, account_url: str | None = None,
                 connection_string: str | None = None, credential: Any = None,
                 api_version: str = DEFAULT_API_VERSION, max_single_put_size: int = 8 * MiB,
                 block_size: int = 8 * MiB, connection_timeout: float = 10.0,
                 read_timeout: float = 60.0, max_concurrency: int = 4) -> None:
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        validate_prefix(prefix)
        if (account_url is None) == (connection_string is None):
            raise ValueError("give exactly one of account_url and connection_string")
        self.container = container
        self.prefix = prefix
        self.max_concurrency = max_concurrency
        kw: dict[str, Any] = {
            "api_version": api_version,
            "max_single_put_size": max_single_put_size,
            "max_block_size": block_size,
            "connection_timeout": connection_timeout,
            "read_timeout": read_timeout,
            "retry_total": 0,
        }
        if connection_string is not None:
            service = BlobServiceClient.from_connection_string(connection_string, credential, **kw)
        else:
            service = BlobServiceClient(account_url, credential=credential, **kw)  # type: ignore[arg-type]
        self.account_url = service.url
        self._service = service
        self._container: ContainerClient = service.get_container_client(container)

    def __repr__(self) -> str:
        return f"AzureBlobObjectStore(account_url={self.account_url!r}, " \
               f"container={self.container!r}, prefix={self.prefix!r})"

    def _name(self, key: str) -> str:
        return self.prefix + validate_key(key)

    def _what(self, op: str, key: str) -> str:
        return f"Azure {op} {self.container}/{self.prefix}{key}"

    def create_container(self) -> None:
        """Create the container if it does not exist (tests and first-time setup)."""
        try:
            self._container.create_container()
        except ResourceExistsError:
            pass
        except (AzureError, OSError) as exc:
            raise map_azure_error(exc, f"Azure create container {self.container}") from None

    def put(self, key: str, data: bytes | memoryview, *, overwrite: bool = False) -> None:
        name = self._name(key)
        blob = bytes(memoryview(data).cast("B"))
        try:
            # overwrite=False makes the SDK send If-None-Match: * on the single put or on the
            # final Put Block List, so the check and the write are one atomic service operation
            self._container.upload_blob(name, blob, blob_type="BlockBlob", overwrite=overwrite,
                                        length=len(blob), max_concurrency=self.max_concurrency)
        except (AzureError, OSError) as exc:
            if not overwrite and isinstance(exc, HttpResponseError) and exc.status_code in (409, 412):
                raise ObjectExists(f"{self._what('put', key)}: object already exists") from None
            raise map_azure_error(exc, self._what("put", key)) from None

    def get(self, key: str) -> bytes:
        name = self._name(key)
        try:
            return self._container.download_blob(name, max_concurrency=self.max_concurrency).readall()
        except (AzureError, OSError) as exc:
            raise map_azure_error(exc, self._what("get", key)) from None

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        name = self._name(key)
        if offset < 0 or length < 0:
            raise InvalidInput(f"invalid range {offset}+{length} of object {key!r}")
        if length == 0:
            self.size(key)
            return b""
        try:
            return self._container.download_blob(name, offset=offset, length=length).readall()
        except HttpResponseError as exc:
            if exc.status_code == 416:
                self.size(key)  # past the end of an existing object: empty; missing: not found
                return b""
            raise map_azure_error(exc, self._what("get_range", key)) from None
        except (AzureError, OSError) as exc:
            raise map_azure_error(exc, self._what("get_range", key)) from None

    def _props(self, key: str, op: str) -> Any:
        name = self._name(key)
        try:
            return self._container.get_blob_client(name).get_blob_properties()
        except ResourceNotFoundError:
            return None
        except (AzureError, OSError) as exc:
            raise map_azure_error(exc, self._what(op, key)) from None

    def exists(self, key: str) -> bool:
        return self._props(key, "exists") is not None

    def size(self, key: str) -> int:
        props = self._props(key, "size")
        if props is None:
            raise ObjectNotFound(f"{self._what('size', key)}: not found")
        return int(props.size)

    def list(self, prefix: str = "") -> Iterator[str]:
        validate_prefix(prefix)
        full = self.prefix + prefix
        cut = len(self.prefix)
        try:
            keys = [b[cut:] for b in self._container.list_blob_names(name_starts_with=full)]
        except (AzureError, OSError) as exc:
            raise map_azure_error(exc, self._what("list", prefix)) from None
        keys.sort()
        return iter(keys)

    def delete(self, key: str) -> None:
        name = self._name(key)
        try:
            self._container.delete_blob(name)
        except ResourceNotFoundError:
            return
        except (AzureError, OSError) as exc:
            raise map_azure_error(exc, self._what("delete", key)) from None

