"""JSON from untrusted bytes with a nesting bound checked *before* parsing (light core: stdlib + numpy).

``json.loads`` recurses in C, guarded only by the interpreter's recursion limit; a library that raises that limit
(onnx2tf sets it to 2**31 - 1 on import) turns ``b"[" * 100_000`` from a RecursionError into a segmentation fault
of the whole process. :func:`loads` measures the nesting depth first — strings removed by one linear regex, then a
running sum over the brackets in numpy — and refuses deeper documents with ValueError, so the parse that follows
never recurses further than ``max_depth``, whatever the recursion limit.
"""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np

__all__ = ["MAX_DEPTH", "loads", "nesting_depth"]

MAX_DEPTH = 64  # far above any document edgeops writes (manifests and metadata stay under 10)
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)  # unambiguous alternation: linear time
_OPEN = np.zeros(256, dtype=np.int8)
_OPEN[[ord("["), ord("{")]] = 1
_OPEN[[ord("]"), ord("}")]] = -1


def nesting_depth(raw: bytes | bytearray | memoryview | str) -> int:
    """The deepest bracket nesting in ``raw`` outside strings (an upper bound for invalid JSON)."""
    data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else bytes(raw)
    if b"[" not in data and b"{" not in data:
        return 0
    steps = _OPEN[np.frombuffer(_STRING.sub(b'""', data), dtype=np.uint8)]
    return int(np.cumsum(steps, dtype=np.int64).max(initial=0))


def loads(raw: bytes | bytearray | memoryview | str, *, max_depth: int = MAX_DEPTH, **kwargs: Any) -> Any:
    """``json.loads(raw, **kwargs)`` after checking the nesting. Raises ValueError (json.JSONDecodeError and
    UnicodeDecodeError are ValueErrors too) for JSON nested deeper than ``max_depth`` or not JSON."""
    if nesting_depth(raw) > max_depth:
        raise ValueError(f"JSON nested deeper than {max_depth} levels")
    return json.loads(raw if isinstance(raw, (str, bytes, bytearray)) else bytes(raw), **kwargs)
