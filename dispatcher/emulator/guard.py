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
from dataclasses import replace
from typing import Any

from .auth import (
    Credential,
    Requirement,
    check_api_headers,
    decide,
    key_digest,
    presented,
    requirement_for,
)
from .errors import ApiError, error_body, new_request_id, retry_hint
from .sessions import SessionStore
from .store import Store

__all__ = ["MAX_BODY_BYTES", "GuardMiddleware", "credential_of", "replay_body"]

# Work API bodies are a stop's `{"force": true}` or at most 16 metadata keys of 64 + 512
# characters (about 10 KB): anything far larger is not a request, and is refused unread.
MAX_BODY_BYTES = 64 * 1024
_CREDENTIAL = "emulator.credential"
_OPEN_PATHS = frozenset({"/_emulator/health"})
# APIs the emulator does not serve: through to a route that says so, whatever the credential.
_UNSERVED = ("/v1/memory_stores",)


class RequestTooLarge(ApiError):
    status = 413


def credential_of(scope: MutableMapping[str, Any]) -> Credential | None:
    value = scope.get("state", {}).get(_CREDENTIAL)
    return value if isinstance(value, Credential) else None


class GuardMiddleware:
    def __init__(self, app: Any, store: Store, sessions: SessionStore) -> None:
        self.app = app
        self.store = store
        self.sessions = sessions

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> Any:
        path = scope.get("path", "")
        if (scope["type"] != "http" or path in _OPEN_PATHS or path.startswith(_UNSERVED)
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
            return await _refuse(send, exc, hint=self.store.config.should_retry_header)
        scope.setdefault("state", {})[_CREDENTIAL] = credential
        return await self.app(scope, replay_body(body, receive), send)

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
        if need.session_id is not None:
            need = await self._of_session(need)
        opens = (await self.store.own_key_environment(need.environment_id)
                 if need.environment_id else None)
        item_tokens: frozenset[bytes] = frozenset()
        if (Credential.SESSION in need.allowed and need.work_id and need.environment_id
                and unknown):
            found = await self.store.tokens_of(need.environment_id, need.work_id)
            item_tokens = frozenset(token.encode() for token in found)
        return decide(keys, need, api_key=api_key,
                      environment_of=environment_of, opens=opens, item_tokens=item_tokens)

    async def _of_session(self, need: Requirement) -> Requirement:
        """A session call is bound to the session's environment and work item; an unknown
        session binds nothing (the route answers 404 to whoever may ask)."""
        binding = await self.sessions.binding(str(need.session_id))
        if binding is None:
            return need
        environment_id, work_id = binding
        return replace(need, environment_id=environment_id, work_id=work_id)


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


def replay_body(body: bytes, receive: Any) -> Any:
    """The body already read, then the real channel (which reports a disconnect)."""
    sent = False

    async def replay() -> Any:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _refuse(send: Any, exc: ApiError, *, hint: bool) -> None:
    request_id = new_request_id()
    body = json.dumps(error_body(exc.status, exc.message, request_id=request_id)).encode()
    extra = [(k.encode(), v.encode()) for k, v in retry_hint(exc.status, enabled=hint).items()]
    await send({"type": "http.response.start", "status": exc.status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        (b"request-id", request_id.encode()), *extra]})
    await send({"type": "http.response.body", "body": body})
