"""Whether a control worker trusts its link to the Work API, by table."""

from __future__ import annotations

import pytest

from dispatcher.control.heartbeat import Reach, Tally, probe_proves_link, probe_target, reach_after
from dispatcher.workapi import WorkAPIError

CUT = Reach(cut_since=5.0)


@pytest.mark.parametrize(("before", "tally", "after"), [
    (Reach(), Tally(sent=3), Reach()),
    (Reach(), Tally(failed=2, unanswered=2), Reach(cut_since=10.0)),
    (CUT, Tally(failed=2, unanswered=2), CUT),  # still cut since the first doubt
    (CUT, Tally(sent=1, failed=4, unanswered=4), Reach()),  # one answer proves the link
    (Reach(), Tally(failed=1), Reach()),  # a 412 or a 503 is an answer
    (CUT, Tally(failed=1), Reach()),
    (Reach(), Tally(failed=2, unanswered=1), Reach()),
    (Reach(), Tally(), Reach()),  # nothing sent, nothing learnt
    (CUT, Tally(), CUT),
])
def test_reach_after(before: Reach, tally: Tally, after: Reach) -> None:
    assert reach_after(before, tally, now=10.0) == after


@pytest.mark.parametrize(("throttled", "target"), [
    ({"env_a": 0.0, "env_b": 0.0}, "env_a"),
    ({"env_a": 12.5, "env_b": 0.0}, "env_b"),  # the server asked env_a's requests to wait
    ({"env_a": 12.5, "env_b": 3.0}, None),  # it throttles them all: the probe waits too
    ({}, None),
])
def test_the_probe_goes_where_the_server_does_not_throttle(throttled: dict[str, float],
                                                           target: str | None) -> None:
    assert probe_target(throttled) == target


@pytest.mark.parametrize(("outcome", "proves"), [
    (None, True),  # stats answered
    (WorkAPIError("throttled", status=429, retry_after=30.0), True),
    (WorkAPIError("unavailable", status=503), True),
    (WorkAPIError("connection refused"), False),
])
def test_any_answer_to_the_probe_proves_the_link(outcome: WorkAPIError | None,
                                                 proves: bool) -> None:
    assert probe_proves_link(outcome) is proves
