"""Keep every held lease alive, from ack to release, whether its session waits or runs.

Each tick takes the leases that are due from a sorted set (a Lua pop, so two heartbeat tasks
never send one lease's heartbeat with the same token: the loser would get a 412 and we would
kill a healthy session), heartbeats them concurrently (a tick of many starts them evenly over most
of its second, so the API sees a stream, not a burst), and hands each answer to the lease machine,
which says what it means (`dispatcher/lease/machine`). One slow lease costs only its own
request timeout. Leases whose release failed are retried here too, when due. While the server
throttles an environment (`control.pacing`), its due leases are handed to the machine instead,
which sends only the heartbeats whose leases would lapse before the throttle does.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from dispatcher.lease import events as ev
from dispatcher.lease.executor import AnsweredHeartbeat
from dispatcher.lease.machine import may_still_send
from dispatcher.lease.model import Heartbeater, Lease, Phase
from dispatcher.lease.replies import heartbeat_event
from dispatcher.logs import event
from dispatcher.perprocess import PerProcess
from dispatcher.runtime import Runtime
from dispatcher.settings import Environment, Settings
from dispatcher.workapi import NO_HEARTBEAT, AsyncWorkClient, Heartbeat, WorkAPIError
from dispatcher.workapi.http11 import AsyncHTTP11Transport

__all__ = ["MAX_CONCURRENT_REQUESTS", "close_sender", "heartbeat_due_leases", "pace",
           "probe_proves_link", "probe_target", "send_delays"]

T = TypeVar("T")

# One request may take this long.
REQUEST_TIMEOUT_SECONDS = 5.0
# A claimed due lease stays in flight this long (`claim_due_heartbeats`): no other tick takes
# it meanwhile. A beat that has not left a request's time before the mark lapses is not sent
# (the lease machine's `may_still_send`): it is given back, due at once (`release_unsent`).
INFLIGHT_SECONDS = REQUEST_TIMEOUT_SECONDS * 2
# Requests in flight at once, per process. Heartbeats a second = in flight / the API's latency, so
# this bounds throughput against a distant API: 5,000 leases at a 30 s TTL (500 heartbeats/s) 150 ms
# away need 75; 256 keeps 500 heartbeats/s up to 0.5 s of latency. A connection costs only a socket
# with the lean transport.
MAX_CONCURRENT_REQUESTS = 256
# Leases one tick takes; the rest stay due for the next tick (Celery beat starts one every second).
# 20,000 leases at a 30 s TTL come due at 2,000 a second: twice that leaves a tick room to catch
# up after a slow one (ticks in a threads pool also overlap: `claim_due_heartbeats` gives each
# its own leases).
BATCH_SIZE = 4000
# A tick with more leases than this starts their requests evenly over PACE_SECONDS instead of
# all at once: the API (and this process's own loop) sees a steady stream, not a burst of
# thousands each second. Each beat leaves at most PACE_SECONDS later than it was due, against
# a TTL three intervals long. Ticks of a few leases (small fleets, tests) send at once.
PACE_ABOVE = 64
PACE_SECONDS = 0.8
# A tick also takes the heartbeats due before the next tick (Celery beat starts one a second),
# and sends each when it is due (or at its paced place, whichever is later). Taken only once
# due, a heartbeat waited up to a tick for it and then its place in the pacing: that lag, and
# how much it varies from one round to the next, is what lengthens the gap between two beats
# of a lease, and with thousands of leases on a loaded host it pushed gaps past the interval's
# slack. Sent at its due time, a lease beats every interval, and the API sees the leases' own
# spread rather than a tick's burst.
LOOKAHEAD_SECONDS = 1.0
# A control worker cut off from the Work API while its peers are not would hold every lease it
# claims in flight for a request timeout, tick after tick, and let them lapse. Once a tick's
# heartbeats all failed, it claims none until one cheap request (`stats`) is answered within
# this: its ticks then find nothing to do, and the due leases go to the peers' ticks.
PROBE_TIMEOUT_SECONDS = 2.0


@dataclass
class Tally:
    sent: int = 0
    failed: int = 0
    lost: int = 0
    released: int = 0
    unanswered: int = 0  # failed with no answer at all: the connection failed or timed out
    late: int = 0  # not sent: their turn came too near their in-flight mark's end


@dataclass(frozen=True)
class Reach:
    """Whether this process reaches the Work API, as its last tick's heartbeats told."""

    cut_since: float | None = None  # when a tick's heartbeats all failed; None: reached


def reach_after(reach: Reach, tally: Tally, now: float) -> Reach:
    """Any answer (a 412 or a 503 too) proves the link; a tick whose heartbeats all went
    unanswered doubts it; a tick that sent none changes nothing."""
    if tally.sent + tally.failed > tally.unanswered:
        return Reach()
    if tally.unanswered:
        return Reach(reach.cut_since if reach.cut_since is not None else now)
    return reach


def pace(leases: int) -> float:
    """Seconds between the starts of a tick's heartbeats: 0 (all at once) for a few, else
    spread evenly over PACE_SECONDS."""
    return PACE_SECONDS / leases if leases > PACE_ABOVE else 0.0


def send_delays(dues: list[float], now: float) -> list[float]:
    """Seconds from `now` until each of a tick's heartbeats leaves (`dues`: when each is due,
    soonest first): when it is due, but never before its place in the tick's pacing, so
    heartbeats due together (a burst of claims) still leave spread out."""
    spacing = pace(len(dues))
    return [max(due - now, index * spacing, 0.0) for index, due in enumerate(dues)]


def heartbeat_due_leases(runtime: Runtime) -> Tally:
    """One tick: heartbeat (or retry the release of) every lease that is due; a process that
    doubts its link to the Work API takes none until a probe is answered."""
    sender = _sender()
    if sender.reach.cut_since is not None and not _probe(runtime, sender):
        return Tally()
    tally = _heartbeat_due(runtime)
    sender.reach = reach_after(sender.reach, tally, time.monotonic())
    return tally


def probe_target(throttled: dict[str, float]) -> str | None:
    """The environment whose `stats` probes the link (`throttled`: each environment's seconds
    of throttle left, in the fleet's order): the first the server does not throttle. None while
    it throttles them all: the probe waits as every other request does, and the due leases stay
    for peers (or for this process, once the throttle lapses)."""
    return next((name for name, seconds in throttled.items() if seconds <= 0), None)


def probe_proves_link(outcome: WorkAPIError | None) -> bool:
    """Any answer proves the link, as for a tick's heartbeats (`reach_after`): a 429 or 503 to
    the probe is the server speaking; only no answer at all (refused, reset, timed out) leaves
    it doubted."""
    return outcome is None or outcome.status is not None


def _probe(runtime: Runtime, sender: _Sender) -> bool:
    environment_id = probe_target(runtime.pacing.remaining_all(
        [environment.id for environment in runtime.environments]))
    if environment_id is None:
        return False
    environment = next(e for e in runtime.environments if e.id == environment_id)
    outcome: WorkAPIError | None = None
    try:
        sender.run(_stats(sender, runtime.settings, environment),
                   timeout=PROBE_TIMEOUT_SECONDS + REQUEST_TIMEOUT_SECONDS)
    except TimeoutError:
        return False
    except WorkAPIError as exc:
        outcome = exc
        runtime.pacing.note(environment.id, status=exc.status, retry_after=exc.retry_after,
                            source="probe")
    if not probe_proves_link(outcome):
        return False
    assert sender.reach.cut_since is not None
    event("work api reachable again", environment_id=environment.id,
          after_seconds=round(time.monotonic() - sender.reach.cut_since, 1),
          action_taken="heartbeats resumed")
    sender.reach = Reach()
    return True


async def _stats(sender: _Sender, settings: Settings, environment: Environment) -> None:
    client = await sender.client(settings, environment)
    await asyncio.wait_for(client.stats(), PROBE_TIMEOUT_SECONDS)


def _heartbeat_due(runtime: Runtime) -> Tally:
    claimed = time.monotonic()
    horizon = runtime.registry.clock.now() + LOOKAHEAD_SECONDS
    due = runtime.registry.claim_due_heartbeats(now=horizon, limit=BATCH_SIZE,
                                                inflight_seconds=INFLIGHT_SECONDS)
    if not due:
        return Tally()
    found = runtime.registry.get_many(due)
    runtime.executor.unschedule_gone(set(due) - {lease.work_id for lease in found})
    leases = _served(runtime, found)
    leases, through = _paced(runtime, leases)
    tally = _send_heartbeats(
        runtime, [lease for lease in leases if _heartbeated_by_us(lease)] + through, due,
        claimed=claimed, mark=horizon + INFLIGHT_SECONDS)
    for lease in leases:
        if lease.phase == Phase.RELEASING:
            tally.released += _retry_release(runtime, lease.work_id)
    return tally


def _paced(runtime: Runtime, leases: list[Lease]) -> tuple[list[Lease], list[Lease]]:
    """The server's pacing: the leases of environments it does not throttle, and those of
    environments it does whose heartbeat the machine sends all the same (their leases would
    lapse before the throttle does). The others wait: the machine schedules them, their release
    retries too, for when the throttle lapses or the lease can wait no longer."""
    throttled = runtime.pacing.remaining_all({lease.environment_id for lease in leases})
    free: list[Lease] = []
    through: list[Lease] = []
    for lease in leases:
        seconds = throttled[lease.environment_id]
        if seconds <= 0:
            free.append(lease)
        else:
            runtime.executor.heartbeat(lease, ev.HeartbeatThrottled(seconds), answered=[],
                                       through=through)
    return free, through


def _served(runtime: Runtime, leases: list[Lease]) -> list[Lease]:
    """The leases of environments this fleet serves. One of an environment no longer
    configured has no key to heartbeat it with: it is not heartbeated with another environment's key
    (logged, and due again once its in-flight mark lapses: a worker that serves it may take
    it), and the server hands it out again after its TTL."""
    served = {e.id for e in runtime.environments}
    for lease in leases:
        if lease.environment_id not in served:
            event("lease of an unknown environment", level=logging.WARNING,
                  work_id=lease.work_id, environment_id=lease.environment_id[:100],
                  action_taken="no heartbeat sent")
    return [lease for lease in leases if lease.environment_id in served]


def _heartbeated_by_us(lease: Lease) -> bool:
    """A lease whose release keeps failing still gets heartbeats while we hold its token: were it to
    lapse, the server would hand the finished session out again."""
    return lease.heartbeats_by == Heartbeater.DISPATCHER and not lease.lost


def _send_heartbeats(runtime: Runtime, leases: list[Lease], due: Mapping[str, float], *,
                     claimed: float, mark: float) -> Tally:
    """Send the heartbeats of `leases` (`due`: when each was due; `claimed`: when the tick took
    them, `mark`: their in-flight deadline) and hand each answer to the machine. Those not sent
    in time are due again at once, not when their mark lapses: a tick that falls behind would
    otherwise add the mark's length to their gap, and a lease a tick drops twice lapses."""
    tally = Tally()
    if not leases:
        return tally
    sender = _sender()
    # However slow the API, each request ends within its timeout, waiting its turn included.
    bound = (REQUEST_TIMEOUT_SECONDS * (2 * len(leases) / MAX_CONCURRENT_REQUESTS + 2)
             + PACE_SECONDS + LOOKAHEAD_SECONDS)
    keys = {e.id: e for e in runtime.environments}
    now = runtime.registry.clock.now()
    offset = now - time.time()
    delays = send_delays([due.get(lease.work_id, now) for lease in leases], now)
    outcomes = sender.run(_send_all(sender, runtime.settings, keys, leases, delays,
                                    offset=offset, claimed=claimed), timeout=bound)
    beats: list[AnsweredHeartbeat] = []
    results: Counter[tuple[str, str]] = Counter()
    unsent: dict[str, float] = {}
    for lease, outcome, sent_at in outcomes:
        if outcome is None:
            tally.late += 1
            unsent[lease.work_id] = due.get(lease.work_id, now)
            continue
        answered = isinstance(outcome, Heartbeat)
        tally.sent += answered
        tally.failed += not answered
        tally.unanswered += isinstance(outcome, WorkAPIError) and outcome.status is None
        results[lease.environment_id, "ok" if answered else "failed"] += 1
        if isinstance(outcome, WorkAPIError):  # a 429 or 503 throttles the whole environment
            runtime.pacing.note(lease.environment_id, status=outcome.status,
                                retry_after=outcome.retry_after, source="heartbeat")
        after = runtime.executor.heartbeat(
            lease, heartbeat_event(outcome, sent_at, due.get(lease.work_id, 0.0)), answered=beats)
        tally.lost += after is None or after.lost
    runtime.executor.record_heartbeats(beats)
    for (environment, result), count in results.items():
        runtime.metrics.inc("heartbeats", count, result=result, environment=environment)
    if tally.late:
        runtime.registry.release_unsent(unsent, mark=mark)
        event("heartbeats not sent in time", level=logging.WARNING, leases=tally.late,
              action_taken="due again at once")
    if tally.unanswered and tally.unanswered == len(leases) - tally.late \
            and sender.reach.cut_since is None:
        event("work api unreachable", level=logging.WARNING, failed=tally.failed,
              action_taken="no lease taken until a probe is answered")
    return tally


def _retry_release(runtime: Runtime, work_id: str) -> int:
    lease = runtime.registry.get(work_id)  # as the heartbeat just left it (it may be lost now)
    if lease is None or lease.phase != Phase.RELEASING:
        return 0
    return int(runtime.executor.run(lease, ev.ReleaseDue()) is None)


class _Limit:
    """At most `size` holders at once, the others served first come first served, each acquire
    and release in constant time. `asyncio.Semaphore` (Python 3.11) walks its queue of waiters
    on every acquire and release: with a tick's thousands of beats waiting their turn that was a
    fifth of the tick's CPU."""

    def __init__(self, size: int) -> None:
        self._free = size
        self._waiters: deque[asyncio.Future[None]] = deque()

    async def acquire(self) -> None:
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # handed a place just as it was cancelled: pass it on
            raise

    def release(self) -> None:
        """Hand the place to the first waiter still waiting, else free it."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self._free += 1


class _Sender:
    """One event loop per process, in its own thread, with one HTTP client per configuration:
    connections outlive ticks (no TCP or TLS set-up per tick, no client built per tick), and
    ticks running at once in a threads pool share one limit of requests in flight."""

    # Configurations kept at once: one per environment the fleet serves, and a runtime per test
    # in the tests. An idle client holds only its idle connections.
    MAX_CLIENTS = 64

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.clients: dict[tuple[Any, ...], AsyncWorkClient] = {}
        self.reach = Reach()
        self._limit: _Limit | None = None
        self._thread = threading.Thread(target=self.loop.run_forever,
                                        name="dispatcher-heartbeat", daemon=True)
        self._thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T], *, timeout: float) -> T:
        """Run on the sender's loop and wait (from any thread but the loop's own). Every
        request has its own timeout; `timeout` only bounds a tick that met a sender being
        closed at worker shutdown."""
        future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise

    def limit(self) -> _Limit:  # made in the loop's thread, on first use
        if self._limit is None:
            self._limit = _Limit(MAX_CONCURRENT_REQUESTS)
        return self._limit

    async def client(self, settings: Settings, environment: Environment) -> AsyncWorkClient:
        """The client of one environment, with its key."""
        key = (settings.base_url, environment.id, environment.key, settings.api_key,
               settings.worker_id, settings.http_timeout_seconds)
        client = self.clients.get(key)
        if client is None:
            while len(self.clients) >= self.MAX_CLIENTS:
                await self.clients.pop(next(iter(self.clients))).close()
            client = self.clients[key] = AsyncWorkClient.from_settings(
                settings, environment_id=environment.id,
                environment_key=environment.key.get_secret_value(),
                max_retries=0, transport=AsyncHTTP11Transport.for_url(
                    settings.base_url, max_connections=MAX_CONCURRENT_REQUESTS))
        return client

    def close(self) -> None:
        async def close_all() -> None:
            while self.clients:
                await self.clients.popitem()[1].close()

        try:
            self.run(close_all(), timeout=REQUEST_TIMEOUT_SECONDS)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=5)
            if not self._thread.is_alive():
                self.loop.close()


# This process's sender; a forked child makes its own (threads do not survive a fork).
_senders: PerProcess[_Sender] = PerProcess(lambda: _Sender())


def _sender() -> _Sender:
    return _senders.get()


def close_sender() -> None:
    """Close this process's HTTP connections and stop its loop (worker shutdown)."""
    sender = _senders.pop()
    if sender is not None:
        sender.close()


async def _send_all(
    sender: _Sender, settings: Settings, environments: dict[str, Environment],
    leases: list[Lease], delays: list[float], *, offset: float, claimed: float
) -> list[tuple[Lease, Heartbeat | WorkAPIError | None, float]]:
    """Heartbeat every lease with its own environment's client, each after its delay; all
    share one limit in flight. Each send time is the fleet's clock: this host's plus `offset`
    (measured outside the loop, which must not wait on Redis). A beat whose turn comes too late
    (the machine's `may_still_send`) is not sent: None."""
    clients = {e: await sender.client(settings, environments[e])
               for e in {lease.environment_id for lease in leases}}
    limit = sender.limit()

    async def one(delay: float,
                  lease: Lease) -> tuple[Lease, Heartbeat | WorkAPIError | None, float]:
        client = clients[lease.environment_id]
        if delay > 0:
            await asyncio.sleep(delay)
        await limit.acquire()
        try:
            if not may_still_send(claimed, time.monotonic(),
                                  request_seconds=REQUEST_TIMEOUT_SECONDS,
                                  inflight_seconds=INFLIGHT_SECONDS):
                return lease, None, 0.0
            sent_at = time.time() + offset
            try:
                reply = await client.heartbeat(
                    lease.work_id,
                    expected_last_heartbeat=lease.token or NO_HEARTBEAT,
                    desired_ttl_seconds=settings.desired_ttl_seconds,
                    timeout=REQUEST_TIMEOUT_SECONDS,
                )
            except WorkAPIError as exc:
                return lease, exc, sent_at
            return lease, reply, sent_at
        finally:
            limit.release()

    return list(await asyncio.gather(*(one(d, lease) for d, lease in zip(delays, leases,
                                                                          strict=True))))
