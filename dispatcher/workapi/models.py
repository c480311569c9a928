"""Pydantic models of the Work API (`managed-agents-2026-04-01`).

Every model keeps fields it does not know (``extra="allow"``) and states and work types are
plain strings, not closed enums: a newer server that adds a field, a state or a work type must
never break a fleet that is already deployed. Timestamps stay the exact strings the server sent,
because the heartbeat lease token is compared by exact string on the server.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator

__all__ = [
    "NO_HEARTBEAT",
    "Heartbeat",
    "InvalidId",
    "LeaseState",
    "ListedPage",
    "ListedWork",
    "Work",
    "WorkData",
    "WorkDataType",
    "WorkPage",
    "WorkQueueStats",
    "WorkState",
    "check_id",
    "epoch_seconds",
    "find_lone_surrogate",
    "id_pattern",
    "sessions_token",
]

# The `expected_last_heartbeat` value that claims a lease nobody has heartbeated yet.
NO_HEARTBEAT = "NO_HEARTBEAT"

# What an id may be before it goes into a URL path: letters, digits, `_`, `-`, and dots after
# the first character (so never `.` or `..`, which walk the path). Real ids are `work_...`.
_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,255}")


def id_pattern() -> str:
    """The regular expression of an id `check_id` takes, for a caller that checks many at once."""
    return _ID.pattern


class InvalidId(ValueError):
    """An id that cannot be one URL path segment; raised before any request is sent."""


def check_id(value: str, what: str = "id") -> str:
    """``value`` if it is safe as one URL path segment; ValueError naming ``what`` if not."""
    if not isinstance(value, str) or not _ID.fullmatch(value):
        shown = repr(value[:40] if isinstance(value, str) else value)
        raise InvalidId(f"{what} must be 1-256 letters, digits, '_', '-' or '.' (not first); "
                         f"got {shown}")
    return value


# A lease TTL larger than this is taken as this: no server grants an hour-long lease, and a
# fleet that believed one would wait that long before judging an unreachable lease lost.
MAX_TTL_SECONDS = 3600
# Queue figures are clamped here: beyond 2**53 a count is no longer exact as a float (metrics).
MAX_COUNT = 2**53


def _clamp(low: int, high: int) -> Any:
    """A validator that brings any finite or infinite number into [low, high], whole seconds or
    counts; NaN is taken as ``low``. One absurd figure from the server (1e309, -5, 10**400)
    then costs one item a sane default instead of an OverflowError later."""

    def clamp(value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, int | float):
            return value  # left to pydantic's own checks
        if isinstance(value, float) and math.isnan(value):
            return low
        return int(max(low, min(value, high)))

    return BeforeValidator(clamp)


TtlSeconds = Annotated[int, _clamp(0, MAX_TTL_SECONDS)]
Count = Annotated[int, _clamp(0, MAX_COUNT)]
Id = Annotated[str, AfterValidator(check_id)]


def _env_safe(value: str) -> str:
    if not value or "\x00" in value:
        raise ValueError("must be non-empty and hold no NUL (it becomes an environment variable)")
    return value


# A session id never enters a URL, only the sandbox's environment and stdin, where any text is
# data; but no environment variable can hold a NUL, and it would fail after the ack.
SessionId = Annotated[str, AfterValidator(_env_safe)]


def find_lone_surrogate(value: Any, where: str = "body") -> str | None:
    """Where a string with a lone surrogate (JSON ``"\\ud800"``) sits in decoded JSON, or None.
    Such a string passes str validation but can never be encoded as UTF-8 again (to Redis, to
    the sandbox's stdin), so an item carrying one would fail after it was acked."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return where
        return None
    if isinstance(value, dict):
        items: Any = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        found = (find_lone_surrogate(key, f"{where}.<key>") if isinstance(key, str) else None
                 ) or find_lone_surrogate(item, f"{where}.{key}")
        if found:
            return found
    return None


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
    id: SessionId
    type: str


class Work(_Open):
    id: Id
    type: str = "work"
    environment_id: Id
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

    @model_validator(mode="before")
    @classmethod
    def _encodable(cls, data: Any) -> Any:
        where = find_lone_surrogate(data, "work")
        if where:
            raise ValueError(f"{where} is not valid Unicode (a lone surrogate)")
        return data

    @property
    def session_id(self) -> str:
        return self.data.id

    @property
    def is_session(self) -> bool:
        return self.data.type == WorkDataType.SESSION

    def to_json(self) -> str:
        """The item as the official CLI hands it to an on-work command (secret included)."""
        return self.model_dump_json()


def sessions_token(secret: str | None) -> str | None:
    """The `sessions_token` inside a delivery's work secret (URL-safe base64 of JSON, its
    padding possibly stripped), as SDK 2.17 reads it; None when there is none to read. The
    token opens that delivery's heartbeat, stop and session calls: never log it."""
    if not secret:
        return None
    try:
        payload = json.loads(base64.urlsafe_b64decode(secret + "=" * (-len(secret) % 4)))
    except (binascii.Error, ValueError):
        return None
    token = payload.get("sessions_token") if isinstance(payload, dict) else None
    return token if isinstance(token, str) and token else None


class Heartbeat(_Open):
    type: str = "work_heartbeat"
    # The lease token. The SDK documents "an empty string if none has been recorded".
    last_heartbeat: str
    lease_extended: bool
    state: str
    ttl_seconds: TtlSeconds


class LeaseState(_Open):
    """The server's view of a lease, sent in `error.details.current_state` of a 412."""

    state: str | None = None
    last_heartbeat: str | None = None
    lease_updated_at: str | None = None
    lease_extended: bool = False
    ttl_seconds: TtlSeconds | None = None


class WorkPage(_Open):
    data: list[Work]
    next_page: str | None = None


@dataclass(frozen=True, slots=True)
class ListedWork:
    """A `list` item as the stop bridge reads it: its id and what says it is stopping, no more.
    A sweep reads every held item each second (20,000 a second at 20,000 held), and a full
    `Work` costs 25-40 µs of CPU an item to validate; these fields are checked by hand."""

    id: str
    state: str
    stop_requested_at: str | None = None


@dataclass(frozen=True, slots=True)
class ListedPage:
    data: list[ListedWork]
    next_page: str | None = None


class WorkQueueStats(_Open):
    type: str = "work_queue_stats"
    depth: Count
    pending: Count
    oldest_queued_at: str | None = None
    workers_polling: Count | None = None


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
