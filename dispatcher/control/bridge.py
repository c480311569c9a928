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
import signal

from dispatcher.lease import events as ev
from dispatcher.lease.replies import listed_event
from dispatcher.logs import event
from dispatcher.runtime import Runtime
from dispatcher.workapi import Work, WorkAPIError

__all__ = ["on_task_revoked", "scan_server_stops"]

# Items a `list` page is asked for. The server may answer with fewer (the spec sets no size), and
# in any order (the spec sets none): nothing below depends on either.
LIST_PAGE_SIZE = 100
# Pages one tick reads at most: 1,000 items a second at full pages, whatever the fleet holds. A
# sweep pages through `list` until every held item has been listed, or the list ends; a sweep
# longer than a tick's budget continues next tick from a cursor kept in Redis, so a stop is seen
# within ceil(items before the last held one / 1,000) seconds, or sooner by the lease's next
# heartbeat reply. Reading the whole list every second would cost the API, and the control
# worker, N / 100 `list` calls a second.
LIST_PAGES_PER_TICK = 10
# A sweep's cursor outlives a tick by this much at most: a sweep left this long starts over.
CURSOR_TTL_SECONDS = 60


def scan_server_stops(runtime: Runtime) -> int:
    """Hand the stops the server's list shows for leases we hold to the lease machine, at most
    LIST_PAGES_PER_TICK pages a tick per environment (each listed with its own key); returns
    how many leases that changed."""
    if runtime.registry.held_count() == 0:  # nothing held: no call at all
        for environment in runtime.environments:
            runtime.registry.end_stop_scan(environment.id)
        return 0
    held = runtime.registry.held_by_environment(e.id for e in runtime.environments)
    if len(held) == 1:
        # The only environment holds every lease, also those recorded before the index of
        # leases per environment existed (a fleet upgraded while holding them).
        held = dict.fromkeys(held, runtime.registry.held_count())
    return sum(_scan(runtime, environment, held=held[environment])
               for environment in held)


def _scan(runtime: Runtime, environment: str, *, held: int) -> int:
    """One tick of one environment's sweep."""
    registry = runtime.registry
    if held == 0:
        registry.end_stop_scan(environment)
        return 0
    cursor = registry.stop_scan_cursor(environment)
    applied = 0
    try:
        for _ in range(LIST_PAGES_PER_TICK):
            page = runtime.client(environment_id=environment).list(limit=LIST_PAGE_SIZE,
                                                                   page=cursor)
            applied += _apply_page(runtime, page.data)
            unseen = registry.note_scanned(environment, [w.id for w in page.data],
                                           ttl_seconds=CURSOR_TTL_SECONDS)
            if not page.next_page or unseen == 0:
                registry.end_stop_scan(environment)
                return applied
            cursor = page.next_page
    except WorkAPIError as exc:
        event("stop scan failed", level=logging.WARNING, environment_id=environment,
              status=exc.status, error=str(exc))
        if exc.status == 400:
            registry.end_stop_scan(environment)  # a cursor the server no longer takes
            return applied
    if cursor is not None:
        registry.set_stop_scan_cursor(environment, cursor, ttl_seconds=CURSOR_TTL_SECONDS)
    return applied


def _apply_page(runtime: Runtime, works: list[Work]) -> int:
    """Hand each held item the server stops (or stopped) to the lease machine."""
    stopping = {w.id: w for w in works if listed_event(w) is not None}
    applied = 0
    for work_id in runtime.registry.held_among(list(stopping)):
        lease = runtime.registry.get(work_id)
        listed = listed_event(stopping[work_id])
        if lease is None or listed is None:
            continue
        after = runtime.executor.run(lease, listed)
        applied += after != lease
    return applied


def on_task_revoked(runtime: Runtime, *, task_id: str, work_id: str, terminated: bool,
                    signum: int | None) -> None:
    """An operator revoked a session task: the machine stops its work item on the server too."""
    lease = runtime.registry.get(work_id)
    runtime.executor.run(lease, ev.OperatorRevoked(task_id, terminated,
                                                   force=signum == signal.SIGKILL))
