"""The poller claims only what the fleet has free slots for, and fills a slot as soon as it
frees up within the same run; a burst is claimed several items at once, each exactly once. Real
Redis and the emulator over HTTP."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from dispatcher.control.poll_keys import PollKeys
from dispatcher.control.poller import AT_ONCE_SECONDS, CLAIMS_IN_FLIGHT, run_poller
from dispatcher.runtime import Runtime

pytestmark = pytest.mark.integration


def test_a_full_fleet_claims_the_moment_a_slot_frees_up(emulator: Any, runtime: Runtime) -> None:
    runtime.capacity.advertise(hostname="w1@test", slots=1, pool="threads",
                               queues=["dispatcher.sessions"])
    _, first = emulator.create_session(runtime.environment_id, metadata={})
    _, second = emulator.create_session(runtime.environment_id, metadata={})
    claimed: list[int] = []
    run = threading.Thread(target=lambda: claimed.append(run_poller(runtime, run_seconds=6.0)))
    run.start()
    deadline = time.monotonic() + 5
    while runtime.registry.held_count() < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    held = runtime.registry.held_ids()
    assert len(held) == 1, "one slot, one claim"
    time.sleep(1.0)
    assert runtime.registry.held_count() == 1, "no claim beyond the free slots"
    freed_at = time.monotonic()
    runtime.registry.delete(held[0])
    while runtime.registry.held_count() < 1 and time.monotonic() < deadline + 3:
        time.sleep(0.02)
    waited = time.monotonic() - freed_at
    run.join(timeout=10)
    assert claimed == [2], "both claimed within one run"
    assert set(runtime.registry.held_ids()) | set(held) == {first, second}
    assert waited < 2.5, f"the freed slot was filled {waited:.2f}s later"


def test_a_run_hands_its_lock_to_its_successor_and_nobody_slips_in(
        emulator: Any, runtime: Runtime) -> None:
    handed: list[str] = []
    run_poller(runtime, run_seconds=0.2, hand_over=handed.append)
    assert len(handed) == 1, "the run published its successor"
    key = PollKeys(runtime.settings.key_prefix).lock(runtime.environment_id)
    assert runtime.redis.get(key) == handed[0], "and kept the lock for it"
    assert run_poller(runtime, run_seconds=0.2) == 0, "a beat tick meanwhile finds it held"
    assert runtime.redis.get(key) == handed[0]
    successor: list[str] = []
    run_poller(runtime, run_seconds=0.2, handover=handed[0], hand_over=successor.append)
    assert successor == handed, "the successor took the lock over and handed it on"


def test_a_hand_over_that_came_too_late_takes_the_lock_afresh(
        emulator: Any, runtime: Runtime) -> None:
    key = PollKeys(runtime.settings.key_prefix).lock(runtime.environment_id)
    runtime.redis.delete(key)  # the predecessor's lock lapsed
    handed: list[str] = []
    run_poller(runtime, run_seconds=0.2, handover="stale-token", hand_over=handed.append)
    assert len(handed) == 1 and handed[0] != "stale-token"


def test_a_draining_worker_stops_polling_and_hands_over(emulator: Any, runtime: Runtime) -> None:
    handed: list[str] = []
    started = time.monotonic()
    run_poller(runtime, run_seconds=30.0, hand_over=handed.append, stopping=lambda: True)
    assert time.monotonic() - started < 5, "no long run on a draining worker"
    assert len(handed) == 1, "its successor runs on another worker"


# A burst larger than one run's claims in flight (`CLAIMS_IN_FLIGHT`), into as many free slots,
# with items beyond them left on the server.
BURST = 24
BEYOND = 6
# Each ack answered this late: claims that ran one after another would have no two acks of the
# burst in flight at once.
ACK_LATENCY_MS = 300


def test_a_burst_into_as_many_free_slots_is_claimed_side_by_side_each_exactly_once(
        emulator: Any, runtime: Runtime) -> None:
    made = [emulator.create_session(runtime.environment_id, metadata={})[1]
            for _ in range(BURST + BEYOND)]
    emulator.set_faults(latency_ms=ACK_LATENCY_MS, endpoints=["ack"])
    most = [0]
    done = threading.Event()

    def advertise() -> None:
        runtime.capacity.advertise(hostname="w1@test", slots=BURST, pool="threads",
                                   queues=["dispatcher.sessions"])

    def watch() -> None:
        # The slots the fleet holds, sampled all along: never past the free slots. The worker
        # advertises its slots as a live one does (a run outlasts one advertisement's life).
        advertised = time.monotonic()
        while not done.is_set():
            most[0] = max(most[0], runtime.registry.held_count())
            if time.monotonic() - advertised > 1.0:
                advertise()
                advertised = time.monotonic()
            time.sleep(0.005)

    advertise()

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        # The run ends once the burst is held (a loaded machine may take many seconds); its
        # claims in flight end before it returns, and the watcher sees them all.
        claimed = run_poller(runtime, run_seconds=120.0,
                             stopping=lambda: runtime.registry.held_count() >= BURST)
    finally:
        done.set()
        watcher.join()
    held = runtime.registry.held_ids()
    assert claimed == BURST and len(held) == BURST, "the whole burst, into its free slots"
    assert most[0] <= BURST, f"{most[0]} leases held at once, beyond {BURST} slots"
    assert set(held) <= set(made)
    sent = [t["kwargs"]["work_id"] for t in runtime.app.sent]
    assert sorted(sent) == sorted(held), "each claimed item published exactly once"
    acks = [e for e in emulator.requests_log()
            if e.get("environment_id") == runtime.environment_id and e["endpoint"] == "ack"]
    assert sorted(e["work_id"] for e in acks) == sorted(held), "each acked exactly once"
    left = [w for w in made if w not in held]
    assert all(emulator.get(runtime.environment_id, w)["state"] == "queued" for w in left), (
        "the items beyond the free slots wait on the server")
    overlap = max(sum(1 for other in acks if other["time"] <= e["time"] < other["answered"])
                  for e in acks)
    assert overlap >= 2, "acks of the burst were in flight side by side"
    assert overlap <= CLAIMS_IN_FLIGHT, "never more than a run's claims in flight"
    polls = [e for e in emulator.requests_log()
             if e.get("environment_id") == runtime.environment_id and e["endpoint"] == "poll"]
    side_by_side = max(sum(1 for other in polls if other["time"] <= e["time"] < other["answered"])
                       for e in polls)
    assert side_by_side >= 2, "the burst's polls went side by side, not one item a round trip"


def test_a_lone_session_is_claimed_by_its_long_poll_with_no_polls_beside_it(
        emulator: Any, runtime: Runtime) -> None:
    """Polls side by side pay only while the queue holds more: a lone item's start carries no
    extra polls, and no extra load on the server while its ack is in flight."""
    runtime.capacity.advertise(hostname="w1@test", slots=4, pool="threads",
                               queues=["dispatcher.sessions"])
    work_id = emulator.create_session(runtime.environment_id, metadata={})[1]
    assert run_poller(runtime, run_seconds=30.0,
                      stopping=lambda: runtime.registry.held_count() >= 1) == 1
    assert runtime.registry.held_ids() == [work_id]
    polls = [e for e in emulator.requests_log()
             if e.get("environment_id") == runtime.environment_id and e["endpoint"] == "poll"]
    assert polls and all(e["block_ms"] is not None for e in polls), "long polls only"


def test_sessions_arriving_one_at_a_time_bring_no_polls_beside_their_ack(
        emulator: Any, runtime: Runtime) -> None:
    """Each item answers a long poll that waited for it: two in a row are not a burst, and no
    non-blocking polls reach the server beside the next one's ack (they delayed its answer)."""
    runtime.capacity.advertise(hostname="w1@test", slots=4, pool="threads",
                               queues=["dispatcher.sessions"])
    made: list[str] = []

    def arrive() -> None:
        for _ in range(3):
            time.sleep(AT_ONCE_SECONDS * 3)  # well after the poll before began to wait
            made.append(emulator.create_session(runtime.environment_id, metadata={})[1])

    arrivals = threading.Thread(target=arrive)
    arrivals.start()
    try:
        claimed = run_poller(runtime, run_seconds=30.0,
                             stopping=lambda: runtime.registry.held_count() >= 3)
    finally:
        arrivals.join()
    assert claimed == 3 and sorted(runtime.registry.held_ids()) == sorted(made)
    polls = [e for e in emulator.requests_log()
             if e.get("environment_id") == runtime.environment_id and e["endpoint"] == "poll"]
    assert all(e["block_ms"] is not None for e in polls), "long polls only"
