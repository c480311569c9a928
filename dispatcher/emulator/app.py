"""The emulator's ASGI app: the Work API routes, making work (environments, sessions), errors.

`create_app` wires the layers, outermost first: guard (credential, API headers, body size) ->
request log -> faults -> the busiest requests' own path (`fastpath`) -> FastAPI routes. Routes are
thin: check the credential, validate parameters, call the store, shape the answer.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from redis.asyncio import BlockingConnectionPool, Redis
from starlette.exceptions import HTTPException

from ..workapi.models import Heartbeat, Work, WorkPage, WorkQueueStats
from .admin import add_admin_routes
from .auth import ADMIN, ENDPOINT_CREDENTIALS
from .batch import CommandBatch
from .config import (
    DEFAULT_RECLAIM_MS,
    MAX_BLOCK_MS,
    REQUEST_LOG_CAP,
    EmulatorConfig,
    StopResponse,
)
from .context import Ctx, Emulator, emulator_of, error_response, requires
from .endpoints import Endpoint
from .errors import ApiError, InvalidRequest
from .fastpath import FastPath
from .faults import FaultMiddleware, Faults, FaultSettings
from .guard import GuardMiddleware
from .requestlog import RequestLog, RequestLogMiddleware, note
from .session_routes import add_session_routes
from .sessions import SessionStore
from .store import Store
from .webhooks import WebhookSender

__all__ = ["Emulator", "create_app"]

WORK = "/v1/environments/{environment_id}/work"
# Redis connections the emulator opens at most. Each request holds one while it talks to Redis,
# a long poll for up to a second. redis-py's asyncio pool allows 100 and then fails the request
# (MaxConnectionsError: the client saw a dropped connection); this pool makes a request beyond
# the limit wait for a free connection instead, for up to REDIS_POOL_WAIT_SECONDS. 400 keeps
# the pool and as many client sockets under a default limit of 1,024 open files.
REDIS_MAX_CONNECTIONS = 400
REDIS_POOL_WAIT_SECONDS = 30.0
# How long a request waits for a reply from Redis: as long as it takes. redis-py gives up after
# 5 s by default, and on a loaded machine (load 20 on two cores) a long poll's second of block
# plus its turn on the event loop took that long: the request was answered 500. A late answer
# is what a busy server gives; a Redis that is gone closes its connections, which still fails a
# request at once. Connecting is bounded: nobody is at the other end of a connection that
# takes longer.
REDIS_REPLY_TIMEOUT_SECONDS: float | None = None
REDIS_CONNECT_TIMEOUT_SECONDS = 30.0


def _work_auth(endpoint: Endpoint) -> Any:
    return Depends(requires(ENDPOINT_CREDENTIALS[endpoint], f"work {endpoint.value}"))


# --- request bodies ------------------------------------------------------------------------
class StopBody(BaseModel):
    force: bool = False


class UpdateBody(BaseModel):
    metadata: dict[str, str | None]


class EnvironmentBody(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    config: dict[str, Any] = Field(default_factory=lambda: {"type": "self_hosted"})
    # Emulator extension: the environment key that opens this environment, and no other.
    environment_key: str | None = Field(default=None, min_length=16, repr=False)


# --- the Work API ----------------------------------------------------------------------------
def add_work_routes(app: FastAPI) -> None:  # noqa: C901 (one small closure per endpoint)
    @app.get(WORK + "/poll", response_model=Work | None, tags=["work"],
             dependencies=[_work_auth(Endpoint.POLL)])
    async def poll(ctx: Ctx, request: Request, environment_id: str,
                   block_ms: int | None = None, reclaim_older_than_ms: int | None = None,
                   worker_id: Annotated[str | None, Header(alias="Anthropic-Worker-ID")] = None,
                   ) -> Response:
        """Long poll: `block_ms` 1-999 (omit for non-blocking); empty is 200 `null`."""
        if block_ms is not None and not 1 <= block_ms <= MAX_BLOCK_MS:
            raise InvalidRequest(f"block_ms must be 1-{MAX_BLOCK_MS} (omit it to not block)")
        if reclaim_older_than_ms is not None and reclaim_older_than_ms < 1:
            raise InvalidRequest("reclaim_older_than_ms must be at least 1")
        work = await ctx.store.poll(environment_id, worker_id=worker_id, block_ms=block_ms,
                                    reclaim_ms=reclaim_older_than_ms or DEFAULT_RECLAIM_MS)
        note(request, work_id=work["id"] if work else None)
        return JSONResponse(work)

    @app.get(WORK + "/stats", response_model=WorkQueueStats, tags=["work"],
             dependencies=[_work_auth(Endpoint.STATS)])
    async def stats(ctx: Ctx, environment_id: str) -> Response:
        return JSONResponse(await ctx.store.stats(environment_id))

    @app.get(WORK, response_model=WorkPage, tags=["work"],
             dependencies=[_work_auth(Endpoint.LIST)])
    async def list_work(ctx: Ctx, environment_id: str, limit: int | None = None,
                        page: str | None = None) -> Response:
        """Newest first; `limit` 1-100 (`--max-list-limit`), default 20; `page` is the previous
        `next_page`."""
        page_json = await ctx.store.list(environment_id, limit=limit, page=page or None)
        return Response(page_json, media_type="application/json")

    @app.get(WORK + "/{work_id}", response_model=Work, tags=["work"],
             dependencies=[_work_auth(Endpoint.GET)])
    async def get_work(ctx: Ctx, environment_id: str, work_id: str) -> Response:
        return JSONResponse(await ctx.store.get(environment_id, work_id))

    @app.post(WORK + "/{work_id}", response_model=Work, tags=["work"],
              dependencies=[_work_auth(Endpoint.UPDATE)])
    async def update(ctx: Ctx, environment_id: str, work_id: str, body: UpdateBody) -> Response:
        """Merge metadata: a string upserts its key, `null` deletes it."""
        return JSONResponse(await ctx.store.update(environment_id, work_id, body.metadata))

    @app.post(WORK + "/{work_id}/ack", response_model=Work, tags=["work"],
              dependencies=[_work_auth(Endpoint.ACK)])
    async def ack(ctx: Ctx, request: Request, environment_id: str, work_id: str) -> Response:
        work = await ctx.store.ack(environment_id, work_id)
        note(request, state=work["state"])
        return JSONResponse(work)

    @app.post(WORK + "/{work_id}/heartbeat", response_model=Heartbeat, tags=["work"],
              dependencies=[_work_auth(Endpoint.HEARTBEAT)])
    async def heartbeat(ctx: Ctx, request: Request, environment_id: str, work_id: str,
                        desired_ttl_seconds: int | None = None,
                        expected_last_heartbeat: str | None = None) -> Response:
        if ctx.faults.refuse_heartbeat():
            note(request, fault="heartbeat_412")
            await ctx.store.refuse_heartbeat(environment_id, work_id, expected_last_heartbeat)
        beat = await ctx.store.heartbeat(environment_id, work_id,
                                         expected=expected_last_heartbeat,
                                         desired_ttl=desired_ttl_seconds)
        note(request, last_heartbeat=beat["last_heartbeat"], state=beat["state"])
        return JSONResponse(beat)

    @app.post(WORK + "/{work_id}/stop", status_code=204, tags=["work"],
              responses={200: {"model": Work, "description": "With `stop_response: json`"}},
              dependencies=[_work_auth(Endpoint.STOP)])
    async def stop(ctx: Ctx, request: Request, environment_id: str, work_id: str,
                   body: StopBody | None = None) -> Response:
        """204 and no body by default (as observed); the work object if so switched."""
        force = body.force if body else False
        note(request, force=force)
        work = await ctx.store.stop(environment_id, work_id, force=force)
        note(request, state=work["state"])
        if ctx.faults.settings.stop_response is StopResponse.JSON:
            return JSONResponse(work)
        return Response(status_code=204)


# --- making environments (sessions: `session_routes`) ----------------------------------------
def add_resource_routes(app: FastAPI) -> None:
    admin = [Depends(requires(ADMIN, "this endpoint"))]

    @app.post("/v1/environments", tags=["resources"], dependencies=admin)
    async def create_environment(ctx: Ctx, body: EnvironmentBody) -> Response:
        return JSONResponse(await ctx.store.create_environment(
            body.name, body.config, environment_key=body.environment_key))

    @app.get("/v1/environments/{environment_id}", tags=["resources"], dependencies=admin)
    async def get_environment(ctx: Ctx, environment_id: str) -> Response:
        return JSONResponse(await ctx.store.environment(environment_id))



# --- errors in the Anthropic shape -----------------------------------------------------------
def add_error_handlers(app: FastAPI) -> None:
    def answer(request: Request, status: int, message: str, *,
               details: dict[str, Any] | None = None,
               headers: Mapping[str, str] | None = None) -> JSONResponse:
        return error_response(request.scope, emulator_of(request), status, message,
                              details=details, headers=headers)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return answer(request, exc.status, exc.message, details=exc.details,
                      headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in error['loc'][1:]) or 'body'}: {error['msg']}"
            for error in exc.errors())
        return answer(request, 400, problems or "invalid request")

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return answer(request, exc.status_code, str(exc.detail), headers=exc.headers)


def create_app(config: EmulatorConfig, *, faults: FaultSettings | None = None,
               redis: Redis | None = None,
               on_startup: Callable[[Emulator], Awaitable[None]] | None = None) -> Any:
    """The emulator as an ASGI app (request log and faults around the FastAPI routes)."""
    redis = redis or Redis.from_pool(BlockingConnectionPool.from_url(
        config.redis_url, decode_responses=True, max_connections=REDIS_MAX_CONNECTIONS,
        timeout=REDIS_POOL_WAIT_SECONDS, socket_timeout=REDIS_REPLY_TIMEOUT_SECONDS,
        socket_connect_timeout=REDIS_CONNECT_TIMEOUT_SECONDS))
    batch = CommandBatch(redis)
    log = RequestLog(redis, batch, f"{config.key_prefix}:requests", REQUEST_LOG_CAP)
    store = Store(redis, config, batch)
    switches = Faults(faults or FaultSettings(), max_list_limit=config.max_list_limit)
    emulator = Emulator(config=config, store=store, sessions=SessionStore(redis, store),
                        faults=switches, log=log, on_startup=on_startup)
    if config.webhook_url and config.webhook_signing_key:
        emulator.webhooks = WebhookSender(url=config.webhook_url,
                                          signing_key=config.webhook_signing_key, log=log,
                                          faults=emulator.faults)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await redis.ping()  # fail at start, not on the first request, if Redis is not there
        if emulator.on_startup is not None:
            await emulator.on_startup(emulator)
        yield
        if emulator.webhooks is not None:
            await emulator.webhooks.aclose()
        await redis.aclose()

    api = FastAPI(title="dispatcher emulator: the Work API (managed-agents-2026-04-01)",
                  version="1", lifespan=lifespan,
                  description="A local, faithful Work API server. See docs/emulator.md.")
    api.state.emulator = emulator
    add_work_routes(api)
    add_resource_routes(api)
    add_session_routes(api)
    add_error_handlers(api)
    add_admin_routes(api)
    return GuardMiddleware(RequestLogMiddleware(FaultMiddleware(FastPath(api, emulator),
                                                                emulator.faults),
                                                emulator.log), emulator.store,
                           emulator.sessions)
