"""The Anthropic error shape, and the exceptions the routes raise to produce it.

    {"type": "error", "error": {"type": ..., "message": ..., "details"?: ...}, "request_id": ...}

ApiError
 ├── InvalidRequest       400 invalid_request_error
 ├── Unauthenticated      401 authentication_error
 ├── Forbidden            403 permission_error
 ├── NotFound             404 not_found_error
 ├── Conflict             409 conflict_error
 └── PreconditionFailed   412 invalid_request_error + details (the official heartbeat fixture)
"""

from __future__ import annotations

import secrets
from typing import Any

__all__ = [
    "ApiError",
    "Conflict",
    "Forbidden",
    "InvalidRequest",
    "NotFound",
    "PreconditionFailed",
    "Unauthenticated",
    "error_body",
    "error_type_for",
    "new_request_id",
    "retry_hint",
]

# The error `type` of each status, from the Anthropic API's error documentation.
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    412: "invalid_request_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}


def error_type_for(status: int) -> str:
    if status in _TYPES:
        return _TYPES[status]
    return "api_error" if status >= 500 else "invalid_request_error"


# 4xx answers a retry can change: a timeout and a rate limit. Every other refusal stands.
_RETRYABLE_4XX = frozenset({408, 429})


def retry_hint(status: int, *, enabled: bool) -> dict[str, str]:
    """`x-should-retry: false` on a refusal that a retry will not change, as SDK 2.17's fake Work
    API sends it; the SDK's retry honours it (a 409 stop is otherwise retried, 13-14 s)."""
    if enabled and 400 <= status < 500 and status not in _RETRYABLE_4XX:
        return {"x-should-retry": "false"}
    return {}


def new_request_id() -> str:
    return f"req_{secrets.token_hex(12)}"


def error_body(status: int, message: str, *, request_id: str,
               details: dict[str, Any] | None = None) -> dict[str, Any]:
    error: dict[str, Any] = {"type": error_type_for(status), "message": message}
    if details is not None:
        error["details"] = details
    return {"type": "error", "error": error, "request_id": request_id}


class ApiError(Exception):
    status = 500

    def __init__(self, message: str, *, details: dict[str, Any] | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details
        self.headers = headers or {}


class InvalidRequest(ApiError):
    status = 400


class Unauthenticated(ApiError):
    status = 401


class Forbidden(ApiError):
    status = 403


class NotFound(ApiError):
    status = 404


class Conflict(ApiError):
    status = 409


class PreconditionFailed(ApiError):
    status = 412
