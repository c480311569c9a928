"""The session side on Redis: sessions, their event logs, and the live event stream.

- a session: one JSON string (`P:session:{id}`) with its scripted agent's state (`agent`);
- its events: a Redis stream (`P:events:{id}`), one entry per event, in the order the session
  wrote them; `events.list` reads it, `events.stream` blocks on it (XREAD) from the moment the
  stream opened, so an event is either in the history a runner lists or on its stream, or both;
- an event sent (a tool result): one WATCH/MULTI on the session key, so the agent's state and
  the events it adds change together, and two sends of one result add it once.

The decisions are the scripted agent's (`agent`); this module only stores what it returns.
"""

from __future__ import annotations

import base64
import binascii
import json
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import WatchError

from . import agent, clock, metadata
from .errors import InvalidRequest, NotFound
from .keys import EmulatorKeys
from .records import new_id
from .store import Store

__all__ = ["EVENT_PAGE_DEFAULT", "EVENT_PAGE_MAX", "SessionStore", "public_session",
           "resolved_agent"]

# `events.list` page size: the SDK's runner reads its history with `limit=1000`.
EVENT_PAGE_DEFAULT = 20
EVENT_PAGE_MAX = 1000
# XREAD BLOCK of the live stream: short, so a closed client is noticed within it.
STREAM_BLOCK_MS = 1000
# A stream with no event for this long ends; the runner reconnects (the inactivity limit of
# SDK 2.17's fake Sessions API).
STREAM_INACTIVITY_S = 600.0
# A comment line on a quiet stream this often: the server only learns that a client went away
# when a write to it fails, so without one a closed stream would hold its task for 600 s.
STREAM_KEEPALIVE_S = 15.0

# The agent a session shows (`BetaManagedAgentsSessionAgent`), whatever its creation named: no
# skills and no subagents (nothing for the runner to download), the agent toolset 20260401 with
# every call allowed (so the runner runs each without asking for a confirmation).
DEFAULT_AGENT: dict[str, Any] = {
    "type": "agent", "id": "agent_emulator_scripted", "name": "scripted", "version": 1,
    "model": {"id": "emulator-scripted-agent"}, "system": None, "description": None,
    "execution_identity": {"type": "service_account"}, "mcp_servers": [], "skills": [],
    "tools": [{"type": "agent_toolset_20260401", "configs": [], "default_config": {
        "enabled": True, "permission_policy": {"type": "always_allow"}}}],
    "multiagent": None}


def resolved_agent(named: Any) -> dict[str, Any]:
    """The agent as a retrieved session shows it: the scripted agent, under the id the creation
    named (an agent id, or an object with one)."""
    if isinstance(named, str):
        return {**DEFAULT_AGENT, "id": named}
    if isinstance(named, dict) and isinstance(named.get("id"), str):
        return {**DEFAULT_AGENT, "id": named["id"]}
    return dict(DEFAULT_AGENT)


def _event_ids() -> Iterator[str]:
    while True:
        yield f"sevt_{secrets.token_hex(12)}"


def public_session(record: dict[str, Any]) -> dict[str, Any]:
    """The session as `BetaManagedAgentsSession` reads it. No memory stores (`resources: []`),
    so the official runner needs no memory endpoint; `work_id` is an emulator extension."""
    return {"id": record["id"], "type": "session", "environment_id": record["environment_id"],
            "agent": record["agent"], "metadata": record["metadata"],
            "status": record["agent_state"]["status"], "resources": [], "vault_ids": [],
            "outcome_evaluations": [], "stats": {}, "usage": {}, "title": None,
            "archived_at": None, "created_at": record["created_at"],
            "updated_at": record["updated_at"], "work_id": record["work_id"]}


class SessionStore:
    def __init__(self, redis: Redis, store: Store) -> None:
        self.redis = redis
        self.store = store
        self.keys: EmulatorKeys = store.keys
        # Which environment and work item a session belongs to: fixed at creation, cached.
        self._bindings: dict[str, tuple[str, str]] = {}

    async def create(self, environment_id: str, *, agent_config: Any, session_metadata: Any,
                     script: list[dict[str, Any]] | None) -> dict[str, Any]:
        meta = metadata.merge({}, session_metadata or {})
        agent.check_script(script or [])
        await self.store.require_environment(environment_id)
        session_id, work_id = new_id("session"), new_id("work")
        state = agent.AgentState(script=script or [])
        moment = clock.rfc3339()
        events = agent.start(state, _event_ids(), moment)
        record = {"id": session_id, "environment_id": environment_id,
                  "agent": resolved_agent(agent_config),
                  "metadata": meta, "created_at": moment, "updated_at": moment,
                  "agent_state": state.dump(), "work_id": work_id}
        # The session and its first events are written with its work item, at once.
        await self.store.enqueue(environment_id, {"id": session_id, "type": "session"}, meta,
                                 work_id=work_id, session=(session_id, json.dumps(record),
                                                           [json.dumps(e) for e in events]))
        return public_session(record)

    async def binding(self, session_id: str) -> tuple[str, str] | None:
        if session_id not in self._bindings:
            raw = await self.redis.get(self.keys.session(session_id))
            record = json.loads(raw) if raw is not None else None
            if record is None or record.get("work_id") is None:
                return None
            self._bindings[session_id] = (record["environment_id"], record["work_id"])
        return self._bindings[session_id]

    async def get(self, session_id: str) -> dict[str, Any]:
        return public_session(await self._record(session_id))

    async def events(self, session_id: str, *, limit: int, page: str | None,
                     types: list[str], order: str) -> dict[str, Any]:
        """A cursor page of the log (`{data, next_page}`), oldest first unless `order=desc`."""
        await self._record(session_id)
        entries: Any = await self.redis.xrange(self.keys.events(session_id))
        rows = [json.loads(fields["event"]) for _, fields in entries]
        rows = [row for row in rows if not types or row["type"] in types]
        if order == "desc":
            rows.reverse()
        start = _decode_page(page) if page else 0
        shown = rows[start:start + limit]
        more = start + limit < len(rows)
        return {"data": shown, "next_page": _encode_page(start + limit) if more else None}

    async def send(self, session_id: str,
                   events: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        """Each event sent, taken by the scripted agent in turn: the events logged, each with
        the script's call it answers (a repeated result is accepted and not logged again)."""
        taken = []
        for sent in events:
            answer = await self._take(session_id, sent)
            if answer is not None:
                taken.append(answer)
        return taken

    async def terminate(self, session_id: str) -> dict[str, Any]:
        def end(state: agent.AgentState) -> tuple[None, list[dict[str, Any]]]:
            return None, agent.terminate(state, _event_ids(), clock.rfc3339())

        await self._change(session_id, end)
        return await self.get(session_id)

    async def stream(self, session_id: str) -> AsyncIterator[dict[str, Any] | None]:
        """The events written from now on, until the session terminates or nothing happens for
        `STREAM_INACTIVITY_S`; `None` after each `STREAM_KEEPALIVE_S` of quiet (a write that
        finds a client gone ends the stream). Ends at once for a terminated session."""
        record = await self._record(session_id)
        if record["agent_state"]["status"] == agent.Status.TERMINATED:
            return
        key = self.keys.events(session_id)
        newest: Any = await self.redis.xrevrange(key, count=1)
        last: str = newest[0][0] if newest else "0-0"
        quiet_since = said_since = time.monotonic()
        while time.monotonic() - quiet_since < STREAM_INACTIVITY_S:
            reply: Any = await self.redis.xread({key: last}, count=100, block=STREAM_BLOCK_MS)
            for entry_id, fields in (reply[0][1] if reply else []):
                last, quiet_since = entry_id, time.monotonic()
                said_since = quiet_since
                event = json.loads(fields["event"])
                yield event
                if event["type"] == "session.status_terminated":
                    return
            if time.monotonic() - said_since >= STREAM_KEEPALIVE_S:
                said_since = time.monotonic()
                yield None

    async def _take(self, session_id: str,
                    sent: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]] | None:
        call: dict[str, Any] = {}

        def take(state: agent.AgentState) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
            call.clear()
            call.update(agent.current_call(state) or {})
            row, following = agent.take_result(state, sent, _event_ids(), clock.rfc3339())
            return row, [row, *following] if row is not None else []

        row = await self._change(session_id, take)
        return (row, dict(call)) if row is not None else None

    async def _change(self, session_id: str,
                      step: Callable[[agent.AgentState],
                                     tuple[dict[str, Any] | None, list[dict[str, Any]]]],
                      ) -> dict[str, Any] | None:
        key = self.keys.session(session_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(key)
                    raw = await pipe.get(key)
                    if raw is None:
                        raise NotFound(f"session {session_id} not found")
                    record = json.loads(raw)
                    state = agent.AgentState.of(record["agent_state"])
                    result, events = step(state)
                    record["agent_state"] = state.dump()
                    record["updated_at"] = clock.rfc3339()
                    pipe.multi()  # type: ignore[no-untyped-call]
                    pipe.set(key, json.dumps(record))
                    for event in events:
                        pipe.xadd(self.keys.events(session_id), {"event": json.dumps(event)})
                    await pipe.execute()
                    return result
                except WatchError:
                    continue

    async def _record(self, session_id: str) -> dict[str, Any]:
        raw = await self.redis.get(self.keys.session(session_id))
        if raw is None:
            raise NotFound(f"session {session_id} not found")
        found: dict[str, Any] = json.loads(raw)
        return found


def _encode_page(position: int) -> str:
    return base64.urlsafe_b64encode(json.dumps({"at": position}).encode()).decode().rstrip("=")


def _decode_page(page: str) -> int:
    try:
        at = json.loads(base64.urlsafe_b64decode(page + "=" * (-len(page) % 4)))["at"]
    except (binascii.Error, ValueError, KeyError, TypeError) as exc:
        raise InvalidRequest("page: not a cursor this server returned") from exc
    if not isinstance(at, int) or at < 0:
        raise InvalidRequest("page: not a cursor this server returned")
    return at
