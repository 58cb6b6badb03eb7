"""Backend-specific behaviour of the S3 and Azure Blob stores against real local servers
(moto, SeaweedFS ``weed mini``, Azurite; all on 127.0.0.1). The shared contract is in
tests/contract/test_store_conformance.py."""

from __future__ import annotations

import logging
import os

import pytest

from drsite.core.errors import AuthError, NetworkError, ObjectExists
from drsite.store.crypto import EncryptedStore
from drsite.store.testing.servers import (
    AZURITE_KEY,
    TEST_ACCESS_KEY,
    TEST_SECRET_KEY,
    free_ports,
)
from drsite.store.wrappers import RetryingStore
from tests.cloud import azure_store, s3_store

MiB = 1024 * 1024
S3_KINDS = ["moto", "seaweedfs"]
AUTH_KINDS = ["seaweedfs"]  # moto does not check signatures by default


@pytest.mark.parametrize("kind", S3_KINDS)
def test_s3_multipart_upload_and_no_overwrite(kind: str) -> None:
    s = s3_store(kind)
    calls: list[str] = []
    s._client.meta.events.register(
        "before-call.s3.*", lambda model, **_kw: calls.append(model.name))
    data = os.urandom(9 * MiB + 123)  # > 8 MiB: two parts
    s.put("big/obj", data)
    assert "CreateMultipartUpload" in calls and calls.count("UploadPart") == 2
    assert s.size("big/obj") == len(data)
    assert s.get("big/obj") == data
    assert s.get_range("big/obj", 8 * MiB - 5, 10) == data[8 * MiB - 5:8 * MiB + 5]
    calls.clear()
    with pytest.raises(ObjectExists):
        s.put("big/obj", data)
    assert "UploadPart" not in calls  # refused before uploading parts
    s.put("big/obj", data[::-1], overwrite=True)
    assert s.get("big/obj") == data[::-1]
    # no multipart uploads left behind
    ups = s._client.list_multipart_uploads(Bucket=s.bucket, Prefix=s.prefix)
    assert not ups.get("Uploads")


@pytest.mark.parametrize("kind", S3_KINDS)
def test_s3_head_then_put_mode(kind: str) -> None:
    s = s3_store(kind, conditional_writes=False)
    s.put("k", b"1")
    with pytest.raises(ObjectExists):
        s.put("k", b"2")
    assert s.get("k") == b"1"


@pytest.mark.parametrize("kind", AUTH_KINDS)
def test_s3_wrong_credentials_are_auth_errors_and_never_logged(
        kind: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    good = s3_store(kind)
    good.put("k", b"v")
    from drsite.store.s3 import S3ObjectStore

    wrong_secret = "not-the-right-secret-987654"
    bad_store = S3ObjectStore(good.bucket, good.prefix, endpoint_url=good.endpoint_url,
                              region="us-east-1", access_key=TEST_ACCESS_KEY,
                              secret_key=wrong_secret)
    with pytest.raises(AuthError) as ei:
        bad_store.get("k")
    assert not ei.value.transient
    with pytest.raises(AuthError):
        bad_store.put("k2", b"v")
    for text in (caplog.text, str(ei.value), repr(bad_store), repr(good)):
        assert TEST_SECRET_KEY not in text
        assert wrong_secret not in text
    assert TEST_ACCESS_KEY not in str(ei.value) + repr(bad_store)


def test_s3_unreachable_endpoint_is_transient() -> None:
    from drsite.store.s3 import S3ObjectStore

    port = free_ports(1)[0]  # nothing listens there
    s = S3ObjectStore("b", "p", endpoint_url=f"http://127.0.0.1:{port}", region="us-east-1",
                      access_key="a", secret_key="b", connect_timeout=1, read_timeout=1)
    with pytest.raises(NetworkError):
        s.get("k")
    with pytest.raises(NetworkError):
        s.put("k", b"v")


def test_s3_retrying_encrypted_stack() -> None:
    s = RetryingStore(EncryptedStore(s3_store("moto"), {"k": b"\x07" * 32}, "k"))
    s.put("pack", b"abc" * 1000)
    assert s.get_range("pack", 2999 - 9, 10) == (b"abc" * 1000)[2990:3000]


def test_azure_block_upload_and_no_overwrite() -> None:
    s = azure_store(max_single_put_size=1 * MiB, block_size=1 * MiB)
    data = os.urandom(3 * MiB + 7)
    s.put("big/obj", data)
    blocks = s._container.get_blob_client(s.prefix + "big/obj").get_block_list()[0]
    assert len(blocks) == 4  # uploaded as blocks, committed at once
    assert s.get("big/obj") == data
    assert s.get_range("big/obj", MiB - 3, 6) == data[MiB - 3:MiB + 3]
    with pytest.raises(ObjectExists):
        s.put("big/obj", b"other")
    assert s.size("big/obj") == len(data)
    s.put("big/obj", b"small", overwrite=True)
    assert s.get("big/obj") == b"small"


def test_azure_api_version_is_pinned() -> None:
    from drsite.store.azure import DEFAULT_API_VERSION

    s = azure_store()
    assert s._container.api_version == DEFAULT_API_VERSION


def test_azure_wrong_key_is_auth_error_and_never_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    good = azure_store()
    good.put("k", b"v")
    from drsite.store.azure import AzureBlobObjectStore
    wrong = "d3Jvbmcta2V5LXdyb25nLWtleS13cm9uZy1rZXktd3Jvbmcta2V5LXdyb25nLWtleQ=="
    bad = AzureBlobObjectStore(good.container, good.prefix, account_url=good.account_url,
                               credential={"account_name": "devstoreaccount1",
                                           "account_key": wrong})
    with pytest.raises(AuthError) as ei:
        bad.get("k")
    with pytest.raises(AuthError):
        bad.put("k2", b"v")
    for text in (caplog.text, str(ei.value), repr(bad)):
        assert AZURITE_KEY not in text
        assert wrong not in text


def test_azure_unreachable_endpoint_is_transient() -> None:
    from drsite.store.azure import AzureBlobObjectStore

    port = free_ports(1)[0]
    s = AzureBlobObjectStore("c", "p", account_url=f"http://127.0.0.1:{port}/devstoreaccount1",
                             credential={"account_name": "devstoreaccount1",
                                         "account_key": AZURITE_KEY},
                             connection_timeout=1, read_timeout=1)
    with pytest.raises(NetworkError):
        s.get("k")
