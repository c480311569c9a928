"""Every Redis key the dispatcher writes, in one place, under one prefix.

The broker's own keys (Celery queues, redbeat) are separate; these are the registry: what the
fleet holds and in what state. Sharing a Redis with the emulator or another fleet is safe as long
as prefixes differ.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

__all__ = ["Keys", "PollState"]


class PollState(StrEnum):
    """One environment's poller state that outlives a poller run (`Keys.poll_state`)."""

    WANTED = "poll-wanted"  # a wake-up: claim now, not at the next watchdog tick
    FAILURES = "poll-failures"  # the failure streak, so backoff survives a new run
    PAUSED_UNTIL = "poll-paused-until"  # when polling may resume after a failure
    IDLE = "poll-idle"  # the last poll found nothing: its share is free for the others


@dataclass(frozen=True)
class Keys:
    prefix: str

    @property
    def metrics(self) -> str:
        """Hash: the fleet's counters and histograms (`metrics.Metrics`), read by the exporter."""
        return f"{self.prefix}:metrics"

    def webhook_seen(self, webhook_id: str) -> str:
        """String: a webhook delivery's id, kept for the replay window so a replay is refused."""
        return f"{self.prefix}:webhook-seen:{webhook_id}"

    def lease(self, work_id: str) -> str:
        """Hash: one held lease (see `model.Lease` for its fields)."""
        return f"{self.prefix}:lease:{work_id}"

    def work(self, work_id: str) -> str:
        """String: the polled work item JSON, secret included; deleted on release, and expiring
        unless heartbeats or pulses keep it."""
        return f"{self.prefix}:work:{work_id}"

    def history(self, work_id: str) -> str:
        """Hash: what outlives a released lease (failed attempts, how the session ended), so a
        re-delivered item that already ended is stopped, not run again; expires after a day."""
        return f"{self.prefix}:history:{work_id}"

    def delivery(self, task_id: str) -> str:
        """Hash: where a session task's message went (published, received by which worker and
        when), so recovery tells a queued message from a lost one on any broker."""
        return f"{self.prefix}:delivery:{task_id}"

    @property
    def leases(self) -> str:
        """Sorted set: work ids of held leases, scored by claim time; its size is used slots."""
        return f"{self.prefix}:leases"

    def environment_leases(self, environment_id: str) -> str:
        """Sorted set: work ids of the leases held for one environment (its used slots, for the
        fair share of a fleet that serves several), scored by claim time."""
        return f"{self.prefix}:leases-of:{environment_id}"

    @property
    def heartbeat_due(self) -> str:
        """Sorted set: work id -> epoch second its next heartbeat is due."""
        return f"{self.prefix}:heartbeat-due"

    @property
    def last_seen(self) -> str:
        """Sorted set: work id -> epoch second of the lease's last sign of life (its claim, its
        dispatch, or its attempt's last pulse): recovery reads only the silent ones."""
        return f"{self.prefix}:last-seen"

    def stop_scan_seen(self, environment_id: str) -> str:
        """Set: the items the stop bridge's current sweep of an environment has listed so far."""
        return f"{self.prefix}:stop-scan-seen:{environment_id}"

    def stop_scan_cursor(self, environment_id: str) -> str:
        """String: the `list` page the stop bridge's sweep of an environment continues from."""
        return f"{self.prefix}:stop-scan-cursor:{environment_id}"

    @property
    def epoch(self) -> str:
        """String: a random id written once; a different or missing one means Redis was reset."""
        return f"{self.prefix}:epoch"

    @property
    def workers(self) -> str:
        """Sorted set: worker hostname -> epoch second it last advertised its slots."""
        return f"{self.prefix}:workers"

    def worker(self, hostname: str) -> str:
        """Hash: a worker's advertised slots, pool, queues and draining flag."""
        return f"{self.prefix}:worker:{hostname}"

    def poll_lock(self, environment_id: str) -> str:
        """String lock: at most one poller in flight per environment, fleet-wide."""
        return f"{self.prefix}:lock:poll:{environment_id}"

    @property
    def beat_lock(self) -> str:
        """String lock (celery-redbeat's): held, with a TTL, by the one beat that ticks."""
        return f"{self.prefix}:redbeat:lock"

    @property
    def celery(self) -> str:
        """Prefix of every key Celery and kombu write (queues, results, pidbox channels), so
        fleets with different prefixes share one Redis without sharing queues."""
        return f"{self.prefix}:celery:"

    def task_lock(self, name: str) -> str:
        """String lock: at most one run of a periodic upkeep task at a time."""
        return f"{self.prefix}:lock:{name}"

    def poll_state(self, name: PollState, environment_id: str) -> str:
        """String: one environment's poller state that outlives a run (`PollState`). Per
        environment: one environment's refused key or empty queue must not pause or starve
        another's poller."""
        return f"{self.prefix}:lock:{name}:{environment_id}"
