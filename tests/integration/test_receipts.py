"""A session message's receipt carries its start's reads (real Redis, the emulator over HTTP,
a real sandbox): the task then starts on them without reading again."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from dispatcher.control.poller import claim
from dispatcher.lease.causes import Outcome
from dispatcher.lease.model import Phase
from dispatcher.runtime import Runtime
from dispatcher.session.attempt import SessionAttempt, run_attempt
from dispatcher.session.receipts import write_receipt
from tests.support.inprocess import in_process_runtime, poll_until

pytestmark = pytest.mark.integration


@pytest.fixture
def runtime(emulator: Any) -> Iterator[Runtime]:
    with in_process_runtime(emulator) as rt:
        yield rt


def test_the_receipt_is_recorded_with_the_reads_a_task_starts_on(
        emulator: Any, runtime: Runtime) -> None:
    session_id, work_id = emulator.create_session(runtime.environment_id,
                                                  metadata={"fake.duration": "0.1"})
    assert claim(runtime, poll_until(runtime, work_id))
    task_id = runtime.app.sent[-1]["task_id"]
    reads = write_receipt(runtime.registry, runtime.deliveries, task_id, worker="r@test",
                          work_id=work_id)
    delivery = runtime.deliveries.of(task_id)
    assert delivery.received_by == "r@test" and delivery.received_at is not None
    assert reads is not None and reads.lease is not None
    assert (reads.lease.work_id, reads.lease.phase) == (work_id, Phase.DISPATCHED)
    assert reads == runtime.registry.start_reads(work_id, worker="r@test"), \
        "the same reads as the task's own"
    outcome = run_attempt(runtime, SessionAttempt(
        work_id=work_id, session_id=session_id, attempt=1, task_id=task_id, worker="r@test"),
        reads=reads)
    assert outcome == Outcome.COMPLETED


def test_a_receipt_without_a_work_id_is_recorded_alone(runtime: Runtime) -> None:
    assert write_receipt(runtime.registry, runtime.deliveries, "task_x", worker="r@test",
                         work_id=None) is None
    assert runtime.deliveries.of("task_x").received_by == "r@test"
