"""edgeops.repair_planner: broadcast passes that publish a chunk many devices want once (no socket, no clock)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeops.repair_planner import RepairPlanner


def drain(planner: RepairPlanner, limit: int | None = None) -> list[int]:
    out: list[int] = []
    while limit is None or len(out) < limit:
        index = planner.next_chunk()
        if index is None:
            break
        out.append(index)
    return out


def test_many_devices_asking_for_everything_at_once_get_each_chunk_once() -> None:
    planner = RepairPlanner(100)
    for _ in range(50):
        planner.request(range(100))
    assert drain(planner) == list(range(100))
    c = planner.counters()
    assert (c.published, c.first_sends, c.resends, c.requests, c.pending) == (100, 100, 0, 50, 0)
    assert planner.next_chunk() is None
    assert planner.position is None


def test_a_device_joining_mid_pass_costs_only_the_chunks_already_passed() -> None:
    planner = RepairPlanner(10)
    planner.request(range(10))
    assert drain(planner, 4) == [0, 1, 2, 3]
    assert planner.position == 4
    planner.request(range(10))  # a late device wants everything
    assert drain(planner) == [4, 5, 6, 7, 8, 9, 0, 1, 2, 3]
    c = planner.counters()
    assert (c.published, c.first_sends, c.resends) == (14, 10, 4)


def test_overlapping_partial_requests_are_published_as_their_union_once() -> None:
    planner = RepairPlanner(20)
    planner.request([1, 3, 5, 7])
    planner.request([5, 7, 9, 11])
    planner.request([3, 11, 19, 19])
    assert drain(planner) == [1, 3, 5, 7, 9, 11, 19]
    assert planner.counters().published == 7


def test_a_repair_after_the_pass_ended_starts_a_new_pass_and_counts_as_resend() -> None:
    planner = RepairPlanner(8)
    planner.request(range(8))
    assert drain(planner) == list(range(8))
    planner.request([2, 6])  # a device lost two chunks
    assert drain(planner) == [2, 6]
    c = planner.counters()
    assert (c.first_sends, c.resends, c.pending) == (8, 2, 0)


def test_a_request_for_an_index_still_ahead_joins_the_running_pass() -> None:
    planner = RepairPlanner(10)
    planner.request([0, 1, 8])
    assert drain(planner, 2) == [0, 1]
    planner.request([1, 5, 9])  # 1 is behind the pass, 5 and 9 ahead of it
    assert drain(planner) == [5, 8, 9, 1]


def test_an_index_out_of_range_is_refused_and_leaves_the_planner_unchanged() -> None:
    planner = RepairPlanner(4)
    with pytest.raises(ValueError, match="out of range"):
        planner.request([1, 4])
    with pytest.raises(ValueError, match="out of range"):
        planner.request([-1])
    assert planner.counters().requests == 0
    assert planner.next_chunk() is None
    with pytest.raises(ValueError):
        RepairPlanner(0)


@settings(max_examples=300, deadline=None)
@given(
    count=st.integers(1, 40),
    steps=st.lists(st.one_of(st.integers(0, 5), st.lists(st.integers(0, 39), max_size=12)), max_size=40),
)
def test_every_requested_chunk_is_published_after_its_request(count: int, steps: list[int | list[int]]) -> None:
    """Interleave requests (lists) with publishing (n next_chunk calls): every index handed out was requested
    since it was last handed out (nothing wasted), and every requested index is handed out after its request."""
    planner = RepairPlanner(count)
    waiting: set[int] = set()  # requested and not published since
    for step in steps:
        if isinstance(step, list):
            planner.request(i % count for i in step)
            waiting.update(i % count for i in step)
        else:
            for index in drain(planner, step):
                assert index in waiting
                waiting.remove(index)
    for index in drain(planner):
        assert index in waiting
        waiting.remove(index)
    assert not waiting
    assert planner.counters().pending == 0
