"""The Work API clients: `WorkClient` (blocking) and `AsyncWorkClient` (asyncio).

Both are thin shells over one sans-IO core (`dispatcher.workapi._endpoints`), which builds each
endpoint's request and parses its response, so paths, headers, credentials, error mapping and
retry decisions exist once. The two clients differ only in how they send and how they sleep.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Generic, Self, TypeVar

import httpx

from dispatcher.perprocess import PerProcess
from dispatcher.workapi._endpoints import (
    ANTHROPIC_VERSION,
    BETA,
    POLL_BLOCK_MS_MAX,
    Call,
    HeartbeatRequests,
    WorkAPI,
)
from dispatcher.workapi.errors import WorkAPIError, transport_errors
from dispatcher.workapi.http11 import AsyncHTTP11Transport, HTTP11Transport
from dispatcher.workapi.models import Heartbeat, ListedPage, Work, WorkPage, WorkQueueStats
from dispatcher.workapi.retry import Backoff

if TYPE_CHECKING:
    from dispatcher.settings import Settings

__all__ = ["ANTHROPIC_VERSION", "BETA", "POLL_BLOCK_MS_MAX", "AsyncWorkClient", "WorkClient",
           "default_worker_id"]

T = TypeVar("T")
TransportT = TypeVar("TransportT", httpx.BaseTransport, httpx.AsyncBaseTransport)


_worker_id = PerProcess(lambda: f"{socket.gethostname()}-{uuid.uuid4().hex[:12]}")


def default_worker_id() -> str:
    """``<host>-<random>``, as the SDK names a poller: the API documents the id as unique, and
    several processes on one host poll. One per process, and a forked child (a prefork pool)
    gets its own rather than inheriting its parent's."""
    return _worker_id.get()


class _ClientBase(Generic[TransportT]):
    """Construction and configuration, the same for both clients."""

    def __init__(
        self,
        *,
        base_url: str,
        environment_id: str,
        environment_key: str | None = None,
        api_key: str | None = None,
        worker_id: str | None = None,
        timeout: float = 10.0,
        max_retries: int = 2,
        transport: TransportT | None = None,
    ) -> None:
        # Cheap on purpose: the httpx client (and its TLS context) is made on first use.
        self._api = WorkAPI(
            base_url=base_url, environment_id=environment_id, environment_key=environment_key,
            api_key=api_key, worker_id=worker_id, timeout=timeout, max_retries=max_retries)
        self._transport: TransportT | None = transport
        self._lock = threading.Lock()  # guards the lazy creation of the sync httpx client

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> Self:
        """A client for the configured environment; keyword arguments override settings."""
        # Imported here: pydantic-settings costs ~40 ms, and the emulator imports this package.
        from dispatcher.settings import SettingsError

        if not (overrides.get("environment_id") or settings.environment_id):
            raise SettingsError("ANTHROPIC_ENVIRONMENT_ID is not set: the environment to work for")
        options: dict[str, Any] = {
            "base_url": settings.base_url,
            "environment_id": settings.environment_id,
            "environment_key": (settings.environment_key.get_secret_value()
                                if settings.environment_key else None),
            "api_key": settings.api_key.get_secret_value() if settings.api_key else None,
            "worker_id": settings.worker_id or default_worker_id(),
            "timeout": settings.http_timeout_seconds,
        }
        return cls(**{**options, **overrides})

    @property
    def environment_id(self) -> str:
        return self._api.environment_id

    @property
    def worker_id(self) -> str | None:
        return self._api.worker_id

    @property
    def transport(self) -> TransportT | None:
        """The transport given at construction (None: httpx's own)."""
        return self._transport

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._api.describe()})"


class WorkClient(_ClientBase[httpx.BaseTransport]):
    """The Work API over a blocking `httpx.Client`; safe to share between threads."""

    _sleep: Callable[[float], None] = staticmethod(time.sleep)
    _http: httpx.Client | None = None

    def _client(self) -> httpx.Client:
        with self._lock:
            if self._http is None:
                self._http = httpx.Client(transport=self._transport)
            return self._http

    def _send(self, request: httpx.Request) -> httpx.Response:
        """Our lean transport is handed the request itself, as `AsyncWorkClient._send` does."""
        if isinstance(self._transport, HTTP11Transport):
            response = self._transport.handle_request(request)
            response.request = request
            response.read()  # the body is already in memory: no I/O
            return response
        return self._client().send(request)

    def _run(self, call: Call[T]) -> T:
        backoff = Backoff()
        failures = 0
        while True:
            try:
                with transport_errors(call.endpoint):
                    response = self._send(call.request)
                return call.result(response)
            except WorkAPIError as exc:
                failures += 1
                delay = self._api.retry_delay(exc, failures, backoff)
                if delay is None:
                    raise
            self._sleep(delay)

    def poll(
        self, *, block_ms: int | None = POLL_BLOCK_MS_MAX, reclaim_older_than_ms: int | None = None
    ) -> Work | None:
        """The next work item, or None when the queue stayed empty for ``block_ms``."""
        return self._run(self._api.poll(block_ms=block_ms,
                                        reclaim_older_than_ms=reclaim_older_than_ms))

    def ack(self, work_id: str) -> Work:
        return self._run(self._api.ack(work_id))

    def heartbeat(
        self,
        work_id: str,
        *,
        expected_last_heartbeat: str | None,
        desired_ttl_seconds: int | None = None,
        timeout: float | None = None,
    ) -> Heartbeat:
        return self._run(self._api.heartbeat(
            work_id, expected_last_heartbeat=expected_last_heartbeat,
            desired_ttl_seconds=desired_ttl_seconds, timeout=timeout))

    def stop(self, work_id: str, *, force: bool = False,
             sessions_token: str | None = None) -> Work | None:
        """Stop an item; None when the server answers 204, as the current one does.
        `sessions_token`: sent with that delivery's token instead of the client's key."""
        return self._run(self._api.stop(work_id, force=force, sessions_token=sessions_token))

    def get(self, work_id: str) -> Work:
        return self._run(self._api.get(work_id))

    def update(self, work_id: str, metadata: Mapping[str, str | None]) -> Work:
        """Upsert metadata keys; a None value deletes the key."""
        return self._run(self._api.update(work_id, metadata))

    def list(self, *, limit: int | None = None, page: str | None = None) -> WorkPage:
        return self._run(self._api.list(limit=limit, page=page))

    def list_states(self, *, limit: int | None = None, page: str | None = None) -> ListedPage:
        """A list page, each item's id, state and stop request only."""
        return self._run(self._api.list_states(limit=limit, page=page))

    def iter_list(self, *, limit: int | None = None) -> Iterator[Work]:
        """Every work item, page after page (``limit`` is the page size)."""
        page: str | None = None
        while True:
            result = self.list(limit=limit, page=page)
            yield from result.data
            if not result.next_page:
                return
            page = result.next_page

    def stats(self) -> WorkQueueStats:
        return self._run(self._api.stats())

    def close(self) -> None:
        with self._lock:
            if self._http is not None:
                self._http.close()
                self._http = None
            elif isinstance(self._transport, HTTP11Transport):
                self._transport.close()  # sent to directly: no httpx client closes it

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class AsyncWorkClient(_ClientBase[httpx.AsyncBaseTransport]):
    """The Work API over an `httpx.AsyncClient`; use it within one event loop."""

    _sleep: Callable[[float], Awaitable[None]] = staticmethod(asyncio.sleep)
    _http: httpx.AsyncClient | None = None
    _heartbeats: HeartbeatRequests | None = None

    def _client(self) -> httpx.AsyncClient:
        if self._http is None:
            self._http = httpx.AsyncClient(transport=self._transport)
        return self._http

    async def _send(self, request: httpx.Request) -> httpx.Response:
        """Our lean transport is handed the request itself: what `httpx.AsyncClient.send`
        adds around it (auth and redirect flows, cookies) the Work API never uses, and it cost
        a heartbeat about as much CPU as the transport's own work. Any other transport goes
        through the httpx client."""
        if isinstance(self._transport, AsyncHTTP11Transport):
            response = await self._transport.handle_async_request(request)
            response.request = request
            await response.aread()  # the body is already in memory: no I/O
            return response
        return await self._client().send(request)

    async def _run(self, call: Call[T]) -> T:
        async def attempt() -> T:
            with transport_errors(call.endpoint):
                response = await self._send(call.request)
            return call.result(response)

        return await self._retrying(attempt)

    async def _retrying(self, attempt: Callable[[], Awaitable[T]]) -> T:
        backoff = Backoff()
        failures = 0
        while True:
            try:
                return await attempt()
            except WorkAPIError as exc:
                failures += 1
                delay = self._api.retry_delay(exc, failures, backoff)
                if delay is None:
                    raise
            await self._sleep(delay)

    async def poll(
        self, *, block_ms: int | None = POLL_BLOCK_MS_MAX, reclaim_older_than_ms: int | None = None
    ) -> Work | None:
        return await self._run(self._api.poll(block_ms=block_ms,
                                              reclaim_older_than_ms=reclaim_older_than_ms))

    async def ack(self, work_id: str) -> Work:
        return await self._run(self._api.ack(work_id))

    async def heartbeat(
        self,
        work_id: str,
        *,
        expected_last_heartbeat: str | None,
        desired_ttl_seconds: int | None = None,
        timeout: float | None = None,
    ) -> Heartbeat:
        transport = self._transport
        if not isinstance(transport, AsyncHTTP11Transport):
            return await self._run(self._api.heartbeat(
                work_id, expected_last_heartbeat=expected_last_heartbeat,
                desired_ttl_seconds=desired_ttl_seconds, timeout=timeout))
        # Our lean transport is handed the heartbeat's bytes (`HeartbeatRequests`).
        requests = self._heartbeats
        if requests is None:
            requests = self._heartbeats = self._api.heartbeat_requests()
        target = requests.target(work_id, expected_last_heartbeat=expected_last_heartbeat,
                                 desired_ttl_seconds=desired_ttl_seconds)

        async def attempt() -> Heartbeat:
            with transport_errors(requests.ENDPOINT):
                answer = await transport.exchange(requests.origin, b"POST", target,
                                                  requests.headers, b"", requests.timeouts(timeout))
            return requests.result(answer.status, answer.reason, answer.headers, answer.body)

        return await self._retrying(attempt)

    async def stop(self, work_id: str, *, force: bool = False,
                   sessions_token: str | None = None) -> Work | None:
        return await self._run(self._api.stop(work_id, force=force,
                                              sessions_token=sessions_token))

    async def get(self, work_id: str) -> Work:
        return await self._run(self._api.get(work_id))

    async def update(self, work_id: str, metadata: Mapping[str, str | None]) -> Work:
        return await self._run(self._api.update(work_id, metadata))

    async def list(self, *, limit: int | None = None, page: str | None = None) -> WorkPage:
        return await self._run(self._api.list(limit=limit, page=page))

    async def list_states(self, *, limit: int | None = None,
                          page: str | None = None) -> ListedPage:
        return await self._run(self._api.list_states(limit=limit, page=page))

    async def aiter_list(self, *, limit: int | None = None) -> AsyncIterator[Work]:
        page: str | None = None
        while True:
            result = await self.list(limit=limit, page=page)
            for work in result.data:
                yield work
            if not result.next_page:
                return
            page = result.next_page

    async def stats(self) -> WorkQueueStats:
        return await self._run(self._api.stats())

    async def close(self) -> None:
        if self._http is not None:
            http, self._http = self._http, None
            await http.aclose()
        elif isinstance(self._transport, AsyncHTTP11Transport):
            await self._transport.aclose()  # sent to directly: no httpx client closes it

    aclose = close

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
