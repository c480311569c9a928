"""Drain mode, the webhook wake-up's claim: until the first empty poll, never waiting for the
lock or a slot, and never losing a wake-up. Real Redis and the emulator over HTTP."""

from __future__ import annotations

import time
from typing import Any

import pytest

from dispatcher.control.poll_keys import PollKeys
from dispatcher.control.poller import drain
from dispatcher.runtime import Runtime

pytestmark = pytest.mark.integration

RECLAIM_MS = 2000


def advertise(runtime: Runtime, slots: int) -> None:
    runtime.capacity.advertise(hostname="w1@test", slots=slots, pool="threads",
                               queues=["dispatcher.sessions"])


def polls(emulator: Any, runtime: Runtime) -> list[dict[str, Any]]:
    return [r for r in emulator.requests_log()
            if r["endpoint"] == "poll" and r["environment_id"] == runtime.environment_id]


def wanted(runtime: Runtime) -> bool:
    key = PollKeys(runtime.settings.key_prefix).wanted(runtime.environment_id)
    return bool(runtime.redis.exists(key))


def test_a_wake_up_claims_every_waiting_item_then_stops_at_the_first_empty_poll(
        emulator: Any, runtime: Runtime) -> None:
    advertise(runtime, 5)
    work_ids = {emulator.create_session(runtime.environment_id)[1] for _ in range(3)}
    assert drain(runtime, reclaim_older_than_ms=RECLAIM_MS, wake=True) == 3
    assert set(runtime.registry.held_ids()) == work_ids
    seen = polls(emulator, runtime)
    assert sum(1 for p in seen if p["work_id"]) == 3
    # The first poll's item, then one round side by side in the room left (three or four of
    # the five slots, as the first claim has recorded its lease or not yet): the other two
    # items and an empty answer or two, where the drain stops.
    assert 1 + 3 <= len(seen) <= 1 + 4 and any(p["work_id"] is None for p in seen), (
        "three items, then no more polls")
    assert all(p["block_ms"] is None for p in seen), "a drain never blocks"
    assert not wanted(runtime)


def test_without_a_wake_up_nothing_is_asked_of_the_server(emulator: Any,
                                                          runtime: Runtime) -> None:
    advertise(runtime, 5)
    emulator.create_session(runtime.environment_id)
    assert drain(runtime, reclaim_older_than_ms=RECLAIM_MS, wake=False) == 0
    assert polls(emulator, runtime) == []


def test_a_wake_up_meeting_a_running_poller_leaves_it_the_flag_without_waiting(
        emulator: Any, runtime: Runtime) -> None:
    advertise(runtime, 5)
    _, work_id = emulator.create_session(runtime.environment_id)
    lock = PollKeys(runtime.settings.key_prefix).lock(runtime.environment_id)
    runtime.redis.set(lock, "another poller", px=30_000)
    began = time.monotonic()
    assert drain(runtime, reclaim_older_than_ms=RECLAIM_MS, wake=True) == 0
    # Waiting for the lock would take its 30 s; a few Redis calls take well under this even on
    # two busy cores.
    assert time.monotonic() - began < 5.0, "it does not wait for the lock"
    assert wanted(runtime) and polls(emulator, runtime) == []

    runtime.redis.delete(lock)  # the holder lets go, finds the flag, drains again
    assert drain(runtime, reclaim_older_than_ms=RECLAIM_MS, wake=False) == 1
    assert runtime.registry.held_ids() == [work_id] and not wanted(runtime)


def test_a_drain_the_full_fleet_cut_short_stands_until_a_slot_frees(
        emulator: Any, runtime: Runtime) -> None:
    advertise(runtime, 1)
    first = emulator.create_session(runtime.environment_id)[1]
    second = emulator.create_session(runtime.environment_id)[1]
    assert drain(runtime, reclaim_older_than_ms=RECLAIM_MS, wake=True) == 1
    assert runtime.registry.held_ids() == [first] and wanted(runtime)
    assert len(polls(emulator, runtime)) == 1, "a full fleet does not poll"

    assert drain(runtime, reclaim_older_than_ms=RECLAIM_MS, wake=False) == 0, "still full"
    runtime.registry.delete(first)
    assert drain(runtime, reclaim_older_than_ms=RECLAIM_MS, wake=False) == 1
    assert runtime.registry.held_ids() == [second]
