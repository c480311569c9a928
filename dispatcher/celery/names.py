"""Every Celery task's name and queue, defined once: the tasks, beat's schedule, routing,
publishing and the log filters all refer to these."""

from __future__ import annotations

__all__ = ["CLAIM_NOW", "CLAIM_WOKEN", "CONTROL_QUEUE", "CONTROL_TASKS", "HEARTBEAT",
           "HEARTBEAT_BEFORE_RENAME", "POLL", "RECOVER", "RECOVER_BEFORE_RENAME", "RENAMED",
           "SCAN_STOPS", "SESSION_RUN"]

CONTROL_QUEUE = "dispatcher.control"

POLL = "tasks.poll.claim_work"
# With webhooks: a delivery (and the slow sweep) wakes the poller, which drains the queue...
CLAIM_NOW = "tasks.poll.claim_now"
# ...and a tick carries on a drain that the fleet's full slots cut short.
CLAIM_WOKEN = "tasks.poll.claim_woken"
HEARTBEAT = "tasks.heartbeat.send_heartbeats"
SCAN_STOPS = "tasks.bridge.scan_stops"
RECOVER = "tasks.recovery.recover"
SESSION_RUN = "tasks.session.run"

# Names the previous release published, each still registered as an alias of its successor
# for one release: during a rolling upgrade an old beat publishes these, and a new worker must
# run them, or the fleet's leases go without heartbeats. Delete in the release after.
HEARTBEAT_BEFORE_RENAME = "tasks.heartbeat.beat_leases"
RECOVER_BEFORE_RENAME = "tasks.bridge.recover"
RENAMED = {HEARTBEAT_BEFORE_RENAME: HEARTBEAT, RECOVER_BEFORE_RENAME: RECOVER}

# The periodic ticks of the control plane, each about every second (or on a webhook).
CONTROL_TASKS = (POLL, CLAIM_NOW, CLAIM_WOKEN, HEARTBEAT, SCAN_STOPS, RECOVER, *RENAMED)
