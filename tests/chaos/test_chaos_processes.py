"""Fleet processes die or leave mid-run: session workers SIGKILLed, a worker drained, the
control worker and beat killed, two beats and two pollers at once."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable

import pytest

from tests.support.chaos import ChaosFleet, Figures
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
