"""Which session messages still wait in the broker's queue, for recovery to tell a message
waiting for a free slot from one a dying worker took with it (`machine.message_lost`).

On Redis a queue is a list (one per priority step, kombu's `_q_for_pri`), read here without
taking anything: from its tail, where kombu pops and where the oldest messages are, in pages,
until every message asked about is found. RabbitMQ shows no queued message without taking it,
and needs no look: it gives a dead consumer's messages back to the queue itself.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from typing import Protocol

from kombu.transport.redis import PRIORITY_STEPS, Channel
from redis import Redis

__all__ = ["OVERLAP", "PAGE", "RedisQueues", "Unseen", "Waiting"]

logger = logging.getLogger(__name__)

# Messages read per round trip: a session message is about 1.5 KB, so a page is about 1.5 MB.
PAGE = 1000
# Workers pop from the tail while the pages are read, moving the messages not yet read toward
# it: each page starts this many messages inside the last, so that many pops between two reads
# skip nothing. A message skipped even so is only seen missing once: recovery asks again.
OVERLAP = 100


class Waiting(Protocol):
    def among(self, queue: str, task_ids: Iterable[str]) -> set[str] | None:
        """Those of `task_ids` whose message is in `queue`; None: the broker cannot tell."""


class Unseen:
    """A broker whose queues cannot be read (RabbitMQ)."""

    def among(self, queue: str, task_ids: Iterable[str]) -> set[str] | None:
        return None


class RedisQueues:
    """`redis` is the broker's Redis; `prefix`, kombu's `global_keyprefix`."""

    def __init__(self, redis: Redis, *, prefix: str) -> None:
        self.redis = redis
        self.prefix = prefix

    def among(self, queue: str, task_ids: Iterable[str]) -> set[str] | None:
        wanted = set(task_ids)
        found: set[str] = set()
        for key in self._keys(queue):
            end = -1
            while wanted - found:
                page = self.redis.lrange(key, end - PAGE + 1, end)
                found |= wanted & {_task_id(raw) for raw in page}
                if len(page) < PAGE:
                    break
                end -= PAGE - OVERLAP
        return found

    def _keys(self, queue: str) -> list[str]:
        """Kombu's list of each priority step: the queue's own name for the lowest (where a
        session message without a priority goes), then the name, a separator and the step."""
        return [self.prefix + (f"{queue}{Channel.sep}{step}" if step else queue)
                for step in PRIORITY_STEPS]


def _task_id(raw: bytes | str) -> str | None:
    """The Celery task id of a kombu message as the Redis transport stores it."""
    try:
        headers = json.loads(raw).get("headers") or {}
        task_id = headers.get("id")
    except (ValueError, AttributeError):
        logger.warning("unreadable message in a session queue: %.80r", raw)
        return None
    return task_id if isinstance(task_id, str) else None
