"""The poller's Redis keys: its lock and the state one environment's poller keeps between runs.

Beside the poller, not in it: `Capacity` keeps `idle` and `arrived` for the fair share, and the
runtime builds the capacity before any poller runs, so keys inside `poller` (which takes the
runtime) would close an import cycle poller -> runtime -> capacity -> poller.

Every key is per environment: one environment's refused key or empty queue must not pause or
starve another's poller. They sit under `lock:` beside the poll lock; renaming them would
orphan the state a running fleet holds while it is upgraded.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["PollKeys"]


@dataclass(frozen=True)
class PollKeys:
    prefix: str

    def lock(self, environment_id: str) -> str:
        """String lock: at most one poller in flight per environment, fleet-wide."""
        return f"{self.prefix}:lock:poll:{environment_id}"

    def wanted(self, environment_id: str) -> str:
        """String flag: a wake-up (a webhook delivery, the sweep) waits to be drained."""
        return f"{self.prefix}:lock:poll-wanted:{environment_id}"

    def failures(self, environment_id: str) -> str:
        """String: the failure streak, so a long outage backs off to the cap across runs."""
        return f"{self.prefix}:lock:poll-failures:{environment_id}"

    def paused_until(self, environment_id: str) -> str:
        """String: epoch second the poller's backoff pause ends."""
        return f"{self.prefix}:lock:poll-paused-until:{environment_id}"

    def idle(self, environment_id: str) -> str:
        """String flag: the environment's last poll found nothing (its share is free)."""
        return f"{self.prefix}:lock:poll-idle:{environment_id}"

    def arrived(self, environment_id: str) -> str:
        """Sorted set: work id -> epoch second (the fleet's clock) a poll answered it, kept for
        `DISPATCHER_IDLE_HEADROOM_SECONDS` (none while it is 0): the environment's recent
        demand, which its idle headroom keeps."""
        return f"{self.prefix}:lock:poll-arrived:{environment_id}"

    @property
    def wake_pending(self) -> str:
        """String flag: a webhook wake-up is queued and not yet run, fleet-wide; deliveries
        while it stands publish nothing more."""
        return f"{self.prefix}:lock:wake-pending"
