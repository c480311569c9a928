"""The typed Work API client: `WorkClient`, `AsyncWorkClient`, their models and errors.

Everything public is re-exported here; import from `dispatcher.workapi`, not its modules. The
models are imported at once; the client, errors and retry policy (which import httpx, a quarter
of a second) on first use, so that a command reading only Redis, or settings validating an id,
never pays for an HTTP stack.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from dispatcher.workapi.models import (
    NO_HEARTBEAT,
    Heartbeat,
    LeaseState,
    ListedPage,
    ListedWork,
    Work,
    WorkData,
    WorkDataType,
    WorkPage,
    WorkQueueStats,
    WorkState,
    epoch_seconds,
    sessions_token,
)

if TYPE_CHECKING:
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
    from dispatcher.workapi.retry import Backoff, classify, delay_for, retry_after_seconds

_LAZY = {
    "client": ("ANTHROPIC_VERSION", "BETA", "POLL_BLOCK_MS_MAX", "AsyncWorkClient",
               "WorkClient"),
    "errors": ("AuthenticationError", "ConflictError", "InvalidRequestError", "InvalidWorkItem",
               "LeasePreconditionFailed", "MalformedResponseError", "MissingCredentialError",
               "NotFoundError", "RateLimitedError", "RequestTimeout", "ServerError",
               "TransientError", "WorkAPIError"),
    "retry": ("Backoff", "classify", "delay_for", "retry_after_seconds"),
}
_MODULE_OF = {name: module for module, names in _LAZY.items() for name in names}


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


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
    "ListedPage",
    "ListedWork",
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
    "sessions_token",
]
