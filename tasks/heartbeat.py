"""The periodic heartbeat (control queue)."""

from __future__ import annotations

from dispatcher.celery import app
from dispatcher.heartbeat import beat_due_leases
from dispatcher.runtime import get_runtime


@app.task(name="tasks.heartbeat.beat_leases", ignore_result=True)
def beat_leases() -> dict[str, int]:
    """Heartbeat every lease that is due (and retry releases that failed)."""
    tally = beat_due_leases(get_runtime(app))
    return {"sent": tally.sent, "failed": tally.failed, "lost": tally.lost}
