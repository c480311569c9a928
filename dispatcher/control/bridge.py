"""The revocation bridge: server stops become sandbox stops, operator revokes become server stops.

Server to fleet. A heartbeat reply shows a stop within one heartbeat interval (up to 30 s);
scanning `list` for `stop_requested_at` every second shows it within about a second. Either way
the stop becomes the lease's stop flag (the record; Celery's revoke is in memory and lost when
no worker is up) plus a revoke of the session task when it still waits in a queue, so it never
starts.

Fleet to server. A session task revoked by an operator (Flower, `celery control revoke`) fires
`task_revoked` in the worker; if that task is the lease's current attempt, the lease gets an
`operator` stop flag, and its release stops the work item on the server.
"""

from __future__ import annotations

import logging

from dispatcher.events import event
from dispatcher.lease.executor import release
from dispatcher.lease.registry import Lease, Phase, StopKind, epoch_of
from dispatcher.runtime import Runtime
from dispatcher.workapi import Work, WorkAPIError, WorkState

__all__ = ["on_task_revoked", "scan_server_stops"]

LIST_PAGE_SIZE = 100  # the most `list` returns at once
# Pages one tick reads at most: 1,000 items a second, whatever the fleet holds. While the items
# newer than the oldest held one fit (1,000 leases or so), each tick reads them all and a stop is
# seen within a second, as ever; beyond, a sweep of them spans several ticks (continuing from
# a cursor kept in Redis) and a stop is seen within ceil(items / 1,000) seconds (5 s at 5,000
# leases), or sooner by the lease's next heartbeat reply. Reading all of them every second would
# cost the API, and the control worker, N / 100 `list` calls a second.
LIST_PAGES_PER_TICK = 10
# A sweep's cursor outlives a tick by this much at most: a sweep left this long starts over.
CURSOR_TTL_SECONDS = 60


def scan_server_stops(runtime: Runtime) -> int:
    """Apply the stops the server has for leases we hold, reading `list` newest first, at most
    LIST_PAGES_PER_TICK pages a tick; returns how many were new."""
    registry = runtime.registry
    oldest, cursor = registry.stop_scan_start()
    if oldest is None:  # nothing held: no call at all
        return 0
    applied = 0
    try:
        for _ in range(LIST_PAGES_PER_TICK):
            page = runtime.client().list(limit=LIST_PAGE_SIZE, page=cursor)
            applied += _apply_page(runtime, page.data)
            # Newest first: once past the oldest item we hold, nothing further can be ours.
            if not page.next_page or any(epoch_of(w.created_at) < oldest for w in page.data):
                cursor = None
                break
            cursor = page.next_page
    except WorkAPIError as exc:
        event("stop scan failed", level=logging.WARNING, status=exc.status, error=str(exc))
        if exc.status == 400:
            cursor = None  # a cursor the server no longer takes: start again from the newest
    registry.set_stop_scan_cursor(cursor, ttl_seconds=CURSOR_TTL_SECONDS)
    return applied


def _apply_page(runtime: Runtime, works: list[Work]) -> int:
    stopping = {w.id: w for w in works if w.state in (WorkState.STOPPED, WorkState.STOPPING)
                or w.stop_requested_at}
    applied = 0
    for work_id in runtime.registry.held_among(list(stopping)):
        lease = runtime.registry.get(work_id)
        if lease is not None and _apply_server_state(runtime, lease, stopping[work_id]):
            applied += 1
    return applied


def _apply_server_state(runtime: Runtime, lease: Lease, work: Work) -> bool:
    if work.state == WorkState.STOPPED:
        if lease.is_lost:
            return False  # already known: its supervisor is killing it
        return request_stop(runtime, lease, StopKind.FORCE, cause="server stopped", lost=True)
    if work.state == WorkState.STOPPING or work.stop_requested_at:
        return request_stop(runtime, lease, StopKind.GRACEFUL, cause="server")
    return False


def request_stop(
    runtime: Runtime, lease: Lease, kind: StopKind, *, cause: str, lost: bool = False
) -> bool:
    """Raise the lease's stop flag and, if its task has not started, revoke it."""
    if lost:
        runtime.registry.mark_lost(lease.work_id, cause)
    if not runtime.registry.request_stop(lease.work_id, kind, cause) and not lost:
        return False
    runtime.metrics.inc("work_stop_requests", cause=cause)
    event("stop requested", work_id=lease.work_id, session_id=lease.session_id,
          attempt=lease.attempt, kind=kind.value, cause=cause, seen_by="bridge")
    if lease.phase == Phase.DISPATCHED:
        # Not started yet: revoke the queued task so it never starts, and release now rather
        # than when some worker meets the message (the task finds no lease and exits).
        runtime.app.control.revoke(lease.task_id)
        stopped = runtime.registry.get(lease.work_id)
        if stopped is not None and stopped.phase == Phase.DISPATCHED:
            release(runtime, stopped, reason=f"stopped while queued ({cause})",
                    outcome="stopped")
    return True


def on_task_revoked(runtime: Runtime, *, task_id: str, work_id: str, terminated: bool,
                    signum: int | None) -> None:
    """An operator revoked a session task: stop its work item on the server too."""
    lease = runtime.registry.get(work_id)
    if lease is None or lease.task_id != task_id:
        return  # a stale attempt, or a lease already released: nothing of the server's to stop
    if lease.phase == Phase.RUNNING and terminated:
        # The supervisor (or, after SIGKILL, recovery) honours the flag and releases the lease.
        kind = StopKind.FORCE if signum == 9 else StopKind.GRACEFUL
        runtime.registry.request_stop(work_id, kind, "operator")
        runtime.metrics.inc("work_stop_requests", cause="operator")
        event("stop requested", work_id=work_id, session_id=lease.session_id,
              attempt=lease.attempt, kind=kind.value, cause="operator", seen_by="revoke")
        return
    if lease.phase != Phase.RUNNING:
        # Discarded before it started: nobody else will release it.
        if not lease.stop:
            runtime.registry.request_stop(work_id, StopKind.FORCE, "operator")
        release(runtime, lease, outcome="stopped",
                reason=f"revoked before start ({lease.stop_cause or 'operator'})")
