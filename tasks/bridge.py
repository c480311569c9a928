"""The stop bridge's tick (control queue)."""

from __future__ import annotations

from dispatcher.celery import names
from dispatcher.celery.application import app
from dispatcher.control.bridge import scan_server_stops
from dispatcher.runtime import get_runtime


@app.task(name=names.SCAN_STOPS, ignore_result=True, send_events=False)
def scan_stops() -> int:
    """Turn stop requests seen in the server's list into stop flags and revokes."""
    return scan_server_stops(get_runtime())
