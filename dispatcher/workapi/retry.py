"""When to try a Work API call again, and how long to wait first.

One classifier for the whole fleet, with the official SDK's policy: the server's
``x-should-retry`` header decides first; otherwise 408, 409, 429 and 5xx are worth another try
and every other 4xx is not. Connection failures and timeouts are always worth another try.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dispatcher.workapi.errors import WorkAPIError

__all__ = [
    "RETRY_BASE_SECONDS",
    "RETRY_CAP_SECONDS",
    "WAIT_IN_CALL_SECONDS",
    "Backoff",
    "classify",
    "delay_for",
    "retry_after_seconds",
]

RETRY_BASE_SECONDS = 0.5  # the SDK's INITIAL_RETRY_DELAY
RETRY_CAP_SECONDS = 8.0  # the SDK's MAX_RETRY_DELAY
# A server's retry-after is read up to an hour. It is the server's pacing and is honoured in
# full by the whole fleet (control/pacing: a shared "throttled until" per environment), not by a
# sleeping call, so a long value stalls no loop. Past an hour the value is taken for a broken
# header (a misparsed date), as a rate limit's window is seconds to minutes.
MAX_RETRY_AFTER_SECONDS = 3600.0
# A call retries in place only after a wait this short, as the SDK does (it honours 60 s at
# most); a longer retry-after ends the call, and its caller waits the time out with the fleet
# instead of holding a worker slot asleep.
WAIT_IN_CALL_SECONDS = 60.0
# 2.0 ** 1024 overflows a float (anthropic-sdk-python#1761); any cap is reached long before.
_MAX_EXPONENT = 32
# 4xx statuses that are passing trouble: request timeout, conflict, rate limit.
_RETRYABLE_4XX = frozenset({408, 409, 429})


def _header(headers: Mapping[str, str], name: str) -> str | None:
    """Case-insensitive lookup that works on httpx.Headers and on a plain dict."""
    value = headers.get(name)
    if value is not None:
        return value
    return next((v for k, v in headers.items() if k.lower() == name), None)


def classify(status: int, headers: Mapping[str, str]) -> bool:
    """True if a response with this status and these headers is worth retrying."""
    should_retry = (_header(headers, "x-should-retry") or "").strip().lower()
    if should_retry == "true":
        return True
    if should_retry == "false":
        return False
    return status in _RETRYABLE_4XX or status >= 500


def retry_after_seconds(headers: Mapping[str, str], *, now: float | None = None) -> float | None:
    """The server's requested wait in seconds, or None when absent, unreadable or out of range.

    ``retry-after-ms`` wins over ``retry-after``; the latter is seconds or an HTTP date.
    ``now`` (epoch seconds) is for tests of the date form.
    """
    seconds = _retry_after_ms(_header(headers, "retry-after-ms"))
    if seconds is None:
        seconds = _retry_after(_header(headers, "retry-after"), now)
    if seconds is None or not 0 < seconds <= MAX_RETRY_AFTER_SECONDS:
        return None
    return seconds


def _retry_after_ms(value: str | None) -> float | None:
    try:
        return float(value) / 1000 if value is not None else None
    except ValueError:
        return None


def _retry_after(value: str | None, now: float | None) -> float | None:
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # "-0000": the date is UTC but carries no zone
        when = when.replace(tzinfo=UTC)
    return when.timestamp() - (time.time() if now is None else now)


@dataclass
class Backoff:
    """Exponential backoff: ``base * 2**attempt`` capped at ``cap``, then jittered.

    The default jitter trims up to 25% off (the SDK's core client); ``full_jitter`` picks
    uniformly in ``[0, delay)`` instead, which spreads a fleet's retries further apart. Keep one
    instance per counter (poll, ack...): a failing ack must not stretch the poll's wait.
    """

    base: float = RETRY_BASE_SECONDS
    cap: float = RETRY_CAP_SECONDS
    full_jitter: bool = False
    attempt: int = 0
    random: Callable[[], float] = field(default=random.random, repr=False, compare=False)

    def next_delay(self) -> float:
        ceiling = min(self.cap, self.base * 2.0 ** min(self.attempt, _MAX_EXPONENT))
        self.attempt += 1
        if self.full_jitter:
            return ceiling * self.random()
        return ceiling * (1 - 0.25 * self.random())

    def reset(self) -> None:
        self.attempt = 0


def delay_for(error: WorkAPIError, backoff: Backoff) -> float:
    """The server's retry-after when it sent a usable one, else the backoff's next delay."""
    if error.retry_after is not None:
        return error.retry_after
    return backoff.next_delay()
