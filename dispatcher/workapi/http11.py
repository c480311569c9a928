"""A lean HTTP/1.1 transport for `httpx.AsyncClient`, on asyncio protocols.

Why: the heartbeat task sends hundreds of small requests a second from one process. Through
httpx's own async transport (httpcore over anyio) a request costs about 0.7 ms of CPU on one
connection, and more than 1.5 ms with 64 in flight, because its pool re-checks every connection
(one poll(2) each) whenever a request is queued or a response closes. Through this one, about
0.3 ms at any concurrency (measured against a local server, request building and parsing
included): keep-alive connections reused newest first, each response read whole (Work API
answers are small), and httpx's own exceptions raised, so the client's error mapping
(`errors.transport_errors`) and everything above it are unchanged.

It speaks only what the Work API needs: HTTP/1.1 over TCP or TLS; bodies framed by
Content-Length, chunked encoding, or the end of the connection. No proxies (`for_url` returns
None when one applies, and the client keeps httpx's transport), no HTTP/2, no request streaming.
A request that fails is never retried here: a heartbeat the server may have applied must not be
sent twice (its second copy would present a stale token and lose the lease).
"""

from __future__ import annotations

import asyncio
import ssl
import time
import urllib.request
from collections import deque
from typing import Any

import httpx

__all__ = ["AsyncHTTP11Transport"]

# As httpx's default keepalive_expiry: a connection idle this long is closed, not reused.
# Servers close idle connections too (uvicorn after 5 s); reusing one they are about to close
# would fail a request for nothing.
KEEPALIVE_EXPIRY_SECONDS = 5.0
# Connections to one origin at most; requests beyond wait (up to the pool timeout).
MAX_CONNECTIONS = 100
# A response head larger than this is not a Work API answer.
MAX_HEAD_BYTES = 64 * 1024
# Nor is a body larger than this (a list page of 100 items is about 60 KB).
MAX_BODY_BYTES = 32 * 1024 * 1024
_NO_BODY_STATUSES = frozenset({204, 304})


class _Connection(asyncio.Protocol):
    """One keep-alive connection: bytes in a buffer, a future to wait for more."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.closed = False
        self.error: BaseException | None = None
        self.idle_since = 0.0
        self._waiter: asyncio.Future[None] | None = None

    # --- asyncio.Protocol -------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self._wake()

    def eof_received(self) -> bool:
        self.closed = True
        self._wake()
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.error = exc
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # --- use ---------------------------------------------------------------------------------
    def reusable(self, now: float) -> bool:
        """Idle, open, recent, and nothing unasked for arrived (a server's 408 before it
        closes an idle connection would otherwise be read as the next request's answer)."""
        return (not self.closed and not self.buffer and self.transport is not None
                and not self.transport.is_closing()
                and now - self.idle_since < KEEPALIVE_EXPIRY_SECONDS)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    async def _more(self) -> None:
        """Wait until more bytes arrive or the connection ends."""
        if self.closed:
            raise httpx.RemoteProtocolError(
                "Server disconnected without sending a complete response.")
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    async def read_until(self, marker: bytes, limit: int) -> bytes:
        start = 0
        while True:
            found = self.buffer.find(marker, start)
            if found >= 0:
                data = bytes(self.buffer[:found])
                del self.buffer[:found + len(marker)]
                return data
            if len(self.buffer) > limit:
                raise httpx.RemoteProtocolError("response line or head too long")
            start = max(0, len(self.buffer) - len(marker) + 1)
            await self._more()

    async def read_exactly(self, n: int) -> bytes:
        while len(self.buffer) < n:
            await self._more()
        data = bytes(self.buffer[:n])
        del self.buffer[:n]
        return data

    async def read_to_end(self) -> bytes:
        while not self.closed:
            if len(self.buffer) > MAX_BODY_BYTES:
                raise httpx.RemoteProtocolError("response body too large")
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        data = bytes(self.buffer)
        self.buffer.clear()
        return data


class _Response:
    __slots__ = ("body", "headers", "keep_alive", "reason", "status")

    def __init__(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]],
                 body: bytes, keep_alive: bool) -> None:
        self.status, self.reason, self.headers = status, reason, headers
        self.body, self.keep_alive = body, keep_alive


async def _read_response(conn: _Connection, method: bytes) -> _Response:
    while True:
        head = await conn.read_until(b"\r\n\r\n", MAX_HEAD_BYTES)
        lines = head.split(b"\r\n")
        version, _, rest = lines[0].partition(b" ")
        code, _, reason = rest.partition(b" ")
        if not version.startswith(b"HTTP/1.") or not code.isdigit():
            raise httpx.RemoteProtocolError(f"not an HTTP/1.1 response: {lines[0][:80]!r}")
        status = int(code)
        if not 100 <= status < 200 or status == 101:
            break  # else an informational answer: the real one follows
    headers, length, chunked, keep_alive = _parse_headers(lines[1:], version)
    if method == b"HEAD" or status in _NO_BODY_STATUSES or status == 101:
        body = b""
    elif chunked:
        body = await _read_chunked(conn)
    elif length is not None:
        if length > MAX_BODY_BYTES:
            raise httpx.RemoteProtocolError("response body too large")
        body = await conn.read_exactly(length)
    else:
        body, keep_alive = await conn.read_to_end(), False
    return _Response(status, reason, headers, body, keep_alive)


def _parse_headers(lines: list[bytes], version: bytes
                   ) -> tuple[list[tuple[bytes, bytes]], int | None, bool, bool]:
    """Headers, Content-Length, whether chunked, whether the connection stays open."""
    headers: list[tuple[bytes, bytes]] = []
    length: int | None = None
    chunked = False
    keep_alive = version == b"HTTP/1.1"
    for line in lines:
        name, colon, value = line.partition(b":")
        if not colon:
            raise httpx.RemoteProtocolError("malformed response header")
        value = value.strip()
        headers.append((name, value))
        lowered = name.strip().lower()
        if lowered == b"content-length":
            if not value.isdigit():
                raise httpx.RemoteProtocolError("malformed Content-Length")
            length = int(value)
        elif lowered == b"transfer-encoding":
            chunked = value.lower().endswith(b"chunked")
        elif lowered == b"connection":
            tokens = {t.strip() for t in value.lower().split(b",")}
            keep_alive = b"keep-alive" in tokens if version == b"HTTP/1.0" else (
                b"close" not in tokens)
    return headers, length, chunked, keep_alive


async def _read_chunked(conn: _Connection) -> bytes:
    parts: list[bytes] = []
    total = 0
    while True:
        size_line = await conn.read_until(b"\r\n", 1024)
        try:
            size = int(size_line.split(b";")[0].strip(), 16)
        except ValueError:
            raise httpx.RemoteProtocolError("malformed chunk size") from None
        if size == 0:
            while await conn.read_until(b"\r\n", MAX_HEAD_BYTES):
                pass  # trailers, up to the empty line
            return b"".join(parts)
        total += size
        if total > MAX_BODY_BYTES:
            raise httpx.RemoteProtocolError("response body too large")
        parts.append(await conn.read_exactly(size))
        if await conn.read_exactly(2) != b"\r\n":
            raise httpx.RemoteProtocolError("malformed chunk")


def _timeouts(request: httpx.Request) -> dict[str, float | None]:
    timeout: dict[str, float | None] = request.extensions.get("timeout", {})
    return timeout


class AsyncHTTP11Transport(httpx.AsyncBaseTransport):
    """Keep-alive HTTP/1.1 connections per origin, reused newest first; one event loop only."""

    def __init__(self, *, max_connections: int = MAX_CONNECTIONS,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self._max_connections = max_connections
        self._ssl_context = ssl_context
        self._idle: dict[tuple[str, str, int], deque[_Connection]] = {}
        self._slots: dict[tuple[str, str, int], asyncio.Semaphore] = {}
        self._closed = False
        self.connections_opened = 0  # in all, for diagnostics and tests

    @classmethod
    def for_url(cls, url: str, **options: Any) -> AsyncHTTP11Transport | None:
        """This transport for a base URL, or None when a proxy from the environment applies
        to it (an httpx client given a transport ignores the environment's proxies)."""
        parsed = httpx.URL(url)
        proxies = urllib.request.getproxies()
        if (proxies.get(parsed.scheme) or proxies.get("all")) and not urllib.request.proxy_bypass(
                parsed.host):
            return None
        return cls(**options)

    def _tls(self) -> ssl.SSLContext:
        if self._ssl_context is None:
            self._ssl_context = httpx.create_ssl_context()
        return self._ssl_context

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self._closed:
            raise httpx.ConnectError("the transport is closed", request=request)
        url = request.url
        scheme = url.scheme
        if scheme not in ("http", "https"):
            raise httpx.UnsupportedProtocol(f"unsupported scheme {scheme!r}", request=request)
        origin = (scheme, url.host, url.port or (443 if scheme == "https" else 80))
        timeout = _timeouts(request)
        slots = self._slots.get(origin)
        if slots is None:
            slots = self._slots[origin] = asyncio.Semaphore(self._max_connections)
        try:
            async with asyncio.timeout(timeout.get("pool")):
                await slots.acquire()
        except TimeoutError:
            raise httpx.PoolTimeout("no connection free in time", request=request) from None
        try:
            return await self._send(request, origin, timeout)
        finally:
            slots.release()

    async def _send(self, request: httpx.Request, origin: tuple[str, str, int],
                    timeout: dict[str, float | None]) -> httpx.Response:
        method = request.method.encode()
        head = [method + b" " + request.url.raw_path + b" HTTP/1.1"]
        head += [name + b": " + value for name, value in request.headers.raw]
        message = b"\r\n".join(head) + b"\r\n\r\n" + await request.aread()
        conn = self._idle_connection(origin) or await self._connect(request, origin, timeout)
        assert conn.transport is not None
        try:
            conn.transport.write(message)
            async with asyncio.timeout(timeout.get("read")):
                response = await _read_response(conn, method)
        except TimeoutError:
            conn.close()
            raise httpx.ReadTimeout("timed out reading the response", request=request) from None
        except httpx.HTTPError as exc:
            conn.close()
            exc.request = request
            raise
        except OSError as exc:
            conn.close()
            raise httpx.ReadError(str(exc) or type(exc).__name__, request=request) from exc
        except BaseException:  # cancelled mid-response: the connection is in an unknown state
            conn.close()
            raise
        if response.keep_alive and not self._closed and not conn.closed:
            conn.idle_since = time.monotonic()
            self._idle.setdefault(origin, deque()).append(conn)
        else:
            conn.close()
        return httpx.Response(
            response.status, headers=response.headers, stream=httpx.ByteStream(response.body),
            extensions={"http_version": b"HTTP/1.1", "reason_phrase": response.reason})

    def _idle_connection(self, origin: tuple[str, str, int]) -> _Connection | None:
        idle = self._idle.get(origin)
        now = time.monotonic()
        while idle:
            conn = idle.pop()  # newest first: the older ones expire unused
            if conn.reusable(now):
                return conn
            conn.close()
        return None

    async def _connect(self, request: httpx.Request, origin: tuple[str, str, int],
                       timeout: dict[str, float | None]) -> _Connection:
        scheme, host, port = origin
        loop = asyncio.get_running_loop()
        tls = self._tls() if scheme == "https" else None
        try:
            async with asyncio.timeout(timeout.get("connect")):
                _, conn = await loop.create_connection(
                    _Connection, host, port, ssl=tls, server_hostname=host if tls else None)
        except TimeoutError:
            raise httpx.ConnectTimeout(f"connecting to {host}:{port} timed out",
                                       request=request) from None
        except OSError as exc:
            raise httpx.ConnectError(str(exc) or type(exc).__name__, request=request) from exc
        self.connections_opened += 1
        return conn

    async def aclose(self) -> None:
        self._closed = True
        for idle in self._idle.values():
            while idle:
                idle.pop().close()
        self._idle.clear()
