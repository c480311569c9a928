"""The Prometheus endpoint by convention, served over real HTTP from real Redis, with server
figures from the emulator: names, units, bounded labels, build_info, the loopback default, the
cost of a scrape (no Work API call within the cache window), stalled connections dropped, and
the Grafana dashboard's metrics all served."""

from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from dispatcher import metrics as metrics_module
from dispatcher.lease.causes import LossCause, StopCause
from dispatcher.metrics import (
    COUNTERS,
    OTHER,
    SERVER_STATS_CACHE_SECONDS,
    FleetCollector,
    ServerStats,
    serve,
)
from dispatcher.runtime import Runtime
from dispatcher.settings import Settings
from dispatcher.workapi import WorkClient
from tests.support.isolation import free_port

pytestmark = pytest.mark.integration

DASHBOARD = Path(__file__).resolve().parents[2] / "docs" / "grafana-dashboard.json"
SNAKE = re.compile(r"^[a-z][a-z0-9_]*$")
METRIC_NAME = re.compile(r"\bdispatcher_[a-z0-9_]+")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Endpoint:
    def __init__(self, runtime: Runtime, clock: Clock) -> None:
        self.runtime = runtime
        self.clock = clock
        self.client = WorkClient.from_settings(runtime.settings, max_retries=0, timeout=5.0)
        collector = FleetCollector(runtime.metrics, runtime.registry, runtime.capacity,
                                   ServerStats(self.client, clock=clock))
        self.server = serve(host=runtime.settings.metrics_host, port=0, collector=collector)
        self.url = f"http://127.0.0.1:{self.server.server_port}/metrics"

    def scrape(self) -> list[Any]:
        response = httpx.get(self.url, timeout=10)
        assert response.status_code == 200, response.text
        return [s for family in text_string_to_metric_families(response.text)
                for s in family.samples]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.client.close()


@pytest.fixture
def endpoint(runtime: Runtime) -> Iterator[Endpoint]:
    served = Endpoint(runtime, Clock())
    try:
        yield served
    finally:
        served.close()


def stats_calls(emulator: Any, environment_id: str) -> int:
    return sum(1 for entry in emulator.requests_log()
               if (entry.get("endpoint"), entry.get("environment_id")) == ("stats", environment_id))


def test_bound_to_loopback_by_default(endpoint: Endpoint) -> None:
    assert Settings.model_fields["metrics_host"].default == "127.0.0.1"
    assert endpoint.runtime.settings.metrics_host == "127.0.0.1"
    assert endpoint.server.server_address[0] == "127.0.0.1"


def test_names_units_and_build_info(endpoint: Endpoint) -> None:
    endpoint.runtime.metrics.observe("dispatch_latency_seconds", 0.2)
    samples = endpoint.scrape()
    names = {s.name for s in samples}
    for counter in COUNTERS:
        assert f"dispatcher_{counter}_total" in names, counter
    for expected in ("dispatcher_dispatch_latency_seconds_bucket",
                     "dispatcher_stop_latency_seconds_count", "dispatcher_leases_held",
                     "dispatcher_session_slots", "dispatcher_workers", "dispatcher_server_up",
                     "dispatcher_server_queue_depth", "dispatcher_server_queue_oldest_age_seconds"):
        assert expected in names, expected
    assert all(SNAKE.match(n) and n.startswith("dispatcher_") for n in names)
    info = [s for s in samples if s.name == "dispatcher_build_info"]
    assert len(info) == 1 and info[0].value == 1
    assert re.match(r"^\d+\.\d+", info[0].labels["version"])
    assert {s.labels["state"] for s in samples if s.name == "dispatcher_session_slots"} == {
        "used", "free"}


def test_slots_sum_to_the_slots_of_live_workers(endpoint: Endpoint) -> None:
    endpoint.runtime.capacity.advertise(hostname="w@h", slots=3, pool="threads",
                                        queues=["dispatcher.sessions"])
    samples = endpoint.scrape()
    slots = {s.labels["state"]: s.value for s in samples if s.name == "dispatcher_session_slots"}
    assert slots == {"used": 0, "free": 3}


def test_label_values_are_bounded(endpoint: Endpoint) -> None:
    recorded = endpoint.runtime.metrics
    recorded.inc("leases_lost", cause=LossCause.HEARTBEAT_REFUSED)
    recorded.inc("leases_lost", cause="a cause nobody foresaw, with spaces: 42")
    recorded.inc("work_stop_requests", cause=StopCause.SERVER)
    samples = endpoint.scrape()
    for sample in samples:
        name = sample.name.removeprefix("dispatcher_").removesuffix("_total")
        if name in COUNTERS and sample.name.endswith("_total"):
            counter = COUNTERS[name]
            assert set(sample.labels) == {"environment", counter.label}
            assert sample.labels[counter.label] in (*counter.values, OTHER), sample
            assert sample.labels["environment"] in ("", endpoint.runtime.environment_id)
    lost = {s.labels["cause"]: s.value for s in samples if s.name == "dispatcher_leases_lost_total"}
    assert (lost["heartbeat_rejected"], lost[OTHER]) == (1, 1)
    stops = {s.labels["cause"]: s.value for s in samples
             if s.name == "dispatcher_work_stop_requests_total"}
    assert stops["server"] == 1


def test_a_scrape_in_the_cache_window_makes_no_work_api_call(endpoint: Endpoint,
                                                              emulator: Any) -> None:
    environment_id = endpoint.runtime.settings.environment_id
    assert environment_id
    emulator.clear_requests()
    for _ in range(5):
        endpoint.scrape()
        endpoint.clock.now += SERVER_STATS_CACHE_SECONDS / 10
    assert stats_calls(emulator, environment_id) == 1
    endpoint.clock.now += SERVER_STATS_CACHE_SECONDS
    samples = endpoint.scrape()
    assert stats_calls(emulator, environment_id) == 2
    assert [s.value for s in samples if s.name == "dispatcher_server_up"] == [1]


def test_a_server_that_fails_is_asked_once_per_window_without_retries(
        endpoint: Endpoint, emulator: Any) -> None:
    environment_id = endpoint.runtime.settings.environment_id
    assert environment_id
    emulator.set_faults(error_rate=1.0, endpoints=["stats"])
    try:
        emulator.clear_requests()
        for _ in range(3):
            samples = endpoint.scrape()
        assert stats_calls(emulator, environment_id) == 1
        assert [s.value for s in samples if s.name == "dispatcher_server_up"] == [0]
        assert "dispatcher_server_queue_depth" not in {s.name for s in samples}
    finally:
        emulator.reset_faults()


def test_a_stalled_connection_is_dropped(endpoint: Endpoint,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics_module._Handler, "timeout", 0.5)
    with socket.create_connection(("127.0.0.1", endpoint.server.server_port), timeout=10) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\n")  # and never the rest of the request
        started = time.monotonic()
        while s.recv(4096):  # the server answers nothing, then closes
            pass
        assert time.monotonic() - started < 5
    assert endpoint.scrape()  # and it still serves everyone else


def test_redis_down_answers_503(runtime: Runtime) -> None:
    from redis import Redis

    from dispatcher.control.capacity import Capacity
    from dispatcher.lease.registry import LeaseRegistry
    from dispatcher.metrics import Metrics

    closed = free_port()
    gone = Redis.from_url(f"redis://127.0.0.1:{closed}/0", socket_connect_timeout=1)
    collector = FleetCollector(Metrics(gone, prefix="x"), LeaseRegistry(gone, prefix="x"),
                               Capacity(gone, prefix="x"), None)
    server = serve(host="127.0.0.1", port=0, collector=collector)
    try:
        response = httpx.get(f"http://127.0.0.1:{server.server_port}/metrics", timeout=10)
        assert response.status_code == 503
        assert response.text.startswith("registry unavailable")
    finally:
        server.shutdown()
        server.server_close()


def dashboard_metrics() -> set[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    assert exprs
    return {name for expr in exprs for name in METRIC_NAME.findall(expr)}


def test_every_dashboard_metric_is_served(endpoint: Endpoint) -> None:
    served = {s.name for s in endpoint.scrape()}
    wanted = dashboard_metrics()
    for figure in ("dispatch_latency", "stop_latency", "leases_held", "session_slots",
                   "server_queue_depth", "server_queue_oldest_age", "heartbeats_total"):
        assert any(figure in name for name in wanted), f"no panel shows {figure}"
    missing = wanted - served
    assert not missing, f"the dashboard queries metrics the endpoint does not serve: {missing}"
