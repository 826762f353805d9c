"""Shared by the chaos benchmarks: the results file they all write, one section each.

:func:`update_section` replaces one top-level key of ``benchmarks/results/reliability.json`` and keeps the others
(read-modify-write under an exclusive ``flock`` on the results directory, written through a temp file and
``os.replace``), so every chaos script adds or refreshes its own section without losing the others'.
"""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["RESULTS", "update_section"]

RESULTS = Path(__file__).resolve().parents[1] / "results" / "reliability.json"


def update_section(key: str, value: Any, path: Path = RESULTS) -> dict[str, Any]:
    """Set ``path``'s top-level ``key`` to ``value``; returns the whole document as written.

    A missing or unreadable file starts a new document. Raises OSError when the file cannot be written.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = os.open(path.parent, os.O_RDONLY)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            doc = json.loads(path.read_text())
            if not isinstance(doc, dict):
                doc = {}
        except (OSError, ValueError):
            doc = {}
        doc[key] = value
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(doc, f, indent=1, sort_keys=True)
                f.write("\n")
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    finally:
        os.close(lock)  # releases the lock
    return doc
