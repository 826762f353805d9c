"""Shared fixtures: the digits example model and data (examples/digits/out, git-ignored), trained offline once
when missing (~15 s), before any test runs, so every test module can rely on it."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.support.mosquitto import MosquittoBroker

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = Path(__file__).resolve().parent.parent
DIGITS = ROOT / "examples" / "digits" / "out"
DIGITS_FILES = ("digits.keras", "digits.onnx", "calib.npz", "eval.npz", "eval_nchw.npz", "train.npz")


@pytest.fixture(scope="session", autouse=True)
def digits_dir() -> Path:
    """examples/digits/train.py output: digits.keras, digits.onnx, calib.npz, eval.npz, eval_nchw.npz, train.npz."""
    if not all((DIGITS / f).is_file() for f in DIGITS_FILES):
        subprocess.run(
            [sys.executable, str(ROOT / "examples/digits/train.py"), "--out", str(DIGITS)],
            check=True,
            capture_output=True,
        )
    return DIGITS


@pytest.fixture(scope="session")
def keys_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from edgeops.signing import generate_keypair

    d = tmp_path_factory.mktemp("keys")
    generate_keypair(d)
    return d


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[MosquittoBroker]:
    """A real mosquitto on a free 127.0.0.1 port (tests/support/mosquitto.py), stopped at teardown."""
    from tests.support.mosquitto import MosquittoBroker

    broker = MosquittoBroker(tmp_path / "mosquitto")
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()
