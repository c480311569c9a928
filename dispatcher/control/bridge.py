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

import contextlib
import logging
import math
import re
import signal
import time
from concurrent.futures import ThreadPoolExecutor, wait

from redis.exceptions import LockError

from dispatcher.lease import events as ev
from dispatcher.lease.replies import listed_event
from dispatcher.logs import event
from dispatcher.perprocess import PerProcess
from dispatcher.runtime import Runtime
from dispatcher.workapi import Backoff, InvalidRequestError, ListedPage, ListedWork, WorkAPIError

__all__ = ["on_running_task_revoked", "on_task_revoked", "page_size", "pages_per_tick",
           "scan_server_stops", "smaller_page"]

# Items a `list` page is asked for while few leases are held. The server may answer with fewer
# (the spec sets no size), and in any order (the spec sets none): nothing below depends on
# either. A server that refuses the size (a 400 naming `limit`) gets smaller pages, remembered
# per environment.
LIST_PAGE_SIZE = 100
# Items a page is asked for once more leases are held than LIST_PAGE_SIZE pages of
# LARGE_PAGE_AFTER cover: the service documents no maximum, and a sweep of 20,000 leases in
# pages of 100 is 200 round trips (20 s at 100 ms each; the Anthropic API's other lists take up
# to 1,000). A server that refuses it names its maximum ("limit must be 1-100"), which is then
# asked for an hour (PAGE_SIZE_MEMORY_SECONDS): one refused call an hour.
LARGE_LIST_PAGE_SIZE = 1000
LARGE_PAGE_AFTER = 10
# A tick reads one pass over its held leases' worth of items, ceil(held / page size) pages, so a
# sweep over the held items ends within a tick and a stop is seen within about a second at any
# count, as long as the held items are among the newest listed: the request rate grows with
# the leases held (one listed item a second per lease), never with the queue. At most this many
# pages a tick, where nothing else bounds it (400,000 items at pages of 1,000).
MAX_PAGES_PER_TICK = 400
# ...and for at most this share of the bridge's interval: the tick ends before the next starts
# (one pool slot is enough), and a sweep longer than that continues next tick from a cursor
# kept in Redis, so a stop is then seen within the sweep's time plus a tick, or sooner by the
# lease's next heartbeat reply. Several environments share it, in equal parts.
TICK_BUDGET_SHARE = 0.8
# A sweep's cursor outlives a tick by this much at most: a sweep left this long starts over.
CURSOR_TTL_SECONDS = 60
# A page size the server refused is remembered this long, then the full size is tried again
# (one refused page an hour), in case the server's limit was raised.
PAGE_SIZE_MEMORY_SECONDS = 3600
# A failure streak is forgotten after this long without news (the backoff cap is 8 s).
SCAN_FAILURES_TTL_SECONDS = 60
# One tick sweeps an environment at a time (a Redis lock): two ticks reading from one cursor
# (beat's ticks bunched after an outage, or two control workers) would read every page twice.
# The lock outlives the tick's budget by this much, for a page still being read at its end.
SWEEP_LOCK_SLACK_SECONDS = 30.0
# Words by which a 400 names the page size (the emulator: "limit must be 1-100").
_NAMES_PAGE_SIZE = re.compile(r"\blimit\b|page[ _]size", re.IGNORECASE)


def smaller_page(size: int, message: str) -> int | None:
    """The page size to try after a 400 with this message; None if it names no page size.

    The largest number after the words that name the size, when it is below `size` (the
    server's maximum: "limit must be 1-50" gives 50), else half of `size`; the status before
    them and the digits of a request id are no size. None at size 1: nothing smaller to try."""
    named = _NAMES_PAGE_SIZE.search(message)
    if size <= 1 or named is None:
        return None
    largest = max(map(int, re.findall(r"\b\d+\b", message[named.end():])), default=0)
    return largest if 1 <= largest < size else max(1, size // 2)


def page_size(held: int, refused: int | None) -> int:
    """The page size a tick asks for: LIST_PAGE_SIZE, or LARGE_LIST_PAGE_SIZE once more leases
    are held than LARGE_PAGE_AFTER such pages hold; never more than the size a refusal left
    (`refused`: the size asked after the server refused a larger one)."""
    wanted = LARGE_LIST_PAGE_SIZE if held > LARGE_PAGE_AFTER * LIST_PAGE_SIZE else LIST_PAGE_SIZE
    return wanted if refused is None else max(1, min(wanted, refused))


def pages_per_tick(held: int, page_size: int) -> int:
    """Pages one tick of one environment's sweep reads at most (its time budget may end it
    sooner): its held leases' worth of items, 1 page at least, MAX_PAGES_PER_TICK at most."""
    return max(1, min(MAX_PAGES_PER_TICK, math.ceil(held / max(1, page_size))))


def scan_server_stops(runtime: Runtime) -> int:
    """Hand the stops the server's list shows for leases we hold to the lease machine, a tick's
    pages per environment (each listed with its own key); returns how many leases that
    changed. An environment the server throttles, or whose last scan failed, or another tick
    sweeps, waits."""
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
    due = [e for e in held if throttled[e] <= 0 and not _paused(runtime, e)]
    deadline = time.monotonic() + TICK_BUDGET_SHARE * runtime.settings.bridge_interval_seconds
    applied = 0
    for index, environment_id in enumerate(due):
        # What is left of the tick's budget, shared by the environments still to sweep.
        until = time.monotonic() + (deadline - time.monotonic()) / (len(due) - index)
        applied += _scan_alone(runtime, environment_id, held=held[environment_id], until=until)
    return applied


def _scan_alone(runtime: Runtime, environment: str, *, held: int, until: float) -> int:
    """One tick of one environment's sweep, unless another tick sweeps it now."""
    budget = max(0.0, until - time.monotonic())
    lock = runtime.redis.lock(_state(runtime, "stop-sweep", environment),
                              timeout=budget + SWEEP_LOCK_SLACK_SECONDS, blocking=False)
    if not lock.acquire():
        return 0
    try:
        return _scan(runtime, environment, held=held, until=until)
    finally:
        with contextlib.suppress(LockError):  # lapsed after a page slower than the slack
            lock.release()


def _scan(runtime: Runtime, environment: str, *, held: int, until: float) -> int:
    """One tick of one environment's sweep: its pages, until the sweep ends, the page budget is
    spent or the time is up (after one page at least). The next page is asked for as soon as a
    page names it, and read while this one is applied and noted in Redis: a pass then takes
    about the server's time or ours, whichever is longer, not their sum. A sweep that ends
    early (every held lease seen) has read at most one page it did not need."""
    registry = runtime.registry
    if held == 0:
        registry.end_stop_scan(environment)
        return 0
    cursor = registry.stop_scan_cursor(environment)
    size = _page_size(runtime, environment, held)
    applied, pages = 0, 0
    reader = _READER.get()
    ahead = None
    try:
        page, size = _list(runtime, environment, size=size, cursor=cursor)
        while True:
            pages += 1
            # The budget at the size that got the page: a refused size makes pages smaller.
            more = (page.next_page is not None and pages < pages_per_tick(held, size)
                    and time.monotonic() < until)
            ahead = (reader.submit(_list, runtime, environment, size=size,
                                   cursor=page.next_page) if more else None)
            applied += _apply_page(runtime, page.data)
            unseen = registry.note_scanned(environment, [w.id for w in page.data],
                                           ttl_seconds=CURSOR_TTL_SECONDS)
            if page.next_page is None or unseen == 0:
                registry.end_stop_scan(environment)
                _succeeded(runtime, environment)
                return applied
            cursor = page.next_page
            if ahead is None:
                break
            page, size = ahead.result()
            ahead = None
    except WorkAPIError as exc:
        _failed(runtime, environment, exc)
        if exc.status == 400:
            registry.end_stop_scan(environment)  # a cursor the server no longer takes
        return applied
    finally:
        if ahead is not None:
            # A page read ahead that nobody will apply: the tick ends once it is in (or
            # failed), so the next tick's first read never waits behind it, and the sweep
            # lock is not released while it is still being read.
            wait([ahead])
    _succeeded(runtime, environment)
    registry.set_stop_scan_cursor(environment, cursor, ttl_seconds=CURSOR_TTL_SECONDS)
    return applied


# This process's one thread that reads a sweep's next page while a tick applies the one before:
# kept for the process's life, not started and joined each tick of each environment. Ticks run
# one at a time per environment (the sweep lock), and environments one after another in a tick,
# so one thread is enough.
_READER = PerProcess(lambda: ThreadPoolExecutor(max_workers=1, thread_name_prefix="stop-sweep"))


def _list(runtime: Runtime, environment: str, *, size: int,
          cursor: str | None) -> tuple[ListedPage, int]:
    """One page, at a size the server takes: a refused size is made smaller (and remembered)
    and asked again at once. Returns the page and the size that got it."""
    client = runtime.client(environment_id=environment, max_retries=0)
    while True:
        try:
            return client.list_states(limit=size, page=cursor), size
        except InvalidRequestError as exc:
            smaller = smaller_page(size, exc.message) if exc.status == 400 else None
            if smaller is None:
                raise
            event("list page size refused", level=logging.WARNING, environment_id=environment,
                  refused=size, next_size=smaller, error=str(exc))
            runtime.redis.set(_state(runtime, "list-page-size", environment), smaller,
                              ex=PAGE_SIZE_MEMORY_SECONDS)
            size = smaller


def _page_size(runtime: Runtime, environment: str, held: int) -> int:
    remembered = runtime.redis.get(_state(runtime, "list-page-size", environment))
    return page_size(held, int(remembered) if remembered else None)


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


def _apply_page(runtime: Runtime, works: list[ListedWork]) -> int:
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
