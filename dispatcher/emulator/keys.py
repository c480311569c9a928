"""Every Redis key the emulator writes, under one prefix (default "emulator").

A dispatcher, a test run or a second emulator may share the Redis as long as prefixes differ;
cleaning up is deleting `<prefix>:*`.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CONSUMER_GROUP", "EmulatorKeys"]

# One consumer group per environment stream; each poller is a consumer named by its worker id.
CONSUMER_GROUP = "workers"


@dataclass(frozen=True)
class EmulatorKeys:
    prefix: str

    @property
    def seq(self) -> str:
        """Counter: the creation order of work items, the score of every list index."""
        return f"{self.prefix}:seq"

    @property
    def requests(self) -> str:
        """List: the request log, newest first, capped."""
        return f"{self.prefix}:requests"

    @property
    def environment_keys(self) -> str:
        """Hash: sha256 of an environment's own key -> the environment it opens."""
        return f"{self.prefix}:environment-keys"

    def environment(self, environment_id: str) -> str:
        """String: the environment's JSON."""
        return f"{self.prefix}:env:{environment_id}"

    def session(self, session_id: str) -> str:
        """String: the session's JSON."""
        return f"{self.prefix}:session:{session_id}"

    def events(self, session_id: str) -> str:
        """Stream: the session's events in order, one JSON `event` field per entry."""
        return f"{self.prefix}:events:{session_id}"

    def work(self, work_id: str) -> str:
        """String: one work item's JSON (`records.WorkRecord`)."""
        return f"{self.prefix}:work:{work_id}"

    def stream(self, environment_id: str) -> str:
        """Stream: one entry per queued item (`work_id` field); group `CONSUMER_GROUP`."""
        return f"{self.prefix}:stream:{environment_id}"

    def index(self, environment_id: str) -> str:
        """Sorted set: every work id of the environment, scored by `seq` (list order)."""
        return f"{self.prefix}:index:{environment_id}"

    def leases(self, environment_id: str) -> str:
        """Sorted set: work ids holding a lease, scored by the epoch second it lapses."""
        return f"{self.prefix}:leases:{environment_id}"

    def workers(self, environment_id: str) -> str:
        """Sorted set: worker ids that polled, scored by the epoch second of their last poll."""
        return f"{self.prefix}:workers:{environment_id}"
