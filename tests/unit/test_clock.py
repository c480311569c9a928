"""The fleet's one clock, against a time source whose answers the test sets."""

from __future__ import annotations

import time

from redis.exceptions import ConnectionError as RedisConnectionError

from dispatcher import clock as clock_module
from dispatcher.clock import RedisClock


class Source:
    def __init__(self, ahead: float) -> None:
        self.ahead = ahead
        self.calls = 0
        self.down = False

    def time(self) -> tuple[int, int]:
        self.calls += 1
        if self.down:
            raise RedisConnectionError("down")
        now = time.time() + self.ahead
        return int(now), int((now % 1) * 1e6)


def test_reads_redis_time_through_the_offset() -> None:
    clock = RedisClock(Source(ahead=30.0))
    assert abs(clock.now() - (time.time() + 30.0)) < 0.05
    assert abs(clock.offset - 30.0) < 0.05


def test_a_behind_host_is_corrected_too() -> None:
    clock = RedisClock(Source(ahead=-42.5))
    assert abs(clock.now() - (time.time() - 42.5)) < 0.05


def test_measures_once_a_minute_not_per_read() -> None:
    source = Source(ahead=5.0)
    clock = RedisClock(source)
    for _ in range(100):
        clock.now()
    assert source.calls == 1


def test_measures_again_after_the_interval() -> None:
    source = Source(ahead=5.0)
    clock = RedisClock(source)
    clock.now()
    clock._synced_at = time.monotonic() - clock_module.RESYNC_SECONDS - 1
    source.ahead = 7.0
    assert abs(clock.now() - (time.time() + 7.0)) < 0.05
    assert source.calls == 2


def test_an_unreachable_redis_keeps_the_last_offset_and_tries_again_later() -> None:
    source = Source(ahead=10.0)
    clock = RedisClock(source)
    clock.now()
    clock._synced_at = time.monotonic() - clock_module.RESYNC_SECONDS - 1
    source.down = True
    assert abs(clock.now() - (time.time() + 10.0)) < 0.05
    clock.now()
    assert source.calls == 2  # not at every read while Redis is away
    assert clock._synced_at is not None
    clock._synced_at -= clock_module.RETRY_SECONDS
    source.down = False
    source.ahead = 11.0
    assert abs(clock.now() - (time.time() + 11.0)) < 0.05
    assert source.calls == 3


def test_before_any_answer_the_host_clock_is_used() -> None:
    source = Source(ahead=10.0)
    source.down = True
    assert abs(RedisClock(source).now() - time.time()) < 0.05
