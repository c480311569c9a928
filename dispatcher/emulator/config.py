"""The emulator's settings, with every choice made where the real service is unknown.

Read once at the edge (`cli`), passed down as one frozen object; nothing else reads the
environment. docs/emulator.md explains each default.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

__all__ = [
    "DEFAULT_KEY_PREFIX",
    "DEFAULT_LIST_LIMIT",
    "DEFAULT_RECLAIM_MS",
    "DEFAULT_TTL_SECONDS",
    "MAX_BLOCK_MS",
    "MAX_LIST_LIMIT",
    "MAX_METADATA_KEYS",
    "MAX_METADATA_KEY_CHARS",
    "MAX_METADATA_VALUE_CHARS",
    "MAX_TTL_SECONDS",
    "MIN_TTL_SECONDS",
    "REQUEST_LOG_CAP",
    "WORKERS_POLLING_WINDOW_S",
    "EmulatorConfig",
    "LeaseExpiry",
    "StopResponse",
]

DEFAULT_KEY_PREFIX = "emulator"
# The API documents block_ms as "1-999": a long poll is under a second, the client re-polls.
MAX_BLOCK_MS = 999
# "If omitted, uses the default (5000ms)" (the poll docstring).
DEFAULT_RECLAIM_MS = 5000
# The lease TTL when a heartbeat asks for none; 120 s is the value in the official 412 fixture.
DEFAULT_TTL_SECONDS = 120
# Clamp of desired_ttl_seconds. Unknown for the real service; a third-party clone documents
# 10-600 s. Tests lower the minimum to 1 s to watch leases lapse quickly.
MIN_TTL_SECONDS = 10
MAX_TTL_SECONDS = 600
# List paging: unknown for the real service; 20/100 are the Anthropic API's usual numbers.
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
    """What happens to an item whose lease lapsed (now > last heartbeat + ttl)."""

    # As observed: a heartbeated lease that lapses is re-queued; an item acked but never
    # heartbeated stays in `starting` for ever (SDK issue #1746).
    REALISTIC = "realistic"
    # Every lapsed lease is re-queued, an acked-never-heartbeated item `ttl` after its ack too.
    REQUEUE = "requeue"
    # Every lapsed lease (same clock as `requeue`) ends the item: `stopped`.
    STOP = "stop"


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
    lease_expiry: LeaseExpiry = LeaseExpiry.REALISTIC
    default_ttl_seconds: int = DEFAULT_TTL_SECONDS
    min_ttl_seconds: int = MIN_TTL_SECONDS
    max_ttl_seconds: int = MAX_TTL_SECONDS
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
