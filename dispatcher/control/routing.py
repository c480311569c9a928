"""Which session queue a work item goes to.

A work item's metadata may name a session queue (`queue`), so pools with different sandboxes
can share one environment; otherwise it goes to its environment's queue, if the configuration
names one, or the first session queue. Only queues the fleet declares are used: an unknown
name would publish to a queue nobody consumes, and the session would wait forever while its
lease is held.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from dispatcher.logs import event

__all__ = ["QUEUE_METADATA_KEY", "choose_queue"]

QUEUE_METADATA_KEY = "queue"


def choose_queue(metadata: Mapping[str, str], queues: list[str], *, work_id: str,
                 default: str | None = None) -> str:
    fallback = default if default in queues else queues[0]
    wanted = metadata.get(QUEUE_METADATA_KEY)
    if wanted is None or wanted in queues:
        return wanted or fallback
    event("unknown session queue", level=logging.WARNING, work_id=work_id,
          wanted=wanted[:100], using=fallback)
    return fallback
