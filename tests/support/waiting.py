"""Waiting for something a test expects to happen, with a deadline and a message saying what did not."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

__all__ = ["wait_for"]


def wait_for(what: str, check: Callable[[], Any], timeout: float = 60.0, *, poll_s: float = 0.1) -> Any:
    """``check()``'s first truthy value, polled every ``poll_s`` seconds; AssertionError naming ``what`` when
    none comes within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out waiting for {what}")
