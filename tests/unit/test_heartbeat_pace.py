"""How a heartbeat tick spreads its requests: a few at once, many evenly over most of a tick."""

from __future__ import annotations

import pytest

from dispatcher.control.heartbeat import PACE_ABOVE, PACE_SECONDS, pace, send_delays


@pytest.mark.parametrize("leases", [0, 1, 10, PACE_ABOVE])
def test_a_few_go_at_once(leases: int) -> None:
    assert pace(leases) == 0.0


@pytest.mark.parametrize("leases", [PACE_ABOVE + 1, 2000, 4000])
def test_many_start_evenly_within_the_pace_window(leases: int) -> None:
    # The last starts at (leases - 1) * spacing: inside the window, so a tick's beats leave
    # before the next tick's, and none later than PACE_SECONDS after it was due.
    assert pace(leases) * (leases - 1) < PACE_SECONDS
    assert pace(leases) * leases == pytest.approx(PACE_SECONDS)


def test_each_heartbeat_leaves_when_due_but_never_before_its_paced_place() -> None:
    now = 1000.0
    # A few: each at its due time, the overdue at once.
    assert send_delays([now - 3, now, now + 0.25, now + 0.9], now) == pytest.approx(
        [0.0, 0.0, 0.25, 0.9])
    # Many due together (a burst of claims): spread over the pace window all the same.
    many = send_delays([now] * 2000, now)
    assert many == [i * pace(2000) for i in range(2000)]
    # Many spread over the next second: at their due times, where those are later.
    spread = [now + i / 2000 for i in range(2000)]
    assert send_delays(spread, now) == pytest.approx([i / 2000 for i in range(2000)])
