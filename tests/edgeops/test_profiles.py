"""Hardware profiles are data: every built-in one validates, users add their own, typos fail early."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgeops.cli import main
from edgeops.errors import ProfileError
from edgeops.profiles import list_profiles, load_profile

REQUIRED = {"rpi4", "rpi5", "jetson-orin-nano", "coral-edgetpu", "android-arm64", "ios", "x86-gateway"}
MINIMAL = """
format = "tflite"
precision = "fp16"
threads = 2
passes = ["convert", "quantize", "validate", "benchmark", "package", "sign"]
"""


def test_builtin_profiles_all_validate() -> None:
    assert set(list_profiles()) >= REQUIRED
    for name in REQUIRED:
        p = load_profile(name)
        assert p.threads >= 1 and p.budgets.min_agreement > 0 and p.budgets.latency_p95_ms
    assert load_profile("coral-edgetpu").pass_options["quantize"]["int8_io"] is True
    assert load_profile("ios").format == "coreml"
    assert "CUDAExecutionProvider" in load_profile("jetson-orin-nano").execution_providers


def test_profiles_list_and_show_cli(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["profiles", "list", "--json"]) == 0
    names = {p["name"] for p in json.loads(capsys.readouterr().out)}
    assert names >= REQUIRED
    assert main(["profiles", "show", "rpi4"]) == 0
    out = capsys.readouterr().out
    assert "int8" in out and "tflite" in out


def test_user_profile_from_flag_and_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "my-board.toml").write_text(MINIMAL)
    assert load_profile("my-board", [tmp_path]).precision == "fp16"
    assert main(["profiles", "show", "my-board", "--profiles-dir", str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["threads"] == 2
    monkeypatch.setenv("EDGEOPS_PROFILES_DIR", str(tmp_path))
    assert "my-board" in list_profiles()
    (tmp_path / "rpi4.toml").write_text(MINIMAL)  # a user file overrides a built-in of the same name
    assert load_profile("rpi4").precision == "fp16"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (MINIMAL.replace('"tflite"', '"tensorrt"'), "format must be one of"),
        (MINIMAL.replace('"fp16"', '"int4"'), "precision 'int4' is not available"),
        (MINIMAL.replace('"validate", ', ""), "lacks required pass"),
        (MINIMAL.replace('"convert", "quantize"', '"quantize", "convert"'), "in the order"),
        (MINIMAL.replace('"sign"]', '"sign", "compress"]'), "unknown pass 'compress'"),
        (MINIMAL + "[pass_options.quantize]\nper_chanel = true\n", "no option"),
        (MINIMAL + "[pass_options.quantize]\nper_channel = 3\n", "per_channel"),
        (MINIMAL + "[budgets]\nmax_acuracy_drop_pt = 1\n", "unknown budget"),
        ("format = ", "invalid TOML"),
    ],
)
def test_invalid_profiles_fail_with_the_field_named(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "bad.toml").write_text(text)
    with pytest.raises(ProfileError, match=message):
        load_profile("bad", [tmp_path])


def test_unknown_profile_lists_the_known_ones() -> None:
    with pytest.raises(ProfileError, match=r"unknown profile 'rpi9'.*rpi4"):
        load_profile("rpi9")
