"""The OTA download on disk: chunks survive a restart, bytes a power cut did not write are fetched again, a
full disk leaves nothing behind, and the store never touches anything outside its own directory."""

from __future__ import annotations

import hashlib
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from device_agent.transfer_store import Transfer, TransferStore
from edgeops.errors import StorageError
from edgeops.release import ReleaseMetadata
from tests.device_agent.test_ota_receiver import BASE_SHA, CHUNK, KEY, full_and_delta, make_release

TARGET = random.Random(7).randbytes(10 * CHUNK + 123)  # 11 chunks, the last one short
PATCH = random.Random(8).randbytes(3 * CHUNK + 1)
RAW, META, FILES = make_release(TARGET, deltas=[("1.0.0", BASE_SHA, PATCH)])
FULL, DELTA = full_and_delta(META, BASE_SHA)
REPO = Path(__file__).resolve().parents[2]


def chunk(index: int, data: bytes = TARGET) -> bytes:
    return data[index * CHUNK : (index + 1) * CHUNK]


def write(transfer: Transfer, indices: list[int], data: bytes = TARGET) -> None:
    for i in indices:
        transfer.write_chunk(i, chunk(i, data))


def test_chunks_survive_a_restart(tmp_path: Path) -> None:
    with TransferStore(tmp_path / "ota").begin(RAW, META, FULL) as transfer:
        part = transfer.part_path.stat()
        assert transfer.held == frozenset() and part.st_size == len(TARGET)
        assert part.st_blocks * 512 >= len(TARGET)  # reserved up front (not sparse): a full disk shows at begin()
        write(transfer, [0, 5, 10])
        transfer.sync()
    store = TransferStore(tmp_path / "ota")  # the agent restarted
    assert store.saved() == [(META.release_id, RAW, FULL.id)]
    with store.open(META, FULL) as transfer:
        assert transfer.held == {0, 5, 10} and not transfer.complete


def test_a_flag_without_its_bytes_is_dropped_on_open(tmp_path: Path) -> None:
    store = TransferStore(tmp_path)
    with store.begin(RAW, META, FULL) as transfer:
        write(transfer, [1, 2, 3, 10])
        bitmap = transfer.dir / "have.bitmap"
    with transfer.part_path.open("r+b") as f:  # bit rot / a torn write in chunk 2
        f.seek(2 * CHUNK + 100)
        f.write(b"\xff\xfe")
    with bitmap.open("r+b") as f:  # a power cut: the flag of chunk 4 reached the disk, its bytes did not
        f.seek(4)
        f.write(b"\x01")
    with store.open(META, FULL) as transfer:
        assert transfer.held == {1, 3, 10}
    assert bitmap.read_bytes()[1:5] == b"\x01\x00\x01\x00"  # the cleared flags are persisted too
    with store.begin(RAW, META, FULL) as transfer:  # begin() on the same payload resumes the same way
        assert transfer.held == {1, 3, 10}


def test_begin_resumes_the_same_payload_and_restarts_another(tmp_path: Path) -> None:
    store = TransferStore(tmp_path)
    with store.begin(RAW, META, FULL) as transfer:
        write(transfer, [0, 1])
    republished, meta2, _ = make_release(TARGET, deltas=[("1.0.0", BASE_SHA, PATCH)], created_at=1_800_000_000.0)
    assert republished != RAW and meta2.full() == FULL
    with store.begin(republished, meta2, FULL) as transfer:  # same release, same payload, newer signature
        assert transfer.held == {0, 1}
        assert (transfer.dir / "release.json").read_bytes() == republished
    with store.begin(RAW, META, DELTA) as transfer:  # the device's base changed: the delta, from scratch
        assert transfer.held == frozenset() and transfer.part_path.stat().st_size == len(PATCH)
        write(transfer, [0, 1, 2, 3], PATCH)
        assert transfer.complete
    assert store.saved() == [(META.release_id, RAW, DELTA.id)]


def test_only_one_release_downloads_at_a_time(tmp_path: Path) -> None:
    store = TransferStore(tmp_path)
    with store.begin(RAW, META, FULL) as transfer:
        write(transfer, [0])
    raw2, meta2, _ = make_release(TARGET[::-1], version="1.2.0")
    payload2 = meta2.payloads[0]
    with store.begin(raw2, meta2, payload2):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == [meta2.release_id]
    assert store.saved() == [(meta2.release_id, raw2, payload2.id)]
    with pytest.raises(StorageError, match="no usable transfer"):
        store.open(META, FULL)


def test_the_finished_part_file_is_the_payload_whatever_the_arrival_order(tmp_path: Path) -> None:
    order = list(range(FULL.chunk_count))
    random.Random(3).shuffle(order)
    with TransferStore(tmp_path).begin(RAW, META, FULL) as transfer:
        for n, i in enumerate(order):
            assert not transfer.complete
            transfer.write_chunk(i, chunk(i))
            if n == 4:
                transfer.write_chunk(i, chunk(i))  # a duplicate written again changes nothing
        transfer.sync()
        assert transfer.complete and transfer.held == set(order)
        assert hashlib.sha256(transfer.part_path.read_bytes()).hexdigest() == FULL.sha256


def test_saved_removes_unusable_directories(tmp_path: Path) -> None:
    store = TransferStore(tmp_path)
    with store.begin(RAW, META, FULL):
        pass
    keep = tmp_path / META.release_id
    for name, broken in [("release.json", "digits-0.0.1-x86-gateway"), ("payload.json", "digits-0.0.2-x86-gateway")]:
        bad = tmp_path / broken
        bad.mkdir()
        for f in keep.iterdir():
            (bad / f.name).write_bytes(f.read_bytes())
        whole = (bad / name).read_bytes()
        (bad / name).write_bytes(whole[: len(whole) // 2])  # truncated by a crash
    (tmp_path / ".new-digits-1.3.0-x86-gateway-abc").mkdir()  # an interrupted begin()
    (tmp_path / "digits-0.0.3-x86-gateway").mkdir()  # no files at all
    assert store.saved() == [(META.release_id, RAW, FULL.id)]
    assert sorted(p.name for p in tmp_path.iterdir()) == [META.release_id]


def test_a_part_file_of_the_wrong_size_starts_over(tmp_path: Path) -> None:
    store = TransferStore(tmp_path)
    with store.begin(RAW, META, FULL) as transfer:
        write(transfer, [0, 1])
    with transfer.part_path.open("r+b") as f:
        f.truncate(CHUNK)
    with pytest.raises(StorageError, match=r"payload\.part is 1024 bytes, the payload is 10363"):
        store.open(META, FULL)
    with store.begin(RAW, META, FULL) as transfer:
        assert transfer.held == frozenset() and transfer.part_path.stat().st_size == len(TARGET)


DISK_FULL_CHILD = textwrap.dedent(
    """
    import resource, signal, sys
    from pathlib import Path
    from cryptography.hazmat.primitives.serialization import load_pem_public_key
    from device_agent.transfer_store import TransferStore
    from edgeops.errors import StorageError
    from edgeops.release import parse_release

    raw = Path(sys.argv[1]).read_bytes()
    meta = parse_release(raw, [load_pem_public_key(Path(sys.argv[2]).read_bytes())])
    store = TransferStore(Path(sys.argv[3]))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, 256 * 1024))  # any file over 256 KiB fails
    try:
        store.begin(raw, meta, meta.full())
    except StorageError as exc:
        print(exc)
        sys.exit(3)
    """
)


def test_a_payload_the_disk_cannot_hold_leaves_nothing(tmp_path: Path) -> None:
    big = random.Random(9).randbytes(1024 * 1024)
    raw, _, _ = make_release(big, chunk_size=64 * 1024)
    (tmp_path / "release.json").write_bytes(raw)
    (tmp_path / "signing.pub").write_bytes(
        KEY.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    root = tmp_path / "ota"
    child = subprocess.run(
        [sys.executable, "-c", DISK_FULL_CHILD, str(tmp_path / "release.json"), str(tmp_path / "signing.pub"),
         str(root)],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )
    assert child.returncode == 3, child.stderr
    assert "1048576-byte download" in child.stdout and "file too large" in child.stdout
    assert list(root.iterdir()) == []  # no transfer directory, no temp directory


def test_release_ids_never_escape_the_store(tmp_path: Path) -> None:
    root = tmp_path / "data" / "ota"
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "precious").write_bytes(b"x")
    store = TransferStore(root)
    with pytest.raises(ValueError, match="no leading dot"):  # such metadata is neither signed nor parsed
        make_release(TARGET, release_id="..")
    for bad in ("..", ".", "../data", ""):
        with pytest.raises(ValueError, match="invalid release id"):
            store.discard(bad)
    assert (tmp_path / "data" / "precious").read_bytes() == b"x"
    store.discard(META.release_id)  # nothing there: no error


def test_misuse_is_a_caller_error(tmp_path: Path) -> None:
    store = TransferStore(tmp_path)
    transfer = store.begin(RAW, META, FULL)
    with pytest.raises(ValueError, match="must be 123 bytes"):
        transfer.write_chunk(10, chunk(0))
    with pytest.raises(ValueError, match="out of range"):
        transfer.write_chunk(11, b"")
    for reserved in ("payload.part", "have.bitmap", ".hidden", "../x"):
        with pytest.raises(ValueError):
            transfer.scratch_path(reserved)
    assert transfer.scratch_path("target.edgeops") == tmp_path / META.release_id / "target.edgeops"
    transfer.close()
    transfer.close()
    with pytest.raises(RuntimeError, match="closed"):
        transfer.write_chunk(0, chunk(0))
    stranger: ReleaseMetadata = make_release(TARGET[::-1], version="3.0.0")[1]
    with pytest.raises(ValueError, match="not one of"):
        store.begin(RAW, META, stranger.payloads[0])


def test_an_unwritable_root_is_a_storage_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(StorageError, match="cannot create the OTA directory"):
        TransferStore(tmp_path / "file" / "ota")
