"""The revocation bridge: server stops become sandbox stops, operator revokes become server stops.

Server to fleet. A heartbeat reply shows a stop within one heartbeat interval (up to 30 s);
scanning `list` for `stop_requested_at` every second shows it within about a second. Either way
the stop becomes the lease's stop flag (the record; Celery's revoke is in memory and lost when
no worker is up) plus a revoke of the session task when it still waits in a queue, so it never
starts. The scan keeps to the server's pacing (`control.pacing`), backs off after an error, and
asks for smaller pages when the server refuses the size.

Fleet to server. A session task revoked by an operator (Flower, `celery control revoke`) fires
`task_revoked` in the worker; if that task is the lease's current attempt, the lease gets an
`operator` stop flag, and its release stops the work item on the server.
"""

from __future__ import annotations

import logging
import math
import re
import signal

from dispatcher.lease import events as ev
from dispatcher.lease.replies import listed_event
from dispatcher.logs import event
from dispatcher.runtime import Runtime
from dispatcher.workapi import Backoff, InvalidRequestError, Work, WorkAPIError, WorkPage

__all__ = ["on_running_task_revoked", "on_task_revoked", "pages_per_tick", "scan_server_stops",
           "smaller_page"]

# Items a `list` page is asked for at first. The server may answer with fewer (the spec sets no
# size), and in any order (the spec sets none): nothing below depends on either. A server that
# refuses the size (a 400 naming `limit`) gets smaller pages, remembered per environment.
LIST_PAGE_SIZE = 100
# A tick reads about as many items as the environment has leases held, up to this many: a
# stop is seen within a second up to 1,000 held leases, as long as the held items are among
# the newest listed. A sweep longer than a tick's budget continues next tick from a cursor kept
# in Redis, so a stop is seen within ceil(items before the last held one / budget) seconds, or
# sooner by the lease's next heartbeat reply.
LIST_ITEMS_PER_TICK = 1000
# ...in this many pages at most, whatever page size the server takes: the bridge's request rate
# per environment is bounded (20 a tick, at 1,000 held leases and pages of 50 or fewer). With
# few leases held it reads one page a tick: 10,000 queued items cost one call a second, not
# ten, and a stop buried under them is seen by the heartbeat reply.
MAX_PAGES_PER_TICK = 20
# A sweep's cursor outlives a tick by this much at most: a sweep left this long starts over.
CURSOR_TTL_SECONDS = 60
# A page size the server refused is remembered this long, then the full size is tried again
# (one refused page an hour), in case the server's limit was raised.
PAGE_SIZE_MEMORY_SECONDS = 3600
# A failure streak is forgotten after this long without news (the backoff cap is 8 s).
SCAN_FAILURES_TTL_SECONDS = 60
# Words by which a 400 names the page size (the emulator: "limit must be 1-100").
_NAMES_PAGE_SIZE = re.compile(r"\blimit\b|page[ _]size", re.IGNORECASE)


def smaller_page(size: int, message: str) -> int | None:
    """The page size to try after a 400 with this message; None if it names no page size.

    The largest number in the message when it is below `size` (the server's maximum: "limit
    must be 1-50" gives 50), else half of `size`. None at size 1: nothing smaller to try."""
    if size <= 1 or not _NAMES_PAGE_SIZE.search(message):
        return None
    largest = max(map(int, re.findall(r"\d+", message)), default=0)
    return largest if 1 <= largest < size else max(1, size // 2)


def pages_per_tick(held: int, page_size: int) -> int:
    """Pages one tick of one environment's sweep reads: enough for its held leases' worth of
    items (LIST_ITEMS_PER_TICK at most), in MAX_PAGES_PER_TICK pages at most, 1 at least."""
    wanted = math.ceil(min(held, LIST_ITEMS_PER_TICK) / max(1, page_size))
    return max(1, min(MAX_PAGES_PER_TICK, wanted))


def scan_server_stops(runtime: Runtime) -> int:
    """Hand the stops the server's list shows for leases we hold to the lease machine, a tick's
    pages per environment (each listed with its own key); returns how many leases that
    changed. An environment the server throttles, or whose last scan failed, waits."""
    if runtime.registry.held_count() == 0:  # nothing held: no call at all
        for environment in runtime.environments:
            runtime.registry.end_stop_scan(environment.id)
        return 0
    held = runtime.registry.held_by_environment(e.id for e in runtime.environments)
    if len(held) == 1:
        # The only environment holds every lease, also those recorded before the index of
        # leases per environment existed (a fleet upgraded while holding them).
        held = dict.fromkeys(held, runtime.registry.held_count())
    throttled = runtime.pacing.remaining_all(held)
    return sum(_scan(runtime, environment, held=held[environment])
               for environment in held
               if throttled[environment] <= 0 and not _paused(runtime, environment))


def _scan(runtime: Runtime, environment: str, *, held: int) -> int:
    """One tick of one environment's sweep."""
    registry = runtime.registry
    if held == 0:
        registry.end_stop_scan(environment)
        return 0
    cursor = registry.stop_scan_cursor(environment)
    size = _page_size(runtime, environment)
    applied = 0
    try:
        for _ in range(pages_per_tick(held, size)):
            page, size = _list(runtime, environment, size=size, cursor=cursor)
            applied += _apply_page(runtime, page.data)
            unseen = registry.note_scanned(environment, [w.id for w in page.data],
                                           ttl_seconds=CURSOR_TTL_SECONDS)
            if not page.next_page or unseen == 0:
                registry.end_stop_scan(environment)
                _succeeded(runtime, environment)
                return applied
            cursor = page.next_page
    except WorkAPIError as exc:
        _failed(runtime, environment, exc)
        if exc.status == 400:
            registry.end_stop_scan(environment)  # a cursor the server no longer takes
        return applied
    _succeeded(runtime, environment)
    if cursor is not None:
        registry.set_stop_scan_cursor(environment, cursor, ttl_seconds=CURSOR_TTL_SECONDS)
    return applied


def _list(runtime: Runtime, environment: str, *, size: int,
          cursor: str | None) -> tuple[WorkPage, int]:
    """One page, at a size the server takes: a refused size is made smaller (and remembered)
    and asked again at once. Returns the page and the size that got it."""
    client = runtime.client(environment_id=environment, max_retries=0)
    while True:
        try:
            return client.list(limit=size, page=cursor), size
        except InvalidRequestError as exc:
            smaller = smaller_page(size, exc.message) if exc.status == 400 else None
            if smaller is None:
                raise
            event("list page size refused", level=logging.WARNING, environment_id=environment,
                  refused=size, next_size=smaller, error=str(exc))
            runtime.redis.set(_state(runtime, "list-page-size", environment), smaller,
                              ex=PAGE_SIZE_MEMORY_SECONDS)
            size = smaller


def _page_size(runtime: Runtime, environment: str) -> int:
    remembered = runtime.redis.get(_state(runtime, "list-page-size", environment))
    return int(remembered) if remembered else LIST_PAGE_SIZE


def _state(runtime: Runtime, name: str, environment: str) -> str:
    """The bridge's own state of one environment's scan, under `lock:` beside the poller's."""
    return f"{runtime.settings.key_prefix}:lock:{name}:{environment}"


def _paused(runtime: Runtime, environment: str) -> bool:
    return bool(runtime.redis.exists(_state(runtime, "scan-paused", environment)))


def _failed(runtime: Runtime, environment: str, exc: WorkAPIError) -> None:
    """The server's pacing when it asks for it (the throttle gates the next scans), else a
    backoff: the next scans of this environment wait (every member's: both live in Redis)."""
    delay = runtime.pacing.note(environment, status=exc.status, retry_after=exc.retry_after,
                                source="list")
    if delay is None:
        failures_key = _state(runtime, "scan-failures", environment)
        streak = int(runtime.redis.get(failures_key) or 0)
        delay = Backoff(attempt=streak).next_delay()
        pipe = runtime.redis.pipeline(transaction=False)
        pipe.set(failures_key, streak + 1, ex=SCAN_FAILURES_TTL_SECONDS)
        pipe.set(_state(runtime, "scan-paused", environment), 1, px=max(1, int(delay * 1000)))
        pipe.execute()
    event("stop scan failed", level=logging.WARNING, environment_id=environment,
          status=exc.status, delay_seconds=round(delay, 2), error=str(exc))


def _succeeded(runtime: Runtime, environment: str) -> None:
    runtime.redis.delete(_state(runtime, "scan-failures", environment))


def _apply_page(runtime: Runtime, works: list[Work]) -> int:
    """Hand each held item the server stops (or stopped) to the lease machine."""
    stopping = {w.id: w for w in works if listed_event(w) is not None}
    applied = 0
    # The held ones' records in one round trip: a page can list a hundred stopping items we
    # hold (a fleet told to stop at scale), and a read each cost the tick a round trip each.
    held = runtime.registry.get_many(runtime.registry.held_among(list(stopping)))
    for lease in held:
        listed = listed_event(stopping[lease.work_id])
        if listed is None:
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


def on_running_task_revoked(runtime: Runtime, *, task_id: str, work_id: str) -> None:
    """An operator's plain revoke (no terminate) of a session task already running in a prefork
    child, seen by the worker's main process: the graceful stop the threads pool's supervisor
    makes of it (it reads the revoked set the child cannot see), the item stopped with it."""
    lease = runtime.registry.get(work_id)
    runtime.executor.run(lease, ev.OperatorRevoked(task_id, terminated=True, force=False))
