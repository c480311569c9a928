"""The busiest requests answered without FastAPI: session creation, poll, ack, heartbeat, list.

A benchmark's burst creates, polls and acks hundreds of items a second, and a fleet at its
capacity target sends thousands of heartbeats a second and lists every lease it holds each
second (the stop bridge), all through one emulator process. For these, FastAPI's routing,
dependency solving, query parsing and response layers cost more of the emulator's CPU than the
store's work (over half of a poll's, an ack's and a heartbeat's, a third of a creation's).
`FastPath` sits where FastAPI would be (inside the guard, the request log and the faults, which
apply as to any request) and answers them itself: the same credential check, store call,
request-log notes and answers, errors in the same handler's shape.

What it does not answer exactly as the route would, it hands on to FastAPI, whose routes stay
(for the OpenAPI document and those requests): a query parameter the route does not name, or one
named twice; a number that is not plain digits; a creation whose body is not a JSON object with
the plain fields of `SessionBody` (a scripted agent, a metadata value that is not a string, a
content type other than `application/json`). The equivalence is tested by sending each case
both ways (`tests/integration/test_emulator_fast_path.py`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, Mapping
from typing import Any
from urllib.parse import parse_qsl

from starlette.responses import PlainTextResponse

from .auth import ADMIN, ENDPOINT_CREDENTIALS
from .config import DEFAULT_RECLAIM_MS, MAX_BLOCK_MS
from .context import Emulator, admitted, error_response
from .endpoints import Endpoint
from .errors import ApiError, InvalidRequest
from .guard import replay_body
from .requestlog import note_scope

__all__ = ["FastPath"]

Query = dict[str, str]
# (status, JSON body) of an answered request.
Answer = tuple[int, Any]


class _Encoded(bytes):
    """An answer's body already encoded as JSON (a list page: `records.listed_page`)."""


class _HandOn(Exception):
    """The request is one only FastAPI answers as the route would: hand it on."""


_WORK = r"^/v1/environments/(?P<env>[^/]+)/work"
_POLL = re.compile(_WORK + r"/poll$")
_LIST = re.compile(_WORK + r"$")
_ITEM = re.compile(_WORK + r"/(?P<work>[^/]+)/(?P<action>ack|heartbeat)$")
_SESSIONS = "/v1/sessions"
# The query parameters each route names; any other is FastAPI's to judge (it ignores it).
_POLL_QUERY = frozenset({"block_ms", "reclaim_older_than_ms"})
_HEARTBEAT_QUERY = frozenset({"expected_last_heartbeat", "desired_ttl_seconds"})
_LIST_QUERY = frozenset({"limit", "page"})
_NO_QUERY: frozenset[str] = frozenset()
# The fields of `SessionBody` read here; with `emulator_script` set, FastAPI validates the script.
_SCRIPT = "emulator_script"


class FastPath:
    def __init__(self, app: Any, emulator: Emulator) -> None:
        self.app = app
        self.emulator = emulator

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> Any:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        method, path = scope["method"], scope["path"]
        if method == "GET" and (polled := _POLL.match(path)):
            env = polled["env"]
            return await self._answer(scope, receive, send, _POLL_QUERY,
                                      lambda query: self._poll(scope, env, query))
        if method == "GET" and (listed := _LIST.match(path)):
            env = listed["env"]
            return await self._answer(scope, receive, send, _LIST_QUERY,
                                      lambda query: self._list(scope, env, query))
        if method == "POST" and (item := _ITEM.match(path)):
            env, work = item["env"], item["work"]
            if item["action"] == "heartbeat":
                return await self._answer(
                    scope, receive, send, _HEARTBEAT_QUERY,
                    lambda query: self._heartbeat(scope, env, work, query))
            return await self._answer(scope, receive, send, _NO_QUERY,
                                      lambda _: self._ack(scope, env, work))
        if method == "POST" and path == _SESSIONS:
            return await self._create(scope, receive, send)
        return await self.app(scope, receive, send)

    async def _answer(self, scope: dict[str, Any], receive: Any, send: Any,
                      names: frozenset[str],
                      handle: Callable[[Query], Awaitable[Answer]]) -> Any:
        query = _plain_query(scope, names)
        if query is None:
            return await self.app(scope, receive, send)
        return await self._respond(scope, receive, send, lambda: handle(query))

    async def _respond(self, scope: dict[str, Any], receive: Any, send: Any,
                       handle: Callable[[], Awaitable[Answer]]) -> None:
        try:
            status, body = await handle()
        except _HandOn:
            await self.app(scope, receive, send)
        except ApiError as exc:
            await error_response(scope, self.emulator, exc.status, exc.message,
                                 details=exc.details, headers=exc.headers)(scope, receive, send)
        except Exception:
            # As Starlette's outermost layer does: a 500 answered, then the error raised on.
            await PlainTextResponse("Internal Server Error", status_code=500)(
                scope, receive, send)
            raise
        else:
            await _send_json(send, status, body)

    # --- the routes ------------------------------------------------------------------------
    async def _poll(self, scope: dict[str, Any], environment_id: str, query: Query) -> Answer:
        block_ms, reclaim_ms = _number(query, "block_ms"), _number(query, "reclaim_older_than_ms")
        admitted(scope, ENDPOINT_CREDENTIALS[Endpoint.POLL], f"work {Endpoint.POLL.value}")
        if block_ms is not None and not 1 <= block_ms <= MAX_BLOCK_MS:
            raise InvalidRequest(f"block_ms must be 1-{MAX_BLOCK_MS} (omit it to not block)")
        if reclaim_ms is not None and reclaim_ms < 1:
            raise InvalidRequest("reclaim_older_than_ms must be at least 1")
        work = await self.emulator.store.poll(
            environment_id, worker_id=_header(scope, b"anthropic-worker-id"), block_ms=block_ms,
            reclaim_ms=reclaim_ms or DEFAULT_RECLAIM_MS)
        note_scope(scope, work_id=work["id"] if work else None)
        return 200, work

    async def _list(self, scope: dict[str, Any], environment_id: str, query: Query) -> Answer:
        limit = _number(query, "limit")
        admitted(scope, ENDPOINT_CREDENTIALS[Endpoint.LIST], f"work {Endpoint.LIST.value}")
        return 200, _Encoded(await self.emulator.store.list(
            environment_id, limit=limit, page=query.get("page") or None))

    async def _ack(self, scope: dict[str, Any], environment_id: str, work_id: str) -> Answer:
        admitted(scope, ENDPOINT_CREDENTIALS[Endpoint.ACK], f"work {Endpoint.ACK.value}")
        work = await self.emulator.store.ack(environment_id, work_id)
        note_scope(scope, state=work["state"])
        return 200, work

    async def _heartbeat(self, scope: dict[str, Any], environment_id: str, work_id: str,
                         query: Query) -> Answer:
        expected, ttl = query.get("expected_last_heartbeat"), _number(query,
                                                                       "desired_ttl_seconds")
        admitted(scope, ENDPOINT_CREDENTIALS[Endpoint.HEARTBEAT],
                 f"work {Endpoint.HEARTBEAT.value}")
        store = self.emulator.store
        if self.emulator.faults.refuse_heartbeat():
            note_scope(scope, fault="heartbeat_412")
            await store.refuse_heartbeat(environment_id, work_id, expected)
        beat = await store.heartbeat(environment_id, work_id, expected=expected,
                                     desired_ttl=ttl)
        note_scope(scope, last_heartbeat=beat["last_heartbeat"], state=beat["state"])
        return 200, beat

    async def _create(self, scope: dict[str, Any], receive: Any, send: Any) -> Any:
        """`POST /v1/sessions`. The body is read first (the guard has it already), so a request
        handed on gets it replayed."""
        raw = await _body(receive)
        fields = _session_fields(scope, raw)
        if fields is None or _plain_query(scope, _NO_QUERY) is None:
            return await self.app(scope, replay_body(raw, receive), send)
        environment_id, agent_config, session_metadata = fields

        async def create() -> Answer:
            admitted(scope, ADMIN, "this endpoint")
            emulator = self.emulator
            session = await emulator.sessions.create(
                environment_id, agent_config=agent_config, session_metadata=session_metadata,
                script=[])
            if emulator.webhooks is not None:
                emulator.webhooks.session_created(session)
            return 200, session

        return await self._respond(scope, receive, send, create)


# --- reading requests as FastAPI would -----------------------------------------------------
def _plain_query(scope: Mapping[str, Any], names: frozenset[str]) -> Query | None:
    """The query as the route reads it, or None for one only FastAPI should judge: a parameter
    the route does not name, or one named twice (a repeated parameter's last value wins there)."""
    pairs = parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
    query = dict(pairs)
    if len(query) != len(pairs) or not names.issuperset(query):
        return None
    return query


def _number(query: Query, name: str) -> int | None:
    """An integer parameter; a value that is not plain digits (a sign, a space, a fraction, an
    empty one) is FastAPI's: its validation decides what is a number, and words the 400."""
    value = query.get(name)
    if value is None:
        return None
    if not (value.isascii() and value.isdigit()):
        raise _HandOn(name)
    return int(value)


def _header(scope: Mapping[str, Any], name: bytes) -> str | None:
    """The first value of a header, as Starlette's `Headers.get` reads it."""
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return str(value.decode("latin-1"))
    return None


def _session_fields(scope: Mapping[str, Any], raw: bytes) -> tuple[str, Any, Any] | None:
    """(environment_id, agent, metadata) of a plain `SessionBody`, or None for a body FastAPI
    should read: not JSON as it reads JSON, not an object, or a field its validation judges."""
    content_type = _header(scope, b"content-type")
    if content_type is not None and content_type != "application/json":
        return None
    try:
        body = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(body, dict) or body.get(_SCRIPT) is not None:
        return None
    environment_id, meta = body.get("environment_id"), body.get("metadata")
    if not isinstance(environment_id, str):
        return None
    if meta is not None and not (isinstance(meta, dict) and all(
            isinstance(value, str) for value in meta.values())):
        return None
    return environment_id, body.get("agent"), meta


async def _body(receive: Any) -> bytes:
    parts: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        parts.append(message.get("body", b""))
        if not message.get("more_body"):
            break
    return b"".join(parts)


async def _send_json(send: Any, status: int, content: Any) -> None:
    """What Starlette's `JSONResponse(content)` sends, without building one."""
    body = content if isinstance(content, _Encoded) else json.dumps(
        content, ensure_ascii=False, allow_nan=False, indent=None,
        separators=(",", ":")).encode("utf-8")
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-length", str(len(body)).encode("latin-1")),
                            (b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})

