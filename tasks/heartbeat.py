"""The periodic heartbeat of held leases (control queue)."""

from __future__ import annotations

from typing import Any

from celery.signals import worker_process_shutdown, worker_shutdown

from dispatcher.celery import names
from dispatcher.celery.application import app
from dispatcher.control.heartbeat import close_sender, heartbeat_due_leases
from dispatcher.runtime import get_runtime


def _send_heartbeats() -> dict[str, int]:
    """Heartbeat every lease that is due (and retry releases that failed)."""
    tally = heartbeat_due_leases(get_runtime())
    return {"sent": tally.sent, "failed": tally.failed, "lost": tally.lost}


send_heartbeats = app.task(name=names.HEARTBEAT, ignore_result=True,
                           send_events=False)(_send_heartbeats)
# The previous release's name (`names.RENAMED`), for a rolling upgrade's old beat.
beat_leases = app.task(name=names.HEARTBEAT_BEFORE_RENAME, ignore_result=True,
                       send_events=False)(_send_heartbeats)


@worker_shutdown.connect
@worker_process_shutdown.connect
def _close_sender(**_: Any) -> None:
    """The heartbeat sender's connections and loop thread end with the worker (or, on
    prefork, with each pool process), not when the interpreter tears them down."""
    close_sender()
