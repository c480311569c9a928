"""Metric names and label values by Prometheus' conventions, decided without Redis."""

from __future__ import annotations

import re

import pytest

from dispatcher.metrics import COUNTERS, HISTOGRAMS, OTHER, bounded

SNAKE = re.compile(r"^[a-z][a-z0-9_]*$")


@pytest.mark.parametrize(("name", "given", "expected"), [
    ("work_claimed", "session", "session"),
    ("work_claimed", "environment_bootstrap", OTHER),
    ("work_released", "attempts_exhausted", "attempts_exhausted"),
    ("work_released", "left to the server's lease expiry", OTHER),
    ("work_stop_requests", "server stopped", "server_stopped"),
    ("work_stop_requests", "claim refused", OTHER),
    ("leases_lost", "re-delivered by the server", "re_delivered"),
    ("leases_lost", "heartbeat 412", "heartbeat_rejected"),
    ("leases_lost", "heartbeat 404: not found", "heartbeat_rejected"),
    ("leases_lost", "assumed lost: no heartbeat succeeded within the TTL", "assumed_lost"),
    ("leases_lost", "lease not extended", "lease_not_extended"),
    ("attempts_restarted", "worker lost (no pulse)", "worker_lost"),
    ("attempts_restarted", "session task never started", "task_never_started"),
    ("attempts_restarted", "worker drained", "worker_drained"),
    ("healthchecks", "True", "true"),
    ("heartbeats", "ok", "ok"),
    ("heartbeats", "Error: 503 Service Unavailable, retry in 1s", OTHER),
    ("work_refused", "", OTHER),
])
def test_free_text_becomes_a_bounded_snake_case_value(name: str, given: str,
                                                       expected: str) -> None:
    assert bounded(name, given) == expected


@pytest.mark.parametrize("name", COUNTERS)
def test_counter_names_and_label_values_are_snake_case(name: str) -> None:
    counter = COUNTERS[name]
    assert SNAKE.match(name) and not name.endswith("_total"), "the _total suffix is added"
    assert SNAKE.match(counter.label)
    assert all(SNAKE.match(v) for v in (*counter.values, OTHER))
    assert OTHER not in counter.values
    assert all(bounded(name, v) == v for v in counter.values)


@pytest.mark.parametrize("name", HISTOGRAMS)
def test_histograms_are_in_seconds(name: str) -> None:
    assert SNAKE.match(name) and name.endswith("_seconds")
    _, buckets = HISTOGRAMS[name]
    assert list(buckets) == sorted(buckets)
