"""The collector kept off the calls' path: survivors are frozen at each tick, and a cycle that formed among
frozen objects is still freed by the periodic full pass."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from daemon.ops.heap import FREEZE_INTERVAL, Heap


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


@pytest.fixture(autouse=True)
def unfrozen() -> Iterator[None]:
    yield
    gc.unfreeze()


def test_a_tick_freezes_what_survived_and_says_when_to_come_back() -> None:
    heap = Heap(full_pass_every=3)
    gc.unfreeze()
    assert heap.tick() == FREEZE_INTERVAL  # the first tick is a full pass
    kept = Node()
    before = gc.get_freeze_count()
    assert heap.tick() == FREEZE_INTERVAL
    assert gc.get_freeze_count() > before
    assert not any(obj is kept for obj in gc.get_objects())  # no pass visits it any more


def test_the_periodic_full_pass_frees_a_cycle_among_frozen_objects() -> None:
    heap = Heap(full_pass_every=3)
    heap.tick()
    a, b = Node(), Node()
    a.other, b.other = b, a
    gone = weakref.ref(a)
    heap.tick()  # the cycle is frozen while still in use
    del a, b
    gc.collect()
    assert gone() is not None  # out of the collector's sight: young passes never free it
    heap.tick()
    assert gone() is not None
    heap.tick()  # the fourth: a full pass again (one in three)
    assert gone() is None


def test_frozen_objects_are_freed_by_reference_counting() -> None:
    heap = Heap(full_pass_every=100)
    heap.tick()
    node = Node()
    gone = weakref.ref(node)
    heap.tick()
    del node
    assert gone() is None
