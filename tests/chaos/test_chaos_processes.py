"""Fleet processes die or leave mid-run: session workers SIGKILLed (one holding a message it had
not announced), a worker drained, the control worker and beat killed, two beats and two pollers
at once."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable

import pytest

from tests.support.chaos import ChaosFleet, Figures
from tests.support.dying_consumer import take_and_die
from tests.support.waiting import wait_for

pytestmark = pytest.mark.chaos


def test_session_workers_sigkilled_at_random_moments(
        chaos: Callable[..., ChaosFleet], report: Callable[[Figures], None]) -> None:
    cf = chaos("session workers SIGKILLed", ttl=6)
    cf.control()
    cf.sessions_worker("s1")
    cf.sessions_worker("s2")
    cf.fleet.wait_slots(8)
    cf.create(16, fake_duration=3)
    stopped = cf.create(2, fake_duration=30)
    kills = 0
    deadline = time.monotonic() + 25
    while kills < 3 and time.monotonic() < deadline:
        time.sleep(cf.rng.uniform(1.0, 3.0))
        victim = cf.rng.choice(["s1", "s2"])
        if not cf.running_on(victim):
            continue
        cf.kill(victim)
        kills += 1
        time.sleep(cf.rng.uniform(0.2, 1.5))
        cf.start(victim)  # capacity comes back
    assert kills == 3, "three kills landed on a worker with sessions"
    cf.wait_started(stopped)
    for work_id in stopped:
        cf.stop(work_id)
    report(cf.finish(timeout=150, check_duplicates=False))


def test_a_drained_worker_hands_its_sessions_over(
        chaos: Callable[..., ChaosFleet], report: Callable[[Figures], None]) -> None:
    cf = chaos("worker drained (SIGTERM)", ttl=6, grace=2)
    cf.control()
    cf.sessions_worker("s1")
    cf.sessions_worker("s2")
    cf.fleet.wait_slots(8)
    work_ids = cf.create(12, fake_duration=5)
    wait_for(lambda: len(cf.running_on("s1")) >= 2, timeout=30, what="sessions on s1")
    on_s1 = cf.running_on("s1")
    drained_at = cf.kill("s1", signal.SIGTERM, fault="SIGTERM s1 (drain)")
    cf.process("s1").wait(timeout=30)
    for work_id in on_s1:  # the drain is a stop of each sandbox on s1, bounded by the grace
        cf.stop_requested[work_id] = drained_at
    cf.start("s1")
    figures = cf.finish(timeout=120)
    for work_id in on_s1:
        starts = cf.fleet.events(work_id, "started")
        assert len(starts) >= 2, f"{work_id} was handed over to a new attempt"
        assert cf.fleet.events(work_id, "sigterm"), f"{work_id} was asked to stop gracefully"
    assert len(work_ids) == figures.sessions
    report(figures)


def test_control_worker_and_beat_killed_and_restarted(
        chaos: Callable[..., ChaosFleet], report: Callable[[Figures], None]) -> None:
    # Beat's lock (10 s) must lapse before a new beat ticks: the TTL must outlast that gap.
    cf = chaos("control worker and beat SIGKILLed", ttl=30)
    cf.control(beat=False)
    cf.beat()
    cf.sessions_worker("s1")
    cf.sessions_worker("s2")
    cf.fleet.wait_slots(8)
    cf.create(12, fake_duration=4)
    for round_ in range(2):
        time.sleep(cf.rng.uniform(1.0, 3.0))
        cf.kill("beat")
        cf.kill("control")
        time.sleep(cf.rng.uniform(0.5, 1.5))
        cf.start("control")
        cf.start("beat")
        if round_ == 0:
            cf.create(4, fake_duration=4)
    report(cf.finish(timeout=150))


def test_two_beats_and_two_pollers(
        chaos: Callable[..., ChaosFleet], report: Callable[[Figures], None]) -> None:
    cf = chaos("two beats, two pollers", ttl=6)
    cf.control("c1")
    cf.control("c2")
    cf.sessions_worker("s1")
    cf.sessions_worker("s2")
    cf.fleet.wait_slots(8)
    work_ids = cf.create(16, fake_duration=1.5)
    figures = cf.finish(timeout=120)
    for work_id in work_ids:
        assert len(cf.fleet.events(work_id, "started")) == 1, f"{work_id} started once"
    log = cf.fleet.emulator.requests_log()
    acks = [e for e in log if e.get("endpoint") == "ack" and e.get("work_id") in work_ids]
    assert len(acks) == len(work_ids), "every item acked exactly once"
    assert not [e for e in log if e.get("endpoint") == "heartbeat" and e.get("status") == 412]
    report(figures)


def test_a_session_message_taken_by_a_worker_killed_before_noting_it_still_runs(
        chaos: Callable[..., ChaosFleet], report: Callable[[Figures], None]) -> None:
    """A worker is SIGKILLed just after taking a session message off its Redis queue, before
    announcing it: no receipt, the message in kombu's unacknowledged hash for an hour. Recovery
    finds it neither queued nor received and starts a new attempt, which a live worker runs.
    The session is routed to a queue no worker consumes yet, so the dying consumer is the only
    one to take its first message."""
    cf = chaos("session message taken by a killed worker", ttl=30)
    cf.fleet.overrides["DISPATCHER_SESSION_QUEUES"] = "dispatcher.sessions,dispatcher.routed"
    cf.control()
    cf.sessions_worker("s1")  # the fleet's slots; it consumes dispatcher.sessions only
    cf.fleet.wait_slots(4)
    (work_id,) = cf.create(1, fake_duration=1, queue="dispatcher.routed")
    wait_for(lambda: cf.fleet.lease(work_id).get("phase") == "dispatched", timeout=30,
             what="the session dispatched to its queue")
    task_id = take_and_die(cf.fleet.redis_url, key_prefix=cf.fleet.prefix,
                           queue="dispatcher.routed")
    assert task_id == cf.fleet.lease(work_id)["task_id"]
    cf.fleet.worker("routed", concurrency=2, queues="dispatcher.routed")
    cf.specs["routed"] = {"kind": "worker", "concurrency": 2, "queues": "dispatcher.routed",
                          "beat": False}
    cf.fleet.wait_event(work_id, "started", timeout=90)
    restarted = cf.log_lines("attempt restarted")
    assert any(work_id in line and "reason=task_never_started" in line for line in restarted), \
        restarted
    figures = cf.finish(timeout=60)
    assert figures.sessions == 1
    report(figures)
