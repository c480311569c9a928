"""The session routes the official runner uses, session creation, and the APIs not served.

Served (credential: the organisation key, the key of the session's environment, or a valid
sessions token of the session's work item):

- `GET /v1/sessions/{id}`: the session (`status`: idle, running, terminated; `resources: []`)
- `GET /v1/sessions/{id}/events`: its event log, a cursor page (`limit`, `page`, `types[]`,
  `order`)
- `GET /v1/sessions/{id}/events/stream`: its events from now on, as server-sent events
- `POST /v1/sessions/{id}/events`: `{"events": [user.tool_result, ...]}` for the scripted agent

Organisation key: `POST /v1/sessions` (with the emulator extension `emulator_script`) and
`POST /_emulator/sessions/{id}/terminate`. Not served: memory stores (404, saying so).
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from .auth import ADMIN, SESSION_ACCESS
from .context import Ctx, requires
from .errors import InvalidRequest, NotFound
from .sessions import EVENT_PAGE_DEFAULT, EVENT_PAGE_MAX

__all__ = ["add_session_routes"]

SESSION = "/v1/sessions/{session_id}"
# A tool result's text in the request log is cut to this (a `read` of a large file would
# otherwise fill the capped log).
LOGGED_RESULT_CHARS = 4000


class ScriptedCall(BaseModel):
    name: str = Field(description="A tool of agent_toolset_20260401: bash, read, write, edit, "
                                  "glob or grep.")
    input: dict[str, Any]


class SessionBody(BaseModel):
    model_config = ConfigDict(extra="allow")
    environment_id: str
    agent: Any = None
    metadata: dict[str, str] | None = None
    # Emulator extension: the scripted agent's tool calls, asked for one at a time.
    emulator_script: list[ScriptedCall] | None = None


class SendBody(BaseModel):
    events: list[dict[str, Any]] = Field(min_length=1)


def add_session_routes(app: FastAPI) -> None:
    admin = [Depends(requires(ADMIN, "this endpoint"))]
    reader = [Depends(requires(SESSION_ACCESS, "a session"))]

    @app.post("/v1/sessions", tags=["sessions"], dependencies=admin)
    async def create_session(ctx: Ctx, body: SessionBody) -> Response:
        """Creates the session and queues its work item; `work_id` is an emulator extension.
        With a webhook URL, `session.status_run_started` is delivered in the background."""
        script = [call.model_dump() for call in body.emulator_script or []]
        session = await ctx.sessions.create(body.environment_id, agent_config=body.agent,
                                            session_metadata=body.metadata, script=script)
        if ctx.webhooks is not None:
            ctx.webhooks.session_created(session)
        return JSONResponse(session)

    @app.get(SESSION, tags=["sessions"], dependencies=reader)
    async def get_session(ctx: Ctx, session_id: str) -> Response:
        return JSONResponse(await ctx.sessions.get(session_id))

    @app.get(SESSION + "/events", tags=["sessions"], dependencies=reader)
    async def list_events(ctx: Ctx, session_id: str, limit: int = EVENT_PAGE_DEFAULT,
                          page: str | None = None, order: str = "asc",
                          types: Annotated[list[str] | None, Query(alias="types[]")] = None,
                          ) -> Response:
        if not 1 <= limit <= EVENT_PAGE_MAX:
            raise InvalidRequest(f"limit must be 1-{EVENT_PAGE_MAX}")
        if order not in ("asc", "desc"):
            raise InvalidRequest("order must be asc or desc")
        return JSONResponse(await ctx.sessions.events(session_id, limit=limit, page=page or None,
                                                      types=types or [], order=order))

    @app.get(SESSION + "/events/stream", tags=["sessions"], dependencies=reader)
    async def stream_events(ctx: Ctx, session_id: str) -> Response:
        await ctx.sessions.get(session_id)  # 404 before the stream starts
        return StreamingResponse(_sse(ctx.sessions.stream(session_id)),
                                 media_type="text/event-stream",
                                 headers={"cache-control": "no-cache"})

    @app.post(SESSION + "/events", tags=["sessions"], dependencies=reader)
    async def send_events(ctx: Ctx, session_id: str, body: SendBody) -> Response:
        """Tool results for the scripted agent; each new one is written to the request log."""
        session = await ctx.sessions.get(session_id)
        taken = await ctx.sessions.send(session_id, body.events)
        for row, call in taken:
            await ctx.log.append(_result_entry(session, row, call))
        return JSONResponse({"data": [row for row, _ in taken]})

    @app.post("/_emulator/sessions/{session_id}/terminate", tags=["emulator"],
              dependencies=admin)
    async def terminate(ctx: Ctx, session_id: str) -> Response:
        return JSONResponse(await ctx.sessions.terminate(session_id))

    @app.api_route("/v1/memory_stores/{rest:path}", methods=["GET", "POST", "DELETE"],
                   tags=["not served"], include_in_schema=False)
    @app.api_route("/v1/memory_stores", methods=["GET", "POST"], tags=["not served"],
                   include_in_schema=False)
    async def memory_stores(request: Request) -> Response:
        raise NotFound("memory stores are not served by the emulator: its sessions have none "
                       "attached (resources: []), so a runner needs no memory endpoint")


async def _sse(events: AsyncIterator[dict[str, Any]]) -> AsyncIterator[bytes]:
    """Server-sent events as the SDK reads them: each named by its type (unnamed ones are
    skipped), the event's JSON as data."""
    yield b": connected\n\n"
    async for event in events:
        yield f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode()


def _result_entry(session: dict[str, Any], row: dict[str, Any],
                  call: dict[str, Any]) -> dict[str, Any]:
    """A tool result as the request log keeps it, beside the call it answers."""
    texts = [block.get("text", "")[:LOGGED_RESULT_CHARS] if isinstance(block, dict) else ""
             for block in row.get("content") or []]
    return {"time": time.time(), "method": "POST", "endpoint": "tool_result", "status": 200,
            "environment_id": session["environment_id"], "work_id": session["work_id"],
            "session_id": session["id"], "tool_use_id": row.get("tool_use_id"),
            "tool": call.get("name"), "input": call.get("input"),
            "is_error": bool(row.get("is_error")), "content": texts}
