"""Session slots: what each worker advertises, and what the poller may claim.

A worker that consumes a session queue advertises its slots every few seconds with a timestamp;
a worker that stopped advertising (killed, drained, partitioned) drops out of the sum once its
advertisement is older than `WORKER_STALE_SECONDS`. Every held lease takes one slot, whether its
session waits in a queue or runs, so

    free = sum(slots of live, non-draining workers) - held leases

and the poller never claims more than that: work waits on the server (where another fleet can
take it, and where `depth` shows it for autoscaling), not in our queues.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from redis import Redis

from dispatcher.lease.keys import Keys

__all__ = ["WORKER_STALE_SECONDS", "Capacity", "WorkerSlots"]

# A worker advertises every ADVERTISE_INTERVAL_SECONDS; three missed advertisements mean gone.
ADVERTISE_INTERVAL_SECONDS = 2.0
WORKER_STALE_SECONDS = 3 * ADVERTISE_INTERVAL_SECONDS
# Worker hashes outlive their staleness a while so `dispatcher status` can show them going.
WORKER_RECORD_TTL_SECONDS = 60


@dataclass(frozen=True)
class WorkerSlots:
    hostname: str
    slots: int
    pool: str
    queues: str
    draining: bool
    seen_at: float

    @property
    def live(self) -> bool:
        return not self.draining and time.time() - self.seen_at < WORKER_STALE_SECONDS


def free_slots(*, total: int, held: int) -> int:
    """Slots the poller may claim for: every lease holds a slot, queued or running (one
    computation, for the poller, the metrics and `dispatcher status`)."""
    return max(0, total - held)


class Capacity:
    def __init__(self, redis: Redis, *, prefix: str) -> None:
        self.redis = redis
        self.keys = Keys(prefix)

    def advertise(self, *, hostname: str, slots: int, pool: str, queues: list[str]) -> None:
        now = time.time()
        key = self.keys.worker(hostname)
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(
            key,
            mapping={"slots": slots, "pool": pool, "queues": ",".join(queues), "seen_at": now},
        )
        pipe.expire(key, WORKER_RECORD_TTL_SECONDS)
        pipe.zadd(self.keys.workers, {hostname: now})
        # Forget workers whose record expired; reads stay free of side effects.
        pipe.zremrangebyscore(self.keys.workers, "-inf", now - WORKER_RECORD_TTL_SECONDS)
        pipe.execute()

    def register(self, hostname: str) -> None:
        """A worker (re)starts: a draining flag left by its previous run no longer holds."""
        self.redis.hdel(self.keys.worker(hostname), "draining")

    def set_draining(self, hostname: str) -> None:
        """The worker is shutting down: its slots no longer count and its sessions hand over."""
        key = self.keys.worker(hostname)
        self.redis.hset(key, "draining", "1")
        self.redis.expire(key, WORKER_RECORD_TTL_SECONDS)

    def is_draining(self, hostname: str) -> bool:
        return self.redis.hget(self.keys.worker(hostname), "draining") == "1"

    def withdraw(self, hostname: str) -> None:
        pipe = self.redis.pipeline(transaction=True)
        pipe.zrem(self.keys.workers, hostname)
        pipe.delete(self.keys.worker(hostname))
        pipe.execute()

    def workers(self) -> list[WorkerSlots]:
        names = [str(n) for n in self.redis.zrange(self.keys.workers, 0, -1)]
        pipe = self.redis.pipeline(transaction=False)
        for name in names:
            pipe.hgetall(self.keys.worker(name))
        result = []
        for name, raw in zip(names, pipe.execute(), strict=True):
            if not raw:
                continue  # its record expired; the next advertisement prunes the name
            result.append(
                WorkerSlots(
                    hostname=name,
                    slots=int(raw.get("slots", 0)),
                    pool=raw.get("pool", ""),
                    queues=raw.get("queues", ""),
                    draining=raw.get("draining") == "1",
                    seen_at=float(raw.get("seen_at", 0)),
                )
            )
        return result

    def total_slots(self) -> int:
        return sum(w.slots for w in self.workers() if w.live)

    def live_workers(self) -> set[str]:
        return {w.hostname for w in self.workers() if w.live}

    def free_slots(self) -> int:
        return free_slots(total=self.total_slots(), held=int(self.redis.zcard(self.keys.leases)))
