"""The periodic heartbeat (control queue)."""

from __future__ import annotations

from typing import Any

from celery.signals import worker_process_shutdown, worker_shutdown

from dispatcher.celery import names
from dispatcher.celery.application import app
from dispatcher.control.heartbeat import beat_due_leases, close_sender
from dispatcher.runtime import get_runtime


@app.task(name=names.HEARTBEAT, ignore_result=True, send_events=False)
def beat_leases() -> dict[str, int]:
    """Heartbeat every lease that is due (and retry releases that failed)."""
    tally = beat_due_leases(get_runtime())
    return {"sent": tally.sent, "failed": tally.failed, "lost": tally.lost}


@worker_shutdown.connect
@worker_process_shutdown.connect
def _close_sender(**_: Any) -> None:
    """The heartbeat sender's connections and loop thread end with the worker (or, on
    prefork, with each pool process), not when the interpreter tears them down."""
    close_sender()
