"""The poller claims only what the fleet has free slots for, and fills a slot as soon as it
frees up within the same run. Real Redis and the emulator over HTTP."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

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
