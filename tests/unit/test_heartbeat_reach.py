"""Whether a control worker trusts its link to the Work API, by table."""

from __future__ import annotations

import pytest

from dispatcher.control.heartbeat import Reach, Tally, reach_after

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
