"""``S3ObjectStore``: the object-store contract over an S3 bucket, with boto3.

Objects are stored under ``<prefix><key>`` one S3 object per drsite object (the same packs +
manifests layout as the local store; see ``store/design.md``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    EndpointConnectionError,
    NoCredentialsError,
    ReadTimeoutError,
    ResponseStreamingError,
)
from botocore.exceptions import (
    ConnectTimeoutError as BotoConnectTimeout,
)

from drsite.core.errors import (
    AuthError,
    DrsiteError,
    InvalidInput,
    NetworkError,
    ObjectExists,
    ObjectNotFound,
    PermanentError,
    TransientError,
)
from drsite.store.contract import validate_key, validate_prefix

if TYPE_CHECKING:
    from types_boto3_s3.client import S3Client
    from types_boto3_s3.type_defs import CompletedPartTypeDef

log = logging.getLogger(__name__)

MiB = 1024 * 1024

_NOT_FOUND = {"NoSuchKey", "404", "NotFound"}
_EXISTS = {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"}
_AUTH = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403", "401",
         "ExpiredToken", "InvalidToken", "AuthorizationHeaderMalformed", "AllAccessDisabled"}
_TRANSIENT = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout",
              "RequestTimeTooSkewed", "InternalError", "ServiceUnavailable", "503", "500",
              "502", "504", "TooManyRequests", "429", "RequestLimitExceeded"}


def map_s3_error(exc: Exception, what: str) -> DrsiteError:
    """Translate a botocore exception into the drsite hierarchy. ``what`` names the operation
    and object (never credentials); the server's message is kept, its request details are not."""
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        msg = f"{what}: {code or status} {err.get('Message', '')}".rstrip()
        if code in _NOT_FOUND or code == "NoSuchBucket":
            if code == "NoSuchBucket":
                return PermanentError(msg, hint="Create the bucket or fix the store's bucket name.")
            return ObjectNotFound(msg)
        if code in _EXISTS or status == 412:
            return ObjectExists(msg)
        if code in _AUTH or status in (401, 403):
            return AuthError(msg, hint="Check the store's access key, secret key and bucket policy.")
        if code in _TRANSIENT or status >= 500 or status == 429:
            return NetworkError(msg)
        if code == "InvalidRange" or status == 416:
            return InvalidInput(msg)
        return PermanentError(msg)
    if isinstance(exc, NoCredentialsError):
        return AuthError(f"{what}: no credentials configured")
    if isinstance(exc, (EndpointConnectionError, BotoConnectTimeout, ReadTimeoutError,
                        ConnectionClosedError, ResponseStreamingError)):
        return NetworkError(f"{what}: {type(exc).__name__}")
    if isinstance(exc, BotoCoreError):
        # HTTP-level failures (urllib3 protocol errors, incomplete reads) are worth a retry
        return TransientError(f"{what}: {type(exc).__name__}: {exc}")
    if isinstance(exc, (OSError, TimeoutError)):
        return NetworkError(f"{what}: {type(exc).__name__}: {exc}")
    return PermanentError(f"{what}: {type(exc).__name__}: {exc}")


def _status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


class S3ObjectStore:
    """An :class:`~drsite.store.contract.ObjectStore` on one S3 bucket under ``prefix``.

    Responsible for: the contract's semantics on S3 — no-overwrite puts (a conditional write,
    ``If-None-Match: *``, when ``conditional_writes``; else HEAD-then-put, which has a race window
    between two writers of the same key, acceptable only because drsite keys are content
    addressed or written by the single writer of an item), ranged reads, sorted paginated
    listings, idempotent deletes, multipart uploads for objects over ``multipart_threshold``
    (aborted on failure), and translating botocore errors into ``drsite.core.errors``.

    Not responsible for: retries (botocore's are turned off; ``RetryingStore`` retries transient
    errors once, with the lost-reply rules), creating the bucket (an operator's job, or
    :meth:`create_bucket` in tests), encryption (``EncryptedStore``), rate limits (wrappers).
    Credentials are kept only inside the boto3 client and never appear in logs, ``repr`` or
    error messages.
    """

    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str | None, region: str,
                 access_key: str, secret_key: str, path_style: bool = True,
                 conditional_writes: bool = True, multipart_threshold: int = 8 * MiB,
                 part_size: int = 8 * MiB, connect_timeout: float = 10.0,
                 read_timeout: float = 60.0, max_pool_connections: int = 16) -> None:
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        validate_prefix(prefix)
        if part_size < 5 * MiB:
            raise ValueError("S3 parts must be at least 5 MiB")
        if multipart_threshold < part_size:
            raise ValueError("multipart_threshold must be >= part_size")
        self.bucket = bucket
        self.prefix = prefix
        self.endpoint_url = endpoint_url
        self.conditional_writes = conditional_writes
        self.multipart_threshold = multipart_threshold
        self.part_size = part_size
        config = Config(
            region_name=region,
            signature_version="s3v4",
            s3={"addressing_style": "path" if path_style else "virtual"},
            retries={"total_max_attempts": 1, "mode": "standard"},
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            max_pool_connections=max_pool_connections,
            # only send/verify checksums where S3 requires them: third-party S3 services
            # (SeaweedFS, older MinIO) reject or mishandle the newer default CRC trailers
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        session = boto3.session.Session()
        self._client: S3Client = session.client(
            "s3", endpoint_url=endpoint_url, aws_access_key_id=access_key,
            aws_secret_access_key=secret_key, config=config)

    def __repr__(self) -> str:
        return f"S3ObjectStore(bucket={self.bucket!r}, prefix={self.prefix!r}, " \
               f"endpoint_url={self.endpoint_url!r})"

    # --- helpers -----------------------------------------------------------------------------

    def _name(self, key: str) -> str:
        return self.prefix + validate_key(key)

    def _what(self, op: str, key: str) -> str:
        return f"S3 {op} s3://{self.bucket}/{self.prefix}{key}"

    def create_bucket(self) -> None:
        """Create the bucket if it does not exist (tests and first-time setup)."""
        try:
            self._client.create_bucket(Bucket=self.bucket)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise map_s3_error(exc, f"S3 create bucket {self.bucket}") from None
        except BotoCoreError as exc:
            raise map_s3_error(exc, f"S3 create bucket {self.bucket}") from None

    # --- contract ----------------------------------------------------------------------------

    def put(self, key: str, data: bytes | memoryview, *, overwrite: bool = False) -> None:
        name = self._name(key)
        blob = memoryview(data).cast("B")
        what = self._what("put", key)
        if not overwrite and not self.conditional_writes and self.exists(key):
            raise ObjectExists(f"{what}: object already exists")
        try:
            if len(blob) > self.multipart_threshold:
                self._put_multipart(name, blob, overwrite, what)
            elif overwrite or not self.conditional_writes:
                self._client.put_object(Bucket=self.bucket, Key=name, Body=bytes(blob))
            else:
                self._client.put_object(Bucket=self.bucket, Key=name, Body=bytes(blob),
                                        IfNoneMatch="*")
        except (ClientError, BotoCoreError, OSError) as exc:
            raise map_s3_error(exc, what) from None

    def _put_multipart(self, name: str, blob: memoryview, overwrite: bool, what: str) -> None:
        """Upload ``blob`` in ``part_size`` parts; the object appears at completion only (atomic),
        and a failed upload is aborted so no orphaned parts are billed."""
        if not overwrite and self.conditional_writes:
            # refuse early (saves uploading parts); the conditional completion below decides
            try:
                self._client.head_object(Bucket=self.bucket, Key=name)
            except ClientError as exc:
                if _status(exc) != 404:
                    raise
            else:
                raise ObjectExists(f"{what}: object already exists")
        upload_id = self._client.create_multipart_upload(Bucket=self.bucket, Key=name)["UploadId"]
        try:
            parts: list[CompletedPartTypeDef] = []
            for n, off in enumerate(range(0, len(blob), self.part_size), start=1):
                r = self._client.upload_part(Bucket=self.bucket, Key=name, UploadId=upload_id,
                                             PartNumber=n, Body=bytes(blob[off:off + self.part_size]))
                parts.append({"PartNumber": n, "ETag": r["ETag"]})
            kwargs: dict[str, Any] = {}
            if not overwrite and self.conditional_writes:
                kwargs["IfNoneMatch"] = "*"
            self._client.complete_multipart_upload(
                Bucket=self.bucket, Key=name, UploadId=upload_id,
                MultipartUpload={"Parts": parts}, **kwargs)
        except BaseException:
            try:
                self._client.abort_multipart_upload(Bucket=self.bucket, Key=name,
                                                    UploadId=upload_id)
            except Exception:  # best effort: a lifecycle rule cleans what is left
                log.warning("%s: could not abort multipart upload", what)
            raise

    def get(self, key: str) -> bytes:
        name = self._name(key)
        what = self._what("get", key)
        try:
            r = self._client.get_object(Bucket=self.bucket, Key=name)
            return r["Body"].read()
        except (ClientError, BotoCoreError, OSError) as exc:
            raise map_s3_error(exc, what) from None

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        name = self._name(key)
        if offset < 0 or length < 0:
            raise InvalidInput(f"invalid range {offset}+{length} of object {key!r}")
        if length == 0:
            self.size(key)  # raises ObjectNotFound
            return b""
        what = self._what("get_range", key)
        try:
            r = self._client.get_object(Bucket=self.bucket, Key=name,
                                        Range=f"bytes={offset}-{offset + length - 1}")
            data = r["Body"].read()
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "InvalidRange" or _status(exc) == 416:
                return b""  # offset at or past the end (the object exists, or it would be 404)
            raise map_s3_error(exc, what) from None
        except (BotoCoreError, OSError) as exc:
            raise map_s3_error(exc, what) from None
        # a server that ignores Range answers 200 with the whole object
        if r.get("ContentRange") is None and len(data) > length:
            data = data[offset:offset + length]
        return data

    def _head(self, key: str, op: str) -> dict[str, Any] | None:
        name = self._name(key)
        try:
            return dict(self._client.head_object(Bucket=self.bucket, Key=name))
        except ClientError as exc:
            if _status(exc) == 404:
                return None
            raise map_s3_error(exc, self._what(op, key)) from None
        except (BotoCoreError, OSError) as exc:
            raise map_s3_error(exc, self._what(op, key)) from None

    def exists(self, key: str) -> bool:
        return self._head(key, "exists") is not None

    def size(self, key: str) -> int:
        head = self._head(key, "size")
        if head is None:
            raise ObjectNotFound(f"{self._what('size', key)}: not found")
        return int(head["ContentLength"])

    def list(self, prefix: str = "") -> Iterator[str]:
        validate_prefix(prefix)
        full = self.prefix + prefix
        cut = len(self.prefix)
        keys: list[str] = []
        try:
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=full)
            for page in pages:
                for obj in page.get("Contents", []):
                    name = obj["Key"]
                    if name.startswith(full) and not name.endswith("/"):
                        keys.append(name[cut:])
        except (ClientError, BotoCoreError, OSError) as exc:
            raise map_s3_error(exc, self._what("list", prefix)) from None
        keys.sort()
        return iter(keys)

    def delete(self, key: str) -> None:
        name = self._name(key)
        try:
            self._client.delete_object(Bucket=self.bucket, Key=name)
        except ClientError as exc:
            if _status(exc) == 404:
                return
            raise map_s3_error(exc, self._what("delete", key)) from None
        except (BotoCoreError, OSError) as exc:
            raise map_s3_error(exc, self._what("delete", key)) from None
