"""Upload throughput to cloud stores: our store stack vs the SDK's own plain upload, same bytes,
same server, same run.

The data (default 256 MiB, dense: no holes, no zero blocks) alternates runs of 1-6 MiB of
incompressible (random) and compressible (text-like) bytes. Servers are local: SeaweedFS
(``weed mini``, S3) and Azurite (Azure Blob), both on 127.0.0.1 (see
``drsite.store.testing.servers``).

* ours: ``Repository`` write of one point (begin → write in 4 MiB pieces → commit: the manifest
  is stored) from ``store_repository(spec)`` — the agent's cloud repository: retry, concurrency
  limit, AES-256-GCM encryption (the vault's default for cloud stores), zstd level 1
  compression, 4 pack uploads in flight;
* reference (a): the SDK's high-level upload of the same bytes as one object with its default
  transfer settings (boto3 ``upload_fileobj``: multipart 8 MiB parts, 10 threads; Azure
  ``upload_blob`` with ``max_concurrency`` 4, 8 MiB blocks);
* reference (b): the same bytes as 8 MiB objects, one ``put_object``/``upload_blob`` after the
  other (the request pattern of our packs, without compression or encryption).

Throughput = data bytes / wall seconds; each side runs ``--runs`` times (interleaved), the best
run of each is kept. Goal: ours / (a) >= 0.9.

    .venv/bin/python bench/cloud_upload.py [--size-mib 256] [--runs 3] [--servers seaweedfs,azurite]
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np
from benchlib import DataMaker, MiB, best, machine_info, mib, rate, write_json

from drsite.core.model import Consistency
from drsite.store.factory import StoreSpec, ensure_bucket, open_backend, store_repository
from drsite.store.testing.servers import (
    AZURITE_KEY,
    TEST_ACCESS_KEY,
    TEST_BUCKET,
    TEST_REGION,
    TEST_SECRET_KEY,
    ServerUnavailable,
    shared_server,
)

GOAL = 0.9
PIECE = 4 * MiB


def make_data(size: int, seed: int) -> bytes:
    dm = DataMaker(seed)
    rng = np.random.default_rng(seed)
    out = bytearray()
    kind = 0
    while len(out) < size:
        n = min(size - len(out), int(rng.integers(1, 7)) * MiB)
        out += dm.random(n) if kind == 0 else dm.text(n)
        kind ^= 1
    return bytes(out)


def spec_for(kind: str, prefix: str) -> dict[str, Any]:
    srv = shared_server(kind)
    key = {"k1": base64.b64encode(os.urandom(32)).decode()}
    if kind == "seaweedfs":
        return {"kind": "s3", "name": "bench", "keys": key, "active_key_id": "k1",
                "config": {"bucket": TEST_BUCKET, "endpoint_url": srv.endpoint,
                           "region": TEST_REGION, "prefix": prefix},
                "secret": {"access_key": TEST_ACCESS_KEY, "secret_key": TEST_SECRET_KEY}}
    return {"kind": "azure", "name": "bench", "keys": key, "active_key_id": "k1",
            "config": {"container": "drsite-bench", "account_url": srv.endpoint,
                       "prefix": prefix},
            "secret": {"account_key": AZURITE_KEY}}


def run_ours(spec: dict[str, Any], data: bytes, item: str,
             upload_threads: int | None = None) -> dict[str, Any]:
    repo = store_repository(spec, item)
    if upload_threads is not None:
        repo.upload_threads = upload_threads
    t0 = time.perf_counter()
    w = repo.begin("c1", base=None, disk_sizes={"d0": len(data)}, kind="initial")
    view = memoryview(data)
    for off in range(0, len(data), PIECE):
        w.write("d0", off, view[off:off + PIECE])
    point = w.commit(created_at=time.time(), consistency=Consistency.CRASH)
    t = time.perf_counter() - t0
    w.close()
    out = {"seconds": t, "bytes_stored": point.bytes_stored, "point": point.point_id}
    repo.close()
    return out


def sdk_whole(spec: dict[str, Any], data: bytes, key: str) -> float:
    """Reference (a): one object, the SDK's high-level upload with its default settings."""
    raw: Any = open_backend(StoreSpec.from_dict(spec))
    if spec["kind"] == "s3":
        client = raw._client
        t0 = time.perf_counter()
        client.upload_fileobj(io.BytesIO(data), raw.bucket, raw.prefix + key)
        return time.perf_counter() - t0
    container = raw._container
    t0 = time.perf_counter()
    container.upload_blob(raw.prefix + key, data, overwrite=True, max_concurrency=4)
    return time.perf_counter() - t0


def sdk_objects(spec: dict[str, Any], data: bytes, key: str) -> float:
    """Reference (b): 8 MiB objects one after the other."""
    raw: Any = open_backend(StoreSpec.from_dict(spec))
    step = 8 * MiB
    t0 = time.perf_counter()
    for i, off in enumerate(range(0, len(data), step)):
        piece = data[off:off + step]
        if spec["kind"] == "s3":
            raw._client.put_object(Bucket=raw.bucket, Key=f"{raw.prefix}{key}/{i}", Body=piece)
        else:
            raw._container.upload_blob(f"{raw.prefix}{key}/{i}", piece, overwrite=True)
    return time.perf_counter() - t0


def bench_server(kind: str, data: bytes, runs: int,
                 upload_threads: int | None = None) -> dict[str, Any]:
    prefix = f"bench-{uuid.uuid4().hex[:8]}/"
    spec = spec_for(kind, prefix)
    ensure_bucket(spec)
    size = len(data)
    ours: list[dict[str, Any]] = []
    whole: list[float] = []
    objs: list[float] = []
    sides: list[tuple[str, Callable[[int], None]]] = [
        ("SDK upload, one object", lambda i: whole.append(sdk_whole(spec, data, f"whole-{i}"))),
        ("SDK put, 8 MiB objects", lambda i: objs.append(sdk_objects(spec, data, f"objs-{i}"))),
        ("ours (zstd + AES-GCM)", lambda i: ours.append(run_ours(spec, data, f"item-{i}", upload_threads))),
    ]
    print(f"{kind}: {shared_server(kind).endpoint}")
    cpu: dict[str, list[float]] = {name: [] for name, _ in sides}
    for i in range(runs):
        for name, fn in sides:
            c0 = time.process_time()
            fn(i)
            cpu[name].append(time.process_time() - c0)
            t = (ours[-1]["seconds"] if name.startswith("ours") else
                 whole[-1] if name.startswith("SDK upload") else objs[-1])
            print(f"  run {i + 1}: {name:26s} {t:6.2f} s  {rate(size, t):>10s}  "
                  f"(client CPU {cpu[name][-1]:.2f} s)")
    o = min(ours, key=lambda r: r["seconds"])
    wb, ob = best(whole), best(objs)
    ra, rb = wb / o["seconds"], ob / o["seconds"]
    comp = size / o["bytes_stored"] if o["bytes_stored"] else 0.0
    print(f"  best of {runs}: ours {rate(size, o['seconds'])} (stored {mib(o['bytes_stored'])}, "
          f"compression {comp:.2f}x), SDK one object {rate(size, wb)}, SDK 8 MiB objects "
          f"{rate(size, ob)}")
    print(f"  ratio ours / SDK one object = {ra:.2f}  (goal >= {GOAL}: "
          f"{'met' if ra >= GOAL else 'NOT met'});  ours / SDK 8 MiB objects = {rb:.2f}")
    return {"ours": ours, "sdk_whole": whole, "sdk_objects": objs, "ours_best": o["seconds"],
            "sdk_whole_best": wb, "sdk_objects_best": ob, "ratio_whole": ra, "ratio_objects": rb,
            "bytes_stored": o["bytes_stored"], "compression": comp, "client_cpu_s": cpu}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=256, help="data size (MiB)")
    ap.add_argument("--runs", type=int, default=3, help="runs of each side (best is kept)")
    ap.add_argument("--servers", default="seaweedfs,azurite")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--upload-threads", type=int, default=None,
                    help="packs in flight (default: the agent's, store_repository)")
    ap.add_argument("--json", default=None, help="also write the figures here")
    a = ap.parse_args(argv)
    data = make_data(a.size_mib * MiB, a.seed)
    info = machine_info()
    print(f"data: {mib(len(data))} dense (random and text-like runs); {info['nproc']} CPUs, "
          f"{info['cpu']}, python {info['python']}")
    results: dict[str, Any] = {}
    for kind in a.servers.split(","):
        try:
            results[kind] = bench_server(kind, data, a.runs, a.upload_threads)
        except ServerUnavailable as e:
            print(f"{kind}: skipped ({e})")
    from pathlib import Path

    write_json(Path(a.json) if a.json else None,
               {"benchmark": "cloud_upload", "size": len(data), "runs": a.runs, "goal": GOAL,
                "machine": info, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
