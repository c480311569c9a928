"""The request log: every authenticated Work API request, for invariant checks in tests and
rehearsals (the guard outside it refuses the others before they get here).

A raw ASGI middleware (outermost, so it also sees injected faults) gives each request an id
(`request-id` header, and `request_id` in error bodies) and, for Work API requests, writes one
entry to a capped Redis stream *before* the last byte of the response leaves: a client that got its
answer finds its request in the log. A reader that keeps up reads only what is new (`after` the
cursor its last read returned): a benchmark at 2,000 heartbeats a second reads a few thousand
entries every few seconds, never the whole log at once (one read of all 50,000, about 20 MB of
JSON, was answered 500 on a loaded machine). Routes add what only they know (the work id a poll
returned, the `last_heartbeat` a heartbeat returned, `force`) with `note`.

Entry: time (epoch s, when the request arrived), answered (polls and acks: epoch s, when the
answer started; a long poll's reply), method, endpoint, environment_id, work_id, status (0:
dropped), worker_id, expected_last_heartbeat, desired_ttl_seconds, block_ms, last_heartbeat,
state, force, fault, applied_status (a lost reply: the status its discarded answer had),
credential (the kind: environment, organisation, sessions_token), request_id.

Beat statistics (`BeatStats`): an environment can ask for its heartbeats to be summed up as
they are answered instead of read back from the log: each lease's last answered beat, and over
a window the largest gap between two beats of one lease, beats answered, refused and failed,
beats per 100 ms and requests per endpoint. A few dictionary updates a beat in this process,
against an XADD per beat here and a reader that fetches, decodes and folds every entry: the
heartbeat capacity benchmark at 2,000 beats a second learns every gap that way without the log
(`log_heartbeats=False` leaves that environment's heartbeats out of it). Only environments that
asked are counted, and only until they stop asking, so the statistics never grow unasked.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

from redis.asyncio import Redis
from starlette.requests import Request

from .batch import CommandBatch
from .endpoints import Endpoint, classify
from .errors import new_request_id
from .guard import credential_of

__all__ = ["BeatStats", "EnvironmentBeats", "RequestLog", "RequestLogMiddleware", "note",
           "note_scope", "request_id_of"]

_NOTES = "emulator.notes"
_REQUEST_ID = "emulator.request_id"
# Endpoints whose entries also say when the answer started (a long poll's return, an ack's
# answer: the start path's breakdown). Not heartbeats, the bulk of a busy log: a reader of all
# 50,000 entries (the heartbeat capacity benchmark) timed out reading them on a loaded machine.
_ANSWER_TIMED = frozenset({"poll", "ack"})
# Query parameters worth keeping, by name in the log.
_QUERY_FIELDS = ("expected_last_heartbeat", "desired_ttl_seconds", "block_ms")
# Each value a client chose (ids in the path, the worker id, query values) is cut to this: one
# caller must not fill the capped log, or a reader's memory, with a few huge requests.
MAX_FIELD_CHARS = 200


def _cut(value: str | None) -> str | None:
    return value if value is None or len(value) <= MAX_FIELD_CHARS else value[:MAX_FIELD_CHARS]


def note_scope(scope: MutableMapping[str, Any], **fields: Any) -> None:
    notes = scope.setdefault("state", {}).setdefault(_NOTES, {})
    notes.update(fields)


def note(request: Request, **fields: Any) -> None:
    note_scope(request.scope, **fields)


def request_id_of(scope: Mapping[str, Any]) -> str | None:
    value = scope.get("state", {}).get(_REQUEST_ID)
    return str(value) if value else None


@dataclass
class EnvironmentBeats:
    """One environment's beat statistics: each lease's last answered beat (epoch s, when the
    request arrived) for as long as they are kept, and the rest over the window since `since`."""

    since: float
    log_heartbeats: bool = True
    last_beat: dict[str, float] = field(default_factory=dict)
    max_gap: float = 0.0  # the largest gap between two answered beats of one lease, ending inside
    max_gap_work_id: str | None = None
    beats: int = 0  # answered (200)
    refused: int = 0  # 4xx: the lease is gone (a 412 after a lapse), or the request was wrong
    failed: int = 0  # 5xx or dropped (status 0)
    per_tenth: Counter[int] = field(default_factory=Counter)  # answered beats per 100 ms
    endpoints: Counter[str] = field(default_factory=Counter)  # requests per endpoint

    def count(self, endpoint: str, work_id: str | None, status: int, at: float) -> None:
        """Fold one answered (or failed) request in: `at` when it arrived, `status` its
        answer's (0: dropped)."""
        self.endpoints[endpoint] += 1
        if endpoint != "heartbeat" or work_id is None:
            return
        if status == 200:
            self.beats += 1
            self.per_tenth[int(at * 10)] += 1
            last = self.last_beat.get(work_id)
            if last is None or at > last:
                # Two beats of one lease in flight at once may be answered out of order: a
                # gap is counted from the later arrival only.
                if last is not None and at - last > self.max_gap:
                    self.max_gap, self.max_gap_work_id = at - last, work_id
                self.last_beat[work_id] = at
        elif 400 <= status < 500:
            self.refused += 1
        else:
            self.failed += 1

    def new_window(self, now: float) -> None:
        """Start counting afresh from `now`; the last beats stay (a gap spanning the start
        counts, at its end)."""
        self.since = now
        self.max_gap, self.max_gap_work_id = 0.0, None
        self.beats = self.refused = self.failed = 0
        self.per_tenth.clear()
        self.endpoints.clear()

    def report(self, now: float) -> dict[str, Any]:
        return {"since": self.since, "until": now, "log_heartbeats": self.log_heartbeats,
                "beats": self.beats, "refused": self.refused, "failed": self.failed,
                "max_gap_s": self.max_gap, "max_gap_work_id": self.max_gap_work_id,
                "endpoints": dict(self.endpoints),
                "per_100ms": {str(tenth): n for tenth, n in sorted(self.per_tenth.items())},
                "last_beat": self.last_beat}


class BeatStats:
    """The environments whose beats are counted (`EnvironmentBeats`), by id."""

    def __init__(self) -> None:
        self.environments: dict[str, EnvironmentBeats] = {}

    def start(self, environment_id: str, *, log_heartbeats: bool, now: float) -> None:
        """Count this environment's beats from `now` (a new window if it already was)."""
        found = self.environments.get(environment_id)
        if found is None:
            self.environments[environment_id] = EnvironmentBeats(now, log_heartbeats)
        else:
            found.log_heartbeats = log_heartbeats
            found.new_window(now)

    def stop(self, environment_id: str) -> bool:
        return self.environments.pop(environment_id, None) is not None

    def of(self, environment_id: str) -> EnvironmentBeats | None:
        return self.environments.get(environment_id)


class RequestLog:
    """The capped stream of entries. An entry goes in the emulator's `CommandBatch` with the
    other commands of requests answered at about the same time: one Redis round trip for all,
    not one each (at thousands of heartbeats a second the log's own round trips were a quarter
    of the emulator's Redis calls). Each request still waits for its own entry to be written
    before its answer's last byte leaves."""

    def __init__(self, redis: Redis, batch: CommandBatch, key: str, cap: int) -> None:
        self.redis = redis
        self.batch = batch
        self.key = key
        self.cap = cap
        self.beats = BeatStats()

    async def append(self, entry: dict[str, Any]) -> None:
        # Trimmed approximately (whole stream nodes at a time): O(1) a write, and the log keeps
        # at least `cap` entries, never unboundedly more.
        await self.batch.execute("XADD", self.key, "MAXLEN", "~", self.cap, "*",
                                 "e", json.dumps(entry))

    async def read(self, limit: int | None = None,
                   after: str | None = None) -> tuple[list[dict[str, Any]], str | None]:
        """Oldest first, and the cursor to read on from (None: the log is empty). Without
        `after`: the newest `limit` entries (all kept, if no limit); with it: the oldest
        `limit` entries written after that cursor (what a reader that keeps up has not seen)."""
        count = min(limit or self.cap, self.cap)
        if after:
            rows = list(await self.redis.xrange(self.key, f"({after}", "+", count=count) or [])
        else:
            rows = list(reversed(
                await self.redis.xrevrange(self.key, "+", "-", count=count) or []))
        # Every entry has its fields (XADD writes none without).
        entries = [json.loads((fields or {})["e"]) for _, fields in rows]
        cursor = str(rows[-1][0]) if rows else after
        return entries, cursor

    async def clear(self) -> None:
        await self.redis.delete(self.key)


class RequestLogMiddleware:
    def __init__(self, app: Any, log: RequestLog) -> None:
        self.app = app
        self.log = log

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> Any:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request_id = new_request_id()
        state = scope.setdefault("state", {})
        state[_REQUEST_ID] = request_id
        match = classify(scope["method"], scope["path"])
        entry: dict[str, Any] | None = None
        counted: EnvironmentBeats | None = None
        logged = False
        if match is not None:
            endpoint = match.endpoint.value
            counted = self.log.beats.of(match.environment_id)
            logged = (counted is None or counted.log_heartbeats
                      or match.endpoint is not Endpoint.HEARTBEAT)
            entry = {"time": time.time(), "method": scope["method"], "endpoint": endpoint,
                     "environment_id": _cut(match.environment_id),
                     "work_id": _cut(match.work_id), "status": 0, "request_id": request_id}
            if logged:
                entry.update(_request_fields(scope))

        async def logging_send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []),
                                                  (b"request-id", request_id.encode())]}
                if entry is not None:
                    entry["status"] = message["status"]
                    if entry["endpoint"] in _ANSWER_TIMED:
                        entry["answered"] = time.time()
            last = message["type"] == "http.response.body" and not message.get("more_body")
            if last and entry is not None:
                await self._write(entry, scope, counted, logged)
                entry_written.append(True)
            await send(message)

        entry_written: list[bool] = []
        try:
            return await self.app(scope, receive, logging_send)
        finally:
            if entry is not None and not entry_written:
                # dropped, or failed before a response
                await self._write(entry, scope, counted, logged)

    async def _write(self, entry: dict[str, Any], scope: dict[str, Any],
                     counted: EnvironmentBeats | None, logged: bool) -> None:
        if counted is not None:
            counted.count(entry["endpoint"], entry["work_id"], entry["status"], entry["time"])
        if not logged:
            return
        state = scope.get("state", {})
        # Which kind of credential opened it (never the key): e.g. a stop sent as an item's
        # sessions token, as SDK 2.17's poller sends its forced stop.
        kind = credential_of(scope)
        entry["credential"] = kind.value if kind is not None else None
        entry.update(state.get(_NOTES, {}))
        await self.log.append(entry)


def _request_fields(scope: dict[str, Any]) -> dict[str, Any]:
    worker_id = None
    for name, value in scope.get("headers", ()):
        if name.lower() == b"anthropic-worker-id":
            worker_id = value.decode("latin-1")  # the last one, if sent twice
    raw = scope.get("query_string", b"")
    query = parse_qs(raw.decode("latin-1")) if raw else {}
    fields: dict[str, Any] = {"worker_id": _cut(worker_id)}
    for name in _QUERY_FIELDS:
        values = query.get(name)
        fields[name] = _cut(values[0]) if values else None
    return fields
