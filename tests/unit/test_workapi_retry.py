"""The one retry classifier, retry-after parsing, and the backoff."""

from __future__ import annotations

import itertools
from email.utils import formatdate

import httpx
import pytest

from dispatcher.workapi import (
    Backoff,
    ConflictError,
    ServerError,
    TransientError,
    classify,
    delay_for,
    retry_after_seconds,
)

NOW = 1_800_000_000.0


@pytest.mark.parametrize(
    ("status", "retry"),
    [(400, False), (401, False), (403, False), (404, False), (408, True), (409, True),
     (412, False), (422, False), (429, True), (500, True), (502, True), (529, True)],
)
def test_status_alone_decides_without_the_header(status: int, retry: bool) -> None:
    assert classify(status, {}) is retry


@pytest.mark.parametrize("status", [400, 404, 409, 412, 429, 500, 503])
@pytest.mark.parametrize(
    ("value", "retry"), [("true", True), ("false", False), (" TRUE ", True), ("False", False)]
)
def test_x_should_retry_decides_first(status: int, value: str, retry: bool) -> None:
    assert classify(status, {"x-should-retry": value}) is retry
    assert classify(status, httpx.Headers({"X-Should-Retry": value})) is retry


def test_an_unreadable_x_should_retry_is_ignored() -> None:
    assert classify(409, {"x-should-retry": "maybe"}) is True
    assert classify(400, {"x-should-retry": ""}) is False


@pytest.mark.parametrize(
    ("headers", "seconds"),
    [
        ({"retry-after": "3"}, 3.0),
        ({"retry-after": "0.5"}, 0.5),
        ({"Retry-After": "60"}, 60.0),
        ({"retry-after-ms": "1500"}, 1.5),
        ({"retry-after-ms": "200", "retry-after": "9"}, 0.2),
        ({"retry-after": formatdate(NOW + 30, usegmt=True)}, 30.0),
        ({"retry-after": formatdate(NOW + 3600, usegmt=True)}, 3600.0),  # an hour away
        ({"retry-after": formatdate(NOW + 3601, usegmt=True)}, None),  # past an hour: broken
        ({"retry-after": "120"}, 120.0),
        ({"retry-after": "61"}, 61.0),
        ({"retry-after": "0"}, None),
        ({"retry-after": "-2"}, None),
        ({"retry-after-ms": "60001"}, 60.001),
        ({"retry-after-ms": "3600001"}, None),
        ({"retry-after": formatdate(NOW - 5, usegmt=True)}, None),  # already past
        ({"retry-after": "tomorrow-ish"}, None),
        ({"retry-after-ms": "soon", "retry-after": "2"}, 2.0),
        ({}, None),
    ],
)
def test_retry_after_is_honoured_only_inside_zero_to_an_hour(
    headers: dict[str, str], seconds: float | None
) -> None:
    assert retry_after_seconds(headers, now=NOW) == seconds


def test_a_retry_after_date_without_a_zone_is_utc() -> None:
    date = formatdate(NOW + 10, usegmt=True).replace("GMT", "-0000")
    assert retry_after_seconds({"retry-after": date}, now=NOW) == 10.0


def test_backoff_doubles_up_to_its_cap_and_trims_up_to_a_quarter() -> None:
    untrimmed = Backoff(random=lambda: 0.0)
    assert [untrimmed.next_delay() for _ in range(7)] == [0.5, 1, 2, 4, 8, 8, 8]
    trimmed = Backoff(random=lambda: 1.0)
    assert [trimmed.next_delay() for _ in range(3)] == [0.375, 0.75, 1.5]


def test_full_jitter_spreads_over_the_whole_interval() -> None:
    values = itertools.cycle([0.0, 0.5, 0.999])
    backoff = Backoff(base=1.0, cap=4.0, full_jitter=True, random=lambda: next(values))
    assert [backoff.next_delay() for _ in range(3)] == [0.0, 1.0, pytest.approx(3.996)]


def test_reset_starts_over_and_instances_count_apart() -> None:
    poll, ack = Backoff(random=lambda: 0.0), Backoff(random=lambda: 0.0)
    poll.next_delay(), poll.next_delay()
    assert (poll.attempt, ack.attempt) == (2, 0)
    assert ack.next_delay() == 0.5
    poll.reset()
    assert poll.next_delay() == 0.5


def test_a_long_outage_does_not_overflow() -> None:
    backoff = Backoff(attempt=5000, random=lambda: 0.0)
    assert backoff.next_delay() == 8.0


def test_delay_for_prefers_the_servers_retry_after() -> None:
    backoff = Backoff(random=lambda: 0.0)
    assert delay_for(ConflictError("x", retry_after=4.0), backoff) == 4.0
    assert backoff.attempt == 0
    assert delay_for(ServerError("x"), backoff) == 0.5
    assert delay_for(TransientError("x"), backoff) == 1.0
