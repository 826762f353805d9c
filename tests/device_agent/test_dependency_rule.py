"""The running agent — model loaded, an inference answered, MQTT and API up — has imported no host-side
package: no compiler framework, no converters, nothing of edgeops outside the light core."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

HEAVY = ["tensorflow", "keras", "tf_keras", "onnx", "coremltools", "converters", "tf2onnx", "onnx2tf", "torch"]
LIGHT_CORE = {
    "edgeops",
    "edgeops.errors",
    "edgeops.artifact",
    "edgeops.manifest",
    "edgeops.signing",
    "edgeops.runtime",
    "edgeops.atomic_file",
    "edgeops.protocol",
    "edgeops.release",
    "edgeops.trust",
    "edgeops.bounded_json",
    "edgeops.delta",
}

CODE = """
import json, sys
from pathlib import Path
import numpy as np
from device_agent.agent import Agent
from device_agent.api_client import ApiClient
from device_agent.config import load_config
agent = Agent(load_config(Path(sys.argv[1])))
agent.start()
x = np.load(sys.argv[2])["x"][:1].astype(np.float32)
_, version = ApiClient(agent.api.address).infer(x)
assert version == "1.0.0", version
agent.stop()
print(json.dumps(sorted(sys.modules)))
"""


def test_running_agent_imports_only_the_light_core(
    write_config: Callable[..., Path], artifacts: dict[str, Path], digits_dir: Path
) -> None:
    cfg = write_config(initial_artifact=str(artifacts["v1"]))
    out = subprocess.run(
        [sys.executable, "-c", CODE, str(cfg), str(digits_dir / "eval_nchw.npz")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    loaded = set(json.loads(out.stdout.strip().splitlines()[-1]))
    assert {"device_agent.agent", "onnxruntime", "paho.mqtt.client"} <= loaded
    assert sorted(m for m in loaded if m.split(".")[0] in HEAVY) == []
    light = [m for m in loaded if m in LIGHT_CORE or m.startswith("edgeops.delta.")]
    host_side = sorted(m for m in loaded if m.startswith("edgeops") and m not in light)
    assert host_side == []
