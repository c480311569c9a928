"""A session's start path: the lines the workers log, read back by the breakdown."""

from __future__ import annotations

import logging
import time

import pytest

from bench.breakdown import OURS_STEPS, start_paths, table
from dispatcher.startpath import StartPath, received, take_received


def test_a_start_path_line_reads_back_as_wall_clock_times(
        caplog: pytest.LogCaptureFixture) -> None:
    before = time.time()
    path = StartPath("claim", first="polled")
    path.mark("acked")
    with caplog.at_level(logging.INFO, logger="dispatcher"):
        path.log("work_1")
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.startswith("start path work_id=work_1 side=claim wall=")
    steps = start_paths([line])["work_1"]
    assert set(steps) == {"polled", "acked"}
    assert before - 0.01 <= steps["polled"] <= steps["acked"] <= time.time() + 0.01


def test_a_receipt_is_taken_once_and_starts_the_session_side() -> None:
    received("task_1")
    arrived = take_received("task_1")
    assert arrived is not None and take_received("task_1") is None
    path = StartPath("session", first="received", mono=arrived)
    assert path.steps[0] == ("received", arrived)


def test_each_step_counts_from_the_one_before_it_that_the_session_passed() -> None:
    lines = [{"poll_answered": 4.0, "polled": 6.0, "published": 16.0, "sandbox_started": 60.0},
             {"poll_answered": 2.0, "polled": 3.0, "published": 9.0, "sandbox_started": 40.0}]
    rows = {row["step"]: row for row in table(lines, OURS_STEPS)}
    assert rows["published"]["p50"] in (6.0, 10.0)  # no `read` ... `recorded`: since `polled`
    assert sorted([rows["sandbox_started"]["p50"], rows["sandbox_started"]["p99"]]) == [31.0,
                                                                                       44.0]
    assert "received" not in rows
