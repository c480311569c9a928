"""The emulator's own routes, under `/_emulator/` (organisation key; never faulted).

- `GET /_emulator/health`: 200 once the server answers (no key: for start-up probes)
- `POST /_emulator/environments/{env}/healthcheck`: queue a `healthcheck` work item
- `POST /_emulator/environments/{env}/work`: queue an item of any data type (tests)
- `GET|POST|DELETE /_emulator/faults`: read, change (partial JSON), reset the fault switches
- `GET|DELETE /_emulator/requests`: read (oldest first, `?limit=`, `?after=` the `next` cursor
  of the last read) or clear the request log
- `POST|GET|DELETE /_emulator/environments/{env}/heartbeats`: count an environment's beats
  (a new window each POST; `{"log_heartbeats": false}` leaves its heartbeats out of the request
  log), read the counts, stop counting (`requestlog.BeatStats`)
"""

from __future__ import annotations

import re
import time
from typing import Any

from fastapi import Depends, FastAPI
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from . import metadata
from .auth import ADMIN
from .context import Ctx, requires
from .errors import InvalidRequest, NotFound
from .faults import FaultSettings
from .records import new_id

__all__ = ["add_admin_routes"]

# A request log cursor: a Redis stream id.
_STREAM_ID = re.compile(r"\d{1,20}-\d{1,20}")


class WorkData(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    id: str | None = Field(default=None, description="Generated when omitted.")


class BeatsBody(BaseModel):
    log_heartbeats: bool = True


class EnqueueBody(BaseModel):
    data: WorkData
    metadata: dict[str, str] | None = None


def add_admin_routes(app: FastAPI) -> None:
    admin = [Depends(requires(ADMIN, "/_emulator"))]

    @app.get("/_emulator/health", tags=["emulator"])
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/_emulator/environments/{environment_id}/healthcheck", tags=["emulator"],
              dependencies=admin)
    async def healthcheck(ctx: Ctx, environment_id: str) -> Response:
        data = {"id": new_id("healthcheck"), "type": "healthcheck"}
        record = await ctx.store.enqueue(environment_id, data, {})
        return JSONResponse(record.public())

    @app.post("/_emulator/environments/{environment_id}/work", tags=["emulator"],
              dependencies=admin)
    async def enqueue(ctx: Ctx, environment_id: str, body: EnqueueBody) -> Response:
        data = body.data.model_dump()
        data["id"] = data["id"] or new_id(body.data.type)
        meta = metadata.merge({}, body.metadata or {})
        record = await ctx.store.enqueue(environment_id, data, meta)
        return JSONResponse(record.public())

    @app.get("/_emulator/faults", response_model=FaultSettings, tags=["emulator"],
             dependencies=admin)
    async def get_faults(ctx: Ctx) -> FaultSettings:
        return ctx.faults.settings

    @app.post("/_emulator/faults", response_model=FaultSettings, tags=["emulator"],
              dependencies=admin)
    async def set_faults(ctx: Ctx, changes: dict[str, Any]) -> FaultSettings:
        """Change only the fields given; the others keep their values."""
        try:
            return ctx.faults.update(changes)
        except ValidationError as exc:
            raise InvalidRequest(f"faults: {exc.errors(include_url=False)}") from exc

    @app.delete("/_emulator/faults", response_model=FaultSettings, tags=["emulator"],
                dependencies=admin)
    async def reset_faults(ctx: Ctx) -> FaultSettings:
        """Back to the switches the emulator was started with."""
        return ctx.faults.reset()

    @app.get("/_emulator/requests", tags=["emulator"], dependencies=admin)
    async def requests(ctx: Ctx, limit: int | None = None, after: str | None = None) -> Response:
        if after is not None and not _STREAM_ID.fullmatch(after):
            raise InvalidRequest("after must be the `next` of an earlier read")
        entries, cursor = await ctx.log.read(limit, after)
        return JSONResponse({"data": entries, "next": cursor})

    @app.delete("/_emulator/requests", status_code=204, tags=["emulator"], dependencies=admin)
    async def clear_requests(ctx: Ctx) -> Response:
        await ctx.log.clear()
        return Response(status_code=204)

    _add_beat_routes(app, admin)


def _add_beat_routes(app: FastAPI, admin: list[Any]) -> None:
    """An environment's beats counted as they are answered (`requestlog.BeatStats`)."""

    @app.post("/_emulator/environments/{environment_id}/heartbeats", tags=["emulator"],
              dependencies=admin)
    async def count_beats(ctx: Ctx, environment_id: str,
                          body: BeatsBody | None = None) -> Response:
        """Count the environment's beats from now on: a new window if it already was."""
        now = time.time()
        log_heartbeats = body.log_heartbeats if body else True
        ctx.log.beats.start(environment_id, log_heartbeats=log_heartbeats, now=now)
        return JSONResponse({"since": now, "log_heartbeats": log_heartbeats})

    @app.get("/_emulator/environments/{environment_id}/heartbeats", tags=["emulator"],
             dependencies=admin)
    async def read_beats(ctx: Ctx, environment_id: str) -> Response:
        counted = ctx.log.beats.of(environment_id)
        if counted is None:
            raise NotFound(f"the beats of {environment_id[:100]} are not counted")
        return JSONResponse(counted.report(time.time()))

    @app.delete("/_emulator/environments/{environment_id}/heartbeats", status_code=204,
                tags=["emulator"], dependencies=admin)
    async def stop_counting_beats(ctx: Ctx, environment_id: str) -> Response:
        ctx.log.beats.stop(environment_id)
        return Response(status_code=204)
