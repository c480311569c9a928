"""The gate in front of every API and admin route, as strict as the service.

A raw ASGI middleware, outermost: it decides who is asking (`auth`) before a byte of the body is
read, then, for `/v1/*`, that the request names an `anthropic-version` and the Managed Agents
beta, then reads the body up to `MAX_BODY_BYTES` (a larger one is 413). A refused request never
reaches a fault, a route or the request log. Routes find the credential in the scope
(`credential_of`). `/_emulator/health` and the OpenAPI pages stay open.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import MutableMapping
from typing import Any

from .auth import (
    Credential,
    Requirement,
    check_api_headers,
    decide,
    key_digest,
    presented,
    requirement_for,
    sessions_token,
)
from .errors import ApiError, error_body, new_request_id
from .store import Store

__all__ = ["MAX_BODY_BYTES", "GuardMiddleware", "credential_of"]

# Work API bodies are a stop's `{"force": true}` or at most 16 metadata keys of 64 + 512
# characters (about 10 KB): anything far larger is not a request, and is refused unread.
MAX_BODY_BYTES = 64 * 1024
_CREDENTIAL = "emulator.credential"
_OPEN_PATHS = frozenset({"/_emulator/health"})


class RequestTooLarge(ApiError):
    status = 413


def credential_of(scope: MutableMapping[str, Any]) -> Credential | None:
    value = scope.get("state", {}).get(_CREDENTIAL)
    return value if isinstance(value, Credential) else None


class GuardMiddleware:
    def __init__(self, app: Any, store: Store) -> None:
        self.app = app
        self.store = store

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> Any:
        path = scope.get("path", "")
        if (scope["type"] != "http" or path in _OPEN_PATHS
                or not path.startswith(("/v1/", "/_emulator/"))):
            return await self.app(scope, receive, send)
        headers: dict[bytes, bytes] = {}
        for name, value in scope.get("headers", []):
            headers.setdefault(name.lower(), value)
        try:
            credential = await self._authorize(requirement_for(scope["method"], path), headers)
            if path.startswith("/v1/"):
                check_api_headers(headers)
            body = await _read_body(receive, headers)
        except ApiError as exc:
            return await _refuse(send, exc)
        scope.setdefault("state", {})[_CREDENTIAL] = credential
        return await self.app(scope, _replay(body, receive), send)

    async def _authorize(self, need: Requirement, headers: dict[bytes, bytes]) -> Credential:
        keys = presented(headers)
        config = self.store.config
        api_key, default_key = config.api_key.encode(), config.environment_key.encode()
        environment_of: dict[bytes, str | None] = {}
        unknown = []
        for key in keys:
            if hmac.compare_digest(key, api_key):
                continue
            if hmac.compare_digest(key, default_key):
                environment_of[key] = None
                continue
            owner = await self.store.environment_of_key(key_digest(key))
            if owner is None:
                unknown.append(key)
            else:
                environment_of[key] = owner
        opens = (await self.store.own_key_environment(need.environment_id)
                 if need.environment_id else None)
        item_token = None
        if (Credential.SESSION in need.allowed and need.work_id and need.environment_id
                and unknown):
            item_token = sessions_token(
                await self.store.secret_of(need.environment_id, need.work_id))
        return decide(keys, need, api_key=api_key,
                      environment_of=environment_of, opens=opens, item_token=item_token)


async def _read_body(receive: Any, headers: dict[bytes, bytes]) -> bytes:
    declared = headers.get(b"content-length", b"").strip()
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise RequestTooLarge(f"request body is larger than {MAX_BODY_BYTES} bytes")
    parts: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise RequestTooLarge(f"request body is larger than {MAX_BODY_BYTES} bytes")
        parts.append(chunk)
        if not message.get("more_body"):
            break
    return b"".join(parts)


def _replay(body: bytes, receive: Any) -> Any:
    """The body already read, then the real channel (which reports a disconnect)."""
    sent = False

    async def replay() -> Any:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _refuse(send: Any, exc: ApiError) -> None:
    request_id = new_request_id()
    body = json.dumps(error_body(exc.status, exc.message, request_id=request_id)).encode()
    await send({"type": "http.response.start", "status": exc.status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        (b"request-id", request_id.encode())]})
    await send({"type": "http.response.body", "body": body})
