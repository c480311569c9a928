"""Prometheus metrics for what Flower does not know: leases, heartbeats, stops, the server queue.

Counters and histograms live in Redis (one hash), so every process of every worker adds to the
same numbers whatever its pool: a prefork child, a thread, a control task on another host. One
exporter (`dispatcher metrics`, or any worker started with `DISPATCHER_METRICS_PORT`) renders
them, with gauges read at scrape time from the registry and the server's `stats`. Scrape one
exporter per fleet: every exporter shows the same fleet-wide numbers.

Recording never fails a caller: a metric lost to a Redis hiccup is better than a lease lost.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from redis import Redis
from redis.exceptions import RedisError

from dispatcher.control.capacity import Capacity
from dispatcher.lease.registry import LeaseRegistry
from dispatcher.workapi import WorkAPIError, WorkClient

__all__ = ["COUNTERS", "HISTOGRAMS", "Metrics", "render", "serve"]

log = logging.getLogger("dispatcher.metrics")

COUNTERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "work_claimed": ("Work items claimed (polled and acked)", ("type",)),
    "work_released": ("Leases released, by how the session ended", ("outcome",)),
    "work_stop_requests": ("Stop requests applied to held leases, by cause", ("cause",)),
    "work_refused": ("Polled items not run (unknown type, ack refused, abandoned)", ("reason",)),
    "heartbeats": ("Heartbeats sent, by result", ("result",)),
    "leases_lost": ("Leases the server no longer gives us, by cause", ("cause",)),
    "attempts_restarted": ("Session attempts started again on another worker", ("reason",)),
    "healthchecks": ("Healthcheck work items answered", ("healthy",)),
}
# Buckets in seconds: dispatch targets are 0.1 s (p50) and 1 s (p99); stop target is 2 s (p99).
HISTOGRAMS: dict[str, tuple[str, tuple[float, ...]]] = {
    "dispatch_latency_seconds": (
        "Work item created to sandbox started",
        (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
    ),
    "stop_latency_seconds": (
        "Stop seen by the fleet to the sandbox signalled",
        (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0),
    ),
}
NAMESPACE = "dispatcher"


def _field(name: str, labels: dict[str, str]) -> str:
    return name + "|" + ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


def _parse_field(field: str) -> tuple[str, dict[str, str]]:
    name, _, raw = field.partition("|")
    labels = dict(pair.split("=", 1) for pair in raw.split(",") if pair)
    return name, labels


class Metrics:
    def __init__(self, redis: Redis, *, prefix: str) -> None:
        self.redis = redis
        self.key = f"{prefix}:metrics"

    def inc(self, name: str, amount: float = 1, **labels: str) -> None:
        assert name in COUNTERS, name
        self._write({_field(name, labels): amount})

    def observe(self, name: str, seconds: float, **labels: str) -> None:
        _, buckets = HISTOGRAMS[name]
        increments: dict[str, float] = {
            _field(f"{name}_bucket", {**labels, "le": str(b)}): 1 for b in buckets if seconds <= b
        }
        increments[_field(f"{name}_bucket", {**labels, "le": "+Inf"})] = 1
        increments[_field(f"{name}_count", labels)] = 1
        increments[_field(f"{name}_sum", labels)] = seconds
        self._write(increments)

    def _write(self, increments: dict[str, float]) -> None:
        try:
            pipe = self.redis.pipeline(transaction=False)
            for field, amount in increments.items():
                pipe.hincrbyfloat(self.key, field, amount)
            pipe.execute()
        except RedisError as exc:
            log.warning("metric not recorded: %s", exc)

    def values(self) -> dict[str, float]:
        return {str(k): float(v) for k, v in self.redis.hgetall(self.key).items()}


class _FleetCollector(Collector):
    def __init__(self, metrics: Metrics, registry: LeaseRegistry, capacity: Capacity,
                 client: WorkClient | None) -> None:
        self.metrics = metrics
        self.registry = registry
        self.capacity = capacity
        self.client = client

    def collect(self) -> Iterator[Metric]:
        values = self.metrics.values()
        yield from _counters(values)
        yield from _histograms(values)
        yield from _fleet_gauges(self.registry, self.capacity)
        if self.client is not None:
            yield from _server_gauges(self.client)


def _counters(values: dict[str, float]) -> Iterator[Metric]:
    for name, (doc, label_names) in COUNTERS.items():
        family = CounterMetricFamily(f"{NAMESPACE}_{name}", doc, labels=label_names)
        for field, value in values.items():
            fname, labels = _parse_field(field)
            if fname == name:
                family.add_metric([labels.get(n, "") for n in label_names], value)
        yield family


def _histograms(values: dict[str, float]) -> Iterator[Metric]:
    for name, (doc, buckets) in HISTOGRAMS.items():
        family = HistogramMetricFamily(f"{NAMESPACE}_{name}", doc)
        counts = {b: values.get(_field(f"{name}_bucket", {"le": str(b)}), 0.0) for b in buckets}
        total = values.get(_field(f"{name}_count", {}), 0.0)
        family.add_metric(
            [], [(str(b), counts[b]) for b in buckets] + [("+Inf", total)],
            sum_value=values.get(_field(f"{name}_sum", {}), 0.0),
        )
        yield family


def _fleet_gauges(registry: LeaseRegistry, capacity: Capacity) -> Iterator[Metric]:
    held = registry.held_count()
    total = capacity.total_slots()
    yield GaugeMetricFamily(f"{NAMESPACE}_leases_held", "Leases the fleet holds now", value=held)
    slots = GaugeMetricFamily(f"{NAMESPACE}_session_slots", "Session slots of live workers",
                              labels=["state"])
    slots.add_metric(["total"], total)
    slots.add_metric(["free"], max(0, total - held))
    yield slots
    yield GaugeMetricFamily(f"{NAMESPACE}_workers", "Live workers advertising session slots",
                            value=len(capacity.live_workers()))


def _server_gauges(client: WorkClient) -> Iterator[Metric]:
    try:
        stats = client.stats()
    except WorkAPIError as exc:
        log.warning("server stats unavailable: %s", exc)
        return
    yield GaugeMetricFamily(f"{NAMESPACE}_server_queue_depth",
                            "Work items queued on the server (consumer group lag)",
                            value=stats.depth)
    yield GaugeMetricFamily(f"{NAMESPACE}_server_queue_pending",
                            "Work items polled but not acknowledged", value=stats.pending)
    age = 0.0
    if stats.oldest_queued_at:
        try:
            oldest = datetime.fromisoformat(stats.oldest_queued_at.replace("Z", "+00:00"))
            age = max(0.0, time.time() - oldest.timestamp())
        except ValueError:
            pass
    yield GaugeMetricFamily(f"{NAMESPACE}_server_queue_oldest_age_seconds",
                            "Age of the oldest queued or pending work item", value=age)
    if stats.workers_polling is not None:
        yield GaugeMetricFamily(f"{NAMESPACE}_server_workers_polling",
                                "Distinct worker ids that polled in the last 30 s",
                                value=stats.workers_polling)


def render(metrics: Metrics, registry: LeaseRegistry, capacity: Capacity,
           client: WorkClient | None) -> bytes:
    collectors = CollectorRegistry(auto_describe=False)
    collectors.register(_FleetCollector(metrics, registry, capacity, client))
    return generate_latest(collectors)


def serve(*, host: str, port: int, metrics: Metrics, registry: LeaseRegistry,
          capacity: Capacity, client: WorkClient | None) -> ThreadingHTTPServer:
    """Serve /metrics on a daemon thread; returns the server (its port when 0 was asked)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.split("?")[0] != "/metrics":
                self.send_error(404)
                return
            try:
                body = render(metrics, registry, capacity, client)
            except RedisError as exc:
                self.send_error(503, f"registry unavailable: {exc}")
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass  # a scrape every few seconds is not news

    server = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, name="dispatcher-metrics", daemon=True).start()
    return server

