"""A started process sets its start-up objects aside from the collector's full passes."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest
from celery.signals import worker_process_init, worker_ready

import dispatcher.celery.signals  # noqa: F401  (connects the handlers)
from dispatcher.heap import freeze_startup_heap


@pytest.fixture
def unfrozen() -> Iterator[None]:
    gc.unfreeze()
    yield
    gc.unfreeze()  # the test process itself collects as before


class _Node:
    def __init__(self) -> None:
        self.me = self  # a cycle: garbage only a collection finds


def test_freezing_sets_aside_what_lives_and_keeps_no_garbage(unfrozen: None) -> None:
    kept = [_Node() for _ in range(1000)]
    garbage = weakref.ref(_Node())
    assert garbage() is not None
    freeze_startup_heap()
    assert gc.get_freeze_count() >= len(kept)
    assert garbage() is None  # collected first, not frozen for good


@pytest.mark.parametrize("signal", [worker_ready, worker_process_init], ids=["worker", "child"])
def test_a_worker_freezes_once_started_and_each_pool_child_once_forked(
        unfrozen: None, signal: object) -> None:
    assert gc.get_freeze_count() == 0
    signal.send(sender=None)  # type: ignore[attr-defined]
    assert gc.get_freeze_count() > 0
