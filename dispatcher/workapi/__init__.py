"""The typed Work API client: `WorkClient`, `AsyncWorkClient`, their models and errors.

Everything public is re-exported here; import from `dispatcher.workapi`, not its modules.
"""

from __future__ import annotations

from dispatcher.workapi.client import (
    ANTHROPIC_VERSION,
    BETA,
    POLL_BLOCK_MS_MAX,
    AsyncWorkClient,
    WorkClient,
)
from dispatcher.workapi.errors import (
    AuthenticationError,
    ConflictError,
    InvalidRequestError,
    InvalidWorkItem,
    LeasePreconditionFailed,
    MalformedResponseError,
    MissingCredentialError,
    NotFoundError,
    RateLimitedError,
    RequestTimeout,
    ServerError,
    TransientError,
    WorkAPIError,
)
from dispatcher.workapi.models import (
    NO_HEARTBEAT,
    Heartbeat,
    LeaseState,
    Work,
    WorkData,
    WorkDataType,
    WorkPage,
    WorkQueueStats,
    WorkState,
    epoch_seconds,
)
from dispatcher.workapi.retry import Backoff, classify, delay_for, retry_after_seconds

__all__ = [
    "ANTHROPIC_VERSION",
    "BETA",
    "NO_HEARTBEAT",
    "POLL_BLOCK_MS_MAX",
    "AsyncWorkClient",
    "AuthenticationError",
    "Backoff",
    "ConflictError",
    "Heartbeat",
    "InvalidRequestError",
    "InvalidWorkItem",
    "LeasePreconditionFailed",
    "LeaseState",
    "MalformedResponseError",
    "MissingCredentialError",
    "NotFoundError",
    "RateLimitedError",
    "RequestTimeout",
    "ServerError",
    "TransientError",
    "Work",
    "WorkAPIError",
    "WorkClient",
    "WorkData",
    "WorkDataType",
    "WorkPage",
    "WorkQueueStats",
    "WorkState",
    "classify",
    "delay_for",
    "epoch_seconds",
    "retry_after_seconds",
]
