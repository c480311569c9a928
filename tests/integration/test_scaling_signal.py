"""The scaling signal follows queued and running sessions: the emulator over real HTTP, real
Redis, the real poller claiming, the metrics endpoint scraped over HTTP (gauge and `/scaling`)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from dispatcher.control.poller import run_poller
from dispatcher.metrics import SCALING_PATH, FleetCollector, ServerStats, serve
from dispatcher.runtime import Runtime
from dispatcher.workapi import WorkClient

pytestmark = pytest.mark.integration

GAUGE = "dispatcher_scaling_desired_slots"


class Scraper:
    """The endpoint with a `stats` cache of zero seconds: each scrape sees the server now."""

    def __init__(self, runtime: Runtime) -> None:
        self.environment_id = runtime.environment_id
        self.client = WorkClient.from_settings(runtime.settings, max_retries=0, timeout=5.0)
        collector = FleetCollector(runtime.metrics, runtime.registry, runtime.capacity,
                                   ServerStats(self.client, ttl_seconds=0.0))
        self.server = serve(host="127.0.0.1", port=0, collector=collector)
        self.base = f"http://127.0.0.1:{self.server.server_port}"

    def gauge(self) -> float | None:
        text = httpx.get(self.base + "/metrics", timeout=10).text
        values = [s.value for f in text_string_to_metric_families(text) for s in f.samples
                  if s.name == GAUGE and s.labels["environment"] == self.environment_id]
        return values[0] if values else None

    def document(self) -> dict[str, Any]:
        response = httpx.get(self.base + SCALING_PATH, timeout=10)
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/json"
        found: dict[str, Any] = response.json()
        return found

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.client.close()


@pytest.fixture
def scraper(runtime: Runtime) -> Iterator[Scraper]:
    served = Scraper(runtime)
    try:
        yield served
    finally:
        served.close()


def _wait_held(runtime: Runtime, count: int) -> None:
    deadline = time.monotonic() + 10
    while runtime.registry.held_count() < count and time.monotonic() < deadline:
        time.sleep(0.05)
    assert runtime.registry.held_count() == count


def test_the_desired_slots_follow_queued_and_running_sessions(
        emulator: Any, runtime: Runtime, scraper: Scraper) -> None:
    assert scraper.gauge() == 0, "nothing queued, nothing held"
    for _ in range(3):
        emulator.create_session(runtime.environment_id, metadata={})
    time.sleep(0.05)  # an age above zero
    assert scraper.gauge() == 3, "three queued"
    queued = scraper.document()["environments"][runtime.environment_id]
    assert (queued["queued"], queued["held"], queued["desired_slots"]) == (3, 0, 3)
    assert queued["oldest_queued_age_seconds"] > 0

    # Two slots: the poller claims two; they are leases held now, the third still queued.
    runtime.capacity.advertise(hostname="w1@test", slots=2, pool="threads",
                               queues=["dispatcher.sessions"])
    run = threading.Thread(target=run_poller, args=(runtime,), kwargs={"run_seconds": 2.0})
    run.start()
    _wait_held(runtime, 2)
    run.join(timeout=10)
    assert scraper.gauge() == 3, "two held and one queued: still three slots wanted"
    claimed = scraper.document()
    figures = claimed["environments"][runtime.environment_id]
    assert (figures["queued"], figures["pending"], figures["held"]) == (1, 0, 2)
    assert claimed["desired_slots"] == 3, "the fleet's total, one environment"

    # One session ends: its lease is gone, the demand falls with it.
    runtime.registry.delete(runtime.registry.held_ids()[0])
    assert scraper.gauge() == 2


def test_a_server_that_does_not_answer_gives_no_figure_to_scale_on(
        emulator: Any, runtime: Runtime, scraper: Scraper) -> None:
    emulator.set_faults(error_rate=1.0, endpoints=["stats"])
    try:
        assert scraper.gauge() is None, "absent, not a guess"
        document = scraper.document()
        assert "desired_slots" not in document, "KEDA errors and uses its fallback"
        assert document["environments"][runtime.environment_id]["server_up"] is False
    finally:
        emulator.reset_faults()
