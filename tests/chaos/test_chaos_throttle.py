"""The server throttles the fleet: `429 retry-after: 120` for a minute, on a real fleet against
the emulator over HTTP. Every request to the environment waits for the time to be up (polls,
list scans, acks, stops), except the heartbeats of leases that would lapse first; no lease
lapses and no session is lost. Counted from the emulator's request log."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from typing import Any

import pytest

from dispatcher.lease.machine import heartbeat_interval
from tests.support.chaos import ChaosFleet, Figures
from tests.support.waiting import wait_for

pytestmark = pytest.mark.chaos

RETRY_AFTER_S = 120
# The minute the test watches the throttle for (of its 120 s).
WINDOW_S = 60.0
# A 12 s TTL: heartbeats every 4 s as usual; under the throttle one at each lease's last safe
# moment, 8 s after the last answered one (one interval before the lapse).
TTL_S = 12
SESSIONS = 4
# Long enough to hold their leases into the window, short enough to end inside it: their stops
# (releases) then wait for the throttle too, their leases heartbeated meanwhile.
SESSION_S = 30.0
# Requests already on their way when the first 429 came back (a long poll, a tick's list).
IN_FLIGHT_S = 1.0
# A heartbeat's arrival may lead its due time by the send's own latency and a tick's jitter.
ARRIVAL_SLACK_S = 1.0


def _log(cf: ChaosFleet) -> list[dict[str, Any]]:
    return [e for e in cf.fleet.emulator.requests_log()
            if e.get("environment_id") == cf.fleet.environment_id]


def _first_429(cf: ChaosFleet) -> float | None:
    return next((float(e["time"]) for e in _log(cf) if e.get("status") == 429), None)


def test_a_long_retry_after_holds_every_request_but_the_heartbeats_leases_need(
        chaos: Callable[..., ChaosFleet], report: Callable[[Figures], None]) -> None:
    cf = chaos(f"API 429 retry-after {RETRY_AFTER_S} s for a minute", ttl=TTL_S)
    cf.control()
    cf.sessions_worker("s1", concurrency=SESSIONS)
    cf.fleet.wait_slots(SESSIONS)
    running = cf.create(SESSIONS, fake_duration=SESSION_S)
    cf.wait_started(running)
    # Every Work API call but the heartbeat is answered 429: a server throttling the fleet
    # that still extends the leases it is sent (else no fleet could keep them).
    cf.fleet.emulator.set_faults(rate_limit_rate=1.0, retry_after_seconds=RETRY_AFTER_S,
                                 endpoints=["poll", "list", "ack", "stop", "get", "update"])
    wait_for(lambda: _first_429(cf) is not None, timeout=30, interval=0.2,
             what="the first 429 (the stop bridge lists every second)")
    began = _first_429(cf)
    assert began is not None
    # Work that arrives during the throttle: the fleet has free slots once the first sessions
    # end, but polls nothing until the time is up.
    waiting = cf.create(2, fake_duration=2.0)
    time.sleep(max(0.0, began + WINDOW_S - time.time()))
    window = [e for e in _log(cf) if began + IN_FLIGHT_S < float(e["time"]) <= began + WINDOW_S]
    # The minute is shown; the rest of the 120 s shows nothing new. The server lifts its
    # throttle early (the key's time left set to none) so the test ends a minute sooner.
    cf.fleet.emulator.reset_faults()
    cf.fleet.redis.delete(f"{cf.fleet.prefix}:lock:throttled:{cf.fleet.environment_id}")
    figures = cf.finish(timeout=120)

    others = [f"{e['endpoint']} at +{float(e['time']) - began:.1f}s" for e in window
              if e.get("endpoint") != "heartbeat"]
    assert not others, f"requests before the time was up: {others}"
    beats: dict[str, list[float]] = {}
    for entry in (e for e in _log(cf) if e.get("endpoint") == "heartbeat"):
        beats.setdefault(str(entry["work_id"]), []).append(float(entry["time"]))
    last_safe = TTL_S - heartbeat_interval(TTL_S)
    early = []
    for work_id, times in beats.items():
        for before, after in itertools.pairwise(times):
            if began + IN_FLIGHT_S < after <= began + WINDOW_S and \
                    after - before < last_safe - ARRIVAL_SLACK_S:
                early.append(f"{work_id}: {after - before:.1f}s after the one before")
    assert not early, f"heartbeats sent while their lease could still wait: {early}"
    in_window = sum(1 for e in window if e.get("endpoint") == "heartbeat")
    assert 0 < in_window <= SESSIONS * (WINDOW_S / last_safe + 1), in_window
    assert cf.log_lines("server throttles the fleet"), "the throttle is logged"
    assert not set(waiting) & {str(e.get("work_id")) for e in window}, "no ack of new work"
    figures.faults = sum(1 for e in _log(cf) if e.get("status") == 429)
    figures.fault_kinds = (f"429 retry-after {RETRY_AFTER_S} s x{figures.faults}; "
                           f"{in_window} heartbeats in the minute (usual: "
                           f"{int(SESSIONS * WINDOW_S / heartbeat_interval(TTL_S))})")
    report(figures)
