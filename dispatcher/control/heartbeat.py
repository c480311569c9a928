"""Keep every held lease alive, from ack to release, whether its session waits or runs.

Each tick takes the leases that are due from a sorted set (a Lua pop, so two heartbeat tasks
never beat the same lease with the same token: the loser would get a 412 and we would kill a
healthy session), heartbeats them concurrently, and schedules each one's next beat from the
`ttl_seconds` the server answered. One slow lease costs only its own request timeout.

What a reply means, as the official workers read it:

===========================================  ==============================================
reply                                        action
===========================================  ==============================================
200 ``active``/``starting``                  keep the exact ``last_heartbeat`` token
200 ``stopping``                             graceful stop of the sandbox, keep beating
200 ``stopped`` or ``lease_extended: false``  lease gone: kill now, release nothing
412 to a first claim, nobody holding it       claim again in a second; stop it after a TTL
412, 404                                     lease gone (another holder, or no item)
other fatal 4xx                              kill now, then force-stop the item
transient, for less than the TTL             retry in a second
transient, for longer than the TTL           lease assumed lost: kill now
===========================================  ==============================================
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from dispatcher.events import event
from dispatcher.lease.executor import release
from dispatcher.lease.registry import Lease, Phase, StopKind
from dispatcher.runtime import Runtime
from dispatcher.settings import Settings
from dispatcher.workapi import (
    NO_HEARTBEAT,
    AsyncWorkClient,
    ConflictError,
    Heartbeat,
    LeasePreconditionFailed,
    NotFoundError,
    WorkAPIError,
    WorkState,
)
from dispatcher.workapi.http11 import AsyncHTTP11Transport

__all__ = ["apply_first_heartbeat", "beat_due_leases", "close_sender", "heartbeat_interval",
           "retry_claim", "unclaimed_refusal"]

T = TypeVar("T")

# The official workers beat every ttl/2, at most every 30 s; we beat every ttl/3 so one failed
# beat still leaves a retry inside the TTL.
INTERVAL_SHARE_OF_TTL = 1 / 3
MAX_INTERVAL_SECONDS = 30.0
MIN_INTERVAL_SECONDS = 1.0
# A lease's TTL before the server first answered (the SDKs assume 30-90 s; we assume less).
ASSUMED_TTL_SECONDS = 30
RETRY_SECONDS = 1.0
# One request may take this long; it is also how long a claimed due lease stays in flight.
REQUEST_TIMEOUT_SECONDS = 5.0
# Requests in flight at once, per process. Beats a second = in flight / the API's latency, so
# this bounds throughput against a distant API: 5,000 leases at a 30 s TTL (500 beats/s) 150 ms
# away need 75; 64 measurably fell behind there. 256 keeps 500 beats/s up to 0.5 s of latency.
# A connection costs only a socket with the lean transport (httpx's pool scanned them all).
MAX_CONCURRENT_REQUESTS = 256
# Leases one tick takes; the rest stay due for the next tick (beat runs every second).
BATCH_SIZE = 2000


def heartbeat_interval(ttl_seconds: int) -> float:
    return max(MIN_INTERVAL_SECONDS, min(ttl_seconds * INTERVAL_SHARE_OF_TTL, MAX_INTERVAL_SECONDS))


@dataclass
class Tally:
    sent: int = 0
    failed: int = 0
    lost: int = 0
    released: int = 0


def beat_due_leases(runtime: Runtime) -> Tally:
    """One tick: beat (or retry the release of) every lease that is due."""
    now = time.time()
    ids = runtime.registry.claim_due_heartbeats(
        now=now, limit=BATCH_SIZE, inflight_seconds=REQUEST_TIMEOUT_SECONDS * 2
    )
    if not ids:
        return Tally()
    leases = runtime.registry.get_many(ids)
    for gone in set(ids) - {lease.work_id for lease in leases}:
        runtime.registry.unschedule_heartbeat(gone)
    # A lease whose release keeps failing is still beaten while we hold its token: were it to
    # lapse, the server would hand the finished session out again.
    beating = [lease for lease in leases if lease.heartbeats_by == "dispatcher"]
    tally = Tally()
    sender = _sender()
    # However slow the API, each request ends within its timeout, waiting its turn included.
    bound = REQUEST_TIMEOUT_SECONDS * (2 * len(beating) / MAX_CONCURRENT_REQUESTS + 2)
    outcomes = (sender.run(_send_all(sender, runtime.settings, beating), timeout=bound)
                if beating else [])
    plain: list[tuple[str, str, int, float]] = []
    for lease, outcome, sent_at in outcomes:
        if isinstance(outcome, Heartbeat) and _is_plain(outcome):
            # The common case, a lease extended and nothing to act on: recorded for the whole
            # tick at once below.
            tally.sent += 1
            plain.append((lease.work_id, outcome.last_heartbeat, _ttl(outcome),
                          sent_at + heartbeat_interval(_ttl(outcome))))
        else:
            _apply(runtime, lease, outcome, tally, sent_at=sent_at)
    if plain:
        runtime.registry.record_beats(plain, ok_at=time.time())
    if tally.sent:
        runtime.metrics.inc("heartbeats", tally.sent, result="ok")
    if tally.failed:
        runtime.metrics.inc("heartbeats", tally.failed, result="failed")
    for lease in leases:
        if lease.phase == Phase.RELEASING and _retry_release(runtime, lease.work_id):
            tally.released += 1
    return tally


def _is_plain(reply: Heartbeat) -> bool:
    """A reply that only extends the lease: no stop, nothing lost."""
    return reply.lease_extended and reply.state not in (WorkState.STOPPING, WorkState.STOPPED)


def _ttl(reply: Heartbeat) -> int:
    return reply.ttl_seconds if reply.ttl_seconds > 0 else ASSUMED_TTL_SECONDS


def _retry_release(runtime: Runtime, work_id: str) -> bool:
    lease = runtime.registry.get(work_id)  # as the beat just left it (it may be lost now)
    if lease is None or lease.phase != Phase.RELEASING:
        return False
    return release(runtime, lease, reason="release retried", outcome="stopped")


class _Sender:
    """One event loop per process, in its own thread, with one HTTP client per configuration:
    connections outlive ticks (no TCP or TLS set-up per tick, no client built per tick), and
    ticks running at once in a threads pool share one limit of requests in flight."""

    # Configurations kept at once; more only happens in tests (a runtime per test).
    MAX_CLIENTS = 4

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.clients: dict[tuple[Any, ...], AsyncWorkClient] = {}
        self._limit: asyncio.Semaphore | None = None
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

    def limit(self) -> asyncio.Semaphore:  # made in the loop's thread, on first use
        if self._limit is None:
            self._limit = asyncio.Semaphore(MAX_CONCURRENT_REQUESTS)
        return self._limit

    async def client(self, settings: Settings) -> AsyncWorkClient:
        key = (settings.base_url, settings.environment_id, settings.environment_key,
               settings.api_key, settings.worker_id, settings.http_timeout_seconds)
        client = self.clients.get(key)
        if client is None:
            while len(self.clients) >= self.MAX_CLIENTS:
                await self.clients.pop(next(iter(self.clients))).close()
            client = self.clients[key] = AsyncWorkClient.from_settings(
                settings, max_retries=0, transport=AsyncHTTP11Transport.for_url(
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


_senders: dict[int, _Sender] = {}
_senders_lock = threading.Lock()


def _sender() -> _Sender:
    """This process's sender; a forked child makes its own (threads do not survive a fork)."""
    pid = os.getpid()
    with _senders_lock:
        sender = _senders.get(pid)
        if sender is None:
            _senders.clear()  # a parent's sender: its thread is not in this process
            sender = _senders[pid] = _Sender()
        return sender


def close_sender() -> None:
    """Close this process's HTTP connections and stop its loop (worker shutdown)."""
    with _senders_lock:
        sender = _senders.pop(os.getpid(), None)
    if sender is not None:
        sender.close()


async def _send_all(
    sender: _Sender, settings: Settings, leases: list[Lease]
) -> list[tuple[Lease, Heartbeat | WorkAPIError, float]]:
    client = await sender.client(settings)
    limit = sender.limit()

    async def one(lease: Lease) -> tuple[Lease, Heartbeat | WorkAPIError, float]:
        async with limit:
            sent_at = time.time()
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

    return list(await asyncio.gather(*(one(lease) for lease in leases)))


def _apply(runtime: Runtime, lease: Lease, outcome: Heartbeat | WorkAPIError, tally: Tally, *,
           sent_at: float) -> None:
    if isinstance(outcome, Heartbeat):
        tally.sent += 1
        _apply_reply(runtime, lease, outcome, sent_at=sent_at)
    else:
        tally.failed += 1
        if _apply_error(runtime, lease, outcome):
            tally.lost += 1


def apply_first_heartbeat(runtime: Runtime, lease: Lease, reply: Heartbeat) -> None:
    _apply_reply(runtime, lease, reply, sent_at=time.time())


def _apply_reply(runtime: Runtime, lease: Lease, reply: Heartbeat, *, sent_at: float) -> None:
    now = time.time()
    ttl = _ttl(reply)
    if not runtime.registry.update(
        lease.work_id, token=reply.last_heartbeat, ttl_seconds=ttl, heartbeat_ok_at=now
    ):
        return  # released while the request was in flight
    if reply.state == WorkState.STOPPED or (
        not reply.lease_extended and reply.state != WorkState.STOPPING
    ):
        stopped = reply.state == WorkState.STOPPED
        _lose(runtime, lease, cause="server stopped" if stopped else "lease not extended")
        return
    if reply.state == WorkState.STOPPING and runtime.registry.request_stop(
        lease.work_id, StopKind.GRACEFUL, "server"
    ):
        runtime.metrics.inc("work_stop_requests", cause="server")
        event("stop requested", work_id=lease.work_id, session_id=lease.session_id,
              attempt=lease.attempt, kind="graceful", seen_by="heartbeat")
    # From when this beat was sent, not answered: a slow API must not stretch the gaps between
    # beats past the TTL (the server's clock started between the two).
    runtime.registry.schedule_heartbeat(lease.work_id, sent_at + heartbeat_interval(ttl))


def _apply_error(runtime: Runtime, lease: Lease, exc: WorkAPIError) -> bool:
    """Judge a failed beat; True if the lease is now considered lost."""
    if not lease.token and unclaimed_refusal(exc):
        return retry_claim(runtime, lease, exc)
    if isinstance(exc, LeasePreconditionFailed | NotFoundError):
        state = getattr(exc, "current_state", None)
        _lose(runtime, lease, cause=f"heartbeat {exc.status}", server_state=state)
        return True
    if not exc.retryable and not isinstance(exc, ConflictError):
        event("heartbeat rejected", level=logging.ERROR, work_id=lease.work_id,
              session_id=lease.session_id, status=exc.status, error=str(exc))
        runtime.registry.request_stop(lease.work_id, StopKind.FORCE, "heartbeat rejected")
        runtime.registry.unschedule_heartbeat(lease.work_id)
        return True
    ttl = lease.ttl_seconds or ASSUMED_TTL_SECONDS
    since_ok = time.time() - (lease.heartbeat_ok_at or lease.claimed_at)
    if since_ok > ttl:
        _lose(runtime, lease, cause="assumed lost: no heartbeat succeeded within the TTL")
        return True
    event("heartbeat failed", level=logging.WARNING, work_id=lease.work_id,
          session_id=lease.session_id, status=exc.status, error=str(exc),
          seconds_since_success=round(since_ok, 1))
    runtime.registry.schedule_heartbeat(lease.work_id, time.time() + RETRY_SECONDS)
    return False


def unclaimed_refusal(exc: WorkAPIError) -> bool:
    """A 412 to a NO_HEARTBEAT claim while the server's own state says nobody has heartbeated
    the item: nobody else holds it, so the refusal is the server's hiccup, not a rival. Giving
    up here would strand the acked item in `starting` for good (anthropic-sdk-python#1746)."""
    if not isinstance(exc, LeasePreconditionFailed) or exc.current_state is None:
        return False
    state = exc.current_state
    return state.last_heartbeat is None and state.state in (None, WorkState.STARTING)


def retry_claim(runtime: Runtime, lease: Lease, exc: WorkAPIError) -> bool:
    """Claim the unclaimed item again soon; past the TTL, stop it (it is ours to stop)."""
    ttl = lease.ttl_seconds or ASSUMED_TTL_SECONDS
    since = time.time() - lease.claimed_at
    if since > ttl:
        event("claim refused", level=logging.WARNING, work_id=lease.work_id,
              session_id=lease.session_id, status=exc.status, seconds_since_ack=round(since, 1),
              action_taken="stopped on the server")
        runtime.registry.request_stop(lease.work_id, StopKind.FORCE, "claim refused")
        runtime.registry.unschedule_heartbeat(lease.work_id)
        current = runtime.registry.get(lease.work_id)
        if current is not None and current.phase != Phase.RUNNING:
            release(runtime, current, reason="claim refused", outcome="stopped")
        return True
    event("claim refused", level=logging.WARNING, work_id=lease.work_id,
          session_id=lease.session_id, status=exc.status, seconds_since_ack=round(since, 1),
          action_taken=f"retry in {RETRY_SECONDS:.0f}s")
    runtime.registry.schedule_heartbeat(lease.work_id, time.time() + RETRY_SECONDS)
    return False


def _lose(runtime: Runtime, lease: Lease, *, cause: str, server_state: object = None) -> None:
    event("heartbeat lost", level=logging.WARNING, work_id=lease.work_id,
          session_id=lease.session_id, attempt=lease.attempt, cause=cause,
          server_state=server_state)
    runtime.registry.mark_lost(lease.work_id, cause)
    runtime.metrics.inc("leases_lost", cause=cause.split(":")[0])
    if lease.phase != Phase.RUNNING:
        # No supervisor will ever act on the flag: forget the lease now.
        lost = runtime.registry.get(lease.work_id)
        if lost is not None:
            release(runtime, lost, reason=cause, outcome="lost")
