"""A worker process's supervision hub: its attempts pulsed together, each woken for its own
news only. Real Redis, the emulator over HTTP, real sandboxes and the real supervisor."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest

from dispatcher.control.poller import claim
from dispatcher.lease import events as ev
from dispatcher.lease.causes import Outcome, SeenBy, StopCause
from dispatcher.lease.model import StopKind
from dispatcher.runtime import Runtime
from dispatcher.session.attempt import SessionAttempt, run_attempt
from dispatcher.session.supervision import hub_for
from tests.support.inprocess import held_items, in_process_runtime, poll_until
from tests.support.waiting import wait_for

pytestmark = pytest.mark.integration

SESSIONS = 4


@pytest.fixture
def runtime(emulator: Any) -> Iterator[Runtime]:
    with in_process_runtime(emulator) as rt:
        yield rt


def _running(emulator: Any, runtime: Runtime) -> tuple[list[str], dict[str, Outcome],
                                                         list[threading.Thread]]:
    """SESSIONS long sessions claimed and their attempts running, each in a thread."""
    ids: list[str] = []
    outcomes: dict[str, Outcome] = {}
    threads = []
    for _ in range(SESSIONS):
        session_id, work_id = emulator.create_session(runtime.environment_id,
                                                      metadata={"fake.duration": "60"})
        assert claim(runtime, poll_until(runtime, work_id))
        task = runtime.app.sent[-1]
        attempt = SessionAttempt(work_id=work_id, session_id=session_id, attempt=1,
                                 task_id=task["task_id"], worker="hub@test")

        def run(a: SessionAttempt = attempt) -> None:
            outcomes[a.work_id] = run_attempt(runtime, a)

        threads.append(threading.Thread(target=run, daemon=True))
        threads[-1].start()
        ids.append(work_id)
    return ids, outcomes, threads


def _pulsed_lately(runtime: Runtime, ids: list[str]) -> bool:
    now = runtime.registry.clock.now()
    leases = [runtime.registry.get(w) for w in ids]
    return all(lease is not None and now - lease.pulse_at < 1.0 for lease in leases)


def _pulse_at(runtime: Runtime, work_id: str) -> float:
    lease = runtime.registry.get(work_id)
    assert lease is not None
    return lease.pulse_at


def _stop(runtime: Runtime, work_id: str) -> None:
    runtime.executor.run(runtime.registry.get(work_id),
                         ev.StopRequested(StopKind.GRACEFUL, StopCause.SERVER, SeenBy.BRIDGE))


def test_one_hub_pulses_every_attempt_and_a_stop_reaches_only_its_own(
        emulator: Any, runtime: Runtime) -> None:
    ids, outcomes, threads = _running(emulator, runtime)
    hub = hub_for(runtime)
    wait_for(lambda: len(hub.members()) == SESSIONS, timeout=30, what="every attempt supervised")

    wait_for(lambda: _pulsed_lately(runtime, ids), timeout=10,
             what="every lease pulsed within the last second")
    _stop(runtime, ids[0])
    threads[0].join(timeout=20)
    assert outcomes == {ids[0]: Outcome.STOPPED}, "the stop reached its own session only"
    assert len(hub.members()) == SESSIONS - 1
    wait_for(lambda: _pulsed_lately(runtime, ids[1:]), timeout=10, what="the others pulsed")
    for work_id in ids[1:]:
        _stop(runtime, work_id)
    for thread in threads:
        thread.join(timeout=20)
    assert set(outcomes.values()) == {Outcome.STOPPED} and len(outcomes) == SESSIONS
    assert hub.members() == [], "an ended attempt leaves the hub"
    wait_for(hub.idle, timeout=5, what="the hub's threads to end with its last attempt")


def test_an_attempt_whose_pulse_does_not_read_leaves_the_others_served(
        emulator: Any, runtime: Runtime, caplog: pytest.LogCaptureFixture) -> None:
    """One lease's record made unreadable (a stop time that is no number: the pulse's answer
    fails to parse; a stop kind no version wrote: the event fails to build) faults that attempt
    alone, in one log line each; the hub's thread goes on pulsing the others."""
    ids, outcomes, threads = _running(emulator, runtime)
    hub = hub_for(runtime)
    wait_for(lambda: len(hub.members()) == SESSIONS, timeout=30, what="every attempt supervised")
    broken = {ids[0]: "stop_seen_at", ids[1]: "stop"}
    with caplog.at_level("ERROR"):
        for work_id, field_name in broken.items():
            runtime.redis.hset(runtime.registry.keys.lease(work_id), field_name, "garbage")
        # Their threads end (the fence takes a silent attempt's sandbox); the others stay.
        for thread in threads[:2]:
            thread.join(timeout=30)
        assert set(outcomes) == set(broken), "the unreadable attempts ended, the others run"
        wait_for(lambda: _pulsed_lately(runtime, ids[2:]), timeout=10, what="the others pulsed")
    faults = [r.getMessage() for r in caplog.records
              if "supervision step failed" in r.getMessage()]
    for work_id in broken:
        assert sum(work_id in line for line in faults) == 1, faults
    for work_id in ids[2:]:
        _stop(runtime, work_id)
    for thread in threads:
        thread.join(timeout=20)
    assert [outcomes[w] for w in ids[2:]] == [Outcome.STOPPED] * (SESSIONS - 2)


@pytest.mark.parametrize("ending", ["stop", "superseded"])
def test_an_attempt_with_no_sandbox_is_pulsed_until_a_pulse_ends_its_wait(
        emulator: Any, runtime: Runtime, ending: str) -> None:
    """An attempt whose container is being created, or whose start the infrastructure failed,
    runs no sandbox: the hub pulses it all the same (recovery takes a silent lease for a dead
    worker's), and its wait ends once a pulse finds a stop, or another attempt current."""
    [work_id] = held_items(emulator, runtime, 1)
    first = _pulse_at(runtime, work_id)
    hub = hub_for(runtime)
    with hub.waiting(work_id, 1, "hub@test") as member:
        wait_for(lambda: _pulse_at(runtime, work_id) > first + 1.0, timeout=10,
                 what="the waiting attempt pulsed for over a second")
        assert not member.wait(0), "nothing ended the wait yet"
        if ending == "stop":
            _stop(runtime, work_id)
        else:
            runtime.redis.hset(runtime.registry.keys.lease(work_id), "attempt", "2")
        assert member.wait(5), f"the pulse that found it ({ending}) ended the wait"
    assert hub.members() == []
    wait_for(hub.idle, timeout=5, what="the hub's threads to end with its last attempt")
