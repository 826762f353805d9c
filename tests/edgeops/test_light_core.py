"""The device-side light core must not pull in the compiler's heavy packages."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ["tensorflow", "keras", "onnx", "coremltools", "converters", "tf2onnx", "onnx2tf", "torch"]


def _modules_after(import_line: str) -> set[str]:
    code = f"import sys, json; {import_line}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(json.loads(out))


def test_light_core_imports_no_heavy_package() -> None:
    loaded = _modules_after(
        "import edgeops.artifact, edgeops.manifest, edgeops.signing, edgeops.runtime, edgeops.atomic_file"
    )
    assert {"edgeops.artifact", "edgeops.signing"} <= loaded
    assert sorted(m for m in HEAVY if m in loaded) == []


def test_device_agent_imports_no_heavy_package() -> None:
    loaded = _modules_after("import device_agent, device_agent.cli")
    assert "device_agent.cli" in loaded
    assert sorted(m for m in HEAVY if m in loaded) == []
