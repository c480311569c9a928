"""One clock for the fleet: wall time as Redis sees it.

Every time the fleet stores in Redis and another host compares (a lease's due heartbeat, its
last pulse, when it was claimed or dispatched, when the server last answered a heartbeat) is
read from this clock, never from the host's own: a host whose clock is 30 s ahead would
otherwise schedule heartbeats 30 s late for everyone else (the lease lapses), and a pulse from a
host 30 s behind would look 30 s old (a healthy session restarted).

Asking Redis for `TIME` on every read would add a round trip to every decision, so each process
measures its offset from Redis once in a while, as NTP does: the midpoint of the request's send
and reply is taken as the moment Redis read its clock, so the error is at most half a round trip
(well under a millisecond next to Redis). Local durations (timeouts, how long a supervisor has
not pulsed) stay on the monotonic clock: they never leave the process.
"""

from __future__ import annotations

import threading
import time
from typing import Protocol

from redis.exceptions import RedisError

__all__ = ["Clock", "RedisClock", "SystemClock"]

# How often a process measures its offset again: host clocks drift by well under a millisecond
# a minute, and NTP steps are rare; a minute keeps the cost to one command a minute a process.
RESYNC_SECONDS = 60.0
# An offset measured over a round trip longer than this is not trusted (a stalled Redis): the
# previous one is kept.
MAX_ROUND_TRIP_SECONDS = 0.5
# After a failed measurement, the next is tried this much later, not at every read: a read must
# not wait out Redis's socket timeout each time while Redis is away.
RETRY_SECONDS = 5.0


class TimeSource(Protocol):
    def time(self) -> tuple[int, int]: ...  # redis-py's `Redis.time()`: seconds, microseconds


class Clock(Protocol):
    def now(self) -> float: ...


class SystemClock:
    """The host's own wall clock: for tests and for code with no Redis."""

    def now(self) -> float:
        return time.time()


class RedisClock:
    """The host's wall clock corrected by its offset from Redis's, measured every minute."""

    def __init__(self, redis: TimeSource) -> None:
        self._redis = redis
        self._offset = 0.0
        self._synced_at: float | None = None  # monotonic
        self._lock = threading.Lock()

    def now(self) -> float:
        if self._synced_at is None or time.monotonic() - self._synced_at >= RESYNC_SECONDS:
            self.sync()
        return time.time() + self._offset

    @property
    def offset(self) -> float:
        """Redis's clock minus this host's, in seconds (0 until measured)."""
        return self._offset

    def sync(self) -> None:
        """Measure the offset now. On failure the previous offset stays (0 at first) and the
        next measurement comes `RETRY_SECONDS` later: a Redis outage must not stop, nor slow,
        the callers that only need a time."""
        with self._lock:
            sent = time.time()
            started = time.monotonic()
            try:
                seconds, micros = self._redis.time()
            except RedisError:
                self._synced_at = started - RESYNC_SECONDS + RETRY_SECONDS
                return
            round_trip = time.monotonic() - started
            if round_trip > MAX_ROUND_TRIP_SECONDS:
                self._synced_at = started - RESYNC_SECONDS + RETRY_SECONDS
                return
            self._offset = seconds + micros / 1e6 - (sent + round_trip / 2)
            self._synced_at = time.monotonic()
