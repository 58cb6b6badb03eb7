"""Store factories for the cloud backends against throw-away local servers (moto, SeaweedFS,
Azurite). A missing server program skips the test, or fails it when ``DRSITE_TEST_CLOUD=1``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from drsite.store.testing.servers import (
    AZURITE_ACCOUNT,
    AZURITE_KEY,
    TEST_ACCESS_KEY,
    TEST_BUCKET,
    TEST_REGION,
    TEST_SECRET_KEY,
    RunningServer,
    ServerUnavailable,
    cloud_required,
    shared_server,
    unique_prefix,
)


def server_or_skip(kind: str) -> RunningServer:
    try:
        return shared_server(kind)
    except ServerUnavailable as exc:
        if cloud_required():
            pytest.fail(f"{kind} is required (DRSITE_TEST_CLOUD=1) but unavailable: {exc}")
        pytest.skip(f"{kind} unavailable: {exc}")


def s3_store(kind: str, **kw: Any) -> Any:
    from drsite.store.s3 import S3ObjectStore

    srv = server_or_skip(kind)
    args: dict[str, Any] = {"endpoint_url": srv.endpoint, "region": TEST_REGION,
                            "access_key": TEST_ACCESS_KEY, "secret_key": TEST_SECRET_KEY}
    args.update(kw)
    store = S3ObjectStore(TEST_BUCKET, unique_prefix(), **args)
    store.create_bucket()
    return store


def azure_store(**kw: Any) -> Any:
    from drsite.store.azure import AzureBlobObjectStore

    srv = server_or_skip("azurite")
    args: dict[str, Any] = {"account_url": srv.endpoint,
                            "credential": {"account_name": AZURITE_ACCOUNT,
                                           "account_key": AZURITE_KEY}}
    args.update(kw)
    store = AzureBlobObjectStore("drsite-test", unique_prefix(), **args)
    store.create_container()
    return store


def s3_moto(_tmp: Path) -> Any:
    return s3_store("moto")


def s3_seaweedfs(_tmp: Path) -> Any:
    return s3_store("seaweedfs")


def azure_azurite(_tmp: Path) -> Any:
    return azure_store()


FACTORIES: dict[str, Callable[[Path], Any]] = {
    "s3-moto": s3_moto,
    "s3-seaweedfs": s3_seaweedfs,
    "azure-azurite": azure_azurite,
}
