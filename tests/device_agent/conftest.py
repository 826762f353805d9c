"""Fixtures for the agent tests: real digits artifacts (built once per session) and agent.toml files."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.support.artifacts import add_runtime_trap, build_digits, repack

PROFILE = "x86-gateway"  # ONNX int8: builds in seconds and runs in onnxruntime


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory: pytest.TempPathFactory, digits_dir: Path, keys_dir: Path) -> dict[str, Path]:
    """Signed digits artifacts for the x86-gateway profile (v1.0.0, v1.1.0, v1.2.0), rpi4 (v1.0.0) and variants.

    Variants (all correctly signed, as a broken build would be): ``bad_golden`` (golden outputs that the model
    does not reproduce), ``corrupt_model`` (model bytes that are not a model), ``slow`` (a latency budget no
    device can meet), ``trap`` (fails in the runtime on inputs with values >= 4), ``rpi4`` (another profile).
    """
    out = tmp_path_factory.mktemp("artifacts")
    key = keys_dir / "signing.key"
    arts = {}
    arts["v1"] = build_digits(digits_dir, out, key, "1.0.0", profiles=(PROFILE, "rpi4"))[PROFILE]
    arts["rpi4"] = out / "digits-1.0.0-rpi4.edgeops"
    arts["v1.1"] = build_digits(digits_dir, out, key, "1.1.0", profiles=(PROFILE,))[PROFILE]
    arts["v1.2"] = build_digits(digits_dir, out, key, "1.2.0", profiles=(PROFILE,))[PROFILE]

    def version(v: str) -> Callable[[dict[str, Any]], None]:
        def set_version(doc: dict[str, Any]) -> None:
            doc["version"] = v

        return set_version

    def bad_golden(files: dict[str, bytes]) -> None:
        import io

        arr = np.load(io.BytesIO(files["golden/output_0.npy"]))
        buf = io.BytesIO()
        np.save(buf, np.roll(arr, 1, axis=-1))
        files["golden/output_0.npy"] = buf.getvalue()

    def corrupt_model(files: dict[str, bytes]) -> None:
        files["model.onnx"] = b"\x08\x07" + bytes(range(256)) * 64

    def trap(files: dict[str, bytes]) -> None:
        files["model.onnx"] = add_runtime_trap(files["model.onnx"], "image", "probs")

    def slow(doc: dict[str, Any]) -> None:
        doc["version"] = "1.1.3"
        doc["recipe"]["profile"]["budgets"]["latency_p95_ms"] = 1e-6

    arts["bad_golden"] = repack(
        arts["v1.1"], out / "bad-golden.edgeops", key, files=bad_golden, manifest=version("1.1.1")
    )
    arts["corrupt_model"] = repack(
        arts["v1.1"], out / "corrupt-model.edgeops", key, files=corrupt_model, manifest=version("1.1.2")
    )
    arts["slow"] = repack(arts["v1.1"], out / "slow.edgeops", key, manifest=slow)
    arts["trap"] = repack(arts["v1.1"], out / "trap.edgeops", key, files=trap, manifest=version("1.1.4"))
    return arts


@pytest.fixture
def write_config(tmp_path: Path, keys_dir: Path) -> Callable[..., Path]:
    """Write an agent.toml in tmp_path; keyword arguments override top-level keys, sections are dicts."""

    def write(name: str = "agent.toml", **over: Any) -> Path:
        doc: dict[str, Any] = {
            "device_id": "dev-1",
            "fleet": "testfleet",
            "profile": PROFILE,
            "groups": ["canary"],
            "data_dir": str(tmp_path / "data"),
            "trusted_keys": [str(keys_dir / "signing.pub")],
            "broker": {"url": "mqtt://127.0.0.1:1"},
            "telemetry": {"interval_s": 60},
            "api": {"address": "127.0.0.1:0"},
            "health": {"latency_runs": 5},
        }
        for k, v in over.items():
            if isinstance(v, dict) and isinstance(doc.get(k), dict):
                doc[k] = {**doc[k], **v}
            else:
                doc[k] = v
        path = tmp_path / name
        path.write_text(_toml(doc))
        return path

    return write


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(v)


def _toml(doc: dict[str, Any]) -> str:
    top = [f"{k} = {_toml_value(v)}" for k, v in doc.items() if not isinstance(v, dict)]
    sections = [
        f"\n[{k}]\n" + "\n".join(f"{kk} = {_toml_value(vv)}" for kk, vv in v.items())
        for k, v in doc.items()
        if isinstance(v, dict)
    ]
    return "\n".join(top) + "\n" + "\n".join(sections) + "\n"
