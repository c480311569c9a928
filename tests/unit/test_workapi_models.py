"""Numbers and ids from the server, checked where they enter: one bad reply costs one item."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import ValidationError

from dispatcher.workapi import Heartbeat, LeaseState, Work, WorkQueueStats
from dispatcher.workapi.models import MAX_COUNT, MAX_TTL_SECONDS, check_id, find_lone_surrogate

BEAT = {"type": "work_heartbeat", "last_heartbeat": "t1", "lease_extended": True,
        "state": "active"}
WORK = {"id": "work_1", "environment_id": "env_1", "state": "queued",
        "data": {"id": "session_1", "type": "session"}, "created_at": "2026-01-01T00:00:00Z"}


def parse(model: Any, raw: str) -> Any:
    """As the client parses: JSON text first (so 1e309 arrives as inf), then the model."""
    return model.model_validate(json.loads(raw))


@pytest.mark.parametrize(
    ("raw", "ttl"),
    [
        ("30", 30),
        ("1e309", MAX_TTL_SECONDS),  # json reads it as inf
        ("-1e309", 0),
        ("1e300", MAX_TTL_SECONDS),
        ("9" * 400, MAX_TTL_SECONDS),  # an int no float can hold
        ("-5", 0),
        ("0", 0),
        ("NaN", 0),
        ("Infinity", MAX_TTL_SECONDS),
        ("45.9", 45),
        ("86400", MAX_TTL_SECONDS),
    ],
)
def test_an_absurd_ttl_is_clamped_where_it_enters(raw: str, ttl: int) -> None:
    beat = parse(Heartbeat, json.dumps(BEAT)[:-1] + f', "ttl_seconds": {raw}}}')
    assert beat.ttl_seconds == ttl
    # The heartbeat tick computes its interval in floats: 10**400 raised OverflowError there.
    assert float(beat.ttl_seconds) / 3 <= MAX_TTL_SECONDS
    state = parse(LeaseState, f'{{"state": "active", "ttl_seconds": {raw}}}')
    assert state.ttl_seconds == ttl


@pytest.mark.parametrize("raw", ['"long"', "true", "[]", "null"])
def test_a_ttl_that_is_no_number_is_still_refused(raw: str) -> None:
    if raw in ("true",):  # pydantic's lax int takes a bool; a 1 s TTL is then clamped sanely
        assert parse(Heartbeat, json.dumps(BEAT)[:-1] + f', "ttl_seconds": {raw}}}')
        return
    with pytest.raises(ValidationError):
        parse(Heartbeat, json.dumps(BEAT)[:-1] + f', "ttl_seconds": {raw}}}')


def test_queue_figures_are_clamped_to_what_a_metric_can_hold() -> None:
    stats = parse(WorkQueueStats, '{"depth": 1e309, "pending": -3, "workers_polling": '
                                  + "9" * 400 + "}")
    assert (stats.depth, stats.pending, stats.workers_polling) == (MAX_COUNT, 0, MAX_COUNT)
    float(stats.depth)  # no OverflowError


@pytest.mark.parametrize("value", ["work_01", "env_01ABC", "a.b", "a-b_c", "w" * 256])
def test_a_plain_id_passes(value: str) -> None:
    assert check_id(value) == value


@pytest.mark.parametrize("value", ["", ".", "..", ".hidden", "a/b", "a%2F", "a b", "a\n",
                                   "a\x00", "\u0430", "w" * 257, "a?b", "a#b"])
def test_an_id_that_could_walk_or_break_a_url_fails(value: str) -> None:
    with pytest.raises(ValueError, match="must be"):
        check_id(value, "work_id")
    with pytest.raises(ValidationError):
        Work.model_validate({**WORK, "id": value})
    with pytest.raises(ValidationError):
        Work.model_validate({**WORK, "environment_id": value})


@pytest.mark.parametrize("where", ["metadata", "data", "extra", "key"])
def test_a_lone_surrogate_anywhere_in_an_item_fails_at_parse(where: str) -> None:
    bad = "x\ud800"
    body = {"metadata": {**WORK, "metadata": {"k": bad}},
            "data": {**WORK, "data": {"id": "s", "type": "session", "note": bad}},
            "extra": {**WORK, "something_new": [1, {"deep": bad}]},
            "key": {**WORK, "metadata": {bad: "v"}}}[where]
    with pytest.raises(ValidationError, match="lone surrogate"):
        Work.model_validate(body)


def test_a_valid_item_round_trips_and_finds_no_surrogate() -> None:
    item = Work.model_validate({**WORK, "metadata": {"emoji": "\U0001f600", "ü": "ok"}})
    assert find_lone_surrogate(json.loads(item.to_json())) is None
    assert item.to_json().encode("utf-8")
