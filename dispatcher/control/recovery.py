"""Recovery: attempts whose worker died, and messages that never reached a worker.

A running attempt pulses its lease every fraction of a second. If the pulses stop for
`PULSE_STALE_SECONDS`, its worker is gone (SIGKILL, host lost, pool child killed): the lease,
still held and heartbeated by the control plane, goes to a new attempt on any worker. If the old
worker was only frozen and wakes up, its next pulse finds a newer attempt and kills its own
sandbox (fencing). A dead worker's sandbox is already gone: the launcher kills its group when
its parent dies.

A lease whose task was published but never started is re-dispatched when the machine's
`message_lost` says its message is lost: never taken by the broker, taken by a worker that did
not start it within `DISPATCH_STALE_SECONDS` (it died, or holds it behind a full pool), or gone
from its Redis queue unreceived for `MISSING_CONFIRM_SECONDS` (its worker died between taking it
and noting it). The facts come from the delivery records in Redis (`lease/deliveries.py`), the
same on both brokers, and on Redis from the queue itself (`celery/waiting.py`).
"""

from __future__ import annotations

import logging
import uuid
from collections import defaultdict

from redis.exceptions import RedisError

from dispatcher.lease import events as ev
from dispatcher.lease.machine import QUIET_SECONDS, Delivery, Stuck, message_lost, stuck
from dispatcher.lease.model import Lease
from dispatcher.logs import event
from dispatcher.runtime import Runtime

__all__ = ["recover"]


def recover(runtime: Runtime) -> int:
    """Move on every stuck lease; returns how many were acted on."""
    now = runtime.registry.clock.now()  # the clock every pulse was written with
    acted = 0
    # Only the leases silent for longer than the shortest of the bounds can be stuck: the
    # registry indexes each lease's last sign of progress, so a tick reads those alone, not
    # every lease (thousands, each second).
    judged = [(lease, stuck(lease, now))
              for lease in runtime.registry.silent_since(now - QUIET_SECONDS)]
    deliveries = _deliveries(runtime, [lease for lease, how in judged
                                       if how == Stuck.QUEUED_TOO_LONG])
    read_at = runtime.deliveries.clock.now()  # the clock the delivery records were written with
    for lease, how in judged:
        move = _event(lease, how, deliveries.get(lease.task_id), read_at)
        if move is not None:
            runtime.executor.run(lease, move)
            acted += 1
    return acted


def _deliveries(runtime: Runtime, queued: list[Lease]) -> dict[str, Delivery]:
    """Where each long-queued lease's message went: each queue read once for all of its
    messages, then their records (after the queue, so a receipt written meanwhile counts)."""
    if not queued:
        return {}
    seen: dict[str, bool | None] = {}
    by_queue: dict[str, list[str]] = defaultdict(list)
    for lease in queued:
        by_queue[lease.queue].append(lease.task_id)
    for queue, task_ids in by_queue.items():
        waiting = _among(runtime, queue, task_ids)
        seen.update({t: None if waiting is None else t in waiting for t in task_ids})
    return runtime.deliveries.looked_up(seen)


def _among(runtime: Runtime, queue: str, task_ids: list[str]) -> set[str] | None:
    """A broker that cannot be read now (its own Redis, down) is one that cannot tell: its
    messages are taken for waiting, and the rest of the tick (silent attempts) goes on."""
    try:
        return runtime.waiting.among(queue, task_ids)
    except RedisError as e:
        event("queue not read", logging.WARNING, queue=queue, messages=len(task_ids),
              error=type(e).__name__)
        return None


def _event(lease: Lease, how: Stuck | None, delivery: Delivery | None,
           now: float) -> ev.Event | None:
    if how == Stuck.SILENT_ATTEMPT:
        return ev.AttemptSilent(next_task_id=uuid.uuid4().hex)
    if how == Stuck.STRANDED_CLAIM:
        return ev.ClaimStranded()
    if how == Stuck.QUEUED_TOO_LONG and delivery is not None and message_lost(delivery, now):
        return ev.MessageLost(next_task_id=uuid.uuid4().hex)
    return None
