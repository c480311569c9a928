"""Reading the fake session program's records, and percentiles."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

__all__ = ["events", "percentile", "summary", "wait_for_event"]


def events(records_dir: Path, work_id: str, name: str) -> list[dict[str, Any]]:
    path = records_dir / f"{work_id}.jsonl"
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    return [r for r in (json.loads(line) for line in lines if line.strip()) if r["event"] == name]


def wait_for_event(records_dir: Path, work_id: str, name: str, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        found = events(records_dir, work_id, name)
        if found:
            return found[0]
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {name} record for {work_id} within {timeout} s")
        time.sleep(0.01)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def summary(values: list[float]) -> dict[str, float]:
    return {"n": len(values), "p50": percentile(values, 50), "p99": percentile(values, 99),
            "mean": statistics.fmean(values) if values else float("nan")}
