"""The artifact container: canonical bytes, signature, integrity — every byte of the file is checked."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest

from edgeops.artifact import pack_artifact, sign_manifest, verify_artifact
from edgeops.errors import ArtifactFormatError, IntegrityError, SignatureError, UntrustedInput
from edgeops.manifest import FileEntry, Golden, Manifest, TensorInfo
from edgeops.signing import generate_keypair, load_private_key, load_public_key


def _manifest(files: dict[str, bytes], version: str = "1.2.3") -> Manifest:
    return Manifest(
        name="m",
        version=version,
        profile="rpi4",
        format="tflite",
        precision="int8",
        runtime="litert",
        model_file="model.tflite",
        inputs=[TensorInfo("x", [1, 4], "float32", "int8", None, 0.1, 0)],
        outputs=[TensorInfo("y", [1, 2], "float32", "float32")],
        files=[FileEntry(n, hashlib.sha256(b).hexdigest(), len(b)) for n, b in sorted(files.items())],
        source={"file": "m.keras", "format": "keras", "sha256": "0" * 64},
        data={},
        toolchain={"numpy": "2"},
        runtime_config={"threads": 4},
        recipe={},
        gate={},
        golden=Golden({"x": "golden/input_0.npy"}, {}, 1, 1e-3, 0),
    )


@pytest.fixture()
def signed(tmp_path: Path) -> tuple[Path, Path, bytes]:
    priv, pub = generate_keypair(tmp_path / "k")
    files = {"model.tflite": bytes(range(256)) * 3, "golden/input_0.npy": b"\x93NUMPY fake"}
    manifest = _manifest(files).to_bytes()
    data = pack_artifact(manifest, sign_manifest(manifest, load_private_key(priv)), files)
    path = tmp_path / "a.edgeops"
    path.write_bytes(data)
    return path, pub, data


def test_valid_artifact_verifies_and_is_a_plain_tar(signed: tuple[Path, Path, bytes]) -> None:
    path, pub, _ = signed
    verified = verify_artifact(path, [load_public_key(pub)])
    assert verified.manifest.version == "1.2.3"
    assert verified.read("model.tflite") == bytes(range(256)) * 3
    listing = subprocess.run(["tar", "-tf", str(path)], capture_output=True, text=True, check=True).stdout.split()
    assert listing == ["manifest.json", "manifest.sig", "golden/input_0.npy", "model.tflite"]


def test_same_inputs_give_same_bytes(signed: tuple[Path, Path, bytes], tmp_path: Path) -> None:
    path, _, data = signed
    priv = load_private_key(path.parent / "k" / "signing.key")
    files = {"model.tflite": bytes(range(256)) * 3, "golden/input_0.npy": b"\x93NUMPY fake"}
    manifest = _manifest(files).to_bytes()
    assert pack_artifact(manifest, sign_manifest(manifest, priv), files) == data


def test_every_flipped_byte_is_rejected(signed: tuple[Path, Path, bytes], tmp_path: Path) -> None:
    _path, pub, data = signed
    key = load_public_key(pub)
    target = tmp_path / "flipped.edgeops"
    accepted = []
    for i in range(len(data)):  # exhaustive: headers, manifest, signature, files, padding, end blocks
        mutated = bytearray(data)
        mutated[i] ^= 0x01
        target.write_bytes(bytes(mutated))
        try:
            verify_artifact(target, [key])
            accepted.append(i)
        except UntrustedInput:
            pass
    assert accepted == []


def test_wrong_key_and_missing_signature_are_rejected(signed: tuple[Path, Path, bytes], tmp_path: Path) -> None:
    path, _, _ = signed
    _, other_pub = generate_keypair(tmp_path / "other")
    with pytest.raises(SignatureError, match="not signed by a trusted key"):
        verify_artifact(path, [load_public_key(other_pub)])
    files = {"model.tflite": b"abc"}
    manifest = _manifest(files).to_bytes()
    unsigned = tmp_path / "unsigned.edgeops"
    unsigned.write_bytes(pack_artifact(manifest, b'{"signatures": []}', files))
    with pytest.raises(SignatureError, match="not signed"):
        verify_artifact(unsigned, [load_public_key(other_pub)])


def test_file_swapped_under_a_valid_signature_is_rejected(signed: tuple[Path, Path, bytes], tmp_path: Path) -> None:
    path, pub, _ = signed
    priv = load_private_key(path.parent / "k" / "signing.key")
    files = {"model.tflite": b"original"}
    manifest = _manifest(files).to_bytes()
    evil = tmp_path / "evil.edgeops"
    evil.write_bytes(pack_artifact(manifest, sign_manifest(manifest, priv), {"model.tflite": b"replaced"}))
    with pytest.raises(IntegrityError, match=r"model\.tflite"):
        verify_artifact(evil, [load_public_key(pub)])
    extra = tmp_path / "extra.edgeops"
    extra.write_bytes(pack_artifact(manifest, sign_manifest(manifest, priv), {**files, "z.bin": b"x"}))
    with pytest.raises(IntegrityError, match="extra"):
        verify_artifact(extra, [load_public_key(pub)])


@pytest.mark.parametrize("cut", [0, 100, 512, 1500, -1])
def test_truncated_or_extended_files_are_rejected(signed: tuple[Path, Path, bytes], tmp_path: Path, cut: int) -> None:
    _path, pub, data = signed
    bad = tmp_path / "bad.edgeops"
    bad.write_bytes(data[:cut] if cut >= 0 else data + b"\0" * 512)
    with pytest.raises(ArtifactFormatError):
        verify_artifact(bad, [load_public_key(pub)])


def test_path_traversal_names_cannot_be_packed_or_read(tmp_path: Path) -> None:
    with pytest.raises(ArtifactFormatError):
        pack_artifact(b"{}", b"{}", {"../etc/passwd": b"x"})
