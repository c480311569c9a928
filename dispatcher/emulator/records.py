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

import msgspec

__all__ = ["WorkRecord", "listed_page", "new_id", "new_token", "secret_for"]


class _Listed(msgspec.Struct):
    """A stored record's public fields (the `BetaSelfHostedWork` shape), in the API's order, as
    a list page shows them; the defaults are `WorkRecord`'s, for a record stored before a field
    existed.

    Decoding a stored record into this skips its private fields; `data` and `metadata` pass
    through as stored (`Raw`: never decoded). A page of 1,000 through `json` and a dict per item
    cost the emulator 13 µs an item, most of a page's CPU: the stop bridge lists every held
    lease each second."""

    id: Any = None
    type: Any = "work"
    environment_id: Any = None
    state: Any = "queued"
    data: msgspec.Raw = msgspec.Raw(b"null")
    metadata: msgspec.Raw = msgspec.Raw(b"{}")
    created_at: Any = None
    acknowledged_at: Any = None
    started_at: Any = None
    latest_heartbeat_at: Any = None
    stop_requested_at: Any = None
    stopped_at: Any = None
    secret: Any = None  # as stored when decoded; set to None before a page is encoded


_PUBLIC = tuple(name for name in _Listed.__struct_fields__ if name != "secret")


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


class _Page(msgspec.Struct):
    data: list[_Listed]
    next_page: str | None


_LISTED = msgspec.json.Decoder(list[_Listed])
_PAGE = msgspec.json.Encoder()


def listed_page(records: str | bytes, next_page: str | None) -> bytes:
    """The JSON of a list page (`{"data": [...], "next_page": ...}`) from its stored records as
    one JSON array, each shown as `WorkRecord(**stored).public()` would."""
    items = _LISTED.decode(records)
    for item in items:
        item.secret = None
    return _PAGE.encode(_Page(items, next_page))
