"""The broker: Redis (the default) or RabbitMQ, and the few settings that differ between them.

Both brokers keep one promise: a session message is acknowledged as its task starts (early ack,
so no broker ever delivers a running session again), and a worker never holds session messages
it has no pool slot for (a held message waits there while another worker idles).

* **Redis.** Every key under the fleet's prefix (`global_keyprefix`), and Celery's own
  `worker_disable_prefetch`: a worker fetches only while its pool has a free slot.
* **RabbitMQ.** Celery ignores `worker_disable_prefetch` there (celery/worker/consumer/tasks.py:
  "only supported for Redis brokers"), and AMQP has no prefetch of zero (0 means unlimited).
  So a worker's channel allows one unacknowledged message (`SessionGate` sets the prefetch
  count to 1, which the early ack frees as the task starts), and while its pool is full it
  cancels its session consumers, so RabbitMQ hands session messages to workers that have room;
  it consumes them again as soon as a slot frees. The one message a full worker may still hold
  (delivered just before the gate closed) is moved on by recovery after 30 s
  (`machine.message_lost`). Publishing waits for the broker's confirm, so a session marked
  published is in RabbitMQ's queue. The vhost isolates fleets, as the key prefix does on Redis.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import bootsteps
from celery.worker import state

from dispatcher import redis_connect
from dispatcher.celery.keys import CeleryKeys
from dispatcher.settings import Settings

__all__ = ["GATE_CHECK_SECONDS", "SessionGate", "broker_conf", "pool_full"]

logger = logging.getLogger(__name__)

# How often a RabbitMQ worker compares its reserved tasks with its pool: at most this long a
# full worker still consumes session messages (of which its prefetch of 1 lets it take one).
GATE_CHECK_SECONDS = 0.1
# One unacknowledged message per channel: the early ack frees it as the task starts.
AMQP_PREFETCH_COUNT = 1
# The AMQP heartbeat of a worker's consuming connection. RabbitMQ hands a session message to a
# consumer it believes alive; a worker cut off from it (its host partitioned, Redis still
# reachable, so it still advertises free slots) never receives the message, and RabbitMQ returns
# it to the queue only once it closes that connection for silence. At Celery's 120 s
# (negotiated down to RabbitMQ's 60) such a session waited a minute or more; at 10 s RabbitMQ
# closes the connection, and another worker starts the session, within about 20 s.
# Publishing connections carry no heartbeat (Celery sends them only on the consumer's).
AMQP_HEARTBEAT_SECONDS = 10


def broker_conf(settings: Settings) -> dict[str, Any]:
    """Celery settings of the broker `settings` names (`DISPATCHER_BROKER_URL`, else Redis)."""
    if settings.broker_url is None:
        # The fleet's own Redis, through its Sentinels when they are set.
        return _redis_conf(redis_connect.broker_redis_url(settings), settings,
                           redis_connect.broker_transport_options(settings))
    if redis_connect.is_redis(settings.broker_url):
        return _redis_conf(settings.broker_url, settings, {})
    return {
        "broker_url": settings.broker_url,
        # A send returns once RabbitMQ has the message: only then is it marked published.
        "broker_transport_options": {"confirm_publish": True},
        # Celery would restore a prefetch count it lowered after a reconnect to
        # concurrency x multiplier, undoing the gate's count of 1.
        "worker_enable_prefetch_count_reduction": False,
        "broker_heartbeat": AMQP_HEARTBEAT_SECONDS,
    }


def _redis_conf(url: str, settings: Settings, options: dict[str, Any]) -> dict[str, Any]:
    return {
        "broker_url": url,
        "broker_transport_options": {"global_keyprefix": CeleryKeys(settings.key_prefix).broker,
                                     **options},
        "worker_disable_prefetch": True,
    }


def pool_full(*, reserved: int, pool_size: int) -> bool:
    """As Celery's Redis-only `worker_disable_prefetch` judges it: every pool slot is taken by a
    task received and not finished (running, or waiting for a slot)."""
    return reserved >= pool_size


class SessionGate(bootsteps.StartStopStep):
    """On RabbitMQ: prefetch one message, and consume session queues only while the pool has a
    free slot. Runs in the consumer's event loop (a hub timer), the only thread that may touch
    its channel."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, consumer: Any, **kwargs: Any) -> None:
        self._timer: Any = None
        self._queues: dict[str, Any] = {}

    def start(self, c: Any) -> None:
        if c.connection.transport.driver_type == "redis" or c.task_consumer is None:
            return
        # Imported here: the app module imports this one before the runtime can be built.
        from dispatcher.runtime import get_runtime

        sessions = set(get_runtime().settings.session_queues)
        self._queues = {q.name: q for q in c.task_consumer.queues if q.name in sessions}
        c.qos.value = AMQP_PREFETCH_COUNT
        c.qos.update()
        if self._queues and c.hub is not None:
            self._timer = c.hub.call_repeatedly(GATE_CHECK_SECONDS, self._check, c)

    def stop(self, c: Any) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def shutdown(self, c: Any) -> None:
        self.stop(c)

    def _check(self, c: Any) -> None:
        consumer = c.task_consumer
        if consumer is None:
            return
        size = getattr(c.controller, "max_concurrency", None) or c.pool.num_processes
        full = pool_full(reserved=len(state.reserved_requests), pool_size=size)
        for name, queue in self._queues.items():
            consuming = consumer.consuming_from(name)
            if full and consuming:
                consumer.cancel_by_queue(name)
                logger.debug("pool full: stopped consuming %s", name)
            elif not full and not consuming:
                consumer.add_queue(queue)
                consumer.consume()
                logger.debug("pool slot free: consuming %s again", name)
