"""QMP client against a real qemu-storage-daemon (skips without QEMU unless DRSITE_TEST_QEMU=1)."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from drsite.core.errors import NetworkError, NotFound, PermanentError
from drsite.hypervisors.qemu.qmp import (
    QmpClient,
    QmpCommandError,
    QmpInvalidArgument,
    QmpNotFound,
)
from drsite.hypervisors.qemu.tools import StorageDaemon, missing_tools, run_tool


def require_qemu() -> None:
    missing = missing_tools()
    if not missing:
        return
    msg = (f"QEMU tools missing: {', '.join(missing)} (apt-get install qemu-utils "
           "qemu-system-common libnbd-bin)")
    if os.environ.get("DRSITE_TEST_QEMU") == "1":
        pytest.fail("DRSITE_TEST_QEMU=1 but " + msg)
    pytest.skip(msg)


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[StorageDaemon]:
    require_qemu()
    img = tmp_path / "disk.qcow2"
    run_tool(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "4M"])
    d = StorageDaemon(tmp_path / "qsd", [
        "--blockdev", f"driver=file,filename={img},node-name=file0",
        "--blockdev", "driver=qcow2,file=file0,node-name=disk0"])
    with d:
        yield d


def test_greeting_and_query(daemon: StorageDaemon) -> None:
    qmp = daemon.qmp
    assert qmp.greeting["version"]["qemu"]["major"] >= 7
    nodes = qmp.execute("query-named-block-nodes", {"flat": True})
    names = {n["node-name"] for n in nodes}
    assert {"file0", "disk0"} <= names
    disk = next(n for n in nodes if n["node-name"] == "disk0")
    assert disk["image"]["virtual-size"] == 4 * 1024 * 1024


def test_errors_are_classified(daemon: StorageDaemon) -> None:
    qmp = daemon.qmp
    with pytest.raises(QmpCommandError) as ei:
        qmp.execute("no-such-command")
    assert ei.value.qmp_class == "CommandNotFound"
    assert not ei.value.transient
    with pytest.raises(QmpInvalidArgument):
        qmp.execute("block-dirty-bitmap-add", {"node": "disk0"})  # 'name' missing
    with pytest.raises((QmpNotFound, QmpCommandError)) as e2:
        qmp.execute("block-dirty-bitmap-remove", {"node": "nope", "name": "b"})
    assert isinstance(e2.value, NotFound | PermanentError)
    # the connection is still usable after command errors
    qmp.execute("block-dirty-bitmap-add", {"node": "disk0", "name": "b0", "persistent": True})
    bms = qmp.execute("query-named-block-nodes", {"flat": True})
    disk = next(n for n in bms if n["node-name"] == "disk0")
    assert [b["name"] for b in disk["dirty-bitmaps"]] == ["b0"]


def test_events_are_buffered(daemon: StorageDaemon, tmp_path: Path) -> None:
    qmp = daemon.qmp
    qmp.execute("nbd-server-start",
                {"addr": {"type": "unix", "data": {"path": str(tmp_path / "nbd.sock")}}})
    qmp.execute("block-export-add", {"type": "nbd", "id": "e0", "node-name": "disk0",
                                     "name": "disk0"})
    qmp.execute("block-export-del", {"id": "e0"})
    ev = qmp.wait_event("BLOCK_EXPORT_DELETED", timeout=5, match=lambda d: d.get("id") == "e0")
    assert ev["data"]["id"] == "e0"
    assert qmp.take_events("BLOCK_EXPORT_DELETED") == []


def test_daemon_death_is_transient(daemon: StorageDaemon) -> None:
    pid = daemon.pid
    assert pid is not None
    os.kill(pid, 9)
    with pytest.raises(NetworkError) as ei:
        daemon.qmp.execute("query-version", timeout=5)
    assert ei.value.transient
    with pytest.raises(NetworkError):
        daemon.qmp.execute("query-version")


def test_connect_refused_and_timeout(tmp_path: Path) -> None:
    with pytest.raises(NetworkError):
        QmpClient.connect(str(tmp_path / "absent.sock"), timeout=1)
    # a server that accepts but never greets: the connect times out as a transient error
    path = str(tmp_path / "mute.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)
    held: list[socket.socket] = []
    t = threading.Thread(target=lambda: held.append(srv.accept()[0]), daemon=True)
    t.start()
    try:
        with pytest.raises(NetworkError):
            QmpClient.connect(path, timeout=0.3)
    finally:
        t.join(2)
        for s in held:
            s.close()
        srv.close()


def test_not_qmp_is_permanent(tmp_path: Path) -> None:
    path = str(tmp_path / "http.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)

    def serve() -> None:
        c, _ = srv.accept()
        c.sendall(b'{"hello": 1}\n')
        c.recv(100)
        c.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        with pytest.raises(PermanentError):
            QmpClient.connect(path, timeout=2)
    finally:
        t.join(2)
        srv.close()
