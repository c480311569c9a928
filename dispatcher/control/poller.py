"""Claim work from the server for the fleet's free session slots.

One poller runs at a time per environment (a Redis lock), long-polls for a few seconds, and for
each item: ack, record the lease, send the first heartbeat at once, then dispatch the session
task. From the ack on, the item always has an owner: if any later step fails, the item is
stopped with the reason logged, never left in `starting` (anthropic-sdk-python#1746).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from redis.exceptions import RedisError

from dispatcher.control import healthcheck
from dispatcher.control.heartbeat import apply_first_heartbeat, retry_claim, unclaimed_refusal
from dispatcher.control.routing import choose_queue
from dispatcher.events import event
from dispatcher.lease.executor import dispatch, release
from dispatcher.lease.registry import Lease, Phase
from dispatcher.runtime import Runtime
from dispatcher.settings import LeaseMode
from dispatcher.workapi import (
    NO_HEARTBEAT,
    Backoff,
    Heartbeat,
    InvalidWorkItem,
    LeasePreconditionFailed,
    Work,
    WorkAPIError,
    WorkDataType,
    delay_for,
)

__all__ = ["POLL_BLOCK_MS", "run_poller"]

POLL_BLOCK_MS = 999  # the API caps block_ms at 999
# One poller task long-polls this long, then returns so beat starts a fresh one: a crashed or
# wedged poller delays claiming by at most this much.
POLL_RUN_SECONDS = 5.0
# The lock outlives a run by a margin; a killed poller's lock lapses on its own.
POLL_LOCK_SECONDS = 30.0
# While the fleet is full, look for a freed slot this often (one Redis round trip each).
FULL_FLEET_RECHECK_SECONDS = 0.05
# A failure streak is forgotten after this long without news (the backoff cap is 8 s).
POLL_FAILURES_TTL_SECONDS = 60


def run_poller(runtime: Runtime, *, run_seconds: float = POLL_RUN_SECONDS) -> int:
    """Claim work until the budget runs out; returns how many claimed."""
    with _poll_lock(runtime) as held:
        if not held:
            return 0
        return _poll_loop(runtime, deadline=time.monotonic() + run_seconds)


@contextmanager
def _poll_lock(runtime: Runtime) -> Iterator[bool]:
    key = runtime.registry.keys.poll_lock(runtime.environment_id)
    token = uuid.uuid4().hex
    held = bool(runtime.redis.set(key, token, nx=True, px=int(POLL_LOCK_SECONDS * 1000)))
    try:
        yield held
    finally:
        if held and runtime.redis.get(key) == token:
            runtime.redis.delete(key)


def _poll_loop(runtime: Runtime, *, deadline: float) -> int:
    claimed = 0
    # The failure count outlives one poller run (each lasts seconds), so a long outage backs
    # off to the cap instead of starting over at half a second every run.
    failures_key = runtime.registry.keys.task_lock("poll-failures")
    backoff = Backoff(attempt=int(runtime.redis.get(failures_key) or 0))
    client = runtime.client(max_retries=0)
    while time.monotonic() < deadline:
        if not _wait_out_pause(runtime, deadline):
            break
        if runtime.capacity.free_slots() <= 0:
            # Work waits on the server, where `depth` shows it and other fleets see it; this
            # run waits for a slot to free up, so a backlog drains as fast as sessions end.
            time.sleep(FULL_FLEET_RECHECK_SECONDS)
            continue
        try:
            item = client.poll(block_ms=POLL_BLOCK_MS)
        except InvalidWorkItem as exc:
            _refuse_invalid(runtime, exc)
            continue
        except WorkAPIError as exc:
            delay = delay_for(exc, backoff)
            event("poll failed", level=logging.WARNING, status=exc.status,
                  retryable=exc.retryable, delay_seconds=round(delay, 2), error=str(exc))
            _pause(runtime, failures=backoff.attempt, seconds=delay)
            if not exc.retryable:
                break
            continue
        if backoff.attempt:
            backoff.reset()
            runtime.redis.delete(failures_key)
        if item is not None and claim(runtime, item):
            claimed += 1
    return claimed


def _pause(runtime: Runtime, *, failures: int, seconds: float) -> None:
    """Record the failure streak and when polling may resume, for this run and the next."""
    keys = runtime.registry.keys
    pipe = runtime.redis.pipeline(transaction=False)
    pipe.set(keys.task_lock("poll-failures"), failures, ex=POLL_FAILURES_TTL_SECONDS)
    pipe.set(keys.task_lock("poll-paused-until"), time.time() + seconds,
             px=max(1, int(seconds * 1000)))
    pipe.execute()


def _refuse_invalid(runtime: Runtime, exc: InvalidWorkItem) -> None:
    """An item we cannot read would be re-delivered for ever: name it and stop it, when its id
    is legible (an id that is not cannot be put in a URL; the server's lease expiry ends it)."""
    runtime.metrics.inc("work_refused", reason="invalid")
    event("invalid work item", level=logging.ERROR, work_id=exc.work_id or "unreadable",
          error=str(exc), action_taken="stopped, not run" if exc.work_id else "none possible")
    if exc.work_id is None:
        return
    try:
        runtime.client().stop(exc.work_id, force=True)
    except WorkAPIError as error:
        event("stop failed", level=logging.ERROR, work_id=exc.work_id, error=str(error))


def _wait_out_pause(runtime: Runtime, deadline: float) -> bool:
    """Sleep through a backoff pause; False if it outlasts this run (the next run waits)."""
    until = float(runtime.redis.get(runtime.registry.keys.task_lock("poll-paused-until")) or 0)
    wait = until - time.time()
    if wait <= 0:
        return True
    if time.monotonic() + wait >= deadline:
        return False
    time.sleep(wait)
    return True


def claim(runtime: Runtime, item: Work) -> bool:
    """Take one polled item into the fleet. True if a lease is now held for it."""
    if item.data.type not in (WorkDataType.SESSION, WorkDataType.HEALTHCHECK):
        _refuse_unknown_type(runtime, item)
        return False
    if _already_held(runtime, item):
        return False
    acked, probe = _ack(runtime, item)
    if not acked:
        return False
    lease = _new_lease(runtime, item)
    try:
        runtime.registry.create(lease, work_json=item.to_json())
    except RedisError as exc:
        _abandon(runtime, item, reason=f"registry unavailable: {exc}")
        return False
    runtime.metrics.inc("work_claimed", type=item.data.type)
    event("claimed", work_id=item.id, session_id=item.session_id, attempt=1,
          type=item.data.type, queue=lease.queue)
    if probe is not None:
        apply_first_heartbeat(runtime, lease, probe)
    elif runtime.settings.lease_mode != LeaseMode.RUNNER and not _first_heartbeat(runtime, lease):
        return False
    if item.data.type == WorkDataType.HEALTHCHECK:
        healthcheck.answer(runtime, lease)
        return False
    try:
        dispatch(runtime, lease)
    except (RedisError, OSError) as exc:
        # The broker refused the message: stop the item rather than leave it owned by nobody.
        release(runtime, lease, reason=f"dispatch failed: {exc}", outcome="dispatch_failed")
        return False
    return True


def _already_held(runtime: Runtime, item: Work) -> bool:
    """The server offers an item we still hold: our lease on it lapsed, so it is no longer ours.

    A session that already ended (its release still failing) is taken back and stopped: it
    must not run again. A running one is fenced now (killed at once, never heartbeated or
    stopped again) and the item left unacked: the server delivers it again once that lease is
    forgotten, and only then is it claimed afresh. Acking it now would start a second attempt
    beside the first.
    """
    lease = runtime.registry.get(item.id)
    if lease is None:
        return False
    if lease.phase == Phase.RELEASING:
        _finish_release(runtime, item, lease)
        return True
    event("polled a held lease", level=logging.WARNING, work_id=item.id,
          session_id=item.session_id, attempt=lease.attempt, phase=lease.phase,
          action_taken="attempt fenced; claimed again on re-delivery")
    runtime.registry.mark_lost(item.id, "re-delivered by the server")
    runtime.metrics.inc("leases_lost", cause="re-delivered by the server")
    if lease.phase != Phase.RUNNING:
        lost = runtime.registry.get(item.id)
        if lost is not None:
            release(runtime, lost, reason="re-delivered by the server", outcome="lost")
    return True


def _finish_release(runtime: Runtime, item: Work, lease: Lease) -> None:
    """Ack the ended session's item again and stop it. Its old token died with the lapse: the
    heartbeat task claims the new lease afresh (NO_HEARTBEAT) while the stop is retried."""
    event("polled a held lease", level=logging.WARNING, work_id=item.id,
          session_id=item.session_id, attempt=lease.attempt, phase=lease.phase,
          action_taken="session already ended: acked and stopped")
    acked, _ = _ack(runtime, item)
    if not acked:
        return  # delivered again later; meanwhile the old lease runs its course
    runtime.registry.update(item.id, token="", lost="", heartbeat_ok_at=time.time(),
                            claimed_at=time.time())
    current = runtime.registry.get(item.id)
    if current is not None:
        release(runtime, current, reason="re-delivered after it ended", outcome="stopped")


def _refuse_unknown_type(runtime: Runtime, item: Work) -> None:
    runtime.metrics.inc("work_refused", reason="unknown_type")
    event("unknown work type", level=logging.WARNING, work_id=item.id, type=item.data.type,
          action_taken="stopped, not run")
    try:
        runtime.client().stop(item.id, force=True)
    except WorkAPIError as exc:
        event("stop failed", level=logging.ERROR, work_id=item.id, error=str(exc))


def _ack(runtime: Runtime, item: Work) -> tuple[bool, Heartbeat | None]:
    """Ack the item: (acked, the first heartbeat's reply if probing already claimed it)."""
    try:
        runtime.client().ack(item.id)
        return True, None
    except WorkAPIError as exc:
        probe = _ack_landed_anyway(runtime, item) if exc.retryable else None
        if probe is not None:
            return True, probe
        runtime.metrics.inc("work_refused", reason="ack_failed")
        event("ack failed", level=logging.WARNING, work_id=item.id, status=exc.status,
              error=str(exc), outcome="left for the server to re-deliver")
        return False, None


def _ack_landed_anyway(runtime: Runtime, item: Work) -> Heartbeat | None:
    """After an ack whose answer was lost, find out whether it landed.

    An acked item nobody heartbeats is stranded for good (anthropic-sdk-python#1746), so ask
    the one question that tells: a NO_HEARTBEAT claim succeeds only on an acked, unclaimed item.
    In runner mode that claim belongs to the sandbox, so there we cannot ask.
    """
    if runtime.settings.lease_mode == LeaseMode.RUNNER:
        return None
    try:
        return runtime.client().heartbeat(
            item.id,
            expected_last_heartbeat=NO_HEARTBEAT,
            desired_ttl_seconds=runtime.settings.desired_ttl_seconds,
        )
    except WorkAPIError:
        return None


def _new_lease(runtime: Runtime, item: Work) -> Lease:
    queue = choose_queue(item.metadata, runtime.settings.session_queues, work_id=item.id)
    now = time.time()
    return Lease(
        work_id=item.id,
        session_id=item.session_id,
        environment_id=item.environment_id,
        mode=runtime.settings.lease_mode.value,
        heartbeats_by="sandbox" if runtime.settings.lease_mode == LeaseMode.RUNNER
        else "dispatcher",
        queue=queue,
        task_id=uuid.uuid4().hex,
        claimed_at=now,
        dispatched_at=now,
        created_at=item.created_at,
    )


def _first_heartbeat(runtime: Runtime, lease: Lease) -> bool:
    """Claim the lease at once, before the session waits in a queue: split-brain otherwise."""
    try:
        reply = runtime.client(max_retries=0).heartbeat(
            lease.work_id,
            expected_last_heartbeat=NO_HEARTBEAT,
            desired_ttl_seconds=runtime.settings.desired_ttl_seconds,
        )
    except LeasePreconditionFailed as exc:
        if unclaimed_refusal(exc):
            retry_claim(runtime, lease, exc)
            return True
        # Someone else claimed it first: it is theirs, we release nothing.
        event("lease taken by another worker", level=logging.WARNING, work_id=lease.work_id)
        runtime.registry.delete(lease.work_id)
        return False
    except WorkAPIError as exc:
        # Keep the lease: the heartbeat task retries within a second and judges the TTL.
        event("first heartbeat failed", level=logging.WARNING, work_id=lease.work_id,
              status=exc.status, error=str(exc))
        runtime.registry.schedule_heartbeat(lease.work_id, time.time())
        return True
    apply_first_heartbeat(runtime, lease, reply)
    return True


def _abandon(runtime: Runtime, item: Work, *, reason: str) -> None:
    runtime.metrics.inc("work_refused", reason="abandoned")
    event("abandoned", level=logging.ERROR, work_id=item.id, session_id=item.session_id,
          reason=reason, outcome="stopped on the server")
    try:
        runtime.client().stop(item.id, force=True)
    except WorkAPIError as exc:
        event("stop failed", level=logging.ERROR, work_id=item.id, error=str(exc))
