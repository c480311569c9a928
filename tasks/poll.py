"""The poller's tasks (control queue): beat's poll tick, or, with webhooks, the wake-ups."""

from __future__ import annotations

from dispatcher.celery import names
from dispatcher.celery.application import app
from dispatcher.control.poller import drain, run_poller
from dispatcher.runtime import get_runtime

# As the SDK's webhook recipe polls: an item polled but never acked (a poller that died between
# the two) is offered again after 2 s, not the server's default 5 s.
RECLAIM_OLDER_THAN_MS = 2000


@app.task(name=names.POLL, ignore_result=True)
def claim_work() -> int:
    """Claim work for the fleet's free session slots; at most one runs per environment."""
    return run_poller(get_runtime(app))


@app.task(name=names.CLAIM_NOW, ignore_result=True)
def claim_now() -> int:
    """A webhook delivery, or the sweep: claim until the queue is empty (or the fleet full)."""
    return drain(get_runtime(app), reclaim_older_than_ms=RECLAIM_OLDER_THAN_MS, wake=True)


@app.task(name=names.CLAIM_WOKEN, ignore_result=True)
def claim_woken() -> int:
    """Carry on a drain the full fleet cut short, once a slot is free (Redis only otherwise)."""
    return drain(get_runtime(app), reclaim_older_than_ms=RECLAIM_OLDER_THAN_MS, wake=False)
