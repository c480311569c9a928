"""The stored work item: its public fields (the `BetaSelfHostedWork` shape) and private ones.

Stored as one JSON string per item, so a state transition is one compare-and-set of one key
(`items`).
"""

from __future__ import annotations

import base64
import json
import secrets
from dataclasses import dataclass, field
from typing import Any

__all__ = ["WorkRecord", "new_id", "new_token", "secret_for"]

_PUBLIC = ("id", "type", "environment_id", "state", "data", "metadata", "created_at",
           "acknowledged_at", "started_at", "latest_heartbeat_at", "stop_requested_at",
           "stopped_at")

# What `WorkRecord` fills in for a public field a stored record lacks (`metadata`: a new {}).
_PUBLIC_DEFAULTS: dict[str, Any] = {"type": "work", "state": "queued"}


def new_id(kind: str) -> str:
    """`work_...`, `env_...`, `session_...`: the service's prefixes, random base62-ish tails."""
    return f"{kind}_{secrets.token_hex(12)}"


def new_token() -> str:
    """A sessions token: the Bearer of one delivery's heartbeat, stop and session calls."""
    return f"sk-ant-req-{secrets.token_urlsafe(24)}"


def secret_for(token: str) -> str:
    """A work secret as SDK 2.17's fake Work API writes it: base64url JSON (no padding) with a
    `version` and the sessions token."""
    payload = json.dumps({"version": 1, "sessions_token": token})
    return base64.urlsafe_b64encode(payload.encode()).decode().rstrip("=")


@dataclass
class WorkRecord:
    id: str
    environment_id: str
    data: dict[str, Any]
    created_at: str
    seq: int  # position in the environment's list order, newest highest
    # The secret of the latest delivery (of the item, with `--sessions-token per-item`).
    secret: str
    state: str = "queued"
    type: str = "work"
    metadata: dict[str, str] = field(default_factory=dict)
    acknowledged_at: str | None = None
    started_at: str | None = None
    latest_heartbeat_at: str | None = None
    stop_requested_at: str | None = None
    stopped_at: str | None = None
    # --- private -------------------------------------------------------------------------------
    # The stream entry that carries the item while it is queued. None for a moment after it is
    # (re)queued, until the entry is added; never set once the item has left the queue.
    entry_id: str | None = None
    ttl_seconds: int | None = None
    # Epoch seconds after which the lease has lapsed; None when no lease is held.
    lease_expires_at: float | None = None
    lease_updated_at: str | None = None
    # Polls that delivered the item since it was (re)queued; none after `max_deliveries`.
    deliveries: int = 0
    # Every sessions token minted for the item -> the epoch second it expires (None: never).
    tokens: dict[str, float | None] = field(default_factory=dict)

    @classmethod
    def loads(cls, raw: str) -> WorkRecord:
        return cls(**json.loads(raw))

    def dumps(self) -> str:
        # The fields as they are, in their order (`asdict` deep-copies them first: a tenth of
        # a heartbeat's CPU in the emulator). The same record always gives the same string:
        # `Items.swap` compares them.
        return self.dumps_fields(vars(self))

    @staticmethod
    def dumps_fields(fields: dict[str, Any]) -> str:
        return json.dumps(fields, separators=(",", ":"))

    def public(self, *, with_secret: bool = False) -> dict[str, Any]:
        """The item as the API shows it; `secret` only on a polled copy."""
        body = {name: getattr(self, name) for name in _PUBLIC}
        body["secret"] = self.secret if with_secret else None
        return body

    @staticmethod
    def public_of(stored: dict[str, Any]) -> dict[str, Any]:
        """`WorkRecord(**stored).public()` of a stored record read as JSON, without building the
        record: a list page shows up to 1,000, and the record cost over half of its CPU."""
        body = {name: stored.get(name, _PUBLIC_DEFAULTS.get(name)) for name in _PUBLIC}
        if "metadata" not in stored:
            body["metadata"] = {}
        body["secret"] = None
        return body
