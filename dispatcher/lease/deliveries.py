"""Where each session message went: published by the control plane, received by a worker.

Recovery must tell a session message that waits in its queue (the fleet is full: leave it) from
one that is lost (restart the attempt). On Redis the queue is a list one could read; RabbitMQ
shows no queued message without taking it. So both brokers get the same record, in Redis:
the executor marks a task id published once the broker took the message, and the worker that
receives it marks it received (`task_received`, in the worker's main process, before the
message is acknowledged). On Redis, recovery also looks for a message long unreceived in its
queue (`celery/waiting.py`) and notes since when it has been missing: a worker that died between
taking it and noting it took it along. The rule that reads these facts is the machine's
(`message_lost`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import cast

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
        # Decoded replies (`redis_connect.connect`): str, as redis-py's types cannot say.
        return _delivery(cast("dict[str, str]", self.redis.hgetall(self.keys.delivery(task_id))))

    def looked_up(self, queued: Mapping[str, bool | None]) -> dict[str, Delivery]:
        """The records of `queued`'s task ids, each told whether its message was just seen in
        its queue (None: the broker cannot be looked into), noting since when one has been
        absent from it (`missing_at`: set at the first look that misses it, gone at one that
        finds it). What that means is the machine's (`message_lost`). Read after the queue
        was, so a receipt written meanwhile counts."""
        ids = list(queued)
        pipe = self.redis.pipeline(transaction=False)
        for task_id in ids:
            pipe.hgetall(self.keys.delivery(task_id))
        records: list[dict[str, str]] = pipe.execute()
        now = self.clock.now()
        for task_id, record in zip(ids, records, strict=True):
            key, seen = self.keys.delivery(task_id), queued[task_id]
            if seen and "missing_at" in record:
                pipe.hdel(key, "missing_at")
                del record["missing_at"]
            elif seen is False and "missing_at" not in record:
                pipe.hset(key, "missing_at", now)
                pipe.expire(key, DELIVERY_TTL_SECONDS)
                record["missing_at"] = str(now)
        pipe.execute()
        return {task_id: _delivery(record) for task_id, record in zip(ids, records, strict=True)}


def _delivery(record: Mapping[str, str]) -> Delivery:
    received_at = record.get("received_at")
    missing_at = record.get("missing_at")
    return Delivery(published="published_at" in record,
                    received_at=float(received_at) if received_at else None,
                    received_by=str(record.get("received_by", "")),
                    missing_since=float(missing_at) if missing_at else None)
