"""One session attempt (session queue). Its arguments are ids only: Flower shows them."""

from __future__ import annotations

import time
from typing import Any

from celery.worker import state as worker_state

from dispatcher.celery import names
from dispatcher.celery.application import app
from dispatcher.runtime import get_runtime
from dispatcher.session.attempt import SessionAttempt, run_attempt
from dispatcher.session.receipts import Receipt, take_received
from dispatcher.startpath import StartPath


# No STARTED state in the result backend (`task_track_started` is on for the app): Flower learns
# that a session started from its `task-started` event, and storing the state would put a Redis
# round trip between the message and the sandbox's start.
@app.task(name=names.SESSION_RUN, bind=True, track_started=False)
def run(self: Any, work_id: str, session_id: str, attempt: int) -> dict[str, object]:
    """Run the on-work command for one attempt of a session and supervise it to the end."""
    task_id = self.request.id
    receipt = take_received(task_id)
    path = _start_path(receipt)
    outcome = run_attempt(
        get_runtime(),
        SessionAttempt(
            work_id=work_id,
            session_id=session_id,
            attempt=attempt,
            task_id=task_id,
            worker=self.request.hostname or "",
            # The threads pool shares the worker's revoked set; prefork children see an empty one
            # and learn of revokes through --terminate (a flag) or the registry instead.
            revoked=lambda: task_id in worker_state.revoked,
            path=path,
        ),
        reads=receipt.fresh_reads(time.monotonic()) if receipt is not None else None,
    )
    return {"work_id": work_id, "session_id": session_id, "attempt": attempt,
            "outcome": outcome.value}


def _start_path(receipt: Receipt | None) -> StartPath:
    """Steps from the message's arrival, when this process received it (the threads pool;
    a prefork child starts at its own first step)."""
    if receipt is None:
        return StartPath("session", first="task_started")
    path = StartPath("session", first="received", mono=receipt.at)
    if receipt.written_at is not None:
        path.mark("receipt", receipt.written_at)
    path.mark("task_started")
    return path
