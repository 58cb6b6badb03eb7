"""NBD client against real qemu-nbd, cross-checked with nbdinfo (skips without QEMU unless
DRSITE_TEST_QEMU=1)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from drsite.core.errors import InvalidInput, NetworkError, NotFound
from drsite.core.extents import ExtentList
from drsite.hypervisors.qemu.nbd import (
    BASE_ALLOCATION,
    NbdClient,
    NbdProtocolError,
    dirty_bitmap_context,
)
from drsite.hypervisors.qemu.tools import missing_tools, run_tool

MiB = 1 << 20


def require_qemu(*extra: str) -> None:
    missing = missing_tools() + [t for t in extra if shutil.which(t) is None]
    if not missing:
        return
    msg = (f"QEMU tools missing: {', '.join(missing)} (apt-get install qemu-utils "
           "qemu-system-common libnbd-bin)")
    if os.environ.get("DRSITE_TEST_QEMU") == "1":
        pytest.fail("DRSITE_TEST_QEMU=1 but " + msg)
    pytest.skip(msg)


class QemuNbd:
    def __init__(self, image: Path, sock: Path, *args: str) -> None:
        self.sock = sock
        self.proc = subprocess.Popen(["qemu-nbd", "-k", str(sock), "-t", "-e", "4", "-x", "disk",
                                      *args, str(image)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while not sock.exists():
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise AssertionError(f"qemu-nbd failed: {err}")
            assert time.monotonic() < deadline, "qemu-nbd did not start"
            time.sleep(0.02)

    @property
    def uri(self) -> str:
        return f"nbd+unix:///disk?socket={self.sock}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        if self.proc.stderr:
            self.proc.stderr.close()


@pytest.fixture
def qcow2_with_bitmap(tmp_path: Path) -> Path:
    """64 MiB qcow2: data at 1M+3M and 20M+64K, bitmap b0 added after, then 30M+128K and
    40M+4K (partial granule) written."""
    require_qemu("qemu-io")
    img = tmp_path / "d.qcow2"
    run_tool(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "64M"])
    run_tool(["qemu-io", "-c", "write -P 0xab 1M 3M", "-c", "write -P 0x11 20M 64k", str(img)])
    run_tool(["qemu-img", "bitmap", "--add", "--enable", str(img), "b0"])
    run_tool(["qemu-io", "-c", "write -P 0x22 30M 128k", "-c", "write -P 0x33 40M 4k",
              str(img)])
    return img


@pytest.fixture
def served(qcow2_with_bitmap: Path, tmp_path: Path) -> Iterator[QemuNbd]:
    srv = QemuNbd(qcow2_with_bitmap, tmp_path / "nbd.sock", "-r", "-f", "qcow2", "-B", "b0")
    yield srv
    srv.stop()


def nbdinfo_map(uri: str, context: str) -> list[tuple[int, int, int]]:
    out = subprocess.run(["nbdinfo", f"--map={context}", uri], capture_output=True, text=True,
                         check=True, timeout=30).stdout
    rows = []
    for line in out.splitlines():
        off, ln, fl = line.split()[:3]
        rows.append((int(off), int(ln), int(fl)))
    return rows


def test_block_status_matches_nbdinfo(served: QemuNbd) -> None:
    require_qemu("nbdinfo")
    bitmap = dirty_bitmap_context("b0")
    with NbdClient.connect_unix(str(served.sock), "disk",
                                meta_contexts=[BASE_ALLOCATION, bitmap]) as c:
        assert c.size == 64 * MiB and c.info.read_only
        for ctx in (BASE_ALLOCATION, bitmap):
            starts, lens, flags = c.extents(ctx)
            ours = list(zip(starts.tolist(), lens.tolist(), flags.tolist(), strict=True))
            assert ours == nbdinfo_map(served.uri, ctx), ctx
        assert c.dirty_extents("b0") == ExtentList.of([(30 * MiB, 128 * 1024),
                                                      (40 * MiB, 64 * 1024)])
        assert c.allocated_extents() == ExtentList.of(
            [(1 * MiB, 3 * MiB), (20 * MiB, 64 * 1024), (30 * MiB, 128 * 1024),
             (40 * MiB, 64 * 1024)])
        # a sub-range query starts and ends where asked
        starts, lens, _ = c.extents(bitmap, 30 * MiB + 4096, 8192)
        assert starts.tolist() == [30 * MiB + 4096] and lens.tolist() == [8192]


def test_pipelined_reads_equal_file(tmp_path: Path) -> None:
    require_qemu()
    raw = tmp_path / "r.raw"
    data = os.urandom(24 * MiB)
    raw.write_bytes(data)
    with open(raw, "r+b") as f:  # punch a hole so both data and hole chunks occur
        f.truncate(32 * MiB)
    expected = data + bytes(8 * MiB)
    srv = QemuNbd(raw, tmp_path / "nbd.sock", "-r", "-f", "raw")
    try:
        with NbdClient.connect_unix(str(srv.sock), "disk") as c:
            ext = ExtentList.of([(0, 5 * MiB + 7), (6 * MiB, 1), (10 * MiB - 3, 21 * MiB)])
            got = list(c.read_extents(ext, inflight=16, request_size=256 * 1024))
            assert c.peak_inflight == 16
            pos_expected = [p for s, n in ext for p in range(s, s + n, 256 * 1024)]
            assert [off for off, _ in got] == pos_expected
            for off, buf in got:
                assert bytes(buf) == expected[off:off + len(buf)]
            whole = bytearray(32 * MiB)
            c.readinto(0, memoryview(whole))
            assert whole == expected
            with pytest.raises(InvalidInput):
                c.read(32 * MiB - 1, 2)
            with pytest.raises(InvalidInput):
                c.write(0, b"x")  # read-only export
    finally:
        srv.stop()


def test_writes_land(tmp_path: Path) -> None:
    require_qemu()
    raw = tmp_path / "w.raw"
    with open(raw, "wb") as f:
        f.truncate(8 * MiB)
    srv = QemuNbd(raw, tmp_path / "nbd.sock", "-f", "raw")
    payload = os.urandom(3 * MiB + 123)
    try:
        with NbdClient.connect_unix(str(srv.sock), "disk") as c:
            c.write(MiB + 5, payload)
            c.flush()
            assert c.read(MiB + 5, len(payload)) == payload
    finally:
        srv.stop()
    on_disk = raw.read_bytes()
    assert on_disk[MiB + 5:MiB + 5 + len(payload)] == payload
    assert on_disk[:MiB + 5] == bytes(MiB + 5)


def test_scattered_writes_and_reads_pipelined(tmp_path: Path) -> None:
    """write_many / read_many: many small extents, pipelined across extents (a large one is
    split at the request size); bad ranges are refused before anything is sent."""
    require_qemu()
    raw = tmp_path / "s.raw"
    with open(raw, "wb") as f:
        f.truncate(64 * MiB)
    srv = QemuNbd(raw, tmp_path / "nbd.sock", "-f", "raw")
    rng = __import__("random").Random(5)
    offs = sorted(rng.sample(range(0, 60 * MiB // 4096), 300))
    writes = [(o * 4096, os.urandom(4096)) for o in offs] + [(60 * MiB + 7, os.urandom(3 * MiB))]
    try:
        with NbdClient.connect_unix(str(srv.sock), "disk") as c:
            c.write_many(writes, inflight=8)
            c.flush()
            buf = bytearray(sum(len(d) for _, d in writes))
            c.read_many([o for o, _ in writes], [len(d) for _, d in writes], memoryview(buf),
                        inflight=8)
            assert bytes(buf) == b"".join(d for _, d in writes)
            assert c.peak_inflight <= 8 + 1
            with pytest.raises(InvalidInput):
                c.read_many([64 * MiB - 1], [2], memoryview(bytearray(2)))
            with pytest.raises(InvalidInput):
                c.read_many([0], [5], memoryview(bytearray(4)))
            with pytest.raises(InvalidInput):
                c.write_many([(64 * MiB, b"x")])
    finally:
        srv.stop()
    on_disk = raw.read_bytes()
    for o, d in writes:
        assert on_disk[o:o + len(d)] == d


def test_missing_bitmap_and_export(served: QemuNbd) -> None:
    with pytest.raises(NotFound):
        NbdClient.connect_unix(str(served.sock), "disk",
                               meta_contexts=[dirty_bitmap_context("nope")])
    with pytest.raises(NotFound):
        NbdClient.connect_unix(str(served.sock), "no-such-export")


def test_server_death_is_transient(tmp_path: Path) -> None:
    require_qemu()
    raw = tmp_path / "r.raw"
    raw.write_bytes(os.urandom(16 * MiB))
    srv = QemuNbd(raw, tmp_path / "nbd.sock", "-r", "-f", "raw")
    c = NbdClient.connect_unix(str(srv.sock), "disk", timeout=5)
    it = c.read_extents([(0, 16 * MiB)], inflight=4, request_size=64 * 1024)
    next(it)
    srv.stop()
    with pytest.raises(NetworkError) as ei:
        for _ in it:
            pass
    assert ei.value.transient
    with pytest.raises(NetworkError):
        c.read(0, 1)
    c.close()


def test_not_nbd_is_protocol_error(tmp_path: Path) -> None:
    path = str(tmp_path / "bogus.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)

    def serve() -> None:
        conn, _ = srv.accept()
        conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        conn.recv(100)
        conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        with pytest.raises(NbdProtocolError) as ei:
            NbdClient.connect_unix(path, "disk", timeout=2)
        assert not ei.value.transient
    finally:
        t.join(2)
        srv.close()
