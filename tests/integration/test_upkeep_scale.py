"""The per-second upkeep at scale: recovery reads only the leases gone silent (an index of each
lease's last sign of progress), and the stop bridge reads its held leases' worth of `list` a
tick (within a page budget and a time budget), sweeping a longer list over several ticks. Real
Redis and the emulator over HTTP; page sizes are shrunk so a dozen items make several pages,
and the bridge's checks count pages and sweeps, never seconds: its time budget is set out of
reach (or to nothing) so a loaded machine cannot change what a tick reads."""

from __future__ import annotations

import time
from typing import Any

import pytest

from dispatcher.control import bridge
from dispatcher.control.bridge import scan_server_stops
from dispatcher.control.recovery import recover
from dispatcher.lease import registry as registry_module
from dispatcher.lease.causes import LossCause
from dispatcher.lease.machine.running import DISPATCH_STALE_SECONDS, PULSE_STALE_SECONDS
from dispatcher.lease.model import Phase
from dispatcher.runtime import Runtime
from tests.support.inprocess import held_items, stop_item

pytestmark = pytest.mark.integration


def _cursor(runtime: Runtime) -> str | None:
    return runtime.registry.stop_scan_cursor(runtime.environment_id)


def _lists(emulator: Any, runtime: Runtime) -> int:
    return sum(1 for e in emulator.requests_log()
               if e.get("endpoint") == "list" and e.get("environment_id") == runtime.environment_id)


# --- recovery --------------------------------------------------------------------------------
def test_recovery_reads_only_silent_leases_and_restarts_the_dead_one(
        emulator: Any, runtime: Runtime) -> None:
    alive, dead = held_items(emulator, runtime, 2)
    registry = runtime.registry
    assert registry.silent_since(time.time() - PULSE_STALE_SECONDS) == []
    past = time.time() - PULSE_STALE_SECONDS - 1
    registry.update(dead, seen=past, pulse_at=past)  # as if its worker died 6 s ago
    assert [lease.work_id for lease in registry.silent_since(time.time() - 5)] == [dead]
    assert registry.pulse(alive, 1, worker="w@h").current
    assert recover(runtime) == 1
    restarted, kept = registry.get(dead), registry.get(alive)
    assert restarted is not None and (restarted.attempt, restarted.phase) == (2, Phase.DISPATCHED)
    assert kept is not None and kept.attempt == 1
    assert [s["kwargs"]["work_id"] for s in runtime.app.sent] == [dead]
    assert registry.silent_since(time.time() - 5) == [], "a new attempt is a sign of progress"


def test_a_lease_pulsed_without_the_index_is_judged_by_its_record_not_the_index(
        emulator: Any, runtime: Runtime) -> None:
    # A session worker of an older version (mid-deploy) writes the pulse time only.
    (work_id,) = held_items(emulator, runtime, 1)
    registry = runtime.registry
    past = time.time() - PULSE_STALE_SECONDS - 1
    registry.redis.zadd(registry.keys.last_seen, {work_id: past})
    registry.redis.hset(registry.keys.lease(work_id), "pulse_at", time.time())
    assert registry.silent_since(time.time() - 5) == []
    assert recover(runtime) == 0, "alive on its record: never restarted"
    score = registry.redis.zscore(registry.keys.last_seen, work_id)
    assert score is not None and score > time.time() - 5, "its entry moved on"


def test_a_held_lease_missing_from_the_index_is_indexed_and_still_recovered(
        emulator: Any, runtime: Runtime) -> None:
    # Written before the index existed; its worker died since.
    (work_id,) = held_items(emulator, runtime, 1)
    registry = runtime.registry
    registry.redis.zrem(registry.keys.last_seen, work_id)
    registry.redis.hset(registry.keys.lease(work_id), "pulse_at", time.time() - 60)
    assert recover(runtime) == 1
    lease = registry.get(work_id)
    assert lease is not None and lease.attempt == 2
    assert registry.redis.zscore(registry.keys.last_seen, work_id) is not None


def test_recovery_moves_a_lost_message_on_and_leaves_a_queued_one(
        emulator: Any, runtime: Runtime) -> None:
    """Dispatched 31 s ago and never started: published and never received waits (at one look;
    `test_lost_messages` reads a real queue); never published, or received and not started
    since, is lost: a new attempt, on either broker."""
    past = time.time() - DISPATCH_STALE_SECONDS - 1
    queued, unsent, taken, just_taken = held_items(emulator, runtime, 4, phase=Phase.DISPATCHED,
                                              dispatched_at=past)
    deliveries = runtime.deliveries
    for work_id in (queued, taken, just_taken):
        deliveries.published(f"t-{work_id}")
    deliveries.received(f"t-{taken}", worker="dead@h")
    runtime.redis.hset(runtime.registry.keys.delivery(f"t-{taken}"), "received_at", past)
    deliveries.received(f"t-{just_taken}", worker="busy@h")
    assert recover(runtime) == 2
    attempts = {w: lease.attempt for w in (queued, unsent, taken, just_taken)
                if (lease := runtime.registry.get(w)) is not None}
    assert attempts == {queued: 1, unsent: 2, taken: 2, just_taken: 1}
    assert sorted(s["kwargs"]["work_id"] for s in runtime.app.sent) == sorted([unsent, taken])
    for sent in runtime.app.sent:
        assert deliveries.of(sent["task_id"]).published, "the new message is marked published"


def test_released_leases_leave_no_index_entries(emulator: Any, runtime: Runtime) -> None:
    ids = held_items(emulator, runtime, 2)
    registry = runtime.registry
    registry.delete(ids[0])
    assert registry.update(ids[0], seen=time.time(), pulse_at=time.time()) is False
    keys = registry.keys
    assert registry.redis.zscore(keys.last_seen, ids[0]) is None
    assert registry.redis.zscore(keys.last_seen, ids[1]) is not None


# --- the stop bridge -------------------------------------------------------------------------
@pytest.fixture
def small_pages(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bridge, "LIST_PAGE_SIZE", 5)
    monkeypatch.setattr(bridge, "MAX_PAGES_PER_TICK", 2)
    monkeypatch.setattr(bridge, "TICK_BUDGET_SHARE", 1_000.0)


@pytest.fixture
def untimed_pages(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pages of 5, and a tick's time budget no machine's load reaches."""
    monkeypatch.setattr(bridge, "LIST_PAGE_SIZE", 5)
    monkeypatch.setattr(bridge, "TICK_BUDGET_SHARE", 1_000.0)


def test_every_stop_among_the_held_items_is_seen_in_one_tick(
        emulator: Any, runtime: Runtime, untimed_pages: None) -> None:
    """A tick reads the held leases' worth of pages back to back, not a fixed few: 40 held
    items in pages of 5 are one sweep of 8 pages, and every stop in it is seen by that tick."""
    ids = held_items(emulator, runtime, 40)
    stopped = [ids[0], ids[19], ids[39]]  # the oldest (last listed), the middle, the newest
    for work_id in stopped:
        stop_item(emulator, runtime, work_id)
    before = _lists(emulator, runtime)
    assert scan_server_stops(runtime) == 3
    assert _lists(emulator, runtime) - before == 8, "one sweep, and not a page more"
    assert _cursor(runtime) is None, "the sweep ended: next tick from the top"
    assert all(runtime.registry.get(w).stop_seen_at for w in stopped)  # type: ignore[union-attr]


def test_a_tick_out_of_time_reads_one_page_and_the_sweep_goes_on_from_there(
        emulator: Any, runtime: Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bridge, "LIST_PAGE_SIZE", 5)
    monkeypatch.setattr(bridge, "TICK_BUDGET_SHARE", 0.0)
    ids = held_items(emulator, runtime, 12)  # 3 pages
    stop_item(emulator, runtime, ids[0])
    before = _lists(emulator, runtime)
    ticks = [scan_server_stops(runtime) for _ in range(3)]
    assert ticks == [0, 0, 1], "a page a tick: found on the third"
    assert _lists(emulator, runtime) - before == 3
    assert _cursor(runtime) is None


def test_an_environment_another_tick_sweeps_is_left_to_it(
        emulator: Any, runtime: Runtime, untimed_pages: None) -> None:
    """Two ticks reading from one cursor would read every page twice: the second one waits."""
    held_items(emulator, runtime, 3)
    lock = runtime.redis.lock(bridge._state(runtime, "stop-sweep", runtime.environment_id),
                              timeout=30)
    assert lock.acquire(blocking=False)
    before = _lists(emulator, runtime)
    assert scan_server_stops(runtime) == 0
    assert _lists(emulator, runtime) == before
    lock.release()
    assert scan_server_stops(runtime) == 0
    assert _lists(emulator, runtime) == before + 1, "once free, swept again"


def test_a_stop_on_a_held_item_is_seen_within_one_tick_while_pages_fit(
        emulator: Any, runtime: Runtime, small_pages: None) -> None:
    ids = held_items(emulator, runtime, 8)  # 2 pages
    stop_item(emulator, runtime, ids[0])  # the oldest: on the last page
    before = _lists(emulator, runtime)
    assert scan_server_stops(runtime) == 1
    assert _lists(emulator, runtime) - before == 2
    lease = runtime.registry.get(ids[0])
    # Never acked on the server, so its stop ends it at once: `stopped`, the lease lost.
    assert lease is not None
    assert (lease.stop, lease.stop_cause) == ("force", LossCause.SERVER_STOPPED)
    assert _cursor(runtime) is None, "a whole sweep: next tick from the top"
    assert scan_server_stops(runtime) == 0, "an applied stop is not new again"


def test_a_longer_list_is_swept_over_several_ticks_within_the_page_budget(
        emulator: Any, runtime: Runtime, small_pages: None) -> None:
    ids = held_items(emulator, runtime, 17)  # 4 pages: 2 ticks of 2 pages
    stop_item(emulator, runtime, ids[0])
    before = _lists(emulator, runtime)
    assert scan_server_stops(runtime) == 0, "tick one reads the newest 10 items only"
    assert _lists(emulator, runtime) - before == 2
    assert _cursor(runtime) is not None, "the sweep continues from there"
    assert scan_server_stops(runtime) == 1, "tick two reads on, to the last held item"
    assert _lists(emulator, runtime) - before == 4
    assert _cursor(runtime) is None


def test_nothing_held_means_no_list_call(emulator: Any, runtime: Runtime) -> None:
    before = _lists(emulator, runtime)
    assert scan_server_stops(runtime) == 0
    assert _lists(emulator, runtime) == before
    assert _cursor(runtime) is None


def test_a_sweep_reads_on_until_every_held_item_was_listed(
        emulator: Any, runtime: Runtime, small_pages: None) -> None:
    """Nothing is assumed of the list's order or page size: items we do not hold (here, newer
    ones nobody claimed) are read past until every held one was listed, a page a tick: three
    leases held are worth one page of five, however many items wait before them."""
    ids = held_items(emulator, runtime, 3)
    for _ in range(12):
        emulator.create_session(runtime.environment_id, metadata={})
    stop_item(emulator, runtime, ids[0])
    before = _lists(emulator, runtime)
    ticks = [scan_server_stops(runtime) for _ in range(3)]
    assert ticks == [0, 0, 1], "found in the sweep's third tick"
    assert _lists(emulator, runtime) - before == 3, "15 items, 5 a page, and not a page more"
    assert _cursor(runtime) is None


def test_a_sweep_ends_on_the_page_that_lists_the_last_held_item(
        emulator: Any, runtime: Runtime, untimed_pages: None,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Older items nobody holds are not read, while the next page is asked for ahead of each
    one applied; the seen-note, here in chunks of 2 ids, counts every held item once."""
    monkeypatch.setattr(registry_module, "NOTE_CHUNK", 2)
    for _ in range(10):
        emulator.create_session(runtime.environment_id, metadata={})
    ids = held_items(emulator, runtime, 7)  # the newest: a page of 5, then 2 and 3 not held
    stop_item(emulator, runtime, ids[0])  # the oldest held: on the second page
    before = _lists(emulator, runtime)
    assert scan_server_stops(runtime) == 1
    assert _lists(emulator, runtime) - before == 2, "the sweep ended with the last held item"
    assert _cursor(runtime) is None
