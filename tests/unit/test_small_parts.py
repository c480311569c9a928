"""Routing, slots, event lines."""

from __future__ import annotations

import logging

import pytest

from dispatcher.celery.bootsteps import session_slots
from dispatcher.control.routing import choose_queue
from dispatcher.logs import event

QUEUES = ["dispatcher.sessions", "dispatcher.gpu"]


def test_metadata_may_name_a_declared_queue() -> None:
    assert choose_queue({"queue": "dispatcher.gpu"}, QUEUES, work_id="w") == "dispatcher.gpu"
    assert choose_queue({}, QUEUES, work_id="w") == "dispatcher.sessions"


def test_an_unknown_queue_falls_back_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="dispatcher"):
        assert choose_queue({"queue": "x; rm -rf /"}, QUEUES, work_id="w") == QUEUES[0]
    assert "unknown session queue" in caplog.text
    assert "wanted='x; rm -rf /'" in caplog.text


@pytest.mark.parametrize(
    ("concurrency", "queues", "configured", "expected"),
    [
        (10, ["dispatcher.control", "dispatcher.sessions"], None, 8),
        (2, ["dispatcher.control", "dispatcher.sessions"], None, 1),
        (4, ["dispatcher.sessions"], None, 4),
        (4, ["dispatcher.control"], None, 0),
        (4, ["dispatcher.sessions"], 9, 9),
    ],
)
def test_session_slots_keep_room_for_control_tasks(
    concurrency: int, queues: list[str], configured: int | None, expected: int
) -> None:
    assert session_slots(concurrency=concurrency, queues=queues, configured=configured,
                         control_queue="dispatcher.control",
                         session_queues=QUEUES) == expected


def test_event_lines_are_greppable_and_quote_hostile_values(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.INFO, logger="dispatcher"):
        event("claimed", work_id="work_1", session_id="s\nattempt=9", attempt=1, skip=None)
    record = caplog.records[-1]
    assert record.getMessage() == "claimed work_id=work_1 session_id='s\\nattempt=9' attempt=1"
    assert record.action == "claimed"  # type: ignore[attr-defined]
