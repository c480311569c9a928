"""A worker that takes a session message off its Redis queue and is SIGKILLed holding it.

A consumer on kombu's Redis transport, as a Celery worker's is: it takes one message, which
kombu records unacknowledged, and dies before anything announces it (Celery's `task_received`,
where the fleet writes its receipt). What the broker holds then is what a worker killed in that
window leaves: the message off its queue, in kombu's unacknowledged hash, no receipt.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

from redis import Redis

from dispatcher.celery.keys import CeleryKeys

__all__ = ["take_and_die"]

CONSUMER = textwrap.dedent("""
    import sys
    from kombu import Connection, Queue
    url, prefix, queue = sys.argv[1:4]
    with Connection(url, transport_options={"global_keyprefix": prefix}) as conn:
        def took(body, message):
            print(message.headers["id"], flush=True)
            sys.stdin.read()
        with conn.Consumer(Queue(queue, no_declare=True), callbacks=[took], no_ack=False):
            conn.drain_events(timeout=30)
""")


def take_and_die(redis_url: str, *, key_prefix: str, queue: str) -> str:
    """The oldest message of `queue` (of the fleet whose key prefix is `key_prefix`) taken by a
    process that is then SIGKILLed; returns its task id."""
    broker_prefix = CeleryKeys(key_prefix).broker
    with subprocess.Popen([sys.executable, "-c", CONSUMER, redis_url, broker_prefix, queue],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as consumer:
        try:
            assert consumer.stdout is not None
            task_id = consumer.stdout.readline().strip()
            assert task_id, "the consumer took a message"
            with Redis.from_url(redis_url) as redis:
                assert redis.hlen(broker_prefix + "unacked") == 1, "held unacknowledged"
        finally:
            os.kill(consumer.pid, signal.SIGKILL)
            consumer.wait(timeout=10)
    return task_id
