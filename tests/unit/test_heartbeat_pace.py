"""How a heartbeat tick spreads its requests: a few at once, many evenly over most of a tick."""

from __future__ import annotations

import pytest

from dispatcher.control.heartbeat import PACE_ABOVE, PACE_SECONDS, pace


@pytest.mark.parametrize("leases", [0, 1, 10, PACE_ABOVE])
def test_a_few_go_at_once(leases: int) -> None:
    assert pace(leases) == 0.0


@pytest.mark.parametrize("leases", [PACE_ABOVE + 1, 2000, 4000])
def test_many_start_evenly_within_the_pace_window(leases: int) -> None:
    # The last starts at (leases - 1) * spacing: inside the window, so a tick's beats leave
    # before the next tick's, and none later than PACE_SECONDS after it was due.
    assert pace(leases) * (leases - 1) < PACE_SECONDS
    assert pace(leases) * leases == pytest.approx(PACE_SECONDS)
