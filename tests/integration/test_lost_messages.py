"""A session message that a worker took off its Redis queue and died with before noting it.

Kombu's Redis transport pops a message (BRPOP), then records it unacknowledged, then Celery
announces it (`task_received`, where the receipt is written). A worker killed between the pop
and the receipt leaves a lease `dispatched` with its message nowhere a worker will find it for an
hour (kombu's visibility timeout), or ever. Recovery looks in the queue: a message waiting there
is left alone however long it waits; one missing and unreceived for `MISSING_CONFIRM_SECONDS` is
lost, and the lease goes to a new attempt. Real Redis, a real Celery app publishing, a real
kombu consumer in a process SIGKILLed as it holds the message, the emulator over HTTP.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery

from dispatcher.celery import waiting
from dispatcher.celery.broker import broker_conf
from dispatcher.celery.keys import CeleryKeys
from dispatcher.control.recovery import recover
from dispatcher.lease.executor import SessionTask
from dispatcher.lease.machine.running import DISPATCH_STALE_SECONDS, MISSING_CONFIRM_SECONDS
from dispatcher.lease.model import Phase
from dispatcher.runtime import Runtime
from tests.support.dying_consumer import take_and_die
from tests.support.inprocess import held_items, in_process_runtime

pytestmark = pytest.mark.integration

QUEUE = "dispatcher.sessions"


@pytest.fixture
def runtime(emulator: Any) -> Iterator[Runtime]:
    """An in-process runtime whose app is a real Celery app on the test's Redis broker."""
    with in_process_runtime(emulator) as rt:
        app = Celery("lost-messages", set_as_current=False)
        app.conf.update(broker_conf(rt.settings), task_create_missing_queues=True)
        rt.app = app
        try:
            yield rt
        finally:
            app.close()


def _dispatched(emulator: Any, runtime: Runtime, n: int) -> list[str]:
    """`n` leases dispatched 31 s ago whose session messages the broker holds now."""
    past = time.time() - DISPATCH_STALE_SECONDS - 1
    ids = held_items(emulator, runtime, n, phase=Phase.DISPATCHED, dispatched_at=past)
    for work_id in ids:
        lease = runtime.registry.get(work_id)
        assert lease is not None
        runtime._publish_session(SessionTask(
            task_id=lease.task_id, work_id=work_id, session_id=lease.session_id, attempt=1,
            queue=QUEUE))
        runtime.deliveries.published(lease.task_id)
    return ids


def _queue_key(runtime: Runtime) -> str:
    return CeleryKeys(runtime.settings.key_prefix).broker + QUEUE


def _backdate_missing(runtime: Runtime, task_id: str) -> None:
    key = runtime.registry.keys.delivery(task_id)
    assert runtime.redis.hget(key, "missing_at") is not None, "recovery saw it missing"
    runtime.redis.hset(key, "missing_at", time.time() - MISSING_CONFIRM_SECONDS - 1)


def _attempt(runtime: Runtime, work_id: str) -> int:
    lease = runtime.registry.get(work_id)
    assert lease is not None
    return lease.attempt


def test_a_message_waiting_in_its_queue_is_never_moved_on(
        emulator: Any, runtime: Runtime) -> None:
    (work_id,) = _dispatched(emulator, runtime, 1)
    lease = runtime.registry.get(work_id)
    assert lease is not None
    for _ in range(3):
        assert recover(runtime) == 0
    assert runtime.redis.hget(runtime.registry.keys.delivery(lease.task_id), "missing_at") is None
    assert _attempt(runtime, work_id) == 1
    assert runtime.waiting.among(QUEUE, [lease.task_id]) == {lease.task_id}


def test_a_message_popped_by_a_worker_that_died_at_once_is_moved_on(
        emulator: Any, runtime: Runtime) -> None:
    """Killed between the BRPOP and kombu's unacknowledged record: the message is nowhere."""
    taken, waits = _dispatched(emulator, runtime, 2)
    popped = runtime.redis.rpop(_queue_key(runtime))  # the dead worker's BRPOP: oldest first
    assert popped is not None and f"t-{taken}" in str(popped)
    taken_task = f"t-{taken}"
    assert recover(runtime) == 0, "missing a moment: maybe being noted now"
    _backdate_missing(runtime, taken_task)
    assert recover(runtime) == 1
    assert (_attempt(runtime, waits), _attempt(runtime, taken)) == (1, 2)
    lease = runtime.registry.get(taken)
    assert lease is not None and lease.phase == Phase.DISPATCHED
    assert runtime.waiting.among(QUEUE, [lease.task_id]) == {lease.task_id}, "published again"


def test_a_message_held_unacknowledged_by_a_killed_worker_is_moved_on(
        emulator: Any, runtime: Runtime) -> None:
    """Killed after kombu recorded the message unacknowledged, before Celery announced it: it
    would come back only after kombu's visibility timeout, an hour later."""
    ids = _dispatched(emulator, runtime, 2)
    task_id = take_and_die(runtime.settings.redis_url, key_prefix=runtime.settings.key_prefix,
                           queue=QUEUE)
    (taken,) = [w for w in ids if f"t-{w}" == task_id]
    assert recover(runtime) == 0
    _backdate_missing(runtime, task_id)
    assert recover(runtime) == 1
    assert {w: _attempt(runtime, w) for w in ids} == {w: 2 if w == taken else 1 for w in ids}


def test_a_message_received_meanwhile_is_judged_by_its_receipt(
        emulator: Any, runtime: Runtime) -> None:
    """Seen missing, then its worker's receipt arrives: a worker is starting it, not lost."""
    (work_id,) = _dispatched(emulator, runtime, 1)
    task_id = f"t-{work_id}"
    runtime.redis.rpop(_queue_key(runtime))
    assert recover(runtime) == 0
    _backdate_missing(runtime, task_id)
    runtime.deliveries.received(task_id, worker="slow@h")
    assert recover(runtime) == 0
    assert _attempt(runtime, work_id) == 1


def test_a_message_seen_again_is_no_longer_missing(emulator: Any, runtime: Runtime) -> None:
    """Skipped once (the queue moved under the read): found on the next look, the mark goes."""
    (work_id,) = _dispatched(emulator, runtime, 1)
    task_id = f"t-{work_id}"
    raw = runtime.redis.rpop(_queue_key(runtime))
    assert raw is not None
    assert recover(runtime) == 0
    runtime.redis.rpush(_queue_key(runtime), raw)
    _backdate_missing(runtime, task_id)
    assert recover(runtime) == 0
    assert runtime.redis.hget(runtime.registry.keys.delivery(task_id), "missing_at") is None
    assert _attempt(runtime, work_id) == 1


def test_a_long_queue_is_read_in_overlapping_pages_from_its_tail(
        runtime: Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(waiting, "PAGE", 7)
    monkeypatch.setattr(waiting, "OVERLAP", 2)
    for i in range(40):
        runtime._publish_session(SessionTask(
            task_id=f"task-{i}", work_id=f"w{i}", session_id=f"s{i}", attempt=1, queue=QUEUE))
    asked = {"task-0", "task-6", "task-7", "task-25", "task-39", "task-none"}
    assert runtime.waiting.among(QUEUE, asked) == asked - {"task-none"}
    assert runtime.waiting.among("dispatcher.other", {"task-0"}) == set()


def test_a_broker_that_cannot_be_read_holds_up_no_other_recovery(
        emulator: Any, caplog: pytest.LogCaptureFixture) -> None:
    """The broker's own Redis is down: its long-queued messages are taken for waiting, said
    once a tick, and a silent attempt is still restarted in the same tick."""
    with in_process_runtime(emulator, DISPATCHER_BROKER_URL="redis://127.0.0.1:9/0") as rt:
        past = time.time() - DISPATCH_STALE_SECONDS - 1
        (queued,) = held_items(emulator, rt, 1, phase=Phase.DISPATCHED, dispatched_at=past)
        rt.deliveries.published(f"t-{queued}")
        (silent,) = held_items(emulator, rt, 1, pulse_at=past)
        with caplog.at_level(logging.WARNING, logger="dispatcher"):
            assert recover(rt) == 1
        assert (_attempt(rt, queued), _attempt(rt, silent)) == (1, 2)
        assert [r.getMessage() for r in caplog.records
                if getattr(r, "action", "") == "queue not read"] == [
            f"queue not read queue={QUEUE} messages=1 error=ConnectionError"]
        assert rt.redis.hget(rt.registry.keys.delivery(f"t-{queued}"), "missing_at") is None
