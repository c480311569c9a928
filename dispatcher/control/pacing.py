"""The server's pacing, per environment: when it asks one member to slow down, the fleet does.

A 429, or any answer that carries `retry-after` (a 503 with one included), throttles its
environment. The throttle
is one Redis key per environment that lives as long as the server asked (`PX`): every member of
the fleet, on any host, sees the same one, and no host's clock is compared with another's (the
time left is the key's `PTTL`, counted by Redis). A longer request extends it; a shorter one
never shortens it.

Who honours it: the poller waits it out before each poll; the stop bridge skips the
environment's list scan until it lapses; the executor sends no ack, first claim or stop (a
release waits in the heartbeat tick). Heartbeats are the lease machine's (`HeartbeatThrottled`):
the heartbeat tick reads `remaining_all` (one round trip, all environments) and the machine
decides which heartbeats wait and which must go because the lease would lapse otherwise. Every
one of these callers hands the 429s and 503s it meets to `note`.

The rule (`throttle_seconds`) is pure; `Pacing` performs it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from redis import Redis

from dispatcher.logs import event
from dispatcher.metrics import Metrics

__all__ = ["Pacing", "throttle_seconds"]

# A 429 without `retry-after`: the fleet waits this long, the SDK's MAX_RETRY_DELAY (the
# longest a client of the server's own waits unasked).
DEFAULT_THROTTLE_SECONDS = 8.0
# Where the source of the throttle is kept (its value): `dispatcher status` and the log show it.
_NAME = "throttled"


def throttle_seconds(status: int | None, retry_after: float | None) -> float | None:
    """How long the fleet stays away from an environment after this answer; None: not asked.

    A `retry-after` counts whatever the status (the server named a time); a 429 without one
    gets the default wait. A 503 without one is that request's failure, retried by its caller
    with its own backoff, as the SDK's client retries it: it is what a proxy answers for one
    failing backend, and a fleet that paused an environment on each would stop claiming at
    all under a 20 % error rate (the lost-replies scenario showed it).
    """
    if retry_after is not None:
        return retry_after
    if status == 429:
        return DEFAULT_THROTTLE_SECONDS
    return None


class Pacing:
    """The fleet's shared "throttled until", one key per environment."""

    def __init__(self, redis: Redis, *, prefix: str, metrics: Metrics | None = None) -> None:
        self.redis = redis
        self.prefix = prefix
        self.metrics = metrics
        self._extend = redis.register_script(_EXTEND)

    def note(self, environment: str, *, status: int | None, retry_after: float | None,
             source: str) -> float | None:
        """Throttle the environment if this answer asks for it; the seconds asked, or None.

        `source` names the caller (poll, list...). The first answer that throttles an
        environment not throttled yet is logged and counted; the answers that come on while
        it stands are not: a fleet hitting a limit sends many, and one line says it.
        """
        seconds = throttle_seconds(status, retry_after)
        if seconds is None:
            return None
        left_ms = int(self._extend(keys=[self._key(environment)],
                                   args=[max(1, int(seconds * 1000)), source]))
        if left_ms <= 0:
            event("server throttles the fleet", level=logging.WARNING,
                  environment_id=environment, status=status, seconds=round(seconds, 3),
                  source=source,
                  action_taken="every request to this environment waits; heartbeats go only "
                               "where a lease would lapse first")
            if self.metrics is not None:
                self.metrics.inc("server_throttles", environment=environment, source=source)
        return seconds

    def remaining(self, environment: str) -> float:
        """Seconds until the environment's throttle lapses; 0.0 when none stands."""
        return self.remaining_all([environment])[environment]

    def remaining_all(self, environments: Iterable[str]) -> dict[str, float]:
        """Every environment's seconds of throttle left (0.0: none), in one round trip."""
        names = list(environments)
        pipe = self.redis.pipeline(transaction=False)
        for environment in names:
            pipe.pttl(self._key(environment))
        return {environment: max(0, int(ms)) / 1000
                for environment, ms in zip(names, pipe.execute(), strict=True)}

    def _key(self, environment: str) -> str:
        """Per environment, under `lock:` beside the poller's state."""
        return f"{self.prefix}:lock:{_NAME}:{environment}"


# KEYS[1] the environment's throttle (string: the source that set it; PX: the time left).
# ARGV[1] milliseconds asked, ARGV[2] the source. Returns the PTTL it found (-2: none stood),
# so the caller knows whether this answer began a throttle. Never shortens one.
_EXTEND = """
local asked = tonumber(ARGV[1])
local left = redis.call('PTTL', KEYS[1])
if left < asked then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', asked)
end
return left
"""
