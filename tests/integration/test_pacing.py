"""The server's pacing, honoured by the whole fleet: a 429 with a long `retry-after` (past the
60 s the SDK honours) silences an environment's polls and list scans until it lapses; the stop
bridge backs off on errors, and shrinks a page size the server refuses. Real Redis and the
emulator over HTTP, its fault switches set as a test needs."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import pytest

from dispatcher.control import bridge
from dispatcher.control.bridge import scan_server_stops
from dispatcher.control.pacing import Pacing
from dispatcher.control.poll_keys import PollKeys
from dispatcher.control.poller import drain, run_poller
from dispatcher.runtime import Runtime
from tests.support.inprocess import held_items, stop_item

pytestmark = pytest.mark.integration

LONG_RETRY_AFTER_S = 120


def _calls(emulator: Any, runtime: Runtime, endpoint: str) -> int:
    return sum(1 for e in emulator.requests_log()
               if e.get("endpoint") == endpoint
               and e.get("environment_id") == runtime.environment_id)


def test_a_long_retry_after_silences_polls_and_scans_of_the_environment(
        emulator: Any, runtime: Runtime, caplog: pytest.LogCaptureFixture) -> None:
    runtime.capacity.advertise(hostname="w1@test", slots=2, pool="threads",
                               queues=["dispatcher.sessions"])
    held_items(emulator, runtime, 1)
    emulator.set_faults(rate_limit_rate=1.0, retry_after_seconds=LONG_RETRY_AFTER_S,
                        endpoints=["poll", "list"])
    with caplog.at_level(logging.WARNING, logger="dispatcher"):
        assert scan_server_stops(runtime) == 0  # met the 429
    left = runtime.pacing.remaining(runtime.environment_id)
    assert LONG_RETRY_AFTER_S - 5 < left <= LONG_RETRY_AFTER_S, "honoured in full, not capped"
    throttled = [r for r in caplog.records if r.getMessage().startswith("server throttles")]
    assert len(throttled) == 1 and "seconds=120" in throttled[0].getMessage()
    counted = runtime.metrics.values()
    assert any(k.startswith("server_throttles") and "list" in k for k in counted), counted

    lists, polls = _calls(emulator, runtime, "list"), _calls(emulator, runtime, "poll")
    for _ in range(5):
        assert scan_server_stops(runtime) == 0
    # A poller run on another member: it waits the throttle out, polling nothing.
    run = threading.Thread(target=run_poller, args=(runtime,), kwargs={"run_seconds": 3.0})
    run.start()
    run.join(timeout=15)
    assert not run.is_alive()
    assert _calls(emulator, runtime, "list") == lists, "no scan before the time is up"
    assert _calls(emulator, runtime, "poll") == polls, "no poll before the time is up"

    # The server lifts it (the key lapses): both go on.
    runtime.redis.delete(runtime.pacing._key(runtime.environment_id))
    emulator.reset_faults()
    scan_server_stops(runtime)
    assert _calls(emulator, runtime, "list") == lists + 1


def test_a_run_waiting_out_a_throttle_ends_soon_after_its_worker_stops(
        emulator: Any, runtime: Runtime) -> None:
    """A worker's warm shutdown waits for its poller run: a run that slept out a long
    Retry-After to its run's end kept a stopping worker alive for up to a minute."""
    runtime.capacity.advertise(hostname="w1@test", slots=2, pool="threads",
                               queues=["dispatcher.sessions"])
    runtime.pacing.note(runtime.environment_id, status=429, retry_after=LONG_RETRY_AFTER_S,
                        source="poll")
    stopping = threading.Event()
    run = threading.Thread(target=run_poller, args=(runtime,),
                           kwargs={"run_seconds": 60.0, "stopping": stopping.is_set})
    run.start()
    time.sleep(1.0)
    assert run.is_alive(), "the run waits the throttle out"
    stopped = time.monotonic()
    stopping.set()
    run.join(timeout=30)
    assert not run.is_alive()
    assert time.monotonic() - stopped < 10, "ended within a few naps, not at the run's end"
    assert _calls(emulator, runtime, "poll") == 0, "nothing polled under the throttle"


def test_a_wake_up_under_a_throttle_polls_nothing_and_leaves_its_wake_up_standing(
        emulator: Any, runtime: Runtime) -> None:
    """The webhook drain holds a control slot: it never sleeps through a throttle; the wake-up
    flag stands, and a tick after the throttle drains."""
    runtime.capacity.advertise(hostname="w1@test", slots=2, pool="threads",
                               queues=["dispatcher.sessions"])
    emulator.create_session(runtime.environment_id, metadata={})
    runtime.pacing.note(runtime.environment_id, status=429, retry_after=120.0, source="poll")
    polls = _calls(emulator, runtime, "poll")
    started = time.monotonic()
    assert drain(runtime, reclaim_older_than_ms=2000, wake=True) == 0
    # Waiting the throttle out would take its 120 s; the bound is for two busy cores.
    assert time.monotonic() - started < 10, "no wait in a control slot"
    assert _calls(emulator, runtime, "poll") == polls
    wanted = PollKeys(runtime.settings.key_prefix).wanted(runtime.environment_id)
    assert runtime.redis.exists(wanted), "the wake-up stands"
    runtime.redis.delete(runtime.pacing._key(runtime.environment_id))
    assert drain(runtime, reclaim_older_than_ms=2000, wake=False) == 1


def test_a_throttle_is_never_shortened_and_is_logged_once(
        emulator: Any, runtime: Runtime, caplog: pytest.LogCaptureFixture) -> None:
    pacing = Pacing(runtime.redis, prefix=runtime.settings.key_prefix)
    env = runtime.environment_id
    with caplog.at_level(logging.WARNING, logger="dispatcher"):
        assert pacing.note(env, status=429, retry_after=120.0, source="poll") == 120.0
        assert pacing.note(env, status=429, retry_after=1.0, source="poll") == 1.0
        assert pacing.note(env, status=429, retry_after=None, source="list") == 8.0
        assert pacing.note(env, status=503, retry_after=None, source="list") is None
        assert pacing.note(env, status=500, retry_after=None, source="list") is None
    assert pacing.remaining(env) > 115, "a shorter answer does not shorten it"
    assert pacing.remaining_all([env, "env_other"])["env_other"] == 0.0
    assert sum(r.getMessage().startswith("server throttles") for r in caplog.records) == 1


def test_the_bridge_backs_off_on_errors(emulator: Any, runtime: Runtime) -> None:
    held_items(emulator, runtime, 1)
    emulator.set_faults(error_rate=1.0, endpoints=["list"])
    before = _calls(emulator, runtime, "list")
    scan_server_stops(runtime)
    scan_server_stops(runtime)  # within the backoff: no call
    assert _calls(emulator, runtime, "list") == before + 1
    assert runtime.pacing.remaining(runtime.environment_id) == 0, "a 500 is no throttle"
    time.sleep(0.6)  # the first backoff is 0.5 s at most
    scan_server_stops(runtime)
    assert _calls(emulator, runtime, "list") == before + 2


def test_a_refused_page_size_is_made_smaller_and_remembered(
        emulator: Any, runtime: Runtime, caplog: pytest.LogCaptureFixture) -> None:
    """A server that takes `limit` only up to 50: the stop is still seen in the same tick."""
    ids = held_items(emulator, runtime, 3)
    stop_item(emulator, runtime, ids[0])
    emulator.set_faults(list_limit_max=50)
    with caplog.at_level(logging.WARNING, logger="dispatcher"):
        assert scan_server_stops(runtime) == 1
    refused = [r.getMessage() for r in caplog.records
               if r.getMessage().startswith("list page size refused")]
    assert len(refused) == 1 and "refused=100" in refused[0] and "next_size=50" in refused[0]
    lease = runtime.registry.get(ids[0])
    assert lease is not None and lease.stop is not None
    log = [e for e in emulator.requests_log()
           if e.get("endpoint") == "list" and e.get("environment_id") == runtime.environment_id]
    assert [e.get("status") for e in log[-2:]] == [400, 200]
    stop_item(emulator, runtime, ids[1])
    assert scan_server_stops(runtime) == 1
    statuses = [e.get("status") for e in emulator.requests_log()
                if e.get("endpoint") == "list"
                and e.get("environment_id") == runtime.environment_id]
    assert statuses[-1] == 200 and statuses.count(400) == 1, "the smaller size was remembered"


def test_few_leases_held_cost_one_page_a_tick_however_long_the_queue(
        emulator: Any, runtime: Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    """The request rate scales with the leases held, not with the items queued: one held lease
    under 60 queued items (pages of 5: 13 pages) is one `list` call a tick."""
    monkeypatch.setattr(bridge, "LIST_PAGE_SIZE", 5)
    held_items(emulator, runtime, 1)
    for _ in range(60):
        emulator.create_session(runtime.environment_id, metadata={})
    before = _calls(emulator, runtime, "list")
    for tick in range(1, 6):
        scan_server_stops(runtime)
        assert _calls(emulator, runtime, "list") - before == tick
