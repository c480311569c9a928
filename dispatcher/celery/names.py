"""Every Celery task's name and queue, defined once: the tasks, beat's schedule, routing,
publishing and the log filters all refer to these."""

from __future__ import annotations

__all__ = ["CLAIM_NOW", "CLAIM_WOKEN", "CONTROL_QUEUE", "CONTROL_TASKS", "HEARTBEAT", "POLL",
           "RECOVER", "SCAN_STOPS", "SESSION_RUN"]

CONTROL_QUEUE = "dispatcher.control"

POLL = "tasks.poll.claim_work"
# With webhooks: a delivery (and the slow sweep) wakes the poller, which drains the queue...
CLAIM_NOW = "tasks.poll.claim_now"
# ...and a tick carries on a drain that the fleet's full slots cut short.
CLAIM_WOKEN = "tasks.poll.claim_woken"
HEARTBEAT = "tasks.heartbeat.beat_leases"
SCAN_STOPS = "tasks.bridge.scan_stops"
RECOVER = "tasks.bridge.recover"
SESSION_RUN = "tasks.session.run"

# The periodic ticks of the control plane, each about every second (or on a webhook).
CONTROL_TASKS = (POLL, CLAIM_NOW, CLAIM_WOKEN, HEARTBEAT, SCAN_STOPS, RECOVER)
