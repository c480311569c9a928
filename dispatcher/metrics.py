"""Prometheus metrics for what Flower does not know: leases, heartbeats, stops, the server queue.

Counters and histograms live in Redis (one hash), so every process of every worker adds to the
same numbers whatever its pool: a prefork child, a thread, a control task on another host. One
exporter (`dispatcher metrics`, or any worker started with `DISPATCHER_METRICS_PORT`) renders
them through a prometheus_client collector, with gauges read at scrape time from the registry
and the server's `stats`. Scrape one exporter per fleet: every exporter shows the same
fleet-wide numbers.

A scrape is cheap and bounded: a few Redis reads, and at most one `stats` call (no retries) per
`SERVER_STATS_CACHE_SECONDS` however many scrapers ask; a connection that sends nothing is
dropped after `REQUEST_TIMEOUT_SECONDS`.

Recording never fails a caller: a metric lost to a Redis hiccup is better than a lease lost.

The scaling signal (`dispatcher_scaling_desired_slots`, and the same figures as JSON on
`/scaling` for KEDA's metrics-api scaler) is computed here, at scrape time, from the cached
`stats` and the registry: a periodic control-plane task would call `stats` whether or not anyone
scales on it, and keep a copy in Redis that is as old as its period; on scrape, the cache bounds
the calls the same way and the figure is never older than the window.

Every counter, histogram and lease gauge is labelled with the `environment` it counts (the
fleet's configured ids: bounded; empty for what no environment was named for), and the server's
figures are read per environment, with its key. Session slots and workers are the fleet's,
shared by its environments, and carry no such label.
"""

from __future__ import annotations

import json
import logging
import platform
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector
from redis import Redis
from redis.exceptions import RedisError

from dispatcher.control.capacity import ENGINE_UP, Capacity, desired_slots, free_slots
from dispatcher.lease.causes import LossCause, Refusal, Release, RestartReason, StopCause
from dispatcher.lease.model import Kind
from dispatcher.lease.registry import LeaseRegistry
from dispatcher.workapi import WorkAPIError, WorkClient, WorkQueueStats, epoch_seconds

__all__ = [
    "COUNTERS",
    "EXPORTER_HTTP_TIMEOUT_SECONDS",
    "HISTOGRAMS",
    "OTHER",
    "SCALING_PATH",
    "FleetCollector",
    "Metrics",
    "ServerStats",
    "bounded",
    "scaling_document",
    "serve",
]

log = logging.getLogger("dispatcher.metrics")

NAMESPACE = "dispatcher"
# What a label value outside its counter's fixed set is counted as: free text (an error message,
# a status code) would make a new time series per distinct value.
OTHER = "other"
# The server's figures move slowly (a queue depth) and cost a Work API call with the fleet's
# key: one call per this many seconds, whatever the scrape rate or the number of scrapers.
SERVER_STATS_CACHE_SECONDS = 10.0
# The `stats` call a scrape may make: a server that is down must not hold the scrape.
EXPORTER_HTTP_TIMEOUT_SECONDS = 5.0
# A scraper that connects and sends nothing holds a thread until this; Prometheus' own scrape
# timeout defaults to 10 s, and a scrape here answers in milliseconds.
REQUEST_TIMEOUT_SECONDS = 5.0
# The JSON form of the scaling signal, beside /metrics, for KEDA's metrics-api scaler.
SCALING_PATH = "/scaling"


@dataclass(frozen=True)
class Counter:
    doc: str
    label: str
    # The label's values, each an enum's member (`lease.causes`); anything else counts as OTHER.
    values: tuple[str, ...]


COUNTERS: dict[str, Counter] = {
    "work_claimed": Counter("Work items claimed (polled and acknowledged), by type", "type",
                            tuple(Kind)),
    "work_released": Counter("Leases released, by how the session ended", "outcome",
                             tuple(Release)),
    "work_stop_requests": Counter("Stop requests applied to held leases, by cause", "cause",
                                  tuple(StopCause)),
    "work_refused": Counter("Polled items not run, by reason", "reason", tuple(Refusal)),
    "heartbeats": Counter("Heartbeats sent, by result", "result", ("ok", "failed")),
    "leases_lost": Counter("Leases the server no longer gives us, by cause", "cause",
                           tuple(LossCause)),
    "attempts_restarted": Counter("Session attempts started again on another worker, by reason",
                                  "reason", tuple(RestartReason)),
    "server_throttles": Counter("Times the server began throttling an environment (429, or "
                                "retry-after), by the call that met it", "source",
                                ("poll", "list", "heartbeat", "ack", "stop", "probe")),
    "heartbeats_throttled": Counter("Due heartbeats met by the server's throttle: deferred "
                                    "(to its end, or to the lease's last safe moment), or sent "
                                    "through it (the lease would lapse otherwise)", "decision",
                                    ("deferred", "sent")),
    "warm_starts": Counter("Container sessions started in a warm container of the worker's "
                           "pool (hit) or cold because it had none (miss)", "result",
                           ("hit", "miss")),
    "healthchecks": Counter("Healthcheck work items answered, by result", "healthy",
                            ("true", "false")),
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
ENVIRONMENT_LABEL = "environment"


def bounded(name: str, value: object) -> str:
    """The value counter `name`'s label takes for `value` (a member of the enum its label set
    comes from): one of its fixed set, or OTHER."""
    text = str(value)
    return text if text in COUNTERS[name].values else OTHER


def _field(name: str, labels: dict[str, str]) -> str:
    return name + "|" + ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


def _environment(environment: str) -> dict[str, str]:
    # A field's separators (`|`, `,`, `=`) cannot be in an id (`workapi.models.check_id`).
    return {ENVIRONMENT_LABEL: environment} if environment else {}


def _parse_field(field: str) -> tuple[str, dict[str, str]]:
    name, _, raw = field.partition("|")
    labels = dict(pair.split("=", 1) for pair in raw.split(",") if pair)
    return name, labels


class Metrics:
    def __init__(self, redis: Redis, *, prefix: str) -> None:
        self.redis = redis
        # Hash: the fleet's counters and histograms, one field per series, read by the exporter.
        self.key = f"{prefix}:metrics"

    def inc(self, name: str, amount: float = 1, *, environment: str = "",
            **labels: object) -> None:
        self.inc_all([(name, amount, labels)], environment=environment)

    def inc_all(self, counts: list[tuple[str, float, dict[str, object]]], *,
                environment: str = "") -> None:
        """Several counters of one environment in one round trip."""
        increments: dict[str, float] = {}
        for name, amount, labels in counts:
            counter = COUNTERS[name]
            assert set(labels) <= {counter.label}, (name, labels)
            values = {k: bounded(name, v) for k, v in labels.items()}
            field = _field(name, {**values, **_environment(environment)})
            increments[field] = increments.get(field, 0) + amount
        if increments:
            self._write(increments)

    def observe(self, name: str, seconds: float, *, environment: str = "") -> None:
        _, buckets = HISTOGRAMS[name]
        where = _environment(environment)
        increments: dict[str, float] = {
            _field(f"{name}_bucket", {"le": str(b), **where}): 1 for b in buckets if seconds <= b
        }
        increments[_field(f"{name}_bucket", {"le": "+Inf", **where})] = 1
        increments[_field(f"{name}_count", where)] = 1
        increments[_field(f"{name}_sum", where)] = seconds
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


class ServerStats:
    """The server's `stats`, fetched at most once per `ttl_seconds`; None while unavailable.

    A failed call is cached too: a server that is down is asked once per window, not once per
    scrape. Concurrent scrapes wait for the one call in flight instead of making their own.
    """

    def __init__(self, client: WorkClient, *, ttl_seconds: float = SERVER_STATS_CACHE_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.client = client
        self.ttl_seconds = ttl_seconds
        self.clock = clock
        self._lock = threading.Lock()
        self._fetched_at: float | None = None
        self._stats: WorkQueueStats | None = None

    def get(self) -> WorkQueueStats | None:
        with self._lock:
            now = self.clock()
            if self._fetched_at is not None and now - self._fetched_at < self.ttl_seconds:
                return self._stats
            self._fetched_at = now
            try:
                self._stats = self.client.stats()
            except WorkAPIError as exc:
                log.warning("server stats unavailable: %s", exc)
                self._stats = None
            return self._stats


class FleetCollector(Collector):
    """`server`: the server's figures of one environment, or of each (by id); `environments`:
    the ids every counter starts from zero for (those of `server` when not given)."""

    def __init__(self, metrics: Metrics, registry: LeaseRegistry, capacity: Capacity,
                 server: ServerStats | Mapping[str, ServerStats] | None,
                 environments: Sequence[str] = ()) -> None:
        self.metrics = metrics
        self.registry = registry
        self.capacity = capacity
        if isinstance(server, ServerStats):
            server = {server.client.environment_id: server}
        self.servers: Mapping[str, ServerStats] = server or {}
        self.environments = tuple(environments) or tuple(self.servers)

    def collect(self) -> Iterator[Metric]:
        values = self.metrics.values()
        yield _build_info()
        yield from _counters(values, self.environments)
        yield from _histograms(values, self.environments)
        yield from _fleet_gauges(self.registry, self.capacity, self.environments)
        if self.servers:
            yield from _server_gauges({e: s.get() for e, s in self.servers.items()})
            yield _scaling_gauge(self.scaling())

    def scaling(self) -> dict[str, dict[str, float | bool]]:
        """Per environment served: the server's queue, the leases held, and the slots they need
        (left out while the server's stats do not answer: a guess would scale on nothing)."""
        held = self.registry.held_by_environment(tuple(self.servers))
        found: dict[str, dict[str, float | bool]] = {}
        for environment, server in self.servers.items():
            stats = server.get()
            figures: dict[str, float | bool] = {"held": held.get(environment, 0),
                                                "server_up": stats is not None}
            if stats is not None:
                figures.update(
                    queued=stats.depth, pending=stats.pending,
                    oldest_queued_age_seconds=_age_seconds(stats.oldest_queued_at),
                    desired_slots=desired_slots(queued=stats.depth, pending=stats.pending,
                                                held=held.get(environment, 0)))
            found[environment] = figures
        return found


def _build_info() -> Metric:
    info = GaugeMetricFamily(f"{NAMESPACE}_build_info", "The running dispatcher, always 1",
                             labels=["version", "python_version"])
    try:
        version = metadata.version("dispatcher")
    except metadata.PackageNotFoundError:
        version = "unknown"
    info.add_metric([version, platform.python_version()], 1)
    return info


def _recorded_environments(values: dict[str, float], known: Sequence[str]) -> list[str]:
    """The configured environments, then any other a field was recorded for (a configuration
    that changed: still bounded, by what was ever configured)."""
    seen = dict.fromkeys(known)
    for field in values:
        seen.setdefault(_parse_field(field)[1].get(ENVIRONMENT_LABEL, ""))
    return list(seen) or [""]


def _counters(values: dict[str, float], environments: Sequence[str]) -> Iterator[Metric]:
    everywhere = _recorded_environments(values, environments)
    for name, counter in COUNTERS.items():
        # Every known value from zero, so rate() and absent() work before the first event.
        by_value = {(e, v): 0.0 for e in everywhere for v in (*counter.values, OTHER)}
        for field, value in values.items():
            fname, labels = _parse_field(field)
            if fname == name:
                key = bounded(name, labels.get(counter.label, ""))
                by_value[labels.get(ENVIRONMENT_LABEL, ""), key] += value
        family = CounterMetricFamily(f"{NAMESPACE}_{name}", counter.doc,
                                     labels=[ENVIRONMENT_LABEL, counter.label])
        for (environment, label_value), value in by_value.items():
            family.add_metric([environment, label_value], value)
        yield family


def _histograms(values: dict[str, float], environments: Sequence[str]) -> Iterator[Metric]:
    everywhere = _recorded_environments(values, environments)
    for name, (doc, buckets) in HISTOGRAMS.items():
        family = HistogramMetricFamily(f"{NAMESPACE}_{name}", doc, labels=[ENVIRONMENT_LABEL])
        for environment in everywhere:
            where = _environment(environment)
            counts = {b: values.get(_field(f"{name}_bucket", {"le": str(b), **where}), 0.0)
                      for b in buckets}
            total = values.get(_field(f"{name}_count", where), 0.0)
            family.add_metric(
                [environment], [(str(b), counts[b]) for b in buckets] + [("+Inf", total)],
                sum_value=values.get(_field(f"{name}_sum", where), 0.0),
            )
        yield family


def _fleet_gauges(registry: LeaseRegistry, capacity: Capacity,
                  environments: Sequence[str]) -> Iterator[Metric]:
    held = registry.held_count()
    total = capacity.total_slots()
    free = free_slots(total=total, held=held)
    used = total - free  # leases beyond the slots wait for one (workers died or drained)
    by_environment = registry.held_by_environment(environments)
    leases = GaugeMetricFamily(f"{NAMESPACE}_leases_held", "Leases the fleet holds now",
                               labels=[ENVIRONMENT_LABEL])
    for environment, count in by_environment.items():
        leases.add_metric([environment], count)
    # Leases of no configured environment (or recorded before the per-environment index).
    unlisted = held - sum(by_environment.values())
    if unlisted or not by_environment:
        leases.add_metric([""], max(0, unlisted))
    yield leases
    slots = GaugeMetricFamily(f"{NAMESPACE}_session_slots",
                              "Session slots of live workers, used or free (sum: all slots)",
                              labels=["state"])
    slots.add_metric(["used"], used)
    slots.add_metric(["free"], free)
    yield slots
    workers = capacity.workers()
    yield GaugeMetricFamily(f"{NAMESPACE}_workers", "Live workers advertising session slots",
                            value=sum(1 for w in workers if w.live))
    engines = GaugeMetricFamily(
        f"{NAMESPACE}_worker_engine_up",
        "1 while a live session worker's container engine answers with every sandbox image, 0 "
        "while it does not answer or lacks one (its session slots withdrawn); workers of the "
        "process runtime are not listed",
        labels=["worker"])
    for worker in workers:
        if worker.live and worker.engine:
            engines.add_metric([worker.hostname], 1 if worker.engine == ENGINE_UP else 0)
    yield engines
    yield GaugeMetricFamily(f"{NAMESPACE}_warm_containers",
                            "Warm containers ready in the pools of live session workers",
                            value=sum(warm_sizes(registry).values()))


def warm_starts(values: Mapping[str, float]) -> dict[str, int]:
    """Warm starts counted, by result (`hit`, `miss`), over every environment."""
    found: dict[str, int] = {}
    for field, value in values.items():
        name, labels = _parse_field(field)
        if name == "warm_starts":
            result = labels.get(COUNTERS[name].label, OTHER)
            found[result] = found.get(result, 0) + int(value)
    return found


def warm_sizes(registry: LeaseRegistry) -> dict[str, int]:
    """Each live warm pool's ready containers (none outside the docker runtime)."""
    from dispatcher.session.warm_book import WarmBook  # Redis only: no engine client

    return WarmBook(registry.redis, prefix=registry.keys.prefix).sizes()


def _server_gauges(by_environment: Mapping[str, WorkQueueStats | None]) -> Iterator[Metric]:
    def gauge(name: str, doc: str) -> GaugeMetricFamily:
        return GaugeMetricFamily(f"{NAMESPACE}_{name}", doc, labels=[ENVIRONMENT_LABEL])

    up = gauge("server_up", "1 if the server's stats answered within the cache window")
    depth = gauge("server_queue_depth", "Work items queued on the server (consumer group lag)")
    pending = gauge("server_queue_pending", "Work items polled but not acknowledged")
    age = gauge("server_queue_oldest_age_seconds", "Age of the oldest queued or pending work item")
    polling = gauge("server_workers_polling", "Distinct worker ids that polled in the last 30 s")
    for environment, stats in by_environment.items():
        up.add_metric([environment], 0 if stats is None else 1)
        if stats is None:
            continue
        depth.add_metric([environment], stats.depth)
        pending.add_metric([environment], stats.pending)
        age.add_metric([environment], _age_seconds(stats.oldest_queued_at))
        if stats.workers_polling is not None:
            polling.add_metric([environment], stats.workers_polling)
    # A family with no sample is left out, as before when the server did not answer.
    yield from (family for family in (up, depth, pending, age, polling) if family.samples)


def _scaling_gauge(by_environment: Mapping[str, Mapping[str, float | bool]]) -> Metric:
    desired = GaugeMetricFamily(
        f"{NAMESPACE}_scaling_desired_slots",
        "Session slots the environment's work needs now: queued + pending on the server + leases "
        "held (absent while the server's stats do not answer)", labels=[ENVIRONMENT_LABEL])
    for environment, figures in by_environment.items():
        if "desired_slots" in figures:
            desired.add_metric([environment], float(figures["desired_slots"]))
    return desired


def scaling_document(collector: FleetCollector) -> dict[str, Any]:
    """`/scaling`: each environment's figures, and the fleet's total while every environment's
    stats answer (a KEDA trigger on a missing total errors and falls back, rather than scaling
    on part of the demand)."""
    environments = collector.scaling()
    document: dict[str, Any] = {"environments": environments}
    if all("desired_slots" in figures for figures in environments.values()):
        document["desired_slots"] = sum(
            int(figures["desired_slots"]) for figures in environments.values())
    return document


def _age_seconds(timestamp: str | None) -> float:
    oldest = epoch_seconds(timestamp)
    return 0.0 if oldest is None else max(0.0, time.time() - oldest)


class _Handler(WSGIRequestHandler):
    # socketserver sets this on each connection: a client that stalls is dropped, not waited on.
    timeout = REQUEST_TIMEOUT_SECONDS

    def log_message(self, format: str, *args: Any) -> None:
        pass  # a scrape every few seconds is not news


def _wsgi_app(collectors: CollectorRegistry,
              collector: FleetCollector) -> Callable[..., Iterable[bytes]]:
    metrics_app = make_wsgi_app(collectors)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        try:
            if environ.get("PATH_INFO") == SCALING_PATH:
                body = json.dumps(scaling_document(collector)).encode()
                start_response("200 OK", [("Content-Type", "application/json")])
                return [body]
            return list(metrics_app(environ, start_response))
        except RedisError as exc:
            start_response("503 Service Unavailable", [("Content-Type", "text/plain")])
            return [f"registry unavailable: {exc}\n".encode()]

    return app


def serve(*, host: str, port: int, collector: FleetCollector) -> WSGIServer:
    """Serve /metrics on a daemon thread; returns the server (its port when 0 was asked)."""
    collectors = CollectorRegistry(auto_describe=False)
    collectors.register(collector)
    server = make_server(host, port, _wsgi_app(collectors, collector), ThreadingWSGIServer,
                         handler_class=_Handler)
    threading.Thread(target=server.serve_forever, name="dispatcher-metrics", daemon=True).start()
    return server
