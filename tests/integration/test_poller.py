"""The poller claims only what the fleet has free slots for, and fills a slot as soon as it
frees up within the same run. Real Redis and the emulator over HTTP."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from dispatcher.control.poll_keys import PollKeys
from dispatcher.control.poller import run_poller
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
