"""Where each session message went: published by the control plane, received by a worker.

Recovery must tell a session message that waits in its queue (the fleet is full: leave it) from
one that is lost (restart the attempt). On Redis the queue is a list one could read; RabbitMQ
shows no queued message without taking it. So both brokers get the same record, in Redis:
the executor marks a task id published once the broker took the message, and the worker that
receives it marks it received (`task_received`, in the worker's main process, before the
message is acknowledged). The rule that reads these facts is the machine's (`message_lost`).
"""

from __future__ import annotations

from redis import Redis
from redis.client import Pipeline

from dispatcher.clock import Clock, RedisClock
from dispatcher.lease.keys import Keys
from dispatcher.lease.machine import Delivery

__all__ = ["DELIVERY_TTL_SECONDS", "Deliveries"]

# A record outlives any wait in a queue that recovery could still act on; a day, as the history.
DELIVERY_TTL_SECONDS = 24 * 3600


class Deliveries:
    def __init__(self, redis: Redis, *, prefix: str, clock: Clock | None = None) -> None:
        self.redis = redis
        self.clock = clock or RedisClock(redis)
        self.keys = Keys(prefix)

    def published(self, task_id: str) -> None:
        self._mark(task_id, {"published_at": self.clock.now()})

    def received(self, task_id: str, *, worker: str, pipe: Pipeline | None = None) -> None:
        """`pipe`: queued there, for its owner to send with other commands."""
        self._mark(task_id, {"received_at": self.clock.now(), "received_by": worker}, pipe)

    def _mark(self, task_id: str, fields: dict[str, str | float],
              pipe: Pipeline | None = None) -> None:
        key = self.keys.delivery(task_id)
        own = pipe is None
        pipe = self.redis.pipeline(transaction=False) if pipe is None else pipe
        for name, value in fields.items():
            pipe.hset(key, name, value)
        pipe.expire(key, DELIVERY_TTL_SECONDS)
        if own:
            pipe.execute()

    def of(self, task_id: str) -> Delivery:
        record = self.redis.hgetall(self.keys.delivery(task_id))
        received_at = record.get("received_at")
        return Delivery(published="published_at" in record,
                        received_at=float(received_at) if received_at else None,
                        received_by=str(record.get("received_by", "")))
