"""Recovery: attempts whose worker died, and messages that never reached a worker.

A running attempt pulses its lease every fraction of a second. If the pulses stop for
`PULSE_STALE_SECONDS`, its worker is gone (SIGKILL, host lost, pool child killed): the lease,
still held and heartbeated by the control plane, goes to a new attempt on any worker. If the old
worker was only frozen and wakes up, its next pulse finds a newer attempt and kills its own
sandbox (fencing). A dead worker's sandbox is already gone: the launcher kills its group when
its parent dies.

A lease whose task was published but never started (the worker that took the message died
before it could mark the attempt running, or the message was lost with a Redis restart) is
re-dispatched when its message is in no session queue for `DISPATCH_STALE_SECONDS`.
"""

from __future__ import annotations

import time

from dispatcher.lease.executor import dispatch, release, restart_attempt
from dispatcher.lease.registry import Lease, Phase
from dispatcher.runtime import Runtime

__all__ = ["DISPATCH_STALE_SECONDS", "PULSE_STALE_SECONDS", "recover"]

# Supervisors pulse every 0.2 s; 5 s of silence is a dead worker, not a slow Redis call.
PULSE_STALE_SECONDS = 5.0
# A published session task waits in its queue only while the fleet is full or draining.
DISPATCH_STALE_SECONDS = 30.0
# A lease the poller recorded but never dispatched (the poller died in between).
CLAIM_STALE_SECONDS = 30.0


def recover(runtime: Runtime) -> int:
    """Move on every stuck lease; returns how many were acted on."""
    now = time.time()
    acted = 0
    # Only the leases silent for longer than the shortest of the bounds can be stuck: the
    # registry indexes each lease's last sign of progress, so a tick reads those alone, not
    # every lease (thousands, each second). Each is then judged on its own record, as before.
    quiet = min(PULSE_STALE_SECONDS, CLAIM_STALE_SECONDS, DISPATCH_STALE_SECONDS)
    for lease in runtime.registry.silent_since(now - quiet):
        if _is_dead_attempt(lease, now):
            restart_attempt(runtime, lease, reason="worker lost (no pulse)", failure=True)
            acted += 1
        elif _is_stranded_claim(lease, now):
            _finish_claim(runtime, lease)
            acted += 1
        elif _is_lost_message(runtime, lease, now):
            restart_attempt(runtime, lease, reason="session task never started", failure=False)
            acted += 1
    return acted


def _is_dead_attempt(lease: Lease, now: float) -> bool:
    return lease.phase == Phase.RUNNING and now - lease.pulse_at > PULSE_STALE_SECONDS


def _is_stranded_claim(lease: Lease, now: float) -> bool:
    return lease.phase == Phase.CLAIMED and now - lease.claimed_at > CLAIM_STALE_SECONDS


def _finish_claim(runtime: Runtime, lease: Lease) -> None:
    if lease.stop or lease.is_lost:
        release(runtime, lease, reason="claimed, then stopped before dispatch",
                outcome="stopped")
        return
    runtime.registry.update(lease.work_id, phase=Phase.DISPATCHED, dispatched_at=time.time())
    dispatch(runtime, lease)


def _is_lost_message(runtime: Runtime, lease: Lease, now: float) -> bool:
    if lease.phase != Phase.DISPATCHED or now - lease.dispatched_at <= DISPATCH_STALE_SECONDS:
        return False
    return not _message_queued(runtime, lease)


def _message_queued(runtime: Runtime, lease: Lease) -> bool:
    """Whether the task's message still waits in its Redis queue (kombu keeps a list per queue,
    each message a JSON document holding the task id)."""
    messages = runtime.redis.lrange(runtime.registry.keys.celery_queue(lease.queue), 0, -1)
    return any(lease.task_id in str(message) for message in messages)
