"""The spool keeps telemetry across restarts and kills, in order, within its bound, and survives a bad file."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from device_agent.spool import Spool
from edgeops.errors import StorageError

TOPIC = "edgeops/v1/acme/device/pi-01/telemetry"


def test_order_and_seq_survive_reopen(tmp_path: Path) -> None:
    path = tmp_path / "data" / "spool.sqlite"
    spool = Spool(path, max_messages=100)
    seqs = [spool.put(TOPIC, f"m{i}".encode(), now=1000.0 + i) for i in range(5)]
    spool.ack(seqs[-1])  # the newest is gone: its seq must still never come back
    spool.close()

    spool = Spool(path, max_messages=100)
    got = spool.peek(10)
    assert [m.payload for m in got] == [b"m0", b"m1", b"m2", b"m3"]
    assert [m.seq for m in got] == seqs[:4] and seqs == sorted(seqs)
    assert got[0].topic == TOPIC and got[0].qos == 1 and got[0].retain is False and got[0].created_at == 1000.0
    assert spool.pending() == 4
    assert spool.put(TOPIC, b"m5") > seqs[-1]
    spool.close()


def test_put_survives_sigkill_right_after_it_returns(tmp_path: Path) -> None:
    path = tmp_path / "spool.sqlite"
    code = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from device_agent.spool import Spool\n"
        f"s = Spool(Path({str(path)!r}), max_messages=10)\n"
        "seq = s.put('t/x', b'precious', retain=True)\n"
        "print(seq, flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        seq = int(proc.stdout.readline())
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    spool = Spool(path, max_messages=10)
    [msg] = spool.peek(10)
    assert (msg.seq, msg.topic, msg.payload, msg.retain) == (seq, "t/x", b"precious", True)
    spool.close()


def test_bound_drops_oldest_and_counts_persistently(tmp_path: Path) -> None:
    path = tmp_path / "spool.sqlite"
    spool = Spool(path, max_messages=3)
    for i in range(5):
        spool.put(TOPIC, b"%d" % i)
    assert [m.payload for m in spool.peek(10)] == [b"2", b"3", b"4"]
    assert spool.pending() == 3 and spool.dropped == 2
    assert spool.take_dropped_report() == 2
    assert spool.take_dropped_report() == 0
    spool.close()

    spool = Spool(path, max_messages=3)
    assert spool.dropped == 2 and spool.take_dropped_report() == 0
    spool.put(TOPIC, b"5")
    assert [m.payload for m in spool.peek(10)] == [b"3", b"4", b"5"]
    assert spool.dropped == 3 and spool.take_dropped_report() == 1
    spool.close()


def test_put_json_embeds_its_seq_as_compact_sorted_json(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool.sqlite", max_messages=10)
    spool.put(TOPIC, b"raw")
    seq = spool.put_json(TOPIC, {"z": 1, "kind": "latency", "p50_ms": 1.5})
    [_, msg] = spool.peek(10)
    assert msg.seq == seq == 2
    assert msg.payload == b'{"kind":"latency","p50_ms":1.5,"seq":2,"z":1}'
    assert json.loads(msg.payload)["seq"] == msg.seq
    with pytest.raises(TypeError):
        spool.put_json(TOPIC, {"x": object()})
    assert spool.pending() == 2  # the bad document left nothing behind
    spool.close()


def test_ack_is_idempotent(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool.sqlite", max_messages=10)
    a, b = spool.put(TOPIC, b"a"), spool.put(TOPIC, b"b")
    spool.ack(a)
    spool.ack(a)
    spool.ack(12345)
    assert spool.pending() == 1 and [m.seq for m in spool.peek(10)] == [b]
    spool.ack_many([b, b, a])
    assert spool.pending() == 0 and spool.peek(10) == []
    spool.close()


def test_concurrent_puts_get_distinct_ordered_seqs(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool.sqlite", max_messages=1000)
    got: list[int] = []
    lock = threading.Lock()

    def writer(n: int) -> None:
        for i in range(25):
            seq = spool.put(TOPIC, b"%d-%d" % (n, i))
            with lock:
                got.append(seq)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(got)) == 100 and spool.pending() == 100
    assert [m.seq for m in spool.peek(1000)] == sorted(got)
    spool.close()


def test_corrupt_file_is_set_aside_and_a_new_spool_starts(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "spool.sqlite"
    path.write_bytes(b"this is not a database, it is a half-written something" * 100)
    with caplog.at_level(logging.WARNING, logger="device_agent.spool"):
        spool = Spool(path, max_messages=10)
    assert spool.pending() == 0
    assert spool.put(TOPIC, b"fresh") == 1 and spool.peek(1)[0].payload == b"fresh"
    spool.close()
    [aside] = list(tmp_path.glob("spool.sqlite.corrupt-*"))
    assert aside.read_bytes().startswith(b"this is not a database")
    assert "corrupt" in caplog.text and aside.name in caplog.text


@contextmanager
def _unprivileged() -> Iterator[None]:
    """Root ignores file modes: act as nobody for the block when running as root."""
    if os.geteuid() != 0:
        yield
        return
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)


def test_read_only_directory_raises_storage_error() -> None:
    # a world-traversable parent, so that the unprivileged user meets the read-only mode and nothing else
    base = Path(os.path.realpath("/tmp")) / f"edgeops-ro-{os.getpid()}"
    ro = base / "data"
    ro.mkdir(parents=True)
    try:
        base.chmod(0o755)
        ro.chmod(0o555)
        with _unprivileged(), pytest.raises(StorageError, match="spool"):
            Spool(ro / "spool.sqlite", max_messages=10)
        with _unprivileged(), pytest.raises(StorageError, match="directory"):
            Spool(ro / "sub" / "spool.sqlite", max_messages=10)
    finally:
        ro.chmod(0o755)
        shutil.rmtree(base)


def test_full_disk_raises_storage_error_and_keeps_what_was_there(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool.sqlite", max_messages=10)
    spool.put(TOPIC, b"before")
    # SQLite's page cap stands in for a full disk: the same SQLITE_FULL error, without filling one
    pages = spool._conn.execute("PRAGMA page_count").fetchone()[0]
    spool._conn.execute(f"PRAGMA max_page_count={pages}")
    with pytest.raises(StorageError, match="full"):
        spool.put(TOPIC, b"x" * 100_000)
    assert spool.pending() == 1 and [m.payload for m in spool.peek(10)] == [b"before"]
    spool.close()
