"""When the poller takes a poll's item for part of a burst (and polls side by side), by table:
the item was waiting on the server (answered within a round trip, or created with the item
before it) and the poll before answered one too; or a wake-up says work waits."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from dispatcher.control.poller import POLL_BLOCK_MS, queue_busy, round_trip_of, was_waiting
from dispatcher.workapi import Work

CREATED = datetime(2026, 12, 6, 12, 0, 0, tzinfo=UTC)


def _item() -> Work:
    return Work.model_validate({"id": "work_1", "type": "work", "environment_id": "env_1",
                                "state": "queued", "created_at": CREATED.isoformat(),
                                "data": {"type": "session", "id": "sesn_1"}})


@pytest.mark.parametrize(
    ("answered_in", "round_trip", "created_before", "waiting"),
    [
        # answered at once, the run's first poll: the round trip is not known yet
        (0.004, None, None, True),
        # a long poll that waited for its item: created while it waited
        (0.400, None, None, False),
        (0.400, 0.004, None, False),
        # a remote service, 150 ms away: answered within its round trip, so it was waiting
        (0.160, 0.150, None, True),
        # ...and its first poll, round trip unknown: not taken for waiting on time alone
        (0.160, None, None, False),
        # a loaded server answered late, but the item came with the one before it
        (0.400, 0.004, CREATED.timestamp() - 0.05, True),
        # sessions arriving one at a time, 0.25 s apart
        (0.400, 0.004, CREATED.timestamp() - 0.25, False),
    ],
)
def test_a_polled_item_was_waiting(answered_in: float, round_trip: float | None,
                                   created_before: float | None, waiting: bool) -> None:
    assert was_waiting(_item(), answered_in=answered_in, round_trip=round_trip,
                       created_before=created_before) is waiting


@pytest.mark.parametrize(
    ("answered_before", "waiting", "drain", "busy"),
    [
        (False, True, False, False),  # one item, even waiting: maybe a lone session
        (True, False, False, False),  # two answered, the second waited for its item
        (True, True, False, True),  # two in a row, the second was waiting: a burst
        (False, False, True, True),  # a wake-up says work waits
    ],
)
def test_polls_go_side_by_side_only_for_a_queue_that_holds_more(
        answered_before: bool, waiting: bool, drain: bool, busy: bool) -> None:
    assert queue_busy(answered_before, waiting=waiting, drain=drain) is busy


@pytest.mark.parametrize(
    ("answered_in", "blocked", "empty", "round_trip"),
    [
        (0.004, False, False, 0.004),  # a non-blocking poll: all of it
        (0.004, False, True, 0.004),
        (POLL_BLOCK_MS / 1000 + 0.15, True, True, 0.15),  # a long poll held its whole block
        (0.3, True, True, 0.0),  # a long poll the server let go early: no more than nothing
        (0.3, True, False, None),  # a long poll that answered an item may have waited for it
    ],
)
def test_a_polls_round_trip(answered_in: float, blocked: bool, empty: bool,
                            round_trip: float | None) -> None:
    assert round_trip_of(answered_in, blocked=blocked, empty=empty) == pytest.approx(round_trip)
