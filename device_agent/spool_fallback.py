"""A small RAM buffer in front of the spool, for the messages it cannot store (a full disk).

Guarantees:

- **Ordered.** While anything is held, a new message is held behind it; every put first moves what is held into
  the spool, oldest first, so messages enter the spool (and get their ``seq``) in the order they were put.
- **Bounded.** At most ``max_bytes`` of JSON are held (``HOLD_MAX_BYTES`` by default: about 800 telemetry
  messages, half a day at the default 60 s interval); beyond that the OLDEST held messages are dropped.
- **Counted.** Every dropped message is counted (:attr:`SpoolFallback.lost`) with the reason (``disk-full`` or
  ``storage``), the first error and the time range of what it dropped; :meth:`take_lost` hands the count over
  once, for a ``spool.dropped`` event, when the spool takes writes again.
- **Quiet.** The first failure of a streak and the recovery are logged, not every refused message.

Not done here: sending (held messages have no ``seq`` and are sent only from the spool), or keeping anything
across a restart: what is held when the process ends is gone (logged by :meth:`close` with its count).
"""

from __future__ import annotations

import json
import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from device_agent.disk_space import is_disk_full
from edgeops.errors import StorageError

__all__ = ["HOLD_MAX_BYTES", "LostReport", "SpoolFallback"]

log = logging.getLogger(__name__)

HOLD_MAX_BYTES = 1 << 20  # JSON bytes held in RAM while the spool refuses writes (Greengrass keeps 2.5 MB in RAM)


@dataclass(frozen=True)
class LostReport:
    """What the buffer dropped since the last report."""

    count: int
    reason: str  # "disk-full" or "storage"
    detail: str  # the spool's first error of the streak
    first_ts: float  # the ``ts`` of the oldest and the newest message dropped (unix seconds)
    last_ts: float


class SpoolFallback:
    """Puts JSON messages into the spool through ``put``, holding those it refuses (see the module docstring).

    ``put(topic, doc)`` is the spool's :meth:`~device_agent.spool.Spool.put_json`: it raises StorageError when
    the message is not stored.
    """

    def __init__(self, put: Callable[[str, dict[str, Any]], int], *, max_bytes: int = HOLD_MAX_BYTES) -> None:
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
        self._put = put
        self._max_bytes = max_bytes
        self._lock = threading.Lock()
        self._held: deque[tuple[str, bytes]] = deque()
        self._held_bytes = 0
        self._error: str | None = None  # the spool's error while it refuses writes
        self._reason = "storage"
        self._lost_total = 0
        self._lost: LostReport | None = None  # not yet reported

    def put(self, topic: str, doc: dict[str, Any]) -> bool:
        """Store ``doc`` in the spool (True), or hold it in RAM behind what is held already (False).

        Raises TypeError/ValueError when ``doc`` is not JSON-ready (as the spool would).
        """
        raw = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
        with self._lock:
            if self._drain_locked():
                try:
                    self._put(topic, doc)
                    return True
                except StorageError as exc:
                    self._failed(exc)
            self._hold(topic, raw)
            return False

    def drain(self) -> bool:
        """Move what is held into the spool, oldest first; True when nothing is held any more."""
        with self._lock:
            return self._drain_locked()

    def take_lost(self) -> LostReport | None:
        """What was dropped since the last call (None when nothing was)."""
        with self._lock:
            lost, self._lost = self._lost, None
            return lost

    def status(self) -> dict[str, Any]:
        """``{"held", "held_bytes", "lost", "error"}``: the RAM buffer now and the spool's error, if it refuses."""
        with self._lock:
            held, error = len(self._held), self._error
            return {"held": held, "held_bytes": self._held_bytes, "lost": self._lost_total, "error": error}

    @property
    def error(self) -> str | None:
        """The spool's error while it refuses writes, else None."""
        with self._lock:
            return self._error

    def close(self) -> int:
        """Try the spool a last time; returns (and logs) how many held messages are lost."""
        with self._lock:
            self._drain_locked()
            left = len(self._held)
        if left:
            log.error("%d message(s) held in RAM are lost: the spool still refuses writes (%s)", left, self._error)
        return left

    # -- under the lock --------------------------------------------------------------------------------------

    def _drain_locked(self) -> bool:
        while self._held:
            topic, raw = self._held[0]
            try:
                self._put(topic, json.loads(raw))
            except StorageError as exc:
                self._failed(exc)
                return False
            self._held.popleft()
            self._held_bytes -= len(raw)
        if self._error is not None:
            log.warning("the spool takes writes again; %d message(s) were lost while it did not", self._lost_total)
            self._error = None
        return True

    def _failed(self, exc: StorageError) -> None:
        if self._error is None:
            self._reason = "disk-full" if is_disk_full(exc) else "storage"
            log.error("cannot spool (%s): holding messages in RAM (at most %d bytes)", exc, self._max_bytes)
            self._error = str(exc)

    def _hold(self, topic: str, raw: bytes) -> None:
        self._held.append((topic, raw))
        self._held_bytes += len(raw)
        while self._held_bytes > self._max_bytes:
            _, dropped = self._held.popleft()
            self._held_bytes -= len(dropped)
            self._count_lost(json.loads(dropped).get("ts"))

    def _count_lost(self, ts: Any) -> None:
        stamp = float(ts) if isinstance(ts, (int, float)) else 0.0
        self._lost_total += 1
        prev = self._lost
        if prev is None:
            self._lost = LostReport(1, self._reason, self._error or "", stamp, stamp)
        else:
            self._lost = LostReport(prev.count + 1, prev.reason, prev.detail, prev.first_ts, stamp)
