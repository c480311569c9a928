"""Metric names and label values by Prometheus' conventions, decided without Redis."""

from __future__ import annotations

import re
from enum import StrEnum

import pytest

from dispatcher.lease.causes import LossCause, Refusal, Release, RestartReason, StopCause
from dispatcher.lease.model import Kind
from dispatcher.metrics import COUNTERS, HISTOGRAMS, OTHER, bounded

SNAKE = re.compile(r"^[a-z][a-z0-9_]*$")


@pytest.mark.parametrize(("name", "given", "expected"), [
    ("work_claimed", Kind.SESSION, "session"),
    ("work_claimed", "environment_bootstrap", OTHER),
    ("work_released", Release.LOST, "lost"),
    ("work_released", "left to the server's lease expiry", OTHER),
    ("work_stop_requests", StopCause.SERVER, "server"),
    ("leases_lost", LossCause.RE_DELIVERED, "re_delivered"),
    ("leases_lost", LossCause.HEARTBEAT_REFUSED, "heartbeat_rejected"),
    # Free text is never parsed into a label: a cause is an enum's member, or OTHER.
    ("leases_lost", "heartbeat 412", OTHER),
    ("attempts_restarted", RestartReason.WORKER_LOST, "worker_lost"),
    ("attempts_restarted", "worker lost (no pulse)", OTHER),
    ("healthchecks", "true", "true"),
    ("heartbeats", "ok", "ok"),
    ("heartbeats", "Error: 503 Service Unavailable, retry in 1s", OTHER),
    ("work_refused", "", OTHER),
])
def test_a_label_is_an_enum_value_or_other(name: str, given: object, expected: str) -> None:
    assert bounded(name, given) == expected


@pytest.mark.parametrize(("name", "enum"), [
    ("work_claimed", Kind), ("work_released", Release),
    ("work_stop_requests", StopCause), ("work_refused", Refusal), ("leases_lost", LossCause),
    ("attempts_restarted", RestartReason)])
def test_each_counters_labels_are_its_enums_values(name: str, enum: type[StrEnum]) -> None:
    assert COUNTERS[name].values == tuple(member.value for member in enum)


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
