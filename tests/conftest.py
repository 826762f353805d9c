"""Shared fixtures: the digits example model and data, trained once per test session (offline, ~15 s)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """examples/digits/train.py output: digits.keras, digits.onnx, calib.npz, eval.npz, eval_nchw.npz, train.npz."""
    out = tmp_path_factory.mktemp("digits")
    subprocess.run(
        [sys.executable, str(ROOT / "examples/digits/train.py"), "--out", str(out)], check=True, capture_output=True
    )
    return out


@pytest.fixture(scope="session")
def keys_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from edgeops.signing import generate_keypair

    d = tmp_path_factory.mktemp("keys")
    generate_keypair(d)
    return d
