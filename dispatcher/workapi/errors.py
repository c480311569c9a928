"""What can go wrong talking to the Work API.

The class names what happened; ``retryable`` says what to do about it. The two are decided
apart: the class from the status code, ``retryable`` by the one classifier
(:func:`dispatcher.workapi.retry.classify`), which lets the server's ``x-should-retry`` header
overrule the status. So a 409 sent with ``x-should-retry: false`` is a ``ConflictError`` whose
``retryable`` is False, and callers branch on ``retryable``, not on the class, to decide whether
to try again.

    Exception
    ├── WorkAPIError                    status, retryable, error_type, request_id, retry_after
    │   ├── TransientError              the connection failed; no answer came (retryable)
    │   │   ├── RequestTimeout          timed out, or a 408
    │   │   └── ServerError             5xx
    │   ├── RateLimitedError            429
    │   ├── ConflictError               409
    │   ├── NotFoundError               404
    │   ├── LeasePreconditionFailed     412 (heartbeat): current_state holds the server's lease
    │   ├── AuthenticationError         401, 403
    │   ├── InvalidRequestError         400, 422 and every other 4xx
    │   └── MalformedResponseError      a 2xx whose body is not what the endpoint returns
    │       └── InvalidWorkItem         ... a work item that fails validation; work_id if legible
    └── ValueError
        └── MissingCredentialError      the key an endpoint needs is not configured

No message or repr carries a key, a work secret or a response body: a body can hold the
polled item's secret, and these messages end up in logs and task results.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import httpx
from pydantic import ValidationError

from dispatcher.workapi.models import LeaseState
from dispatcher.workapi.retry import classify, retry_after_seconds

__all__ = [
    "AuthenticationError",
    "ConflictError",
    "InvalidRequestError",
    "InvalidWorkItem",
    "LeasePreconditionFailed",
    "MalformedResponseError",
    "MissingCredentialError",
    "NotFoundError",
    "RateLimitedError",
    "RequestTimeout",
    "ServerError",
    "TransientError",
    "WorkAPIError",
    "describe_body",
    "error_from_response",
    "redact",
    "transport_errors",
]

# Anthropic keys and tokens (`sk-ant-api03-...`, `sk-ant-oat01-...`, `sk-ant-req-...`). A
# server message that quotes one back must not carry it into a log line.
_KEY_PATTERN = re.compile(r"sk-ant-[A-Za-z0-9_\-]+")
# Server messages are cut here so an error line stays one readable line.
MAX_MESSAGE_CHARS = 500


def redact(text: str) -> str:
    """``text`` with anything shaped like an Anthropic key masked, cut to one short line."""
    flat = " ".join(_KEY_PATTERN.sub("sk-ant-***", text).split())
    if len(flat) > MAX_MESSAGE_CHARS:
        return flat[: MAX_MESSAGE_CHARS - 3] + "..."
    return flat


class WorkAPIError(Exception):
    """A Work API call failed. ``status`` is None when no response arrived."""

    # What ``retryable`` is when the raiser does not say (it normally comes from `classify`).
    default_retryable: ClassVar[bool] = False

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        retryable: bool | None = None,
        error_type: str | None = None,
        request_id: str | None = None,
        retry_after: float | None = None,
        endpoint: str | None = None,
    ) -> None:
        super().__init__(redact(message))
        self.status = status
        self.retryable = self.default_retryable if retryable is None else retryable
        self.error_type = error_type
        self.request_id = request_id
        self.retry_after = retry_after
        self.endpoint = endpoint

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""

    def __repr__(self) -> str:
        fields = {
            "status": self.status,
            "retryable": self.retryable,
            "error_type": self.error_type,
            "request_id": self.request_id,
            "retry_after": self.retry_after,
        }
        shown = ", ".join(f"{k}={v!r}" for k, v in fields.items() if v is not None)
        return f"{type(self).__name__}({self.message!r}, {shown})"


class TransientError(WorkAPIError):
    """No usable answer: connection refused or reset, DNS, TLS, a broken response stream."""

    default_retryable = True


class RequestTimeout(TransientError):
    """The request timed out on our side, or the server answered 408."""


class ServerError(TransientError):
    """A 5xx: the server failed or is overloaded (529)."""


class RateLimitedError(WorkAPIError):
    default_retryable = True


class ConflictError(WorkAPIError):
    """A 409. On stop it means "already stopped"; on heartbeat the item is queued or stopped."""

    default_retryable = True


class NotFoundError(WorkAPIError):
    pass


class LeasePreconditionFailed(WorkAPIError):
    """A 412 on heartbeat: the lease token we sent is not the server's; another worker may hold it.

    ``current_state`` is the server's view of the lease (from ``error.details.current_state``),
    or None when the body did not carry a readable one.
    """

    def __init__(
        self, message: str, *, current_state: LeaseState | None = None, **kwargs: Any
    ) -> None:
        super().__init__(message, **kwargs)
        self.current_state = current_state


class AuthenticationError(WorkAPIError):
    """A 401 or 403: the key is wrong, revoked, or the wrong kind for this endpoint."""


class InvalidRequestError(WorkAPIError):
    """A 400, 422 or any other 4xx: retrying the same request will not help."""


class MalformedResponseError(WorkAPIError):
    """A 2xx whose body is not the JSON the endpoint returns (truncated, wrong shape, HTML).

    Retryable: a proxy's error page or a cut-off body is usually passing trouble.
    """

    default_retryable = True


class InvalidWorkItem(MalformedResponseError):
    """A 2xx carrying a work item that fails validation (a hostile id, a lone surrogate).

    ``work_id`` is the item's id read from the raw reply when it is itself valid, so the caller
    can name the item and stop it; asking again would only bring the same item back, so it is
    not retryable.
    """

    default_retryable = False

    def __init__(self, message: str, *, work_id: str | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.work_id = work_id


class MissingCredentialError(ValueError):
    """The key an endpoint needs is not configured; raised before any request is sent."""


# --- from responses and transport failures -------------------------------------------------
_ERROR_CLASSES: dict[int, type[WorkAPIError]] = {
    401: AuthenticationError,
    403: AuthenticationError,
    404: NotFoundError,
    408: RequestTimeout,
    409: ConflictError,
    412: LeasePreconditionFailed,
    429: RateLimitedError,
}


def _error_class(status: int) -> type[WorkAPIError]:
    if status in _ERROR_CLASSES:
        return _ERROR_CLASSES[status]
    if status >= 500:
        return ServerError
    if status >= 400:
        return InvalidRequestError
    return WorkAPIError  # a redirect or other surprise: the base URL is probably wrong


def describe_body(response: httpx.Response) -> str:
    """What the body looks like, without a byte of it (it may hold a work secret)."""
    content_type = response.headers.get("content-type") or "no content-type"
    return f"{content_type}, {len(response.content)} bytes"


def _error_fields(response: httpx.Response) -> tuple[str | None, str, Any, str | None]:
    """(error type, message, details, request id) from an error body of any shape."""
    request_id = response.headers.get("request-id")
    if not response.content:
        return None, "no error body", None, request_id
    try:
        body = json.loads(response.content)
    except (ValueError, RecursionError):  # RecursionError: a body nested too deeply
        return None, f"the error body is not JSON ({describe_body(response)})", None, request_id
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return None, "the error body has no error object", None, request_id
    error_type = error.get("type") if isinstance(error.get("type"), str) else None
    message = error.get("message")
    if isinstance(body.get("request_id"), str):
        request_id = body["request_id"]
    return error_type, str(message) if message else "no message", error.get("details"), request_id


def _lease_state(details: Any) -> LeaseState | None:
    state = details.get("current_state") if isinstance(details, dict) else None
    try:
        return LeaseState.model_validate(state) if isinstance(state, dict) else None
    except ValidationError:
        return None


def error_from_response(endpoint: str, response: httpx.Response) -> WorkAPIError:
    """The exception for a non-2xx answer; its class from the status, retryable from classify."""
    status = response.status_code
    error_type, message, details, request_id = _error_fields(response)
    text = f"{endpoint}: {status} {error_type or response.reason_phrase}: {message}"
    if request_id:
        text += f" (request_id={request_id})"
    fields: dict[str, Any] = {
        "status": status,
        "retryable": classify(status, response.headers),
        "error_type": error_type,
        "request_id": request_id,
        "retry_after": retry_after_seconds(response.headers),
        "endpoint": endpoint,
    }
    cls = _error_class(status)
    if cls is LeasePreconditionFailed:
        return LeasePreconditionFailed(text, current_state=_lease_state(details), **fields)
    return cls(text, **fields)


@contextmanager
def transport_errors(endpoint: str) -> Iterator[None]:
    """Turn httpx's failures into ours; a connection error or timeout is always transient."""
    try:
        yield
    except httpx.TimeoutException as exc:
        raise RequestTimeout(f"{endpoint}: timed out ({type(exc).__name__})",
                             endpoint=endpoint) from exc
    except httpx.RequestError as exc:
        raise TransientError(f"{endpoint}: {type(exc).__name__}: {exc}",
                             endpoint=endpoint) from exc
