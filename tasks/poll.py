"""The poller (control queue): started and watched by beat, each run handing over to the next."""

from __future__ import annotations

from typing import Any

from dispatcher.celery import names
from dispatcher.celery.application import app
from dispatcher.control.poller import POLL_LOCK_SECONDS, run_poller
from dispatcher.runtime import get_runtime


@app.task(name=names.POLL, ignore_result=True, bind=True, send_events=False)
def claim_work(self: Any, handover: str | None = None) -> int:
    """Claim work for the fleet's free session slots; at most one runs per environment. The
    lock token in `handover` is no secret: it only lets the successor keep the lock."""
    runtime = get_runtime()
    hostname = self.request.hostname or ""

    def hand_over(token: str) -> None:
        # A successor nobody takes within the lock's life is dropped: beat starts a fresh one.
        claim_work.apply_async(kwargs={"handover": token}, queue=names.CONTROL_QUEUE,
                               expires=POLL_LOCK_SECONDS)

    return run_poller(runtime, handover=handover, hand_over=hand_over,
                      stopping=lambda: runtime.capacity.is_draining(hostname))
