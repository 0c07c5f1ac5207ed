"""The collector's settings for long-running processes (shared/heap.py)."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from shared import heap


@pytest.fixture
def collector() -> Iterator[None]:
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


def test_settle_freezes_what_exists_and_keeps_the_threshold(collector: None) -> None:
    before = gc.get_threshold()
    heap.settle()
    assert gc.get_freeze_count() > 0
    assert gc.get_threshold() == before


def test_settle_sets_only_the_young_threshold(collector: None) -> None:
    _, middle, old = gc.get_threshold()
    heap.settle(young_threshold=100_000)
    assert gc.get_threshold() == (100_000, middle, old)


class Cycle:
    other: Cycle


def unreachable_cycle() -> weakref.ref[Cycle]:
    """A reference to one of two objects that hold each other and nothing else holds."""
    first, second = Cycle(), Cycle()
    first.other, second.other = second, first
    return weakref.ref(first)


def test_garbage_made_before_settling_is_collected_not_frozen(collector: None) -> None:
    gone = unreachable_cycle()
    heap.settle(young_threshold=100_000)
    assert gone() is None


def test_garbage_made_after_settling_is_still_collected(collector: None) -> None:
    heap.settle(young_threshold=100_000)
    gone = unreachable_cycle()
    gc.collect()
    assert gone() is None
