"""The emulator's settings, with every choice made where the real service is unknown.

Read once at the edge (`cli`), passed down as one frozen object; nothing else reads the
environment. docs/emulator.md explains each default.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

__all__ = [
    "DEFAULT_KEY_PREFIX",
    "DEFAULT_LIST_LIMIT",
    "DEFAULT_RECLAIM_MS",
    "DEFAULT_TTL_SECONDS",
    "MAX_BLOCK_MS",
    "MAX_DELIVERIES",
    "MAX_LIST_LIMIT",
    "MAX_METADATA_KEYS",
    "MAX_METADATA_KEY_CHARS",
    "MAX_METADATA_VALUE_CHARS",
    "MAX_TTL_SECONDS",
    "MIN_TTL_SECONDS",
    "MODELS",
    "REQUEST_LOG_CAP",
    "SESSIONS_TOKEN_LIFE_SECONDS",
    "UNCLAIMED_LIMIT_SECONDS",
    "WORKERS_POLLING_WINDOW_S",
    "EmulatorConfig",
    "LeaseExpiry",
    "ServerModel",
    "SessionsToken",
    "StopResponse",
    "StoppingHeartbeat",
]

DEFAULT_KEY_PREFIX = "emulator"
# The API documents block_ms as "1-999": a long poll is under a second, the client re-polls.
MAX_BLOCK_MS = 999
# "If omitted, uses the default (5000ms)" (the poll docstring).
DEFAULT_RECLAIM_MS = 5000
# The lease TTL when a heartbeat asks for none: "The API's default lease TTL" (SDK 2.17's
# `_lease.py`, which assumes it before the first reply; its fake Work API grants it too).
DEFAULT_TTL_SECONDS = 300
# An item acked but never heartbeated lapses this long after its ack (SDK 2.17's fake Work API,
# `UNCLAIMED_LIMIT`); 0: never, it stays `starting` (what SDK issue #1746 observed).
UNCLAIMED_LIMIT_SECONDS = 600
# Deliveries of an item that nobody acks before it leaves the queue (the fake's
# `MAX_DELIVERIES`); 0: no limit.
MAX_DELIVERIES = 3
# A sessions token expires this long after the poll that minted it (the fake's `TOKEN_LIFE`);
# 0: never.
SESSIONS_TOKEN_LIFE_SECONDS = 3600
# Clamp of desired_ttl_seconds. Unknown for the real service; a third-party clone documents
# 10-600 s. Tests lower the minimum to 1 s to watch leases lapse quickly.
MIN_TTL_SECONDS = 10
MAX_TTL_SECONDS = 600
# List paging: unknown for the real service; 20/100 are the Anthropic API's usual numbers.
# The maximum is `EmulatorConfig.max_list_limit` (`--max-list-limit`): the service documents
# none, and a fleet sweeping many held leases asks pages of 1,000.
DEFAULT_LIST_LIMIT = 20
MAX_LIST_LIMIT = 100
# Metadata limits: unknown for the real service; these are the Anthropic API's metadata limits
# elsewhere (16 keys, 64-character keys, 512-character values).
MAX_METADATA_KEYS = 16
MAX_METADATA_KEY_CHARS = 64
MAX_METADATA_VALUE_CHARS = 512
# `workers_polling` counts distinct worker ids "in the last 30 seconds" (stats docstring).
WORKERS_POLLING_WINDOW_S = 30.0
# The request log keeps the newest entries only, so a long benchmark cannot fill Redis.
REQUEST_LOG_CAP = 50_000


class LeaseExpiry(StrEnum):
    """What happens to an item whose lease lapsed: a heartbeated one `ttl` after its last
    heartbeat, one acked but never heartbeated `unclaimed_limit_seconds` after its ack."""

    # SDK 2.17's fake Work API: the item ends.
    STOP = "stop"
    # The lease is cleared and the item goes back on the queue, to be delivered again.
    REQUEUE = "requeue"


class StoppingHeartbeat(StrEnum):
    """A heartbeat on a `stopping` item."""

    # SDK 2.17's fake Work API: `lease_extended: false`, no new token. SDK 2.17's worker stops
    # only on `lease_extended: false`, so this is what makes a graceful stop reach it.
    REFUSE = "refuse"
    # The lease is extended with a new token while the worker shuts down.
    EXTEND = "extend"


class SessionsToken(StrEnum):
    """How the `sessions_token` in a delivered work secret is minted."""

    # SDK 2.17's fake Work API: a new token on every delivery (poll), each expiring on its own.
    PER_DELIVERY = "per-delivery"
    # One token per item, minted with it, delivered again unchanged.
    PER_ITEM = "per-item"


class ServerModel(StrEnum):
    """Every switch of the server model at once (`--server-model`); a flag of its own wins."""

    # SDK 2.17's model of the service (its fake Work API): the defaults of `EmulatorConfig`.
    SDK_217 = "sdk-2.17"
    # The emulator's model before SDK 2.17's evidence.
    EARLIER = "earlier"


# The `EmulatorConfig` fields each model sets.
MODELS: Mapping[ServerModel, Mapping[str, Any]] = {
    ServerModel.SDK_217: {},
    ServerModel.EARLIER: {
        "stopping_heartbeat": StoppingHeartbeat.EXTEND, "should_retry_header": False,
        "default_ttl_seconds": 120, "unclaimed_limit_seconds": 0,
        "lease_expiry": LeaseExpiry.REQUEUE, "max_deliveries": 0,
        "sessions_token": SessionsToken.PER_ITEM, "sessions_token_life_seconds": 0,
        "claim_unacked": False, "stop_stopped_noop": False},
}


class StopResponse(StrEnum):
    # What the SDK maintainers observe the service send: 204, no body.
    NO_CONTENT = "204"
    # What the OpenAPI document declares: the work object.
    JSON = "json"


@dataclass(frozen=True)
class EmulatorConfig:
    environment_key: str
    api_key: str
    redis_url: str = "redis://127.0.0.1:6379/0"
    key_prefix: str = DEFAULT_KEY_PREFIX
    host: str = "127.0.0.1"
    port: int = 8765
    lease_expiry: LeaseExpiry = LeaseExpiry.STOP
    default_ttl_seconds: int = DEFAULT_TTL_SECONDS
    unclaimed_limit_seconds: int = UNCLAIMED_LIMIT_SECONDS
    max_deliveries: int = MAX_DELIVERIES
    stopping_heartbeat: StoppingHeartbeat = StoppingHeartbeat.REFUSE
    sessions_token: SessionsToken = SessionsToken.PER_DELIVERY
    sessions_token_life_seconds: int = SESSIONS_TOKEN_LIFE_SECONDS
    # A heartbeat with `NO_HEARTBEAT` on an item polled but not acked claims it (the fake Work
    # API); off: 409, ack first.
    claim_unacked: bool = True
    # A stop of a stopped item: answered as any stop, changing nothing (the fake Work API);
    # off: 409 `conflict_error`.
    stop_stopped_noop: bool = True
    # Refusals that will not change on a retry (4xx other than 408 and 429) carry
    # `x-should-retry: false` (the fake Work API), which the SDK's retry honours.
    should_retry_header: bool = True
    min_ttl_seconds: int = MIN_TTL_SECONDS
    max_ttl_seconds: int = MAX_TTL_SECONDS
    # The largest `limit` a `list` takes; above it, a 400.
    max_list_limit: int = MAX_LIST_LIMIT
    # Names of environments to create at start-up, printed with their ids (demos).
    create_environments: tuple[str, ...] = field(default_factory=tuple)
    # Environment ids to create at start-up (fixed ids, e.g. for docker compose).
    environment_ids: tuple[str, ...] = field(default_factory=tuple)
    # Where `session.status_run_started` is delivered, signed with the `whsec_...` key; no
    # deliveries without both.
    webhook_url: str | None = None
    webhook_signing_key: str | None = field(default=None, repr=False)

    def clamp_ttl(self, desired: int | None) -> int:
        if desired is None:
            return self.default_ttl_seconds
        return max(self.min_ttl_seconds, min(self.max_ttl_seconds, desired))
