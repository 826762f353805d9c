"""Which chunk of one payload to publish next, so that a chunk many devices want goes out once (sans-I/O).

Chunks are broadcast: one publish on the release's chunk topic reaches every device subscribed to it. So the
publisher does not answer each device's repair request on its own; it folds every request into *passes* over the
payload. A pass walks the chunk indices in ascending order. A request that arrives while a pass is at position
``p`` (the next index the pass can still reach) adds its indices ``>= p`` to the current pass — the pass will
reach them — and its indices ``< p`` to the next pass. With no pass running, a request starts one at 0.

Guarantees:

* every index requested is published at least once after the request (at the latest in the next pass);
* within one pass an index is published at most once, however many devices asked for it, so N devices that
  ask for everything at the same time cost one publish per chunk, and a device that joins half-way through
  costs only the chunks the pass had already passed;
* the planner only decides; it opens no file and no socket, reads no clock and takes no lock (the adapter,
  :mod:`edgeops.release_server`, serialises calls).

It does not know which devices asked: it cannot tell one device's repeated request from two devices' requests,
and it does not time anything out (a device that lost a chunk asks again).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["PlannerCounters", "RepairPlanner"]

_WANTED = 1


@dataclass(frozen=True)
class PlannerCounters:
    published: int  # chunks handed out by next_chunk()
    first_sends: int  # ... of which had never been handed out before
    resends: int  # ... of which had been handed out before (repairs, late joiners)
    requests: int  # request() calls
    pending: int  # chunks wanted but not yet handed out (current and next pass)


class RepairPlanner:
    """The broadcast schedule of one payload of ``chunk_count`` chunks."""

    def __init__(self, chunk_count: int) -> None:
        if chunk_count < 1:
            raise ValueError(f"chunk_count must be at least 1, got {chunk_count}")
        self.chunk_count = chunk_count
        self._current = bytearray(chunk_count)  # 1 = wanted in the running pass (only at indices >= _position)
        self._next = bytearray(chunk_count)  # 1 = wanted in the pass after this one
        self._current_pending = 0
        self._next_pending = 0
        self._position = 0  # the next index the running pass can publish
        self._sent = bytearray(chunk_count)  # 1 = handed out at least once
        self._published = self._first_sends = self._requests = 0

    @property
    def position(self) -> int | None:
        """The next index the running pass can reach, or None when no pass runs."""
        return self._position if self._current_pending else None

    @property
    def pending(self) -> int:
        """Chunks wanted and not yet handed out (this pass and the next)."""
        return self._current_pending + self._next_pending

    def request(self, missing: Iterable[int]) -> None:
        """Record that a device is missing the chunks ``missing`` (any order, duplicates allowed).

        Raises ValueError for an index outside 0..chunk_count-1 (the caller validates requests first); the
        planner is then unchanged.
        """
        indices = sorted(set(missing))
        if indices and (indices[0] < 0 or indices[-1] >= self.chunk_count):
            raise ValueError(f"chunk index out of range 0..{self.chunk_count - 1}")
        self._requests += 1
        if not self._current_pending:
            self._start_next_pass()
        for i in indices:
            if i >= self._position:
                if not self._current[i]:
                    self._current[i] = _WANTED
                    self._current_pending += 1
            elif not self._next[i]:
                self._next[i] = _WANTED
                self._next_pending += 1

    def next_chunk(self) -> int | None:
        """The index to publish now, or None when nothing is wanted. Each call hands out one index."""
        if not self._current_pending:
            self._start_next_pass()
            if not self._current_pending:
                return None
        index = self._current.find(_WANTED, self._position)
        if index < 0:  # unreachable: every wanted index of the running pass is at or after the position
            raise RuntimeError("repair planner lost track of its pass")
        self._current[index] = 0
        self._current_pending -= 1
        self._position = index + 1
        self._published += 1
        if not self._sent[index]:
            self._sent[index] = 1
            self._first_sends += 1
        return index

    def counters(self) -> PlannerCounters:
        return PlannerCounters(
            published=self._published,
            first_sends=self._first_sends,
            resends=self._published - self._first_sends,
            requests=self._requests,
            pending=self.pending,
        )

    def _start_next_pass(self) -> None:
        """Make the next pass the running one (it may be empty), starting at index 0."""
        self._current, self._next = self._next, self._current
        self._current_pending, self._next_pending = self._next_pending, 0
        self._position = 0
