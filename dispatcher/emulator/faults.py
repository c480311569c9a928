"""Fault switches, for reliability tests and for users rehearsing failures, and the raw ASGI
middleware that applies them to Work API requests.

Faults never apply to `/_emulator/*`, `/v1/sessions` or `/v1/environments` (making work and
inspecting the emulator must stay reliable while the Work API misbehaves). Each share is a
probability in [0, 1], drawn per request; `endpoints` limits every fault to those endpoints.
Order of the draws: latency, dropped connection, 429, 5xx, malformed body, lost reply.
`list_limit_max` is no draw: while set, every `list` asking for more items than it is refused
with the 400 the emulator answers a `limit` out of range, naming the smaller range (a server
whose page size is capped below the emulator's own `--max-list-limit`, 100 by default).

A dropped connection sends nothing: the middleware returns a non-None value from the ASGI call,
which uvicorn answers by closing the socket without writing a byte (see `server`, which pins the
protocol whose behaviour this relies on). A dropped request was never applied; a lost reply
was: the request is handled, its answer thrown away, and the connection closed the same way, as
when a network drops the reply or a client times out just after the server acted.
"""

from __future__ import annotations

import asyncio
import json
import random
from typing import Any
from urllib.parse import parse_qs

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from .config import MAX_LIST_LIMIT, StopResponse
from .endpoints import Endpoint, classify
from .errors import error_body, new_request_id
from .requestlog import note_scope, request_id_of

__all__ = ["DROPPED", "FaultMiddleware", "FaultSettings", "Faults"]

# The value returned by the ASGI call of a dropped request; uvicorn closes the connection.
DROPPED = "dropped"
# A body cut short: what a client sees from a proxy that truncates, or a server that crashes
# mid-write.
MALFORMED_BODY = b'{"type": "work", "id": "work_'

_Share = Field(default=0.0, ge=0.0, le=1.0)
# The validation context's name for the emulator's `--max-list-limit`.
_MAX_LIST_LIMIT = "max_list_limit"


class FaultSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    latency_ms: int = Field(default=0, ge=0, le=60_000,
                            description="Added before each request is handled.")
    endpoints: list[Endpoint] | None = Field(
        default=None, description="Only these endpoints get faults; null means all.")
    error_rate: float = _Share
    error_status: int = Field(default=500, ge=500, le=599)
    rate_limit_rate: float = _Share
    retry_after_seconds: float = Field(
        default=1.0, gt=0, le=3600,
        description="Sent as `retry-after` with each 429; up to an hour, past the 60 s the SDK "
                    "honours, as a server pacing a fleet may ask.")
    list_limit_max: int | None = Field(
        default=None, ge=1,
        description="`list` refuses a `limit` above this with a 400; null: the usual range, "
                    "1 to `--max-list-limit` (100 by default), above which it may not be set.")
    drop_rate: float = _Share
    heartbeat_412_rate: float = Field(
        default=0.0, ge=0.0, le=1.0,
        description="Heartbeats refused with 412 and the item's real current_state.")
    malformed_rate: float = Field(default=0.0, ge=0.0, le=1.0,
                                  description="2xx bodies replaced by truncated JSON.")
    lost_reply_rate: float = Field(
        default=0.0, ge=0.0, le=1.0,
        description="Requests applied, then the connection closed before the reply.")
    webhook_drop_rate: float = Field(
        default=0.0, ge=0.0, le=1.0,
        description="Session webhooks never sent (a lost delivery), with `--webhook-url`.")
    stop_response: StopResponse = Field(
        default=StopResponse.NO_CONTENT,
        description="Stop answers 204 with no body, or 200 with the work object.")

    @field_validator("list_limit_max")
    @classmethod
    def _within_the_list_range(cls, value: int | None, info: ValidationInfo) -> int | None:
        """Set at run time (`Faults.update`), it narrows the emulator's own range, never
        widens it: the context names that range's top."""
        most = (info.context or {}).get(_MAX_LIST_LIMIT)
        if value is not None and most is not None and value > most:
            raise ValueError(f"must be at most the emulator's --max-list-limit, {most}")
        return value

    def applies_to(self, endpoint: Endpoint) -> bool:
        return self.endpoints is None or endpoint in self.endpoints


class Faults:
    """The switches in force: set at start-up, changed at run time by `/_emulator/faults`."""

    def __init__(self, initial: FaultSettings, *, max_list_limit: int = MAX_LIST_LIMIT) -> None:
        self.initial = initial
        self.settings = initial
        self.max_list_limit = max_list_limit
        self._random = random.Random()

    def update(self, changes: dict[str, Any]) -> FaultSettings:
        self.settings = FaultSettings.model_validate(
            {**self.settings.model_dump(), **changes},
            context={_MAX_LIST_LIMIT: self.max_list_limit})
        return self.settings

    def reset(self) -> FaultSettings:
        self.settings = self.initial
        return self.settings

    def draw(self, share: float) -> bool:
        return share > 0 and self._random.random() < share

    def refuse_heartbeat(self) -> bool:
        return self.draw(self.settings.heartbeat_412_rate)


class FaultMiddleware:
    def __init__(self, app: Any, faults: Faults) -> None:
        self.app = app
        self.faults = faults

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> Any:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        match = classify(scope["method"], scope["path"])
        settings = self.faults.settings
        if match is None or not settings.applies_to(match.endpoint):
            return await self.app(scope, receive, send)
        if settings.latency_ms:
            await asyncio.sleep(settings.latency_ms / 1000)
        if match.endpoint == Endpoint.LIST and _over_limit(scope, settings.list_limit_max):
            note_scope(scope, fault="list_limit")
            return await _error(scope, send, 400,
                                f"limit must be 1-{settings.list_limit_max}", {})
        if self.faults.draw(settings.drop_rate):
            note_scope(scope, fault="drop")
            return DROPPED
        if self.faults.draw(settings.rate_limit_rate):
            note_scope(scope, fault="rate_limit")
            headers = {"retry-after": _seconds(settings.retry_after_seconds)}
            return await _error(scope, send, 429, "injected rate limit", headers)
        if self.faults.draw(settings.error_rate):
            note_scope(scope, fault="error")
            return await _error(scope, send, settings.error_status, "injected server error", {})
        if self.faults.draw(settings.malformed_rate):
            note_scope(scope, fault="malformed")
            return await self.app(scope, receive, _malformed(send))
        if self.faults.draw(settings.lost_reply_rate):
            note_scope(scope, fault="lost_reply")
            await self.app(scope, receive, _discard(scope))
            return DROPPED
        return await self.app(scope, receive, send)


def _over_limit(scope: dict[str, Any], most: int | None) -> bool:
    """Does this `list` ask for more than `most` items? An unreadable limit is the app's to
    refuse, as it would without the switch."""
    if most is None:
        return False
    values = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("limit", [])
    return bool(values) and values[0].isdigit() and int(values[0]) > most


def _discard(scope: dict[str, Any]) -> Any:
    """A `send` for a reply that never reaches the client. The status it would have had is
    noted as `applied_status`: the request log's `status` stays 0 (the client saw none), but
    checks of what the server did (an ack that landed, a token it issued) need the outcome."""

    async def discarding_send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            note_scope(scope, applied_status=message["status"])

    return discarding_send


async def _error(scope: dict[str, Any], send: Any, status: int, message: str,
                 headers: dict[str, str]) -> None:
    request_id = request_id_of(scope) or new_request_id()
    body = json.dumps(error_body(status, message, request_id=request_id)).encode()
    raw_headers = [(b"content-type", b"application/json"),
                   (b"content-length", str(len(body)).encode())]
    raw_headers += [(k.encode(), v.encode()) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body})


def _malformed(send: Any) -> Any:
    """A `send` that replaces a successful response's body with truncated JSON."""
    started: dict[str, Any] = {}

    async def corrupting_send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            started.update(message)  # held until the body is known
            return
        if message["type"] != "http.response.body" or not started:
            await send(message)
            return
        start, body = dict(started), message.get("body", b"")
        started.clear()
        if 200 <= start["status"] < 300 and body:
            body = MALFORMED_BODY
            start["headers"] = [(k, v) for k, v in start.get("headers", [])
                                if k.lower() != b"content-length"]
            start["headers"].append((b"content-length", str(len(body)).encode()))
        await send(start)
        await send({**message, "body": body})

    return corrupting_send


def _seconds(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)
