"""The autoscalers' signal as a rule: what one environment's work needs, in session slots."""

from __future__ import annotations

import pytest

from dispatcher.control.capacity import desired_slots


@pytest.mark.parametrize(("queued", "pending", "held", "desired"), [
    (0, 0, 0, 0),     # idle: a pool may scale to zero
    (5, 0, 0, 5),     # a backlog with no worker alive: wake up for all of it
    (0, 2, 0, 2),     # polled, not yet acknowledged: on its way to a slot
    (1, 0, 2, 3),     # two held (starting or running) and one waiting
    (0, 0, 4, 4),     # all running: keep them
    (-1, -1, 3, 3),   # a server's nonsense never lowers the figure below what runs
])
def test_desired_slots_are_queued_plus_pending_plus_held(
        queued: int, pending: int, held: int, desired: int) -> None:
    assert desired_slots(queued=queued, pending=pending, held=held) == desired
