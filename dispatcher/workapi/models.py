"""Pydantic models of the Work API (`managed-agents-2026-04-01`).

Every model keeps fields it does not know (``extra="allow"``) and states and work types are
plain strings, not closed enums: a newer server that adds a field, a state or a work type must
never break a fleet that is already deployed. Timestamps stay the exact strings the server sent,
because the heartbeat lease token is compared by exact string on the server.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "NO_HEARTBEAT",
    "Heartbeat",
    "LeaseState",
    "Work",
    "WorkData",
    "WorkDataType",
    "WorkPage",
    "WorkQueueStats",
    "WorkState",
    "epoch_seconds",
]

# The `expected_last_heartbeat` value that claims a lease nobody has heartbeated yet.
NO_HEARTBEAT = "NO_HEARTBEAT"


class WorkState(StrEnum):
    QUEUED = "queued"
    STARTING = "starting"
    ACTIVE = "active"
    STOPPING = "stopping"
    STOPPED = "stopped"


class WorkDataType(StrEnum):
    SESSION = "session"
    # Sent by the current service to probe a worker; the Python SDK does not model it yet.
    HEALTHCHECK = "healthcheck"


class _Open(BaseModel):
    """A server object: unknown fields are kept and survive a round trip to JSON."""

    model_config = ConfigDict(extra="allow", frozen=True)


class WorkData(_Open):
    id: str
    type: str


class Work(_Open):
    id: str
    type: str = "work"
    environment_id: str
    state: str
    data: WorkData
    metadata: dict[str, str] = Field(default_factory=dict)
    created_at: str
    acknowledged_at: str | None = None
    started_at: str | None = None
    latest_heartbeat_at: str | None = None
    stop_requested_at: str | None = None
    stopped_at: str | None = None
    # Set on polled copies only. repr=False keeps it out of every log line and traceback.
    secret: str | None = Field(default=None, repr=False)

    @property
    def session_id(self) -> str:
        return self.data.id

    @property
    def is_session(self) -> bool:
        return self.data.type == WorkDataType.SESSION

    def to_json(self) -> str:
        """The item as the official CLI hands it to an on-work command (secret included)."""
        return self.model_dump_json()


class Heartbeat(_Open):
    type: str = "work_heartbeat"
    # The lease token. The SDK documents "an empty string if none has been recorded".
    last_heartbeat: str
    lease_extended: bool
    state: str
    ttl_seconds: int


class LeaseState(_Open):
    """The server's view of a lease, sent in `error.details.current_state` of a 412."""

    state: str | None = None
    last_heartbeat: str | None = None
    lease_updated_at: str | None = None
    lease_extended: bool = False
    ttl_seconds: int | None = None


class WorkPage(_Open):
    data: list[Work]
    next_page: str | None = None


class WorkQueueStats(_Open):
    type: str = "work_queue_stats"
    depth: int
    pending: int
    oldest_queued_at: str | None = None
    workers_polling: int | None = None


def dump_metadata(metadata: dict[str, Any]) -> dict[str, Any]:
    """Metadata for an update body: strings upsert, ``None`` deletes."""
    return {key: (None if value is None else str(value)) for key, value in metadata.items()}


def epoch_seconds(timestamp: str | None) -> float | None:
    """A server timestamp (RFC 3339) as an epoch second; None if absent or unreadable. The one
    parser of the server's times: a zone-less one is read as UTC."""
    if not timestamp:
        return None
    try:
        parsed = datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
    except ValueError:
        return None
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).timestamp()
