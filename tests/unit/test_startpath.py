"""A session's start path: the lines the workers log, read back by the breakdown."""

from __future__ import annotations

import logging
import time

import pytest

from bench.breakdown import OURS_STEPS, start_paths, table
from dispatcher.lease.registry import StartReads
from dispatcher.session.receipts import READS_FRESH_SECONDS, received, take_received
from dispatcher.startpath import StartPath


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
    now = time.monotonic()
    received("task_1", at=now, written_at=now + 0.001)
    receipt = take_received("task_1")
    assert receipt is not None and take_received("task_1") is None
    path = StartPath("session", first="received", mono=receipt.at)
    path.mark("receipt", receipt.written_at)
    assert path.steps == [("received", now), ("receipt", now + 0.001)]


def test_reads_taken_with_the_receipt_serve_only_a_task_that_starts_soon_after() -> None:
    reads = StartReads(None, None, "epoch", draining=False)
    received("task_2", at=100.0, reads=reads)
    receipt = take_received("task_2")
    assert receipt is not None
    assert receipt.fresh_reads(100.0 + READS_FRESH_SECONDS) is reads
    assert receipt.fresh_reads(100.0 + READS_FRESH_SECONDS + 0.01) is None, "read again"


def test_each_step_counts_from_the_one_before_it_that_the_session_passed() -> None:
    lines = [{"poll_answered": 4.0, "polled": 6.0, "published": 16.0, "sandbox_started": 60.0},
             {"poll_answered": 2.0, "polled": 3.0, "published": 9.0, "sandbox_started": 40.0}]
    rows = {row["step"]: row for row in table(lines, OURS_STEPS)}
    assert rows["published"]["p50"] in (6.0, 10.0)  # no `read` ... `recorded`: since `polled`
    assert sorted([rows["sandbox_started"]["p50"], rows["sandbox_started"]["p99"]]) == [31.0,
                                                                                       44.0]
    assert "received" not in rows
