"""A lean HTTP/1.1 transport for `httpx.AsyncClient`, on asyncio protocols.

Why: the heartbeat task sends hundreds of small requests a second from one process. Through
httpx's own async transport (httpcore over anyio) a request costs about 0.7 ms of CPU on one
connection, and more than 1.5 ms with 64 in flight, because its pool re-checks every connection
(one poll(2) each) whenever a request is queued or a response closes. Through this one, about
0.3 ms at any concurrency (measured against a local server, request building and parsing
included): keep-alive connections reused newest first, each response read whole (Work API
answers are small), and httpx's own exceptions raised, so the client's error mapping
(`errors.transport_errors`) and everything above it are unchanged. `AsyncWorkClient` hands
its requests straight to this transport, not through `httpx.AsyncClient.send` (whose auth,
redirect and cookie flows the Work API never uses): about 0.1 ms less a request.
`bench/http11_cpu.py` measures both.

The bytes are framed and parsed by h11 (the parser under httpx's own transport), not by hand:
it refuses a negative or malformed chunk size, conflicting Content-Length headers and CR or LF
in a header value we would send; we add the refusal of folded header lines. Bytes that arrive
on an idle connection close it at once instead of being kept.

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

import h11
import httpx

__all__ = ["Answer", "AsyncHTTP11Transport"]

# As httpx's default keepalive_expiry: a connection idle this long is closed, not reused.
# Servers close idle connections too (uvicorn after 5 s); reusing one they are about to close
# would fail a request for nothing.
KEEPALIVE_EXPIRY_SECONDS = 5.0
# A response head larger than this is not a Work API answer.
MAX_HEAD_BYTES = 64 * 1024
# Nor is a body larger than this (a list page of 100 items is about 60 KB).
MAX_BODY_BYTES = 32 * 1024 * 1024
# Bytes received but not yet parsed, at most: one whole answer.
MAX_BUFFERED_BYTES = MAX_HEAD_BYTES + MAX_BODY_BYTES


class _Connection(asyncio.Protocol):
    """One keep-alive connection: bytes in a buffer, a future to wait for more, and the h11
    state machine that frames and checks what goes out and comes in."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD_BYTES)
        self.buffer = bytearray()
        self.head = bytearray()  # raw bytes of the answer's head, until h11 has parsed it
        self.busy = False  # a request is out and its answer is being read
        self.closed = False
        self.error: BaseException | None = None
        self.idle_since = 0.0
        self._waiter: asyncio.Future[None] | None = None

    # --- asyncio.Protocol -------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if not self.busy or len(self.buffer) + len(data) > MAX_BUFFERED_BYTES:
            # Bytes nobody asked for (a server's 408 before it closes an idle connection) make
            # the connection unusable; and no answer is larger than the bound. Either way,
            # close rather than keep what a misbehaving server sends.
            self.close()
            self.buffer.clear()
            self._wake()
            return
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
        """Idle, open, recent, and ready for a new request (h11 agrees)."""
        return (not self.closed and not self.buffer and self.transport is not None
                and not self.transport.is_closing() and self.h11.our_state is h11.IDLE
                and now - self.idle_since < KEEPALIVE_EXPIRY_SECONDS)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    async def next_event(self) -> Any:
        """The next h11 event of the answer, feeding it bytes as they arrive."""
        while True:
            event = self.h11.next_event()
            if event is not h11.NEED_DATA:
                return event
            if self.buffer:
                data = bytes(self.buffer)
                self.buffer.clear()
                if self.h11.their_state is h11.SEND_RESPONSE and len(self.head) < MAX_HEAD_BYTES:
                    self.head += data
                self.h11.receive_data(data)
            elif self.closed:
                self.h11.receive_data(b"")  # end of stream: h11 says if the answer is whole
            else:
                self._waiter = asyncio.get_running_loop().create_future()
                try:
                    await self._waiter
                finally:
                    self._waiter = None


class Answer:
    """An answer read whole: status, reason, raw headers and body."""

    __slots__ = ("body", "headers", "reason", "status")

    def __init__(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]],
                 body: bytes) -> None:
        self.status, self.reason, self.headers, self.body = status, reason, headers, body


def _check_head(conn: _Connection) -> None:
    """Consume one parsed head from `conn.head`. h11 unfolds an obsolete folded header line
    (RFC 9112 lets a client); we refuse it: no Work API answer has one, and a proxy on the
    way may have read it as two headers."""
    end = conn.head.find(b"\r\n\r\n")
    head = conn.head[:end] if end >= 0 else conn.head
    if b"\r\n " in head or b"\r\n\t" in head:
        raise httpx.RemoteProtocolError("folded header line in the response")
    del conn.head[:end + 4 if end >= 0 else len(conn.head)]


async def _read_response(conn: _Connection) -> Answer:
    response: h11.Response | None = None
    parts: list[bytes] = []
    size = 0
    while True:
        event = await conn.next_event()
        if isinstance(event, h11.InformationalResponse):
            _check_head(conn)
            continue  # the real answer follows
        if isinstance(event, h11.Response):
            _check_head(conn)
            conn.head.clear()
            response = event
        elif isinstance(event, h11.Data):
            size += len(event.data)
            if size > MAX_BODY_BYTES:
                raise httpx.RemoteProtocolError("response body too large")
            parts.append(bytes(event.data))
        elif isinstance(event, h11.EndOfMessage):
            assert response is not None
            return Answer(response.status_code, bytes(response.reason),
                             [(bytes(k), bytes(v)) for k, v in response.headers.raw_items()],
                             b"".join(parts))
        elif isinstance(event, h11.ConnectionClosed):
            raise httpx.RemoteProtocolError(
                "Server disconnected without sending a complete response.")


def _timeouts(request: httpx.Request) -> dict[str, float | None]:
    timeout: dict[str, float | None] = request.extensions.get("timeout", {})
    return timeout


class AsyncHTTP11Transport(httpx.AsyncBaseTransport):
    """Keep-alive HTTP/1.1 connections per origin, reused newest first; one event loop only."""

    def __init__(self, *, max_connections: int,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        # `max_connections` is the caller's limit of requests in flight: fewer connections
        # would queue requests the caller believes are on the wire.
        self._max_connections = max_connections
        self._ssl_context = ssl_context
        self._idle: dict[tuple[str, str, int], deque[_Connection]] = {}
        self._slots: dict[tuple[str, str, int], asyncio.Semaphore] = {}
        self._closed = False
        self.connections_opened = 0  # in all, for diagnostics and tests

    @property
    def max_connections(self) -> int:
        return self._max_connections

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
        url = request.url
        origin = (url.scheme, url.host, url.port or (443 if url.scheme == "https" else 80))
        try:
            response = await self.exchange(
                origin, request.method.encode(), url.raw_path, request.headers.raw,
                await request.aread(), _timeouts(request))
        except httpx.RequestError as exc:
            exc.request = request
            raise
        return httpx.Response(
            response.status, headers=response.headers, stream=httpx.ByteStream(response.body),
            extensions={"http_version": b"HTTP/1.1", "reason_phrase": response.reason})

    async def exchange(self, origin: tuple[str, str, int], method: bytes, target: bytes,
                       headers: list[tuple[bytes, bytes]], body: bytes,
                       timeout: dict[str, float | None]) -> Answer:
        """One request on a keep-alive connection of `origin` (scheme, host, port), its answer
        read whole: what `handle_async_request` does once httpx's request is taken apart, for
        a caller that sends the same request over and over and builds its bytes itself (the
        heartbeat). Failures raise httpx's exceptions, with no request attached."""
        if self._closed:
            raise httpx.ConnectError("the transport is closed")
        if origin[0] not in ("http", "https"):
            raise httpx.UnsupportedProtocol(f"unsupported scheme {origin[0]!r}")
        slots = self._slots.get(origin)
        if slots is None:
            slots = self._slots[origin] = asyncio.Semaphore(self._max_connections)
        try:
            async with asyncio.timeout(timeout.get("pool")):
                await slots.acquire()
        except TimeoutError:
            raise httpx.PoolTimeout("no connection free in time") from None
        try:
            return await self._send(origin, method, target, headers, body, timeout)
        finally:
            slots.release()

    async def _send(self, origin: tuple[str, str, int], method: bytes, target: bytes,
                    headers: list[tuple[bytes, bytes]], body: bytes,
                    timeout: dict[str, float | None]) -> Answer:
        conn = self._idle_connection(origin) or await self._connect(origin, timeout)
        assert conn.transport is not None
        try:
            # h11 frames the request and refuses what would corrupt it (CR or LF in a header
            # value, a body that does not match its Content-Length) before a byte is sent.
            message = conn.h11.send(h11.Request(method=method, target=target, headers=headers))
            if body:
                message += conn.h11.send(h11.Data(data=body))
            message += conn.h11.send(h11.EndOfMessage())
        except h11.LocalProtocolError as exc:
            conn.close()
            raise httpx.LocalProtocolError(str(exc)) from None
        conn.busy = True
        try:
            conn.transport.write(message)
            async with asyncio.timeout(timeout.get("read")):
                response = await _read_response(conn)
        except TimeoutError:
            conn.close()
            raise httpx.ReadTimeout("timed out reading the response") from None
        except h11.RemoteProtocolError as exc:
            conn.close()
            raise httpx.RemoteProtocolError(str(exc)) from None
        except httpx.HTTPError:
            conn.close()
            raise
        except OSError as exc:
            conn.close()
            raise httpx.ReadError(str(exc) or type(exc).__name__) from exc
        except BaseException:  # cancelled mid-response: the connection is in an unknown state
            conn.close()
            raise
        self._finish(conn, origin)
        return response

    def _finish(self, conn: _Connection, origin: tuple[str, str, int]) -> None:
        """Back to the pool if both sides may go on (h11 knows `Connection: close`, HTTP/1.0
        and close-delimited bodies) and nothing arrived beyond the answer; else closed."""
        machine = conn.h11
        if (machine.our_state is h11.DONE and machine.their_state is h11.DONE
                and not machine.trailing_data[0] and not self._closed and not conn.closed):
            machine.start_next_cycle()
            conn.busy = False
            conn.idle_since = time.monotonic()
            self._idle.setdefault(origin, deque()).append(conn)
        else:
            conn.close()

    def _idle_connection(self, origin: tuple[str, str, int]) -> _Connection | None:
        idle = self._idle.get(origin)
        now = time.monotonic()
        while idle:
            conn = idle.pop()  # newest first: the older ones expire unused
            if conn.reusable(now):
                return conn
            conn.close()
        return None

    async def _connect(self, origin: tuple[str, str, int],
                       timeout: dict[str, float | None]) -> _Connection:
        scheme, host, port = origin
        loop = asyncio.get_running_loop()
        tls = self._tls() if scheme == "https" else None
        try:
            async with asyncio.timeout(timeout.get("connect")):
                _, conn = await loop.create_connection(
                    _Connection, host, port, ssl=tls, server_hostname=host if tls else None)
        except TimeoutError:
            raise httpx.ConnectTimeout(f"connecting to {host}:{port} timed out") from None
        except OSError as exc:
            raise httpx.ConnectError(str(exc) or type(exc).__name__) from exc
        self.connections_opened += 1
        return conn

    async def aclose(self) -> None:
        self._closed = True
        for idle in self._idle.values():
            while idle:
                idle.pop().close()
        self._idle.clear()
