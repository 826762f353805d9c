"""`edgeops demo` (what `make demo` runs) from start to "v2 on all devices", on a small fleet: its own mosquitto,
v1 and a fine-tuned v2 built with `edgeops build`, the fleet service, real agents in two groups, v1 rolled out,
then v2 as a delta with a canary; everything it started is gone afterwards."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.slow
def test_demo_reaches_v2_on_every_device_and_cleans_up(tmp_path: Path, digits_dir: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "edgeops", "demo", "--workdir", str(tmp_path / "demo"), "--devices", "4",
         "--examples", str(ROOT / "examples" / "digits"), "--http", "127.0.0.1:0", "--exit-when-done"],
        capture_output=True, text=True, timeout=900, cwd=ROOT, check=False,
    )
    out = done.stdout
    assert done.returncode == 0, done.stderr[-3000:] + out[-3000:]
    assert "v2 published as a delta from v1" in out
    assert re.search(r"dashboard: http://127\.0\.0\.1:\d+", out)
    assert "v2 on all devices (4/4)" in out and out.rstrip().endswith("demo stopped cleanly")
    port = int(re.search(r"mosquitto on mqtts://127\.0\.0\.1:(\d+)", out).group(1))  # type: ignore[union-attr]
    # the fleet ran over mutual TLS in TUF mode: each agent had its own certificate and stored the trusted metadata
    agent_toml = (tmp_path / "demo" / "fleet" / "dev-0000" / "agent.toml").read_text()
    assert "[trust]" in agent_toml and "dev-0000/device.crt" in agent_toml and "trusted_keys" not in agent_toml
    stored = tmp_path / "demo" / "fleet" / "dev-0003" / "data" / "trust"
    assert {p.name for p in stored.iterdir()} >= {"root.json", "timestamp.json", "snapshot.json", "targets.json"}
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        pass  # the demo's broker is stopped
