"""kill -9 at every crash point of an install: the next start serves the old model (or the new one once the
commit point has passed), re-verified, with nothing half-written left behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from device_agent.fault_points import INSTALL_POINTS


def agent_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "device_agent.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=120,
    )


@pytest.mark.parametrize("point", INSTALL_POINTS)
def test_kill_during_install(
    point: str, write_config: Callable[..., Path], artifacts: dict[str, Path], digits_dir: Path, tmp_path: Path
) -> None:
    cfg = str(write_config())
    assert agent_cli("install", "--config", cfg, str(artifacts["v1"])).returncode == 0
    killed = agent_cli("install", "--config", cfg, str(artifacts["v1.1"]), env={"EDGEOPS_FAULT_POINT": point})
    assert killed.returncode == -9, killed.stderr
    expect = "1.1.0" if point == "install.committed" else "1.0.0"
    np.save(tmp_path / "x.npy", np.load(digits_dir / "eval_nchw.npz")["x"][:1].astype(np.float32))
    infer = agent_cli("infer", "--config", cfg, "--local", "--json", str(tmp_path / "x.npy"))
    assert infer.returncode == 0, infer.stderr
    assert json.loads(infer.stdout)["model_version"] == expect  # re-verified from disk and served
    # the store is healthy: the next install goes through and leaves no temp file behind
    nxt = agent_cli("install", "--config", cfg, str(artifacts["v1.2"]))
    assert nxt.returncode == 0, nxt.stderr
    slots = tmp_path / "data" / "slots"
    assert not list(slots.glob(".*.tmp"))
    state = json.loads((slots / "state.json").read_text())
    assert state["versions"][state["active"]] == "1.2.0" and state["versions"][state["previous"]] == expect
