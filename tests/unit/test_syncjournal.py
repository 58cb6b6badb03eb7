"""The sync journal (tracking/syncjournal.py): append, group fsync, contiguity, trim, a torn
tail after a crash, and coverage of a point's seal instant."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from drsite.core.errors import Conflict, InvalidInput
from drsite.tracking import syncjournal as J
from drsite.tracking.syncjournal import SyncJournal, decode_writes, encode_writes


def _payload(seq: int) -> bytes:
    return encode_writes([("d0", seq * 4096, seq.to_bytes(8, "little") * 512),
                          ("d1", 0, b"x" * 100)])


def _end(j: SyncJournal) -> int:
    """The end of the last entry in a one-segment journal (the file goes on with zeros)."""
    n = j.describe()["bytes"]
    assert isinstance(n, int)
    return n


def test_encode_decode_round_trip_and_bad_input() -> None:
    writes = [("d0", 4096, b"a" * 4096), ("disk-1", 1 << 40, b"\x00\x01")]
    assert decode_writes(encode_writes(writes)) == writes
    with pytest.raises(InvalidInput):
        decode_writes(encode_writes(writes)[:-1])
    with pytest.raises(InvalidInput):
        decode_writes(encode_writes(writes) + b"\x00")
    with pytest.raises(InvalidInput):
        encode_writes([("", 0, b"x")])


def test_append_sync_reopen_and_contiguity(tmp_path: Path) -> None:
    stream = uuid.uuid4().hex
    j = SyncJournal.open(tmp_path / "j")
    with pytest.raises(Conflict):
        j.append(1, b"x")  # not begun
    j.begin(stream, 10)
    for s in range(11, 21):
        j.append(s, _payload(s))
    with pytest.raises(Conflict, match="does not follow"):
        j.append(22, _payload(22))
    with pytest.raises(Conflict):
        j.append(20, _payload(20))
    j.sync()
    assert j.last == 20 and j.first_base == 10
    j.close()
    j2 = SyncJournal.open(tmp_path / "j")
    assert j2.stream == stream and j2.last == 20 and j2.cut_bytes == 0
    got = list(j2.entries_after(15))
    assert [s for s, _ in got] == [16, 17, 18, 19, 20]
    assert got[0][1] == _payload(16)
    j2.append(21, _payload(21))  # continues after a reopen
    assert j2.last == 21


def test_torn_tail_is_cut_at_open(tmp_path: Path) -> None:
    stream = uuid.uuid4().hex
    j = SyncJournal.open(tmp_path / "j")
    j.begin(stream, 0)
    for s in range(1, 6):
        j.append(s, _payload(s))
    j.sync()
    seg = next((tmp_path / "j").glob("seg-*.j"))
    size = _end(j)
    j.close()
    # a crash in the middle of entry 5: its last 100 bytes did not reach the disk (the
    # preallocated zeros are still there)
    with open(seg, "r+b") as f:
        f.seek(size - 100)
        f.write(bytes(100))
    j2 = SyncJournal.open(tmp_path / "j")
    assert j2.last == 4 and j2.cut_bytes > 0
    assert seg.stat().st_size < size - 100
    j2.append(5, _payload(5))
    j2.sync()
    end = _end(j2)
    j2.close()
    # a flipped byte in the last entry's payload: its CRC fails, it is cut
    data = bytearray(seg.read_bytes())
    data[end - 10] ^= 0xFF
    seg.write_bytes(bytes(data))
    j3 = SyncJournal.open(tmp_path / "j")
    assert j3.last == 4
    assert [s for s, _ in j3.entries_after(0)] == [1, 2, 3, 4]


def test_begin_replaces_the_run_and_a_crash_before_the_state_keeps_the_old(tmp_path: Path) -> None:
    a, b = uuid.uuid4().hex, uuid.uuid4().hex
    j = SyncJournal.open(tmp_path / "j")
    j.begin(a, 0)
    j.append(1, _payload(1))
    j.sync()
    j.begin(a, 0)  # not idempotent once entries exist: a new run at the same base
    assert j.last == 0
    j.append(1, _payload(1))
    j.begin(b, 7)
    assert j.stream == b and j.first_base == 7 and j.last == 7
    assert list(j.entries_after(0)) == []
    j.close()
    # a foreign segment (another stream) left behind is dropped at open
    (tmp_path / "j" / "seg-00000000000000ff.j").write_bytes(
        J._SEG_HEAD.pack(J._SEG_MAGIC, uuid.UUID(a).bytes, 255))
    j2 = SyncJournal.open(tmp_path / "j")
    assert j2.stream == b and j2.last == 7
    assert not (tmp_path / "j" / "seg-00000000000000ff.j").exists()


def test_segments_rotate_and_trim_keeps_what_a_point_does_not_cover(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(J, "SEGMENT_BYTES", 20_000)
    stream = uuid.uuid4().hex
    j = SyncJournal.open(tmp_path / "j")
    j.begin(stream, 100)
    for s in range(101, 141):
        j.append(s, _payload(s))
    j.sync()
    nseg = j.describe()["segments"]
    assert isinstance(nseg, int) and nseg > 3
    assert j.trim(uuid.uuid4().hex, 130) == 0  # another stream's point trims nothing
    deleted = j.trim(stream, 125)
    assert deleted > 0
    first = j.first_base
    assert first is not None and first <= 125
    assert [s for s, _ in j.entries_after(125)] == list(range(126, 141))
    assert j.coverage(stream, 125).ok
    j.close()
    j2 = SyncJournal.open(tmp_path / "j")  # reopened after a trim: still contiguous
    assert j2.first_base == first and j2.last == 140
    assert [s for s, _ in j2.entries_after(130)] == list(range(131, 141))
    j2.trim(stream, 10_000)
    assert j2.describe()["segments"] == 1  # the last segment always stays


def test_coverage_says_why_not(tmp_path: Path) -> None:
    stream = uuid.uuid4().hex
    j = SyncJournal.open(tmp_path / "j")
    assert not j.coverage(stream, 0).ok
    j.begin(stream, 50)
    for s in range(51, 56):
        j.append(s, _payload(s))
    assert j.coverage(stream, 50).ok and j.coverage(stream, 55).ok
    assert "starts at 50" in j.coverage(stream, 49).reason
    assert "ends at 55" in j.coverage(stream, 56).reason
    assert "restarted" in j.coverage(uuid.uuid4().hex, 52).reason
    assert "not sealed in synchronous mode" in j.coverage(None, None).reason


def test_a_read_only_open_changes_nothing_and_stops_at_a_torn_tail(tmp_path: Path) -> None:
    """Break-glass reads the journal beside the agent that may still append to it: a partial
    last entry (being written) ends what it reads, nothing on disk changes, writes refuse."""
    stream = uuid.uuid4().hex
    assert SyncJournal.open_readonly(tmp_path / "none").coverage(stream, 0).reason == \
        "the sync journal is empty"
    assert not (tmp_path / "none").exists()  # not created
    w = SyncJournal.open(tmp_path / "j")
    w.begin(stream, 3)
    for s in range(4, 9):
        w.append(s, _payload(s))
    w.sync()
    seg = next((tmp_path / "j").glob("seg-*.j"))
    size = _end(w)
    # the writer is half-way through entry 9 (its head and part of its payload)
    payload = _payload(9)
    head = J._ENT_HEAD.pack(J._ENT_MAGIC, 9, len(payload), J._crc(9, payload))
    with open(seg, "r+b") as f:
        f.seek(size)
        f.write(head + payload[:50])
    before = sorted((p.name, p.stat().st_size) for p in (tmp_path / "j").iterdir())
    r = SyncJournal.open_readonly(tmp_path / "j")
    assert r.readonly and r.stream == stream and r.last == 8 and r.cut_bytes > 0
    assert r.coverage(stream, 5).ok and r.coverage(stream, 5).last == 8
    assert [s for s, _ in r.entries_after(5)] == [6, 7, 8]
    for call in (lambda: r.append(9, payload), lambda: r.begin(stream, 20),
                 lambda: r.trim(stream, 8)):
        with pytest.raises(Conflict, match="read-only"):
            call()
    r.close()
    assert sorted((p.name, p.stat().st_size) for p in (tmp_path / "j").iterdir()) == before
    with open(seg, "rb") as f:  # the torn tail is the writer's to cut, not the reader's
        f.seek(size)
        assert f.read(len(head)) == head
    # a segment of another stream (a begin under way in the writer) ends the read, kept
    (tmp_path / "j" / "seg-00000000000000ff.j").write_bytes(
        J._SEG_HEAD.pack(J._SEG_MAGIC, uuid.uuid4().bytes, 255))
    r2 = SyncJournal.open_readonly(tmp_path / "j")
    assert r2.last == 8 and (tmp_path / "j" / "seg-00000000000000ff.j").exists()
    r2.close()
    w.close()


def test_outlived_only_by_a_point_committed_after_the_run_and_not_of_its_stream() -> None:
    s = uuid.uuid4().hex
    run = {"stream": s, "base": 7, "after_point": "p000000000003"}
    mark = {"stream": s, "seq": 9}
    assert not J.outlived(run, "p000000000003", None)          # the point before the run
    assert not J.outlived(run, "p000000000004", mark)          # sealed in the run: needed
    assert J.outlived(run, "p000000000004", None)              # sealed with no mirror: async
    assert J.outlived(run, "p000000000010", {"stream": uuid.uuid4().hex, "seq": 2})
    assert not J.outlived(run, None, None)                     # no point at all
    assert J.outlived({**run, "after_point": None}, "p000000000001", None)  # none before it
    # a journal begun by an older agent does not say what came before it: never
    assert not J.outlived({"stream": s, "base": 7}, "p000000000009", None)
    assert not J.outlived(None, "p000000000009", None)


def test_begin_records_what_the_run_began_after(tmp_path: Path) -> None:
    s = uuid.uuid4().hex
    j = SyncJournal.open(tmp_path / "j")
    j.begin(s, 0)
    assert "after_point" not in (J.journal_state(tmp_path / "j") or {})
    j.begin(s, 4, after_point=None)
    assert J.journal_state(tmp_path / "j") == {"stream": s, "base": 4, "after_point": None}
    j.begin(s, 9, after_point="p000000000002")
    assert (J.journal_state(tmp_path / "j") or {})["after_point"] == "p000000000002"
    j.close()


def test_the_last_segment_is_preallocated_and_a_zero_tail_is_a_clean_end(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Appends overwrite zeros written ahead (a data-only fdatasync); reopening keeps the
    zeros (nothing is cut, the entries are all there); past the zeros the segment grows by
    another stretch of them; a segment is cut to its last entry before the next one begins,
    and a zero tail left on an earlier segment still reads as its clean end."""
    monkeypatch.setattr(J, "PREALLOC", 64 << 10)
    monkeypatch.setattr(J, "SEGMENT_BYTES", 100_000)
    stream = uuid.uuid4().hex
    j = SyncJournal.open(tmp_path / "j")
    j.begin(stream, 0)
    seg = next((tmp_path / "j").glob("seg-*.j"))
    prealloc = seg.stat().st_size
    assert prealloc >= J._SEG_HEAD.size + (64 << 10)
    assert seg.read_bytes()[J._SEG_HEAD.size:] == bytes(prealloc - J._SEG_HEAD.size)
    for s in range(1, 6):
        j.append(s, _payload(s))
    j.sync()
    assert seg.stat().st_size == prealloc and _end(j) < prealloc  # no growth: overwrites
    j.close()
    j = SyncJournal.open(tmp_path / "j")
    assert j.last == 5 and j.cut_bytes == 0 and seg.stat().st_size == prealloc
    for s in range(6, 40):  # past the zeros: another stretch, then a second segment
        j.append(s, _payload(s))
    j.sync()
    segs = sorted((tmp_path / "j").glob("seg-*.j"))
    assert len(segs) >= 2 and segs[0] == seg
    assert seg.stat().st_size == _seg_end(seg)    # the closed segment: no zeros left
    assert segs[-1].stat().st_size > _seg_end(segs[-1])
    j.close()
    with open(seg, "ab") as f:   # zeros after an earlier segment's last entry: a clean end
        f.write(bytes(8192))
    j = SyncJournal.open(tmp_path / "j")
    assert j.last == 39 and j.cut_bytes == 0
    assert [s for s, _ in j.entries_after(0)] == list(range(1, 40))
    j.close()


def _seg_end(path: Path) -> int:
    """The end of a segment file's last entry."""
    data = path.read_bytes()
    pos = J._SEG_HEAD.size
    while pos + J._ENT_HEAD.size <= len(data):
        magic, _, length, _ = J._ENT_HEAD.unpack_from(data, pos)
        if magic != J._ENT_MAGIC:
            break
        pos += J._ENT_HEAD.size + length
    return pos


def test_a_durable_append_is_one_dsync_write_unless_something_else_waits_for_a_flush(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``append(durable=True)`` makes every entry so far durable: alone (the preallocated
    zeros underneath already flushed) it is one ``pwritev`` with ``RWF_DSYNC`` and no
    ``fdatasync``; after entries appended without a flush, or when the append wrote new zeros
    ahead, it is a plain write and one ``fdatasync`` of the file (RWF_DSYNC would flush only
    its own range)."""
    if not J._RWF_DSYNC:
        pytest.skip("no RWF_DSYNC on this platform")
    monkeypatch.setattr(J, "PREALLOC", 64 << 10)
    calls: list[tuple[str, int]] = []
    real_pwritev, real_fdatasync = J.os.pwritev, J.os.fdatasync

    def pwritev(fd: int, bufs: list[bytes], off: int, flags: int = 0) -> int:
        calls.append(("pwritev", flags))
        return real_pwritev(fd, bufs, off, flags)

    def fdatasync(fd: int) -> None:
        calls.append(("fdatasync", 0))
        real_fdatasync(fd)

    j = SyncJournal.open(tmp_path / "j")
    j.begin(uuid.uuid4().hex, 0)
    monkeypatch.setattr(J.os, "pwritev", pwritev)
    monkeypatch.setattr(J.os, "fdatasync", fdatasync)
    j.append(1, _payload(1), durable=True)
    assert calls == [("pwritev", J._RWF_DSYNC)]
    j.sync()   # nothing left to flush
    assert calls == [("pwritev", J._RWF_DSYNC)]
    del calls[:]
    j.append(2, _payload(2))
    j.append(3, _payload(3))
    j.append(4, _payload(4), durable=True)   # group commit: one flush for 2..4
    assert calls == [("pwritev", 0)] * 3 + [("fdatasync", 0)]
    del calls[:]
    seq = 5
    while not any(c == ("fdatasync", 0) for c in calls):   # until an append writes zeros ahead
        j.append(seq, _payload(seq), durable=True)
        seq += 1
        assert seq < 100
    assert calls[-2:] == [("pwritev", 0), ("fdatasync", 0)]
    del calls[:]
    j.append(seq, _payload(seq), durable=True)   # the zeros are flushed: back to one write
    assert calls == [("pwritev", J._RWF_DSYNC)]
    j.append(seq + 1, _payload(seq + 1))   # left unflushed, as a crash would leave it
    j.close()
    j = SyncJournal.open(tmp_path / "j")
    assert j.last == seq + 1 and j.cut_bytes == 0
    assert [s for s, _ in j.entries_after(0)] == list(range(1, seq + 2))
    assert dict(j.entries_after(0))[seq] == _payload(seq)
    del calls[:]
    # after an open, what an earlier process appended may be in the page cache only: the
    # first durable append flushes the whole file
    j.append(seq + 2, _payload(seq + 2), durable=True)
    assert calls == [("pwritev", 0), ("fdatasync", 0)]
    j.close()


def test_an_append_of_a_replaced_run_is_refused(tmp_path: Path) -> None:
    """``append(run=)`` names the run its connection began: after a newer ``begin`` (another
    connection, perhaps another stream whose numbers overlap) it is refused."""
    j = SyncJournal.open(tmp_path / "j")
    j.begin(uuid.uuid4().hex, 0)
    old = j.run
    j.append(1, _payload(1), run=old, durable=True)
    j.begin(uuid.uuid4().hex, 1)   # a restarted guest: a new stream whose base happens to be 1
    with pytest.raises(Conflict, match="newer run"):
        j.append(2, _payload(2), run=old, durable=True)
    j.append(2, _payload(2), run=j.run, durable=True)
    assert [s for s, _ in j.entries_after(1)] == [2]
    j.close()
