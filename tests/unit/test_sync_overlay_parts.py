"""The parts of QEMU synchronous mode that need no QEMU: the writer's name as QEMU's
``tls-authz`` matches it, the overlay tail's coverage, the driver's configuration check, and
the watchdog's verdict on a silent or refusing recovery site (``syncwatch.watch``)."""

from __future__ import annotations

import json
import os
import socket
import ssl
import threading
import time
from pathlib import Path

import pytest

from drsite.core.errors import InvalidInput
from drsite.failover.synctail import OverlayTail
from drsite.hypervisors.qemu import syncmirror, syncwatch
from drsite.hypervisors.qemu.layout import QemuDisk, QemuVmConfig, VmDir
from drsite.hypervisors.qemu.runner import Runner, process_token
from drsite.hypervisors.qemu.syncmirror import check_config
from drsite.sitestore.syncoverlay import OverlayServer, writer_dn
from drsite.sitestore.testing import make_test_certs


def test_writer_dn_is_in_certificate_order_as_gnutls_prints_it(tmp_path: Path) -> None:
    certs = make_test_certs(tmp_path)
    der = ssl.PEM_cert_to_DER_cert(certs.client_cert.read_text())
    assert writer_dn(der) == "CN=host-primary,O=site-a"


def _run(d: Path, stream: str, created: float) -> None:
    (d / stream).mkdir(parents=True)
    (d / stream / "run.json").write_text(json.dumps(
        {"stream": stream, "disks": {"d0": 4096}, "created": created}))


def test_overlay_tail_covers_only_a_point_of_a_run_it_holds(tmp_path: Path) -> None:
    tail = OverlayTail(tmp_path / "item")
    assert tail.coverage("a" * 32, 0).reason == "no sync overlay is here"
    _run(tmp_path / "item", "a" * 32, 1.0)
    _run(tmp_path / "item", "b" * 32, 2.0)
    (tmp_path / "item" / "tls").mkdir()          # not a run
    assert tail.coverage("a" * 32, 3).ok and tail.coverage("a" * 32, 3).last == 1
    assert tail.coverage("b" * 32, 0).ok and tail.coverage("b" * 32, 0).last == 0
    assert "not sealed in synchronous mode" in tail.coverage(None, None).reason
    assert "is gone" in tail.coverage("c" * 32, 0).reason
    assert "later run(s) began after a suspension" in tail.describe(
        (1, 4096), "p1", tail.coverage("a" * 32, 0))


def test_sync_configuration_must_name_an_export_per_disk(tmp_path: Path) -> None:
    cfg = QemuVmConfig("vm-1", "vm", 1, 64, (), (QemuDisk("d0", 4096, "drv0"),), False)
    good = {"item_id": "i", "host": "127.0.0.1", "port": 9, "budget_ms": 50, "ca_file": "c",
            "cert_file": "c", "key_file": "k", "stream": "s", "exports": {"d0": "s-d0"}}
    assert check_config(good, cfg)["used"] is False
    for bad in ({"exports": {"d1": "x"}}, {"budget_ms": 0}, {"port": 70000}):
        with pytest.raises(InvalidInput):
            check_config({**good, **bad}, cfg)
    with pytest.raises(InvalidInput, match="lacks stream"):
        check_config({k: v for k, v in good.items() if k != "stream"}, cfg)


def _watch_cfg(tmp_path: Path, port: int, budget_ms: int) -> dict[str, object]:
    (tmp_path / "syncrun.json").write_text(json.dumps({"stream": "s1"}))
    return {"vm_dir": str(tmp_path), "stream": "s1", "host": "127.0.0.1", "port": port,
            "exports": ["e"], "budget_ms": budget_ms, "ca_file": "", "cert_file": "",
            "key_file": "", "pid": os.getpid(), "token": process_token(os.getpid())}


def test_watchdog_calls_a_silent_site_by_the_budget(tmp_path: Path) -> None:
    """A site that accepts TCP and says nothing (a hung daemon, a black hole)."""
    srv = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    threading.Thread(target=lambda: held.append(srv.accept()[0]), daemon=True).start()
    try:
        t0 = time.monotonic()
        why = syncwatch.watch(_watch_cfg(tmp_path, srv.getsockname()[1], 200))
        took = time.monotonic() - t0
        assert "did not answer within the latency budget of 200 ms" in why, why
        assert 0.15 < took < 2.0, took
    finally:
        srv.close()
        for s in held:
            s.close()


def test_watchdog_reports_a_refusing_site_and_stops_when_its_run_ends(tmp_path: Path) -> None:
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]
    srv.close()   # nothing listens: refused at once
    why = syncwatch.watch(_watch_cfg(tmp_path, port, 200))
    assert why.startswith("the recovery site's export failed"), why
    cfg = _watch_cfg(tmp_path, port, 200)
    (tmp_path / "syncrun.json").unlink()   # the driver ended the run
    assert syncwatch.watch(cfg) == "ended"


def test_trim_deletes_only_the_runs_provisioned_before_the_points_run(tmp_path: Path) -> None:
    ov = OverlayServer(tmp_path / "ov", tmp_path / "ca", tmp_path / "c", tmp_path / "k")
    item = ov.item_dir("item-1")
    for i, s in enumerate(("a", "b", "c")):
        _run(item, s * 32, float(i))
    assert ov.trim("item-1", None) == 0
    assert ov.trim("item-1", "d" * 32) == 0          # a run this site never made: keep all
    assert ov.trim("item-1", "b" * 32) == 1           # no daemon runs: nothing to unexport
    assert [r["stream"] for r in ov.runs("item-1")] == ["b" * 32, "c" * 32]
    assert not (item / ("a" * 32)).exists()
    assert ov.trim("item-1", "b" * 32) == 0           # idempotent


class _NoRootQemu:
    """A QEMU whose device sits on the disk's own node (started before synchronous mode)."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def execute(self, command: str, arguments: object = None, **_: object) -> object:
        self.calls.append(command)
        if command == "query-block":
            return [{"qdev": "/machine/peripheral/vd0/virtio-backend",
                     "inserted": {"node-name": "drv0"}}]
        return []


def test_a_run_does_not_begin_on_a_qemu_without_the_root_node(tmp_path: Path) -> None:
    """Its mirror would sit on the disk's node and every later fleece would fail."""
    cfg = QemuVmConfig("vm-1", "vm", 1, 64, (), (QemuDisk("d0", 4096, "drv0"),), False)
    conf = {"item_id": "i", "host": "127.0.0.1", "port": 9, "budget_ms": 50, "ca_file": "c",
            "cert_file": "c", "key_file": "k", "stream": "s", "exports": {"d0": "s-d0"}}
    q = _NoRootQemu()
    with pytest.raises(InvalidInput, match="pass-through root node"):
        syncmirror.begin(q, VmDir(tmp_path), cfg, check_config(conf, cfg),  # type: ignore[arg-type]
                         Runner("vm", os.getpid(), "t"), {})
    assert "blockdev-mirror" not in q.calls and "blockdev-add" not in q.calls
