"""The steps every part shares: dispatch an attempt, start the next one, release a lease.

Release is the only way a lease ends, and it never leaves a work item without an owner: if the
server cannot be told (a transient error), the lease stays in the registry as `releasing` and
the heartbeat task retries the stop until it lands.
"""

from __future__ import annotations

import logging
import time
import uuid

from dispatcher.events import event
from dispatcher.lease.registry import Lease, Phase, StopKind
from dispatcher.runtime import Runtime
from dispatcher.workapi import ConflictError, NotFoundError, WorkAPIError

__all__ = ["SESSION_TASK", "dispatch", "release", "restart_attempt"]

SESSION_TASK = "tasks.session.run"
# Retry a failed release this soon; the heartbeat task picks releasing leases up when due.
RELEASE_RETRY_SECONDS = 2.0


def dispatch(runtime: Runtime, lease: Lease) -> None:
    """Publish the session task of the lease's current attempt on its queue.

    Only ids travel in the message (Flower shows task arguments): the work item and its secret
    stay in the registry.
    """
    # Phase first: a worker may start the task before send_task even returns.
    runtime.registry.update(lease.work_id, phase=Phase.DISPATCHED, dispatched_at=time.time())
    kwargs = {"work_id": lease.work_id, "session_id": lease.session_id, "attempt": lease.attempt}
    runtime.app.send_task(
        SESSION_TASK,
        kwargs=kwargs,
        task_id=lease.task_id,
        queue=lease.queue,
        kwargsrepr=f"work_id={lease.work_id} session_id={lease.session_id} "
        f"attempt={lease.attempt}",
    )
    event("dispatched", work_id=lease.work_id, session_id=lease.session_id,
          attempt=lease.attempt, task_id=lease.task_id, queue=lease.queue)


def restart_attempt(runtime: Runtime, lease: Lease, *, reason: str, failure: bool) -> None:
    """Hand the session to a new attempt on any worker, or release it if it may not run again.

    `failure` counts the ending attempt against DISPATCHER_MAX_ATTEMPTS: a worker that died
    mid-session does; a drain (a deploy) or a message that never reached a worker does not,
    so rolling restarts never use a session's attempts up.
    """
    if lease.stop or lease.is_lost:
        release(runtime, lease, reason=f"{reason}; stop requested", outcome="stopped")
        return
    if failure and lease.failures + 1 >= runtime.settings.max_attempts:
        event("attempts exhausted", level=logging.WARNING, work_id=lease.work_id,
              session_id=lease.session_id, attempt=lease.attempt, reason=reason)
        release(runtime, lease, reason="attempts exhausted", outcome="attempts_exhausted")
        return
    task_id = uuid.uuid4().hex
    attempt = runtime.registry.new_attempt(
        lease.work_id, expected_attempt=lease.attempt, task_id=task_id
    )
    if attempt <= 0:
        return  # someone else already moved the lease on, or released it
    if failure:
        runtime.registry.update(lease.work_id, failures=lease.failures + 1)
    event("attempt restarted", level=logging.WARNING, work_id=lease.work_id,
          session_id=lease.session_id, attempt=attempt, reason=reason)
    runtime.metrics.inc("attempts_restarted", reason=reason.split(" (")[0])
    next_lease = runtime.registry.get(lease.work_id)
    if next_lease is not None:
        dispatch(runtime, next_lease)


def release(runtime: Runtime, lease: Lease, *, reason: str, outcome: str) -> bool:
    """Stop the work item on the server (force; 409 means already stopped) and forget it.

    A lost lease is not ours to stop. `outcome` is the metric label (completed, failed,
    stopped, lost, ...). Returns False if the stop must be retried later.
    """
    if not lease.is_lost:
        try:
            # No client retries: a 409 (already stopped) is final here, and a transient failure
            # is retried by the heartbeat task, so one release never holds a worker for seconds.
            runtime.client(max_retries=0).stop(lease.work_id, force=True)
        except (ConflictError, NotFoundError):
            pass  # already stopped, or gone: either way nothing is left to release
        except WorkAPIError as exc:
            if exc.retryable:
                _retry_release_later(runtime, lease, exc)
                return False
            event("release refused", level=logging.ERROR, work_id=lease.work_id,
                  session_id=lease.session_id, status=exc.status, error=str(exc))
    runtime.registry.delete(lease.work_id)
    runtime.metrics.inc("work_released", outcome=outcome)
    event("released", work_id=lease.work_id, session_id=lease.session_id,
          attempt=lease.attempt, reason=reason, lost=lease.is_lost or None)
    return True


def _retry_release_later(runtime: Runtime, lease: Lease, exc: WorkAPIError) -> None:
    runtime.registry.update(lease.work_id, phase=Phase.RELEASING)
    runtime.registry.request_stop(lease.work_id, StopKind.FORCE, "releasing")
    # Sooner only: postponing a due beat of a lease we still hold would let it lapse.
    runtime.registry.schedule_heartbeat(lease.work_id, time.time() + RELEASE_RETRY_SECONDS,
                                        sooner_only=True)
    event("release deferred", level=logging.WARNING, work_id=lease.work_id,
          session_id=lease.session_id, status=exc.status, error=str(exc))
