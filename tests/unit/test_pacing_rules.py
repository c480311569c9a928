"""The pacing rules, pure: how long a server's answer throttles an environment, what page size
to try after a refused one, and how many pages a tick of the stop bridge reads."""

from __future__ import annotations

import pytest

from dispatcher.control.bridge import (
    LIST_ITEMS_PER_TICK,
    MAX_PAGES_PER_TICK,
    pages_per_tick,
    smaller_page,
)
from dispatcher.control.pacing import DEFAULT_THROTTLE_SECONDS, throttle_seconds


@pytest.mark.parametrize(
    ("status", "retry_after", "seconds"),
    [(429, 120.0, 120.0), (429, None, DEFAULT_THROTTLE_SECONDS),
     (503, None, None), (503, 30.0, 30.0),
     (500, 5.0, 5.0),  # the server named a time: honoured whatever the status
     (500, None, None), (None, None, None), (400, None, None), (409, None, None)],
)
def test_what_throttles_and_for_how_long(status: int | None, retry_after: float | None,
                                         seconds: float | None) -> None:
    assert throttle_seconds(status, retry_after) == seconds


@pytest.mark.parametrize(
    ("size", "message", "smaller"),
    [(100, "limit must be 1-50", 50),
     (100, "limit: must be at most 25", 25),
     (100, "page_size too large", 50),
     (100, "Limit exceeds the maximum", 50),
     (50, "limit must be 1-100", 25),  # no number below the size: halve it
     (3, "limit too large", 1),
     (1, "limit must be 1-1", None),  # nothing smaller to try
     (100, "invalid page cursor", None),
     (100, "unlimited nonsense", None)],
)
def test_a_refused_page_size(size: int, message: str, smaller: int | None) -> None:
    assert smaller_page(size, message) == smaller


@pytest.mark.parametrize(
    ("held", "page_size", "pages"),
    [(0, 100, 1), (1, 100, 1), (100, 100, 1), (101, 100, 2), (1_000, 100, 10),
     (10_000, 100, 10), (1_000, 50, 20), (1_000, 10, MAX_PAGES_PER_TICK), (5, 1, 5)],
)
def test_pages_scale_with_the_leases_held_and_are_bounded(held: int, page_size: int,
                                                          pages: int) -> None:
    assert pages_per_tick(held, page_size) == pages


def test_the_request_rate_is_bounded_whatever_the_page_size() -> None:
    for held in (1, 10, 100, 1_000, 10_000, 100_000):
        for size in (1, 7, 50, 100):
            pages = pages_per_tick(held, size)
            assert 1 <= pages <= MAX_PAGES_PER_TICK
            assert pages * size <= max(size, LIST_ITEMS_PER_TICK + size)
