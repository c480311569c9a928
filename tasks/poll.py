"""The beat-scheduled poller (control queue)."""

from __future__ import annotations

from dispatcher.celery import names
from dispatcher.celery.application import app
from dispatcher.control.poller import run_poller
from dispatcher.runtime import get_runtime


@app.task(name=names.POLL, ignore_result=True)
def claim_work() -> int:
    """Claim work for the fleet's free session slots; at most one runs per environment."""
    return run_poller(get_runtime(app))
