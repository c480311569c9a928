"""The pacing rules, pure: how long a server's answer throttles an environment, what page size
to try after a refused one, and how many pages a tick of the stop bridge reads."""

from __future__ import annotations

import pytest

from dispatcher.control.bridge import (
    LARGE_LIST_PAGE_SIZE,
    LIST_PAGE_SIZE,
    MAX_PAGES_PER_TICK,
    page_size,
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
     # As the client words it: the status before the size's name and a request id's digits
     # after it are no size.
     (1000, "list: 400 invalid_request_error: limit must be 1-100 "
            "(request_id=req_c2828b7f626098a4b0b4e711)", 100),
     (1000, "list: 400 invalid_request_error: limit too large (request_id=req_9f7)", 500),
     (100, "unlimited nonsense", None)],
)
def test_a_refused_page_size(size: int, message: str, smaller: int | None) -> None:
    assert smaller_page(size, message) == smaller


@pytest.mark.parametrize(
    ("held", "refused", "size"),
    [(0, None, LIST_PAGE_SIZE), (1_000, None, LIST_PAGE_SIZE),
     (1_001, None, LARGE_LIST_PAGE_SIZE), (20_000, None, LARGE_LIST_PAGE_SIZE),
     (20_000, 100, 100),  # the server's maximum, named by its refusal
     (500, 50, 50), (500, 500, LIST_PAGE_SIZE)],  # a refusal never makes pages larger
)
def test_the_page_size_grows_with_the_leases_held_up_to_what_the_server_takes(
        held: int, refused: int | None, size: int) -> None:
    assert page_size(held, refused) == size


@pytest.mark.parametrize(
    ("held", "page_size", "pages"),
    [(0, 100, 1), (1, 100, 1), (100, 100, 1), (101, 100, 2), (1_000, 100, 10),
     (1_000, 50, 20), (5_000, 100, 50), (20_000, 100, 200), (20_000, 1_000, 20),
     (10_000, 10, MAX_PAGES_PER_TICK), (5, 1, 5)],
)
def test_a_tick_reads_the_leases_held_worth_of_pages(held: int, page_size: int,
                                                     pages: int) -> None:
    assert pages_per_tick(held, page_size) == pages


def test_the_request_rate_follows_the_leases_held_not_the_queue() -> None:
    """One listed item a second per lease held (a page more at most), whatever the page size:
    the queue's length never enters the rule."""
    for held in (1, 10, 100, 1_000, 10_000, 100_000):
        for size in (1, 7, 50, 100, 1_000):
            pages = pages_per_tick(held, size)
            assert 1 <= pages <= MAX_PAGES_PER_TICK
            assert pages * size < max(held, 1) + size
