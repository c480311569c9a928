"""Engine faults injected for real: real workers of the docker runtime talk to the real engine
through a relay (tests/support/engine_proxy.py) that can go down or hold container creates.

What the fleet promises (docs/reliability.md, "Engine faults"): an engine that is down or slow
is the fleet's failure, not the session's. No session ends and no item is stopped for it; the
worker withdraws its slots while its engine does not answer and gives them back when it does;
every session then runs exactly once; and what a superseded attempt reports never ends the
current one."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.engine_proxy import EngineRelay
from tests.support.fleet import Fleet
from tests.support.waiting import wait_for

pytestmark = pytest.mark.acceptance

# The bound on both edges of an outage: the probe asks every 0.5 s with a 1 s timeout.
SLOTS_BOUND_SECONDS = 2.0
# An engine slow to create: longer than recovery's staleness limit (8 s without a pulse).
SLOW_CREATE_SECONDS = 8.0


@pytest.fixture
def relay() -> Iterator[EngineRelay]:
    """Set up before the fleet (a test names it first), so torn down after it: the workers
    remove their containers through it until they stop."""
    proxy = EngineRelay()
    try:
        yield proxy
    finally:
        proxy.close()


def _behind_the_relay(fleet: Fleet, relay: EngineRelay) -> Fleet:
    """A control worker and one session worker of two slots whose engine is the relay."""
    fleet.overrides["DOCKER_HOST"] = relay.docker_host
    fleet.worker("control", queues="dispatcher.control", beat=True)
    fleet.worker("w1", concurrency=2, queues="dispatcher.sessions")
    fleet.wait_slots(2)
    return fleet


def _running(fleet: Fleet, work_id: str) -> bool:
    return fleet.lease(work_id).get("phase") == "running"


def test_an_engine_down_while_items_are_claimed_ends_no_session(
        relay: EngineRelay, container_fleet: Fleet, engine: Any) -> None:
    fleet = _behind_the_relay(container_fleet, relay)
    # Creates are held, so both sessions are claimed and inside their start when it dies.
    relay.delay_create = 30.0
    work_ids = [fleet.create(fake_duration=2) for _ in range(2)]
    for work_id in work_ids:
        wait_for(lambda w=work_id: _running(fleet, w), timeout=30,
                 what=f"{work_id}'s attempt starting its container")
    relay.down()
    down_at = time.monotonic()
    wait_for(lambda: fleet.slots() == 0, timeout=10, interval=0.05, what="slots withdrawn")
    withdrawn_after = time.monotonic() - down_at
    code, output = fleet.status_check()
    assert code == 5 and "container engine does not answer" in output, output
    # The outage lasts past recovery's staleness limit: the attempts pulse while they wait.
    time.sleep(10)
    for work_id in work_ids:
        lease = fleet.lease(work_id)
        assert lease, "the lease is held through the outage"
        assert not lease.get("ended") and not lease.get("stop"), lease
        assert fleet.state(work_id) != "stopped", "no item stopped for the engine's outage"
        assert not fleet.events(work_id, "started")
    relay.delay_create = 0.0
    relay.up()
    up_at = time.monotonic()
    wait_for(lambda: fleet.slots() == 2, timeout=10, interval=0.05, what="slots given back")
    given_back_after = time.monotonic() - up_at
    fleet.wait_stopped(work_ids, timeout=90)
    for work_id in work_ids:
        started = fleet.events(work_id, "started")
        assert len(started) == 1, "every session runs exactly once"
        assert started[0]["attempt"] == "2", "after the start the engine failed, not counted"
        assert [e["reason"] for e in fleet.events(work_id, "exited")] == ["completed"]
    log = fleet.log("w1")
    assert log.count("engine unavailable") == 1 and log.count("engine answers again") == 1
    assert "reason=infrastructure" in fleet.log("w1") + fleet.log("control")
    assert "ended=failed" not in log
    wait_for(lambda: not fleet.containers(engine), timeout=10, what="containers removed")
    assert withdrawn_after <= SLOTS_BOUND_SECONDS, withdrawn_after
    assert given_back_after <= SLOTS_BOUND_SECONDS, given_back_after


def test_a_slow_engine_starts_no_second_attempt_and_ends_no_session(
        relay: EngineRelay, container_fleet: Fleet, engine: Any) -> None:
    fleet = _behind_the_relay(container_fleet, relay)
    relay.delay_create = SLOW_CREATE_SECONDS
    work_id = fleet.create(fake_duration=2)
    fleet.wait_event(work_id, "started", timeout=60)
    fleet.wait_stopped([work_id], timeout=60)
    assert [e["attempt"] for e in fleet.events(work_id, "started")] == ["1"]
    assert [e["reason"] for e in fleet.events(work_id, "exited")] == ["completed"]
    logs = fleet.log("w1") + fleet.log("control")
    assert "attempt restarted" not in logs, "no second attempt while the first was created"
    assert "stale event ignored" not in logs
    assert relay.creates == 1
    wait_for(lambda: not fleet.containers(engine), timeout=10, what="container removed")


@pytest.mark.parametrize("stale_start", ["refused", "created"])
def test_a_stale_attempts_failure_or_exit_never_ends_the_current_attempt(
        relay: EngineRelay, container_fleet: Fleet, engine: Any, stale_start: str) -> None:
    """w1's engine is slow, and w1 is frozen while it waits for it: recovery moves the session
    to w2 (attempt 2, its own engine). Then w1 wakes and its engine refuses the container, or
    creates it late: neither attempt 1's failure nor its container's end may end attempt 2's
    session (the failure once did: the lease deleted, `ended=failed`, the item stopped on the
    server)."""
    fleet = container_fleet
    fleet.worker("control", queues="dispatcher.control", beat=True)
    fleet.overrides["DOCKER_HOST"] = relay.docker_host
    w1 = fleet.worker("w1", concurrency=1, queues="dispatcher.sessions")
    fleet.wait_slots(1)
    relay.delay_create = 120.0
    work_id = fleet.create(fake_duration=8)
    wait_for(lambda: _running(fleet, work_id), timeout=30, what="attempt 1 creating")
    wait_for(lambda: relay.holding >= 1, timeout=30, what="attempt 1's create held")
    w1.send_signal(signal.SIGSTOP)
    try:
        del fleet.overrides["DOCKER_HOST"]
        fleet.worker("w2", concurrency=1, queues="dispatcher.sessions")
        wait_for(lambda: fleet.lease(work_id).get("attempt") == "2", timeout=40,
                 what="recovery moved the session to attempt 2")
        fleet.wait_event(work_id, "started", timeout=60)
    finally:
        w1.send_signal(signal.SIGCONT)
    if stale_start == "refused":
        relay.fail_create = True  # attempt 1's create, still held, is refused
        wait_for(lambda: "stale event ignored" in fleet.log("w1"), timeout=30,
                 what="attempt 1's failure ignored")
    else:
        # Attempt 1's container is made, late: it must not live. Its supervisor kills it
        # (`fenced`), or, if the create outlasted the client's timeout meanwhile, reports the
        # start failed (ignored: stale) and leaves the container to the reaper.
        relay.delay_create = 0.0
        wait_for(lambda: any(line in fleet.log("w1")
                             for line in ("fenced", "stale event ignored")),
                 timeout=30, what="attempt 1 fenced, or its late failure ignored")
        wait_for(lambda: not [c for c in fleet.containers(engine, running=True)
                              if c["Labels"]["dispatcher.attempt"] == "1"],
                 timeout=30, what="attempt 1's container gone")
    lease = fleet.lease(work_id)
    assert lease.get("attempt") == "2" and not lease.get("ended"), lease
    assert fleet.state(work_id) != "stopped", "the item runs on"
    fleet.wait_stopped([work_id], timeout=60)
    exited = {e["attempt"]: e["reason"] for e in fleet.events(work_id, "exited")}
    assert exited.get("2") == "completed", exited
    assert "1" not in exited or exited["1"] != "completed", "attempt 1 never ran to its end"
    assert "ended=failed" not in fleet.log("w1")
    wait_for(lambda: not fleet.containers(engine), timeout=10, what="container removed")
