"""The slot store: what it accepts, what it refuses, and that a refused or interrupted install leaves the
committed state and the active slot untouched."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from device_agent.slot_store import SlotStore
from edgeops.artifact import pack_artifact
from edgeops.errors import (
    DowngradeError,
    IntegrityError,
    ProfileMismatch,
    SignatureError,
    StorageError,
)
from edgeops.signing import generate_keypair, load_public_key
from tests.device_agent.conftest import PROFILE
from tests.support.artifacts import read_files, repack


@pytest.fixture
def store(tmp_path: Path, keys_dir: Path) -> SlotStore:
    return SlotStore(tmp_path / "slots", trusted_keys=[load_public_key(keys_dir / "signing.pub")], profile=PROFILE)


def _snapshot(store: SlotStore) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(store.root.iterdir())}


def test_stage_commit_and_rollback(store: SlotStore, artifacts: dict[str, Path]) -> None:
    slot, art = store.stage(artifacts["v1"])
    assert slot == "a" and art.manifest.version == "1.0.0" and art.path == store.path("a")
    assert store.state.active is None  # staging commits nothing
    store.commit(slot, "1.0.0")
    slot2, _ = store.stage(artifacts["v1.1"])
    assert slot2 == "b"
    state = store.commit(slot2, "1.1.0")
    assert (state.active, state.previous, state.floor) == ("b", "a", "1.1.0")
    # the committed state survives a restart
    again = SlotStore(store.root, trusted_keys=store.trusted_keys, profile=PROFILE)
    assert again.state.active == "b" and again.state.versions == {"a": "1.0.0", "b": "1.1.0"}
    state = again.rollback()
    assert (state.active, state.previous, state.floor) == ("a", "b", "1.1.0")
    assert again.verify_slot("a").manifest.version == "1.0.0"


def test_downgrade_and_same_version_refused(store: SlotStore, artifacts: dict[str, Path]) -> None:
    store.commit(store.stage(artifacts["v1.1"])[0], "1.1.0")
    before = _snapshot(store)
    for old in ("v1", "v1.1"):
        with pytest.raises(DowngradeError, match="not newer"):
            store.stage(artifacts[old])
    assert _snapshot(store) == before  # nothing half-written, no temp file left


def test_floor_stays_up_after_rollback(store: SlotStore, artifacts: dict[str, Path]) -> None:
    store.commit(store.stage(artifacts["v1"])[0], "1.0.0")
    store.commit(store.stage(artifacts["v1.1"])[0], "1.1.0")
    store.rollback(keep_current=False)
    with pytest.raises(DowngradeError):
        store.stage(artifacts["v1.1"])  # the version rolled away from cannot come back


def test_tampered_unsigned_foreign_and_wrong_profile(
    store: SlotStore, artifacts: dict[str, Path], tmp_path: Path
) -> None:
    store.commit(store.stage(artifacts["v1"])[0], "1.0.0")
    before = _snapshot(store)
    data = bytearray(artifacts["v1.1"].read_bytes())
    data[-2000] ^= 0x01  # inside the model bytes
    (tampered := tmp_path / "tampered.edgeops").write_bytes(bytes(data))
    other = tmp_path / "other"
    generate_keypair(other)
    foreign = repack(artifacts["v1.1"], tmp_path / "foreign.edgeops", other / "signing.key")
    doc, files = read_files(artifacts["v1.1"])
    manifest = (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()
    unsigned = tmp_path / "unsigned.edgeops"
    unsigned.write_bytes(pack_artifact(manifest, b'{"signatures": []}\n', files))
    cases = [
        (tampered, IntegrityError),
        (foreign, SignatureError),
        (artifacts["rpi4"], ProfileMismatch),
        (unsigned, SignatureError),
        (tmp_path / "missing.edgeops", StorageError),
    ]
    for path, err in cases:
        with pytest.raises(err):
            store.stage(path)
        assert _snapshot(store) == before, path.name


def test_disk_full_while_staging_leaves_nothing(store: SlotStore, artifacts: dict[str, Path], keys_dir: Path) -> None:
    """A write that fails mid-way (file size limit in a child process, as ENOSPC would) is a StorageError and
    leaves no temp file and no change to the slots."""
    store.commit(store.stage(artifacts["v1"])[0], "1.0.0")
    before = _snapshot(store)
    code = f"""
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))
from pathlib import Path
from device_agent.slot_store import SlotStore
from edgeops.artifact import pack_artifact
from edgeops.errors import StorageError
from edgeops.signing import load_public_key
s = SlotStore(Path({str(store.root)!r}), trusted_keys=[load_public_key(Path({str(keys_dir / "signing.pub")!r}))],
              profile={PROFILE!r})
try:
    s.stage(Path({str(artifacts["v1.1"])!r}))
except StorageError as e:
    print("StorageError:", e)
    sys.exit(3)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 3, proc.stderr
    assert "cannot write slot" in proc.stdout
    assert _snapshot(store) == before


def test_oversized_artifact_refused(tmp_path: Path, keys_dir: Path, artifacts: dict[str, Path]) -> None:
    small = SlotStore(
        tmp_path / "s",
        trusted_keys=[load_public_key(keys_dir / "signing.pub")],
        profile=PROFILE,
        max_artifact_bytes=1000,
    )
    with pytest.raises(Exception, match="over the device's limit"):
        small.stage(artifacts["v1"])


def test_corrupt_state_file_is_an_error(tmp_path: Path, keys_dir: Path) -> None:
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "state.json").write_text("{not json")
    with pytest.raises(StorageError, match="corrupt"):
        SlotStore(tmp_path / "s", trusted_keys=[load_public_key(keys_dir / "signing.pub")], profile=PROFILE)
