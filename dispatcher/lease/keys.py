"""The lease registry's Redis keys, under the fleet's prefix: what the fleet holds and in what
state.

Other parts keep their keys beside them, under the same prefix: the poller's
(`control/poll_keys.py`), the workers' index (`control/capacity.py`), the counters
(`metrics.py`), the webhook replay guard (`ops/webhook_server.py`) and Celery's own
(`celery/keys.py`). The stop bridge's sweep state stays here: the registry's scripts read it
atomically with the lease index. Sharing a Redis with the emulator or another fleet is safe as
long as prefixes differ.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Keys"]


@dataclass(frozen=True)
class Keys:
    prefix: str

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

    def proven(self, work_id: str) -> str:
        """List: a mark pushed when our ack of the item is answered, for its attempt waiting to
        start (a blocking pop wakes it at once); expires soon after."""
        return f"{self.prefix}:proven:{work_id}"

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

    def worker(self, hostname: str) -> str:
        """Hash: a worker's advertised slots, pool, queues and draining flag. Written by
        `control.capacity`; a lease key because an attempt's pulse reads the draining flag in
        the same script as its lease."""
        return f"{self.prefix}:worker:{hostname}"

    @property
    def epoch(self) -> str:
        """String: a random id written once; a different or missing one means Redis was reset."""
        return f"{self.prefix}:epoch"
