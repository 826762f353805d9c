"""edgeops.release_builder and `edgeops release publish/list` without a broker, on real digits artifacts."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import edgeops.release_builder as builder
from edgeops.cli import main
from edgeops.delta import apply_delta
from edgeops.errors import DowngradeError, IntegrityError, ProfileMismatch, ReleaseRejected, SignatureError
from edgeops.release import PayloadKind, parse_release
from edgeops.release_builder import SIGNED_NAME, SUMMARY_NAME, TARGET_NAME, build_release, load_releases
from edgeops.signing import load_private_key, load_public_key
from tests.support.artifacts import build_digits, repack

PROFILE = "x86-gateway"
FLEET = "testfleet"
CHUNK = 4096
NOW = 1_760_000_000.0


@pytest.fixture(scope="module")
def arts(tmp_path_factory: pytest.TempPathFactory, digits_dir: Path, keys_dir: Path) -> dict[str, Path]:
    """Real builds v1.0.0 and v1.1.0 (x86-gateway), and v1.0.0 re-signed as an rpi4 artifact."""
    out = tmp_path_factory.mktemp("release-artifacts")
    key = keys_dir / "signing.key"
    found = {
        "v1": build_digits(digits_dir, out, key, "1.0.0", profiles=(PROFILE,))[PROFILE],
        "v1.1": build_digits(digits_dir, out, key, "1.1.0", profiles=(PROFILE,))[PROFILE],
    }

    def to_rpi4(doc: dict[str, object]) -> None:
        doc["profile"] = "rpi4"

    found["rpi4"] = repack(found["v1"], out / "digits-1.0.0-rpi4.edgeops", key, manifest=to_rpi4)
    return found


@pytest.fixture(scope="module")
def key(keys_dir: Path) -> Ed25519PrivateKey:
    return load_private_key(keys_dir / "signing.key")


def _build(arts: dict[str, Path], key: Ed25519PrivateKey, store: Path, **kw: Any) -> builder.PublishedRelease:
    return build_release(arts["v1.1"], [arts["v1"]], fleet=FLEET, key=key, store=store, chunk_size=CHUNK, now=NOW, **kw)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_release_has_a_full_and_a_delta_payload_whose_signed_hashes_match_the_files(
    arts: dict[str, Path], key: Ed25519PrivateKey, tmp_path: Path, keys_dir: Path
) -> None:
    messages: list[str] = []
    rel = _build(arts, key, tmp_path / "store", pubkey=key.public_key(), progress=messages.append)
    meta = parse_release((rel.directory / SIGNED_NAME).read_bytes(), [load_public_key(keys_dir / "signing.pub")])
    assert meta == rel.meta
    assert (meta.release_id, meta.fleet, meta.version, meta.profile) == (
        "digits-1.1.0-x86-gateway", FLEET, "1.1.0", PROFILE)
    assert rel.directory == tmp_path / "store" / meta.release_id
    assert (meta.target_sha256, meta.target_size) == (_sha(arts["v1.1"]), arts["v1.1"].stat().st_size)
    full, delta = meta.payloads
    assert full.kind is PayloadKind.FULL and rel.payload_file(full.id) == rel.directory / TARGET_NAME
    assert delta.kind is PayloadKind.DELTA and (delta.base_version, delta.base_sha256) == ("1.0.0", _sha(arts["v1"]))
    assert delta.size < full.size and delta.codec
    for p in meta.payloads:
        data = rel.payload_file(p.id).read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest(), p.id) == (p.size, p.sha256, p.sha256[:16])
        assert p.chunk_hashes == tuple(hashlib.sha256(data[i : i + CHUNK]).digest() for i in range(0, len(data), CHUNK))
    # the delta really turns the base into the target
    rebuilt = tmp_path / "rebuilt.edgeops"
    apply_delta(arts["v1"], rel.payload_file(delta.id), rebuilt)
    assert rebuilt.read_bytes() == arts["v1.1"].read_bytes()
    summary = json.loads((rel.directory / SUMMARY_NAME).read_text())
    assert [(p["kind"], p["file"], p["size"]) for p in summary["payloads"]] == [
        ("full", TARGET_NAME, full.size), ("delta", rel.payload_file(delta.id).name, delta.size)]
    assert any("delta from 1.0.0" in m for m in messages)


def test_a_second_build_reuses_the_patch_instead_of_computing_it_again(
    arts: dict[str, Path], key: Ed25519PrivateKey, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = tmp_path / "store"
    first = _build(arts, key, store)
    patch = first.payload_file(first.meta.payloads[1].id)
    before = patch.stat()

    def no_delta(*args: object, **kw: object) -> None:
        raise AssertionError("make_delta called although the patch is cached")

    monkeypatch.setattr(builder, "make_delta", no_delta)
    messages: list[str] = []
    second = build_release(arts["v1.1"], [arts["v1"]], fleet=FLEET, key=key, store=store, chunk_size=CHUNK,
                           now=NOW + 60, progress=messages.append)
    after = patch.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert second.meta.payloads == first.meta.payloads and second.meta.created_at == NOW + 60
    assert any("reusing" in m for m in messages)


def test_a_patch_for_another_target_is_not_reused(
    arts: dict[str, Path], key: Ed25519PrivateKey, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    rel = _build(arts, key, store)
    patch = rel.payload_file(rel.meta.payloads[1].id)
    good = patch.read_bytes()
    patch.write_bytes(b"EODELTA\0" + b"\0" * 200)  # a stale or damaged patch under the cached name
    again = _build(arts, key, store)
    assert patch.read_bytes() == good and again.meta == rel.meta


def test_same_inputs_and_time_give_the_same_bytes(
    arts: dict[str, Path], key: Ed25519PrivateKey, tmp_path: Path
) -> None:
    a, b = _build(arts, key, tmp_path / "a"), _build(arts, key, tmp_path / "b")
    assert a.signed == b.signed
    for name in (SIGNED_NAME, SUMMARY_NAME, TARGET_NAME, a.payload_file(a.meta.payloads[1].id).name):
        assert (a.directory / name).read_bytes() == (b.directory / name).read_bytes(), name
    assert not [p.name for p in a.directory.iterdir() if p.name.startswith(".")]  # no temp file left


def test_a_base_of_another_profile_or_not_older_is_refused(
    arts: dict[str, Path], key: Ed25519PrivateKey, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    with pytest.raises(ProfileMismatch, match="rpi4"):
        build_release(arts["v1.1"], [arts["rpi4"]], fleet=FLEET, key=key, store=store)
    with pytest.raises(DowngradeError, match=r"1\.1\.0, not older"):
        build_release(arts["v1.1"], [arts["v1.1"]], fleet=FLEET, key=key, store=store)
    with pytest.raises(DowngradeError, match="not older"):
        build_release(arts["v1"], [arts["v1.1"]], fleet=FLEET, key=key, store=store)
    with pytest.raises(SignatureError):
        build_release(arts["v1.1"], [], fleet=FLEET, key=key, store=store,
                      pubkey=Ed25519PrivateKey.generate().public_key())
    with pytest.raises(ValueError, match="chunk size"):
        build_release(arts["v1.1"], [], fleet=FLEET, key=key, store=store, chunk_size=100)
    assert not store.exists()  # nothing written for a refused release


def test_a_delta_not_smaller_than_the_full_artifact_is_left_out(
    arts: dict[str, Path], key: Ed25519PrivateKey, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = builder.make_delta

    def bloated(old: Path, new: Path, out: Path, **kw: object) -> object:
        info = real(old, new, out)
        out.write_bytes(out.read_bytes() + b"\0" * new.stat().st_size)
        return info

    monkeypatch.setattr(builder, "make_delta", bloated)
    messages: list[str] = []
    rel = _build(arts, key, tmp_path / "store", progress=messages.append)
    assert [p.kind for p in rel.meta.payloads] == [PayloadKind.FULL]
    assert any("not smaller than the full artifact" in m for m in messages)
    assert json.loads((rel.directory / SUMMARY_NAME).read_text())["skipped"][0]["base_version"] == "1.0.0"


def test_load_releases_reads_the_store_back_and_checks_it(
    arts: dict[str, Path], key: Ed25519PrivateKey, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    rel = _build(arts, key, store)
    (store / "half-built").mkdir()  # no release.signed: an interrupted build, not a release
    for trusted in ([key.public_key()], None):
        (loaded,) = load_releases(store, trusted)
        assert (loaded.meta, loaded.signed, loaded.payload_files) == (rel.meta, rel.signed, rel.payload_files)
    with pytest.raises(ReleaseRejected, match="untrusted-key"):
        load_releases(store, [Ed25519PrivateKey.generate().public_key()])
    target = rel.directory / TARGET_NAME
    target.write_bytes(target.read_bytes()[:-512])
    with pytest.raises(IntegrityError, match="announces"):
        load_releases(store, None)
    assert load_releases(tmp_path / "missing", None) == []


def test_cli_publish_without_broker_builds_the_store_and_list_shows_it(
    arts: dict[str, Path], keys_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = tmp_path / "store"
    args = ["release", "publish", str(arts["v1.1"]), "--base", str(arts["v1"]), "--fleet", FLEET,
            "--key", str(keys_dir / "signing.key"), "--pubkey", str(keys_dir / "signing.pub"),
            "--store", str(store), "--chunk-size", str(CHUNK), "--json"]
    assert main(args) == 0
    out = capsys.readouterr()
    doc = json.loads(out.out)
    assert "built the release store only" in out.err
    assert (doc["release_id"], doc["published"], doc["version"]) == ("digits-1.1.0-x86-gateway", False, "1.1.0")
    assert [(p["kind"], p["base_version"]) for p in doc["payloads"]] == [("full", None), ("delta", "1.0.0")]
    full, delta = doc["payloads"]
    assert full["ratio"] == 1.0 and 0 < delta["ratio"] < 1 and delta["codec"]
    assert full["chunk_count"] == -(-arts["v1.1"].stat().st_size // CHUNK)

    assert main(["release", "list", "--store", str(store), "--json"]) == 0
    (listed,) = json.loads(capsys.readouterr().out)
    assert listed["release_id"] == doc["release_id"] and listed["payloads"] == doc["payloads"]
    assert main(["release", "list", "--store", str(store)]) == 0
    assert "digits-1.1.0-x86-gateway" in capsys.readouterr().out

    # a bad base: one line on stderr, exit 1, nothing new in the store
    assert main([*args[:3], "--base", str(arts["rpi4"]), *args[5:]]) == 1
    err = capsys.readouterr().err
    assert err.startswith("edgeops: error:") and "rpi4" in err and len(err.strip().splitlines()) == 1
    assert main([*args[:2], str(tmp_path / "nope.edgeops"), *args[3:]]) == 2
    assert "no such artifact" in capsys.readouterr().err
