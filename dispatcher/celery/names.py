"""Every Celery task's name and queue, defined once: the tasks, beat's schedule, routing,
publishing and the log filters all refer to these."""

from __future__ import annotations

__all__ = ["CONTROL_QUEUE", "CONTROL_TASKS", "HEARTBEAT", "POLL", "RECOVER", "SCAN_STOPS",
           "SESSION_RUN"]

CONTROL_QUEUE = "dispatcher.control"

POLL = "tasks.poll.claim_work"
HEARTBEAT = "tasks.heartbeat.beat_leases"
SCAN_STOPS = "tasks.bridge.scan_stops"
RECOVER = "tasks.bridge.recover"
SESSION_RUN = "tasks.session.run"

# The periodic ticks of the control plane, each about every second.
CONTROL_TASKS = (POLL, HEARTBEAT, SCAN_STOPS, RECOVER)
