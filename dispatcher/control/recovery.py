"""Recovery: attempts whose worker died, and messages that never reached a worker.

A running attempt pulses its lease every fraction of a second. If the pulses stop for
`PULSE_STALE_SECONDS`, its worker is gone (SIGKILL, host lost, pool child killed): the lease,
still held and heartbeated by the control plane, goes to a new attempt on any worker. If the old
worker was only frozen and wakes up, its next pulse finds a newer attempt and kills its own
sandbox (fencing). A dead worker's sandbox is already gone: the launcher kills its group when
its parent dies.

A lease whose task was published but never started is re-dispatched when the machine's
`message_lost` says its message is lost: never taken by the broker, or taken by a worker that
did not start it within `DISPATCH_STALE_SECONDS` (it died, or holds it behind a full pool). The
facts come from the delivery records in Redis (`lease/deliveries.py`), the same on both brokers.
"""

from __future__ import annotations

import uuid

from dispatcher.lease import events as ev
from dispatcher.lease.machine import QUIET_SECONDS, Stuck, message_lost, stuck
from dispatcher.lease.model import Lease
from dispatcher.runtime import Runtime

__all__ = ["recover"]


def recover(runtime: Runtime) -> int:
    """Move on every stuck lease; returns how many were acted on."""
    now = runtime.registry.clock.now()  # the clock every pulse was written with
    acted = 0
    # Only the leases silent for longer than the shortest of the bounds can be stuck: the
    # registry indexes each lease's last sign of progress, so a tick reads those alone, not
    # every lease (thousands, each second).
    for lease in runtime.registry.silent_since(now - QUIET_SECONDS):
        event = _event(runtime, lease, stuck(lease, now))
        if event is not None:
            runtime.executor.run(lease, event)
            acted += 1
    return acted


def _event(runtime: Runtime, lease: Lease, how: Stuck | None) -> ev.Event | None:
    if how == Stuck.SILENT_ATTEMPT:
        return ev.AttemptSilent(next_task_id=uuid.uuid4().hex)
    if how == Stuck.STRANDED_CLAIM:
        return ev.ClaimStranded()
    if how == Stuck.QUEUED_TOO_LONG and message_lost(runtime.deliveries.of(lease.task_id),
                                                     runtime.deliveries.clock.now()):
        return ev.MessageLost(next_task_id=uuid.uuid4().hex)
    return None

