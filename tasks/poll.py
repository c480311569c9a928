"""The poller's tasks (control queue): the continuous poller, started and watched by beat, each
run handing over to the next; or, with webhooks, the wake-ups and beat's slow sweep."""

from __future__ import annotations

from typing import Any

from dispatcher.celery import names
from dispatcher.celery.application import app
from dispatcher.control.poller import POLL_LOCK_SECONDS, drain, run_poller
from dispatcher.runtime import get_runtime

# As the SDK's webhook recipe polls: an item polled but never acked (a poller that died between
# the two) is offered again after 2 s, not the server's default 5 s.
RECLAIM_OLDER_THAN_MS = 2000


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


@app.task(name=names.CLAIM_NOW, ignore_result=True, send_events=False)
def claim_now() -> int:
    """A webhook delivery, or the sweep: claim until the queue is empty (or the fleet full)."""
    return drain(get_runtime(), reclaim_older_than_ms=RECLAIM_OLDER_THAN_MS, wake=True)


@app.task(name=names.CLAIM_WOKEN, ignore_result=True, send_events=False)
def claim_woken() -> int:
    """Carry on a drain the full fleet cut short, once a slot is free (Redis only otherwise)."""
    return drain(get_runtime(), reclaim_older_than_ms=RECLAIM_OLDER_THAN_MS, wake=False)
