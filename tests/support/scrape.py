"""Read a worker's Prometheus endpoint (DISPATCHER_METRICS_PORT) in a test."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

__all__ = ["Samples", "scrape", "try_scrape", "value"]

Samples = list[tuple[str, dict[str, str], float]]


def scrape(port: int) -> Samples:
    body = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return [(s.name, dict(s.labels), s.value)
            for family in text_string_to_metric_families(body) for s in family.samples]


def try_scrape(port: int) -> Samples | None:
    try:
        return scrape(port)
    except httpx.TransportError:
        return None


def value(samples: Samples, name: str, **labels: str) -> float | None:
    """The sum of the samples named `name` whose labels include `labels`; None if none is."""
    found = [v for n, lbls, v in samples if n == name and labels.items() <= lbls.items()]
    return sum(found) if found else None
