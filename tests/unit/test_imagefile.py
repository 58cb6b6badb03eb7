"""Raw image helpers (``drsite.imagefile``) and JSON records (``drsite.fsutil``): sparse
scans and their error policy, full reads, sparse copies and moves (also across file systems and
where the kernel cannot copy), atomic records."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from drsite.core.errors import NotFound, PermanentError, TransientError
from drsite.fsutil import atomic_write_json, read_record, write_record
from drsite.imagefile import (
    RawImageReader,
    copy_sparse,
    move_sparse,
    pread_full,
    pwrite_all,
    sparse_data_extents,
)

MiB = 1 << 20


def sparse_file(path: Path, size: int, writes: dict[int, bytes]) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
        for off, data in writes.items():
            os.pwrite(f.fileno(), data, off)
    return path


def holes_supported(path: Path) -> bool:
    fd = os.open(path, os.O_RDONLY)
    try:
        return sparse_data_extents(fd, os.fstat(fd).st_size).total < os.fstat(fd).st_size
    finally:
        os.close(fd)


def test_data_extents_find_data_and_skip_holes(tmp_path: Path) -> None:
    p = sparse_file(tmp_path / "img", 8 * MiB, {MiB: b"a" * 10, 5 * MiB + 7: b"b"})
    fd = os.open(p, os.O_RDONLY)
    try:
        ext = sparse_data_extents(fd, 8 * MiB)
        for off, n in ((MiB, 10), (5 * MiB + 7, 1)):
            assert any(s <= off and off + n <= s + k for s, k in ext)  # never omits data
        if holes_supported(p):
            assert ext.total < 8 * MiB
        assert sparse_data_extents(fd, 0).total == 0
        assert sparse_data_extents(fd, MiB).total <= MiB  # clipped to the size asked for
    finally:
        os.close(fd)


@pytest.mark.parametrize("err", [errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS])
def test_data_extents_unsupported_means_whole_file(tmp_path: Path, err: int,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    p = sparse_file(tmp_path / "img", 4 * MiB, {0: b"x"})

    def lseek(fd: int, pos: int, how: int) -> int:
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(os, "lseek", lseek)
    fd = os.open(p, os.O_RDONLY)
    try:
        assert sparse_data_extents(fd, 4 * MiB).to_pairs() == [(0, 4 * MiB)]
    finally:
        os.close(fd)


def test_data_extents_io_errors_are_raised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An I/O error is a broken disk, not "all data": it is raised, classified."""
    p = sparse_file(tmp_path / "img", MiB, {0: b"x"})
    fd = os.open(p, os.O_RDONLY)
    os.close(fd)
    with pytest.raises(PermanentError):  # EBADF
        sparse_data_extents(fd, MiB)

    def lseek(fd: int, pos: int, how: int) -> int:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(os, "lseek", lseek)
    fd = os.open(p, os.O_RDONLY)
    try:
        with pytest.raises(TransientError):
            sparse_data_extents(fd, MiB)
    finally:
        os.close(fd)


def test_pread_full_zero_fills_past_the_end(tmp_path: Path) -> None:
    p = tmp_path / "short"
    p.write_bytes(b"0123456789")
    fd = os.open(p, os.O_RDONLY)
    try:
        buf = bytearray(b"\xff" * 16)
        pread_full(fd, memoryview(buf), 4)
        assert bytes(buf) == b"456789" + bytes(10)
        words = memoryview(bytearray(b"\xff" * 16)).cast("I")  # not a byte view
        pread_full(fd, words, 0)
        assert words.cast("B").tobytes() == b"0123456789" + bytes(6)
    finally:
        os.close(fd)
    with RawImageReader(p, 16) as r:
        out = bytearray(16)
        r.readinto(0, memoryview(out))
        assert bytes(out) == b"0123456789" + bytes(6)


def test_pwrite_all_writes_everything(tmp_path: Path) -> None:
    p = tmp_path / "w"
    fd = os.open(p, os.O_RDWR | os.O_CREAT)
    try:
        pwrite_all(fd, memoryview(bytearray(range(256)) * 1000).cast("B"), 10)
        assert os.pread(fd, 256 * 1000, 10) == bytes(range(256)) * 1000
    finally:
        os.close(fd)


def test_copy_sparse_keeps_holes_and_sizes(tmp_path: Path) -> None:
    src = sparse_file(tmp_path / "src", 8 * MiB, {0: b"head", 6 * MiB: b"z" * 5000})
    dest = tmp_path / "dest"
    copied = copy_sparse(src, dest, 8 * MiB)
    assert dest.read_bytes() == src.read_bytes()
    assert copied >= 5004
    if holes_supported(src):
        assert copied < 8 * MiB and dest.stat().st_blocks * 512 < 4 * MiB
    assert copy_sparse(src, tmp_path / "cut", MiB) <= MiB  # cut at the size asked for
    assert (tmp_path / "cut").read_bytes() == src.read_bytes()[:MiB]
    copy_sparse(src, tmp_path / "grown", 10 * MiB)
    assert (tmp_path / "grown").read_bytes() == src.read_bytes() + bytes(2 * MiB)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut", "dest", "grown", "src"]


@pytest.mark.parametrize("err", [errno.EXDEV, errno.EOPNOTSUPP])
def test_copy_sparse_without_kernel_copy(tmp_path: Path, err: int,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Where copy_file_range cannot copy (across file systems on Linux >= 5.19, or a file
    system without it), a plain read/write copy gives the same image."""
    src = sparse_file(tmp_path / "src", 4 * MiB, {100: b"abc", 3 * MiB: os.urandom(70_000)})

    def no_copy(*args: int) -> int:
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(os, "copy_file_range", no_copy)
    assert copy_sparse(src, tmp_path / "dest", 4 * MiB) >= 70_003
    assert (tmp_path / "dest").read_bytes() == src.read_bytes()


def test_copy_sparse_failure_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = sparse_file(tmp_path / "src", MiB, {0: b"x"})

    def full(*args: int) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "copy_file_range", full)
    with pytest.raises(TransientError):  # LowDiskSpace: retry once there is room
        copy_sparse(src, tmp_path / "dest", MiB)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
    with pytest.raises(NotFound):
        copy_sparse(tmp_path / "missing", tmp_path / "dest", MiB)


def test_move_sparse_renames_on_one_file_system(tmp_path: Path) -> None:
    src = sparse_file(tmp_path / "src", MiB, {0: b"x"})
    ino = src.stat().st_ino
    move_sparse(src, tmp_path / "dest")
    assert not src.exists() and (tmp_path / "dest").stat().st_ino == ino


def test_move_sparse_across_file_systems(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shm = Path("/dev/shm")
    other = shm.is_dir() and os.access(shm, os.W_OK) and shm.stat().st_dev != tmp_path.stat().st_dev
    if other:
        src = sparse_file(shm / f"drsite-test-{os.getpid()}", 4 * MiB, {MiB: b"moved"})
    else:  # a single file system here: make the rename fail as it would across two
        src = sparse_file(tmp_path / "src", 4 * MiB, {MiB: b"moved"})
        real_replace = os.replace

        def replace(a: str | Path, b: str | Path) -> None:
            if Path(a) == src:
                raise OSError(errno.EXDEV, "Invalid cross-device link")
            real_replace(a, b)

        monkeypatch.setattr(os, "replace", replace)
    data = src.read_bytes()
    try:
        move_sparse(src, tmp_path / "dest")
        assert not src.exists()
        assert (tmp_path / "dest").read_bytes() == data
    finally:
        src.unlink(missing_ok=True)


def test_move_sparse_failure_keeps_the_source(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    src = sparse_file(tmp_path / "src", MiB, {0: b"keep"})

    def replace(a: str | Path, b: str | Path) -> None:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    def full(*args: int) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "copy_file_range", full)
    with pytest.raises(TransientError):
        move_sparse(src, tmp_path / "dest")
    assert src.read_bytes()[:4] == b"keep" and not (tmp_path / "dest").exists()


def test_records(tmp_path: Path) -> None:
    rec = tmp_path / "vm.json"
    assert read_record(rec) is None
    write_record(rec, {"b": 1, "a": [1, 2]})
    assert read_record(rec) == {"a": [1, 2], "b": 1}
    write_record(rec, {"b": 2})
    assert read_record(rec) == {"b": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["vm.json"]  # no temp files left
    gone = tmp_path / "deleted-vm" / "stop.json"
    with pytest.raises(NotFound):  # a record never recreates a removed directory
        write_record(gone, {"clean": True})
    assert not gone.parent.exists()
    atomic_write_json(gone, {"x": 1})  # the OSError family creates parents
    assert json.loads(gone.read_text()) == {"x": 1}
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(PermanentError):
        read_record(tmp_path / "list.json")
    (tmp_path / "torn.json").write_text('{"a": ')
    with pytest.raises(PermanentError):
        read_record(tmp_path / "torn.json")
