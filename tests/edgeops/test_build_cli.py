"""`edgeops build` end to end through the CLI, on the digits example: the issue's must-show commands,
determinism, pruning, and every bad input (one line, non-zero exit, no artifact left)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgeops.cli import main

PROFILES = ["rpi4", "x86-gateway", "ios", "coral-edgetpu"]


def _build(model: Path, profiles: list[str], out: Path, keys: Path, *extra: str) -> list[str]:
    args = ["build", str(model), "--key", str(keys / "signing.key"), "--version", "1.0.0", "--out", str(out)]
    for p in profiles:
        args += ["--profile", p]
    return args + list(extra)


@pytest.fixture(scope="module")
def keras_build(digits_dir: Path, keys_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("dist")
    args = _build(
        digits_dir / "digits.keras",
        PROFILES,
        out,
        keys_dir,
        "--calib",
        str(digits_dir / "calib.npz"),
        "--eval",
        str(digits_dir / "eval.npz"),
        "--json",
    )
    proc = subprocess.run([sys.executable, "-m", "edgeops.cli.main", *args], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out, json.loads(proc.stdout)


def test_keras_model_builds_four_verified_artifacts(
    keras_build: tuple[Path, dict], keys_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, report = keras_build
    assert report["passed"] is True
    assert [p["profile"] for p in report["profiles"]] == PROFILES
    for entry in report["profiles"]:
        artifact = Path(entry["artifact"])
        assert artifact.is_file() and artifact.stat().st_size == entry["size_bytes"]
        assert main(["verify", str(artifact), "--pubkey", str(keys_dir / "signing.pub")]) == 0
        assert entry["gate"] == {"passed": True, "reason": None}
    by = {p["profile"]: p for p in report["profiles"]}
    for name in ("rpi4", "x86-gateway", "coral-edgetpu"):
        m = by[name]["metrics"]
        assert m["agreement"] >= 0.99 and m["source_accuracy"] - m["accuracy"] <= 0.01
        assert by[name]["latency_ms"]["p95"] >= by[name]["latency_ms"]["p50"] > 0
        assert by[name]["size_bytes"] < 0.15 * by[name]["source_size_bytes"]  # int8 vs the fp32 .keras file
    assert by["ios"]["executed"] is False and by["ios"]["latency_ms"] is None
    assert any("need macOS" in n for n in by["ios"]["notes"])
    assert any("not Edge-TPU compiled" in n for n in by["coral-edgetpu"]["notes"])
    assert (out / "report.json").is_file()
    html = (out / "report.html").read_text()
    assert html.count("<svg") == 3 and "coral-edgetpu" in html and "http" not in html.split("<body>")[1]


def test_artifacts_pass_the_agents_golden_check(keras_build: tuple[Path, dict], keys_dir: Path) -> None:
    from device_agent.cli import main as agent_main

    out, _ = keras_build
    for profile in ("rpi4", "x86-gateway", "coral-edgetpu"):
        artifact = out / f"digits-1.0.0-{profile}.edgeops"
        assert (
            agent_main(["check", str(artifact), "--pubkey", str(keys_dir / "signing.pub"), "--profile", profile]) == 0
        )
        assert agent_main(["check", str(artifact), "--pubkey", str(keys_dir / "signing.pub"), "--profile", "rpi5"]) == 1


def test_coral_artifact_has_int8_io_and_rpi4_float_io(
    keras_build: tuple[Path, dict], capsys: pytest.CaptureFixture[str]
) -> None:
    out, _ = keras_build
    assert main(["inspect", str(out / "digits-1.0.0-coral-edgetpu.edgeops"), "--json"]) == 0
    coral = json.loads(capsys.readouterr().out)
    assert coral["inputs"][0]["model_dtype"] == "int8" and coral["inputs"][0]["scale"] > 0
    assert main(["inspect", str(out / "digits-1.0.0-rpi4.edgeops"), "--json"]) == 0
    rpi4 = json.loads(capsys.readouterr().out)
    assert rpi4["inputs"][0]["model_dtype"] == "float32"
    assert rpi4["golden"]["count"] == 8 and set(rpi4["drift"]) == {"inputs", "outputs"}
    assert rpi4["source"]["sha256"] and rpi4["data"]["calib_sha256"] and rpi4["toolchain"]["tensorflow"]


def test_build_is_byte_for_byte_deterministic(
    keras_build: tuple[Path, dict], digits_dir: Path, keys_dir: Path, tmp_path: Path
) -> None:
    first, _ = keras_build
    args = _build(
        digits_dir / "digits.keras",
        PROFILES,
        tmp_path,
        keys_dir,
        "--calib",
        str(digits_dir / "calib.npz"),
        "--eval",
        str(digits_dir / "eval.npz"),
    )
    assert main(args) == 0  # in this process, after other builds: no leaked global state may change the bytes
    for profile in PROFILES:
        name = f"digits-1.0.0-{profile}.edgeops"
        assert (tmp_path / name).read_bytes() == (first / name).read_bytes(), profile


def test_onnx_model_builds_for_rpi4_and_x86(
    digits_dir: Path, keys_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from device_agent.cli import main as agent_main

    args = _build(
        digits_dir / "digits.onnx",
        ["rpi4", "x86-gateway"],
        tmp_path,
        keys_dir,
        "--calib",
        str(digits_dir / "eval_nchw.npz"),
        "--json",
    )
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert all(p["metrics"]["agreement"] >= 0.99 for p in report["profiles"])
    for profile in ("rpi4", "x86-gateway"):
        artifact = tmp_path / f"digits-1.0.0-{profile}.edgeops"
        assert main(["verify", str(artifact), "--pubkey", str(keys_dir / "signing.pub")]) == 0
        assert agent_main(["check", str(artifact), "--pubkey", str(keys_dir / "signing.pub")]) == 0
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "digits-1.0.0-rpi4.edgeops"), "--json"]) == 0
    image = json.loads(capsys.readouterr().out)["inputs"][0]
    assert image["shape"] == [1, 1, 8, 8] and image["transpose"] == [0, 2, 3, 1]  # callers keep sending NCHW


PRUNED = """
format = "tflite"
precision = "int8"
threads = 2
passes = ["prune", "convert", "quantize", "validate", "benchmark", "package", "sign"]
[budgets]
max_accuracy_drop_pt = {drop}
min_agreement = {agreement}
[pass_options.prune]
method = "magnitude"
sparsity = {sparsity}
epochs = 2
"""


def test_pruned_build_reports_sparsity_and_smaller_compressed_size(
    digits_dir: Path, keys_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    (profiles / "pruned.toml").write_text(PRUNED.format(drop=2.0, agreement=0.95, sparsity=0.6))
    (profiles / "dense.toml").write_text(
        PRUNED.format(drop=2.0, agreement=0.95, sparsity=0.6).replace('"prune", ', "").split("[pass_options.prune]")[0]
    )
    args = _build(
        digits_dir / "digits.keras",
        ["pruned", "dense"],
        tmp_path / "out",
        keys_dir,
        "--calib",
        str(digits_dir / "calib.npz"),
        "--eval",
        str(digits_dir / "eval.npz"),
        "--train",
        str(digits_dir / "train.npz"),
        "--profiles-dir",
        str(profiles),
        "--json",
    )
    assert main(args) == 0
    by = {p["profile"]: p for p in json.loads(capsys.readouterr().out)["profiles"]}
    assert by["pruned"]["sparsity"] == pytest.approx(0.6, abs=0.02)
    assert by["dense"]["sparsity"] is None
    assert by["pruned"]["size_zstd_bytes"] < 0.8 * by["dense"]["size_zstd_bytes"]


# --- bad input: one line, non-zero exit, no artifact --------------------------------------------------------


def _fails(args: list[str], out: Path, capsys: pytest.CaptureFixture[str], *expected: str) -> str:
    code = main(args)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("edgeops: ")]
    assert code != 0
    assert len(errors) == 1, err
    assert "Traceback" not in err
    for text in expected:
        assert text in errors[0], errors[0]
    assert not list(out.glob("*.edgeops")) if out.exists() else True
    return errors[0]


def test_corrupt_and_unknown_models(
    digits_dir: Path, keys_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    calib = ["--calib", str(digits_dir / "calib.npz")]
    out = tmp_path / "out"
    for name in ("bad.keras", "bad.onnx"):
        (tmp_path / name).write_bytes(b"\x00garbage" * 100)
        _fails(_build(tmp_path / name, ["rpi4"], out, keys_dir, *calib), out, capsys, "cannot load")
    (tmp_path / "model.pt").write_bytes(b"torch")
    _fails(_build(tmp_path / "model.pt", ["rpi4"], out, keys_dir, *calib), out, capsys, "unknown model format")
    _fails(_build(digits_dir / "digits.keras", ["rpi9"], out, keys_dir, *calib), out, capsys, "unknown profile 'rpi9'")


def test_op_the_target_cannot_run_names_op_and_profile(
    keys_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import tensorflow as tf

    class Inverse(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec((None, 4, 4), tf.float32, name="x")])
        def serve(self, x: tf.Tensor) -> dict[str, tf.Tensor]:
            return {"y": tf.linalg.inv(x + 4.0 * tf.eye(4))}

    module = Inverse()
    tf.saved_model.save(module, str(tmp_path / "inv"), signatures={"serving_default": module.serve})
    np.save(tmp_path / "x.npy", np.random.default_rng(0).normal(size=(16, 4, 4)).astype(np.float32))
    out = tmp_path / "out"
    line = _fails(
        _build(tmp_path / "inv", ["android-arm64"], out, keys_dir, "--calib", str(tmp_path / "x.npy")),
        out,
        capsys,
        "MatrixInverse",
        "android-arm64",
    )
    assert line.startswith("edgeops: FAILED profile android-arm64")


def test_bad_data(digits_dir: Path, keys_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model, out = digits_dir / "digits.keras", tmp_path / "out"
    _fails(
        _build(model, ["rpi4"], out, keys_dir, "--eval", str(digits_dir / "eval.npz")),
        out,
        capsys,
        "rpi4",
        "needs calibration data (--calib)",
    )
    np.savez(tmp_path / "wrong.npz", x=np.zeros((10, 9, 9, 1), np.float32))
    _fails(
        _build(model, ["rpi4"], out, keys_dir, "--calib", str(tmp_path / "wrong.npz")),
        out,
        capsys,
        "'image'",
        "(10, 9, 9, 1)",
        "(N, 8, 8, 1)",
    )


def test_eval_set_that_fails_the_gate_names_profile_and_figure(
    digits_dir: Path, keys_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    (profiles / "overpruned.toml").write_text(PRUNED.format(drop=0.5, agreement=0.99, sparsity=0.97))
    out = tmp_path / "out"
    out.mkdir()
    (out / "digits-1.0.0-overpruned.edgeops").write_bytes(b"stale artifact of an earlier build")
    args = _build(
        digits_dir / "digits.keras",
        ["overpruned", "rpi4"],
        out,
        keys_dir,
        "--calib",
        str(digits_dir / "calib.npz"),
        "--eval",
        str(digits_dir / "eval.npz"),
        "--profiles-dir",
        str(profiles),
    )
    code = main(args)
    err = capsys.readouterr().err
    assert code == 1
    [line] = [line for line in err.splitlines() if line.startswith("edgeops: ")]
    assert "overpruned" in line and ("agreement" in line or "accuracy drop" in line)
    assert sorted(p.name for p in out.glob("*.edgeops")) == ["digits-1.0.0-rpi4.edgeops"]  # the good one stays


def test_unwritable_output_and_bad_keys(
    digits_dir: Path, keys_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model, calib = digits_dir / "digits.keras", ["--calib", str(digits_dir / "calib.npz")]
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    _fails(_build(model, ["rpi4"], blocker / "out", keys_dir, *calib), tmp_path, capsys, "not writable")
    missing = tmp_path / "nokeys"
    _fails(
        _build(model, ["rpi4"], tmp_path / "out", missing, *calib), tmp_path / "out", capsys, "signing key not found"
    )
    (tmp_path / "junk.key").write_text("-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n")
    args = _build(model, ["rpi4"], tmp_path / "out", keys_dir, *calib)
    args[args.index("--key") + 1] = str(tmp_path / "junk.key")
    _fails(args, tmp_path / "out", capsys, "not an unencrypted PEM private key")
    bad_version = _build(model, ["rpi4"], tmp_path / "out", keys_dir, *calib)
    bad_version[bad_version.index("--version") + 1] = "1.0"
    _fails(bad_version, tmp_path / "out", capsys, "semantic version")


def test_verify_rejects_wrong_key_tampering_and_missing_key(
    keras_build: tuple[Path, dict], keys_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, _ = keras_build
    assert main(["keys", "init", "--dir", str(tmp_path / "other")]) == 0
    artifact = out / "digits-1.0.0-rpi4.edgeops"
    assert main(["verify", str(artifact), "--pubkey", str(tmp_path / "other" / "signing.pub")]) == 1
    assert "not signed by a trusted key" in capsys.readouterr().err
    data = bytearray(artifact.read_bytes())
    data[-3000] ^= 0xFF  # inside model.tflite, the last member
    tampered = tmp_path / "t.edgeops"
    tampered.write_bytes(bytes(data))
    assert main(["verify", str(tampered), "--pubkey", str(keys_dir / "signing.pub")]) == 1
    assert "model.tflite: sha256 does not match" in capsys.readouterr().err
    assert main(["verify", str(artifact), "--pubkey", str(tmp_path / "missing.pub")]) == 1
    assert "public key not found" in capsys.readouterr().err
