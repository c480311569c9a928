"""The stop bridge's request rate under 10,000 queued items: bounded by the leases held, not by
the queue. Real Redis and the emulator over HTTP; each call of `scan_server_stops` is one beat
tick (beat runs one a second), so `list` calls per tick are `list` calls per second.

By default at a twentieth of the scale, every ratio kept (500 items in pages of 5 are the 100
pages of 10,000 in pages of 100; 50 leases held fill 10 pages a tick as 1,000 do), so it stays
cheap. `DISPATCHER_BRIDGE_RATE_SCALE=1` runs it at full scale, 10,000 items queued on the
emulator: docs/operations.md's figures ("The server's pacing") come from that run."""

from __future__ import annotations

import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from dispatcher.control import bridge
from dispatcher.control.bridge import LIST_PAGE_SIZE, scan_server_stops
from dispatcher.lease.model import Lease, Phase
from dispatcher.runtime import Runtime
from tests.support.inprocess import held_items

pytestmark = pytest.mark.integration

SCALE = int(os.environ.get("DISPATCHER_BRIDGE_RATE_SCALE", "20"))
QUEUED = 10_000 // SCALE
PAGE = LIST_PAGE_SIZE // SCALE
HELD = 1_000 // SCALE
TICKS = 12


def _lists(emulator: Any, runtime: Runtime) -> int:
    return sum(1 for e in emulator.requests_log()
               if e.get("endpoint") == "list"
               and e.get("environment_id") == runtime.environment_id)


def _per_tick(emulator: Any, runtime: Runtime) -> tuple[list[int], float]:
    """`list` calls of each of TICKS ticks, and the slowest tick's seconds."""
    calls, slowest = [], 0.0
    for _ in range(TICKS):
        before = _lists(emulator, runtime)
        started = time.monotonic()
        scan_server_stops(runtime)
        slowest = max(slowest, time.monotonic() - started)
        calls.append(_lists(emulator, runtime) - before)
    return calls, slowest


def _hold(runtime: Runtime, count: int) -> None:
    """`count` more leases held, of items the server lists nowhere near the front (a scan
    never finds them all, so every sweep runs to the queue's end)."""
    now = time.time()
    for n in range(count):
        runtime.registry.create(Lease(
            work_id=f"work_held{n:05d}", session_id=f"sesn_held{n:05d}",
            environment_id=runtime.environment_id, mode="dispatcher",
            queue="dispatcher.sessions", phase=Phase.RUNNING, task_id=f"t-{n}", worker="w@h",
            claimed_at=now, dispatched_at=now, pulse_at=now), work_json="{}")


def test_the_bridge_request_rate_under_10000_queued_items(
        emulator: Any, runtime: Runtime, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bridge, "LIST_PAGE_SIZE", PAGE)
    # The page counts are the rule's, not a loaded machine's: the tick's time budget (which can
    # only lower them) is out of reach; the slowest tick shows what it would have cut.
    monkeypatch.setattr(bridge, "TICK_BUDGET_SHARE", 1_000.0)
    held_items(emulator, runtime, 1)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda _: emulator.enqueue(runtime.environment_id, "session"),
                      range(QUEUED)))

    one, one_slowest = _per_tick(emulator, runtime)
    assert one == [1] * TICKS, "one lease held: one page a tick, however long the queue"

    _hold(runtime, HELD - 1)
    many, many_slowest = _per_tick(emulator, runtime)
    # 1,000 held at pages of 100: ten pages a tick, the sweep going on from its cursor.
    assert max(many) <= 10 and sum(many) >= TICKS * 5, many

    emulator.set_faults(list_limit_max=PAGE // 2)
    small, _ = _per_tick(emulator, runtime)
    # The first tick meets the refused size once (a call more); a tick reads the held leases'
    # worth in pages of the size the server named, twice as many (fewer where a sweep ends).
    assert max(small[1:]) == math.ceil(HELD / (PAGE // 2)), small
    assert max(small) <= math.ceil(HELD / (PAGE // 2)) + 1, small

    emulator.set_faults(list_limit_max=None, error_rate=1.0, endpoints=["list"])
    failing, _ = _per_tick(emulator, runtime)
    assert sum(failing) <= TICKS // 2 + 1, f"errors back off: {failing}"
    with capsys.disabled():
        print(f"\nstop bridge under {QUEUED} queued items, pages of {PAGE}, list calls a tick "
              f"(= a second): 1 held {max(one)} (slowest tick {one_slowest:.2f}s); {HELD} held "
              f"{max(many)} (slowest {many_slowest:.2f}s); {HELD} held at pages of {PAGE // 2} "
              f"{max(small)}; every list failing {sum(failing)} in {TICKS} ticks")
