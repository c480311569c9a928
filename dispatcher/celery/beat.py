"""Beat's scheduler: celery-redbeat, made to survive a Redis that restarted empty.

celery-redbeat keeps the schedule and its lock in Redis. When Redis loses its data, the next
`tick` cannot extend the lock (`LockNotOwnedError`) and beat exits (sibson/redbeat#230); an
embedded beat (`worker -B`) exits silently and the fleet stops polling and heartbeating. Here
the tick instead re-acquires the lock if it is free (and writes the lost schedule back), or
stays a standby if another beat took it, trying again each interval. A Redis that does not
answer at all (restarting, or a network cut) makes the tick wait and try again, logging once.
"""

from __future__ import annotations

import logging
from typing import Any

from redbeat import RedBeatScheduler
from redis.exceptions import LockNotOwnedError, RedisError

__all__ = ["Scheduler"]

log = logging.getLogger("dispatcher.celery.beat")

# While Redis does not answer, try again this often: beat's work (polling, heartbeats) resumes
# within a second of Redis coming back.
UNREACHABLE_RETRY_SECONDS = 1.0


class Scheduler(RedBeatScheduler):
    _unreachable = False

    def tick(self, min: Any = min, **kwargs: Any) -> float:
        try:
            delay = float(super().tick(min=min, **kwargs))
        except LockNotOwnedError:
            return self._recover_lock()
        except RedisError as exc:
            if not self._unreachable:
                log.warning("beat cannot reach Redis (%s); retrying every %.0f s", exc,
                            UNREACHABLE_RETRY_SECONDS)
            self._unreachable = True
            return UNREACHABLE_RETRY_SECONDS
        if self._unreachable:
            log.warning("beat reaches Redis again")
            self._unreachable = False
        return delay

    def _recover_lock(self) -> float:
        if self.lock.acquire(blocking=False):
            log.warning("beat lock was lost (Redis restarted?); re-acquired it and restored "
                        "the schedule")
            self.setup_schedule()
            return 0.0
        log.warning("beat lock is held by another beat; standing by")
        return float(self.max_interval)
