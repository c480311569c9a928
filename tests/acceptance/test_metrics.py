"""The Prometheus exporter a worker serves with DISPATCHER_METRICS_PORT, scraped during a run."""

from __future__ import annotations

import pytest

from tests.support.fleet import Fleet
from tests.support.isolation import free_port
from tests.support.scrape import Samples, scrape, try_scrape, value
from tests.support.waiting import wait_for

pytestmark = pytest.mark.acceptance


def test_counters_move_as_sessions_complete_and_gauges_are_there(fleet: Fleet) -> None:
    port = free_port()
    fleet.overrides["DISPATCHER_METRICS_PORT"] = str(port)
    # The emulator's smallest TTL: a heartbeat about every 3.3 s, so a 5 s session gets one.
    fleet.overrides["DISPATCHER_DESIRED_TTL_SECONDS"] = "10"
    fleet.worker("w1", beat=True)
    before = wait_for(lambda: try_scrape(port), timeout=30, what="the metrics endpoint")
    assert value(before, "dispatcher_work_claimed_total") in (None, 0.0)
    fleet.wait_slots(4)

    work_ids = [fleet.create(fake_duration=0.5) for _ in range(3)]
    work_ids.append(fleet.create(fake_duration=5))
    during = wait_for(lambda: (s := scrape(port)) and (value(s, "dispatcher_leases_held") or 0)
                      and s, timeout=20, what="a lease held, seen in a scrape")
    assert (value(during, "dispatcher_session_slots", state="used") or 0) >= 1
    assert value(during, "dispatcher_session_slots") == 4, "used and free sum to every slot"
    fleet.wait_stopped(work_ids, timeout=30)

    def settled() -> Samples | None:
        s = scrape(port)
        # The server's figures are cached for 10 s: a scrape during the run may have seen the
        # queue non-empty, and the next scrapes repeat that until the cache expires.
        done = (value(s, "dispatcher_work_claimed_total", type="session") == 4
                and value(s, "dispatcher_work_released_total", outcome="completed") == 4
                and value(s, "dispatcher_leases_held") == 0
                and value(s, "dispatcher_server_queue_depth") == 0)
        return s if done else None

    after = wait_for(settled, timeout=40, what="every session counted as claimed and released")
    assert (value(after, "dispatcher_heartbeats_total", result="ok") or 0) >= 1
    assert value(after, "dispatcher_dispatch_latency_seconds_count") == 4
    assert (value(after, "dispatcher_dispatch_latency_seconds_sum") or 0) > 0
    assert value(after, "dispatcher_session_slots", state="free") == 4
    assert value(after, "dispatcher_session_slots", state="used") == 0
    assert value(after, "dispatcher_server_queue_depth") == 0
    for gauge in ("dispatcher_leases_held", "dispatcher_workers",
                  "dispatcher_server_queue_pending"):
        assert value(after, gauge) is not None, gauge
    assert value(after, "dispatcher_build_info") == 1
    assert value(after, "dispatcher_server_up") == 1
    assert f"host=127.0.0.1 port={port}" in fleet.log("w1"), "loopback unless configured"
