"""Deeply nested JSON is refused before the C parser recurses, whatever the interpreter's recursion limit.

onnx2tf raises the limit to 2**31 - 1 when it is imported (a host process that builds TFLite from ONNX); with that
limit ``json.loads(b"[" * 100_000)`` is a segmentation fault, not a RecursionError. Each parser that reads bytes
from the network or a file is run here in a fresh interpreter with the limit raised the same way.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from edgeops import bounded_json

ROOT = Path(__file__).resolve().parents[2]

CODE = """
import sys
sys.setrecursionlimit(2**31 - 1)  # what `import onnx2tf` does
import threading
threading.stack_size(8 * 1024 * 1024)
deep = b"[" * 200_000 + b"]" * 200_000
obj = b'{"a":' * 100_000 + b'1' + b'}' * 100_000
from edgeops.errors import UntrustedInput
from edgeops.manifest import Manifest
from edgeops.release import parse_release, parse_repair
from edgeops.protocol import parse_command
from edgeops.fleet.ingest import parse_telemetry
from edgeops.fleet.registry import parse_state
from edgeops.trust import TrustSession
from device_agent.http_api import decode_request
import datetime as dt
calls = [
    lambda d: Manifest.from_bytes(d),
    lambda d: parse_release(d, []),
    lambda d: parse_repair(d),
    lambda d: parse_command(d, []),
    lambda d: parse_telemetry("dev", d, received_at=0.0),
    lambda d: parse_state("dev", d, received_at=0.0),
    lambda d: TrustSession(d, now=dt.datetime.now(dt.timezone.utc)),
    lambda d: decode_request("application/json", d, [], max_bytes=10**7),
]
for i, call in enumerate(calls):
    for data in (deep, obj):
        try:
            call(data)
        except UntrustedInput:
            pass
print("refused all", len(calls) * 2)
"""


def test_parsers_refuse_deep_json_with_an_unlimited_recursion_limit() -> None:
    done = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, cwd=ROOT, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stderr[-2000:]  # -11 was the segmentation fault
    assert "refused all 16" in done.stdout


@pytest.mark.parametrize(
    ("raw", "depth"),
    [(b"{}", 1), (b'{"a": [1, {"b": "[[[{{{"}]}', 3), (b'"[[[\\"[["', 0), (b"[[]]", 2), (b"", 0), ("[ü]", 1)],
)
def test_nesting_depth_skips_strings(raw: bytes | str, depth: int) -> None:
    assert bounded_json.nesting_depth(raw) == depth


def test_loads_refuses_past_the_bound_and_parses_below_it() -> None:
    assert bounded_json.loads(b"[" * 64 + b"]" * 64, max_depth=64) is not None
    with pytest.raises(ValueError, match="deeper than 64"):
        bounded_json.loads(b"[" * 65 + b"]" * 65, max_depth=64)
