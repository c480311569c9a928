"""Lean HTTP/1.1 transports: for `httpx.AsyncClient` on asyncio protocols
(`AsyncHTTP11Transport`), and for `httpx.Client` on blocking sockets shared by threads
(`HTTP11Transport`). Both read answers with the same I/O-free readers (`_read_response`, a
generator that yields when it needs bytes), each waiting for bytes its own way.

Why: the heartbeat task sends hundreds of small requests a second from one process. Through
httpx's own async transport (httpcore over anyio) a request costs about 0.7 ms of CPU on one
connection, and more than 1.5 ms with 64 in flight, because its pool re-checks every connection
(one poll(2) each) whenever a request is queued or a response closes. Through this one, about
0.15 ms at any concurrency (measured against a local server, request building and parsing
included): keep-alive connections reused newest first, each response read whole (Work API
answers are small), and httpx's own exceptions raised, so the client's error mapping
(`errors.transport_errors`) and everything above it are unchanged. `AsyncWorkClient` hands
its requests straight to this transport, not through `httpx.AsyncClient.send` (whose auth,
redirect and cookie flows the Work API never uses): about 0.1 ms less a request.
`bench/http11_cpu.py` measures both. The blocking one carries every other request of a worker
(`Runtime.client`): a poller run's polls, acks and first heartbeats, from its claim threads,
cost the claimer half the CPU they did through httpx's client (`bench/claims.py`).

An answer in the plain form a Work API server gives (HTTP/1.1, a final status, CRLF lines,
token names, values of visible characters, one Content-Length of digits, no Transfer-Encoding
and no Connection header) is read by one regular expression (`_plain_head`): h11 cost a
heartbeat more CPU than the rest of the transport. Any other answer (chunked, close-delimited,
informational, 204, a HEAD's, `Connection: close`, bare LF lines, anything odd) is framed and
checked by h11 (the parser under httpx's own transport), from its first byte: it refuses a
negative or malformed chunk size and conflicting Content-Length headers; we add the refusal of
folded header lines. The plain form is a subset of what h11 takes, framed as h11 frames it.
What we send is checked before a byte leaves, as h11 would check it (`_request_head`): no CR
or LF in a header value, a body that matches its Content-Length. Bytes that arrive on an idle
connection close it (the event loop's at once, the blocking one's when it would be reused)
instead of being kept.

It speaks only what the Work API needs: HTTP/1.1 over TCP or TLS; bodies framed by
Content-Length, chunked encoding, or the end of the connection. No proxies (`for_url` returns
None when one applies, and the client keeps httpx's transport), no HTTP/2, no request streaming.
A request that fails is never retried here: a heartbeat the server may have applied must not be
sent twice (its second copy would present a stale token and lose the lease).
"""

from __future__ import annotations

import asyncio
import re
import select
import socket
import ssl
import threading
import time
import urllib.request
from collections import deque
from collections.abc import Generator, Iterator
from contextlib import contextmanager
from typing import Any, Self, cast

import h11
import httpx

__all__ = ["Answer", "AsyncHTTP11Transport", "HTTP11Transport"]

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
# A blocking socket's read: most answers whole in one (a heartbeat's is under 1 KB), a list
# page of 1,000 items (0.7 MB) in a few dozen.
RECEIVE_BYTES = 64 * 1024

# h11's grammar (h11/_abnf.py), narrowed: a header value of visible characters and spaces.
_TOKEN = rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+"
_VALUE = rb"(?:[\x21-\x7e\x80-\xff]+(?:[ \t]+[\x21-\x7e\x80-\xff]+)*)?"
_FIELD = re.compile(rb"(" + _TOKEN + rb"):[ \t]*(" + _VALUE + rb")[ \t]*\r\n")
# An answer's head in the plain form: HTTP/1.1, a final status with a reason, header lines.
_PLAIN_HEAD = re.compile(rb"HTTP/1\.1 ([2-5][0-9][0-9]) ([\t\x20-\x7e\x80-\xff]*)\r\n"
                         rb"((?:" + _TOKEN + rb":[ \t]*" + _VALUE + rb"[ \t]*\r\n)*)\r\n")
# Headers that make an answer's framing other than plain: h11 reads those.
_FRAMING = frozenset({b"transfer-encoding", b"connection"})
# A plain answer's Content-Length has at most this many digits: any length we take
# (MAX_BODY_BYTES) has fewer, and a longer one goes to h11, whose reading refuses it.
_LENGTH_DIGITS = 18
# What a request we send may hold: a method, a target of visible characters, header lines.
_REQUEST_LINE = re.compile(_TOKEN + rb" [\x21-\x7e]+")
_HEADER_NAME = re.compile(_TOKEN)
_HEADER_VALUE = re.compile(_VALUE)


class _Buffered:
    """What the readers (`_read_response`) see of a connection, whichever transport holds it:
    the bytes received and not yet parsed, and whether the stream has ended."""

    def __init__(self) -> None:
        self.keep = True  # whether the last answer leaves the connection fit for another
        self.buffer = bytearray()
        self.head = bytearray()  # raw bytes of the answer's head, until h11 has parsed it
        self.busy = False  # a request is out and its answer is being read
        self.closed = False
        self.idle_since = 0.0

    def close(self) -> None:
        self.closed = True


class _Connection(_Buffered, asyncio.Protocol):
    """One keep-alive connection on an event loop: bytes in a buffer and a future to wait for
    more."""

    def __init__(self) -> None:
        super().__init__()
        self.transport: asyncio.Transport | None = None
        self.error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None

    # --- asyncio.Protocol -------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (asyncio's own, or uvloop's, which does not derive from it).
        self.transport = cast("asyncio.Transport", transport)

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
        """Idle, open, recent, and with nothing unread: ready for a new request."""
        return (not self.closed and not self.buffer and self.transport is not None
                and not self.transport.is_closing() and not self.busy
                and now - self.idle_since < KEEPALIVE_EXPIRY_SECONDS)

    def close(self) -> None:
        super().close()
        if self.transport is not None:
            self.transport.close()

    async def more(self) -> None:
        """Wait for bytes (or the end of the stream)."""
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None


# A reader of an answer, free of I/O: it yields when it needs more bytes in the connection's
# buffer (or word of the stream's end), and returns what it read. Each transport drives it with
# its own waiting (`_read_async`, `_SocketConnection.read`), so both read every answer alike.
Reading = Generator[None, None, "Answer"]


def _next_event(conn: _Buffered, machine: h11.Connection) -> Generator[None, None, Any]:
    """The next h11 event of the answer, feeding it bytes as they arrive."""
    while True:
        event = machine.next_event()
        if event is not h11.NEED_DATA:
            return event
        if conn.buffer:
            data = bytes(conn.buffer)
            conn.buffer.clear()
            if machine.their_state is h11.SEND_RESPONSE and len(conn.head) < MAX_HEAD_BYTES:
                conn.head += data
            machine.receive_data(data)
        elif conn.closed:
            machine.receive_data(b"")  # end of stream: h11 says if the answer is whole
        else:
            yield


class Answer:
    """An answer read whole: status, reason, raw headers and body."""

    __slots__ = ("body", "headers", "reason", "status")

    def __init__(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]],
                 body: bytes) -> None:
        self.status, self.reason, self.headers, self.body = status, reason, headers, body

    def response(self) -> httpx.Response:
        """As httpx's transports hand an answer to the client."""
        return httpx.Response(
            self.status, headers=self.headers, stream=httpx.ByteStream(self.body),
            extensions={"http_version": b"HTTP/1.1", "reason_phrase": self.reason})


def _check_head(conn: _Buffered) -> None:
    """Consume one parsed head from `conn.head`. h11 unfolds an obsolete folded header line
    (RFC 9112 lets a client); we refuse it: no Work API answer has one, and a proxy on the
    way may have read it as two headers."""
    end = conn.head.find(b"\r\n\r\n")
    head = conn.head[:end] if end >= 0 else conn.head
    if b"\r\n " in head or b"\r\n\t" in head:
        raise httpx.RemoteProtocolError("folded header line in the response")
    del conn.head[:end + 4 if end >= 0 else len(conn.head)]


class _Sent:
    """A request as it left, for h11 to be told of when it reads the answer."""

    __slots__ = ("body", "headers", "method", "target")

    def __init__(self, method: bytes, target: bytes, headers: list[tuple[bytes, bytes]],
                 body: bytes) -> None:
        self.method, self.target, self.headers, self.body = method, target, headers, body


def _request_head(sent: _Sent) -> bytes:
    """The request's bytes up to its body, refused (httpx.LocalProtocolError) where h11 would
    refuse them: CR or LF in a header value, no Host, a body that does not match its
    Content-Length. Its body is sent as is: Transfer-Encoding is not ours to send."""
    line = sent.method + b" " + sent.target
    if not _REQUEST_LINE.fullmatch(line):
        raise httpx.LocalProtocolError(f"Illegal method or target {line[:80]!r}")
    host, length = False, None
    for name, value in sent.headers:
        if not _HEADER_NAME.fullmatch(name):
            raise httpx.LocalProtocolError(f"Illegal header name {name[:80]!r}")
        if not _HEADER_VALUE.fullmatch(value):
            raise httpx.LocalProtocolError(f"Illegal header value {value[:80]!r}")
        lowered = name.lower()
        host = host or lowered == b"host"
        if lowered == b"content-length":
            length = value
        elif lowered == b"transfer-encoding":
            raise httpx.LocalProtocolError("a request body is sent whole, not streamed")
    if not host:
        raise httpx.LocalProtocolError("Missing mandatory Host: header")
    if (sent.body or length is not None) and length != str(len(sent.body)).encode():
        raise httpx.LocalProtocolError("the body does not match its Content-Length")
    return b"".join([line, b" HTTP/1.1\r\n",
                     *[name + b": " + value + b"\r\n" for name, value in sent.headers], b"\r\n"])


def _plain_head(buffer: bytearray, end: int,
                sent: _Sent) -> tuple[int, bytes, list[tuple[bytes, bytes]], int] | None:
    """The status, reason, headers and body length of an answer whose head (up to `end`, its
    blank line) is in the plain form; None for any other: h11 reads it."""
    match = _PLAIN_HEAD.fullmatch(bytes(buffer[:end + 4]))
    if match is None or sent.method == b"HEAD":
        return None
    status = int(match.group(1))
    if status in (204, 304):
        return None  # no body whatever the headers say: h11 knows
    headers = _FIELD.findall(match.group(3))
    length = None
    for name, value in headers:
        lowered = name.lower()
        if lowered == b"content-length":
            if length is not None or not value.isdigit() or len(value) > _LENGTH_DIGITS:
                return None
            length = int(value)
        elif lowered in _FRAMING:
            return None
    if length is None:
        return None
    return status, match.group(2), headers, length


def _read_response(conn: _Buffered, sent: _Sent) -> Reading:
    """The answer, read plain when it is, else by h11 from its first byte."""
    buffer = conn.buffer
    while True:
        end = buffer.find(b"\r\n\r\n")
        if end >= 0:
            break
        if (conn.closed or len(buffer) > MAX_HEAD_BYTES or b"\n\n" in buffer
                or b"\n\r\n" in buffer):
            return (yield from _read_with_h11(conn, sent))
        yield
    plain = _plain_head(buffer, end, sent)
    if plain is None:
        return (yield from _read_with_h11(conn, sent))
    status, reason, headers, length = plain
    if length > MAX_BODY_BYTES:
        raise httpx.RemoteProtocolError("response body too large")
    whole = end + 4 + length
    while len(buffer) < whole:
        if conn.closed:
            raise httpx.RemoteProtocolError(
                "Server disconnected without sending a complete response.")
        yield
    body = bytes(buffer[end + 4:whole])
    conn.keep = len(buffer) == whole  # bytes beyond the answer: nothing to reuse
    del buffer[:whole]
    return Answer(status, reason, headers, body)


def _read_with_h11(conn: _Buffered, sent: _Sent) -> Reading:
    """h11 told of the request as it left, and fed the answer from its first byte."""
    machine = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD_BYTES)
    machine.send(h11.Request(method=sent.method, target=sent.target, headers=sent.headers))
    if sent.body:
        machine.send(h11.Data(data=sent.body))
    machine.send(h11.EndOfMessage())
    answer = yield from _read_events(conn, machine)
    conn.keep = (machine.our_state is h11.DONE and machine.their_state is h11.DONE
                 and not machine.trailing_data[0])
    return answer


def _read_events(conn: _Buffered, machine: h11.Connection) -> Reading:
    response: h11.Response | None = None
    parts: list[bytes] = []
    size = 0
    while True:
        event = yield from _next_event(conn, machine)
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


@contextmanager
def _dropped_on_failure(conn: _Buffered) -> Iterator[None]:
    """A request's failure raised as httpx's exception, and its connection closed: whatever
    happened mid-request (a protocol error, a broken socket, a timeout, a cancellation) leaves
    it in an unknown state."""
    try:
        yield
    except (h11.RemoteProtocolError, h11.LocalProtocolError) as exc:
        conn.close()
        raise httpx.RemoteProtocolError(str(exc)) from None
    except httpx.HTTPError:
        conn.close()
        raise
    except OSError as exc:
        conn.close()
        raise httpx.ReadError(str(exc) or type(exc).__name__) from exc
    except BaseException:
        conn.close()
        raise


async def _read_async(conn: _Connection, reading: Reading) -> Answer:
    """Drive a reader on an event loop: each time it needs bytes, wait for them."""
    try:
        while True:
            next(reading)
            await conn.more()
    except StopIteration as done:
        answer: Answer = done.value
        return answer


def _timeouts(request: httpx.Request) -> dict[str, float | None]:
    timeout: dict[str, float | None] = request.extensions.get("timeout", {})
    return timeout


class _Lean:
    """What both transports share: keep-alive connections per origin (scheme, host, port),
    reused newest first, up to a number in flight; TLS; the proxy rule."""

    def __init__(self, *, max_connections: int,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        # `max_connections` is the caller's limit of requests in flight: fewer connections
        # would queue requests the caller believes are on the wire.
        self._max_connections = max_connections
        self._ssl_context = ssl_context
        self._closed = False
        self.connections_opened = 0  # in all, for diagnostics and tests

    @property
    def max_connections(self) -> int:
        return self._max_connections

    @classmethod
    def for_url(cls, url: str, **options: Any) -> Self | None:
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


def _origin(url: httpx.URL) -> tuple[str, str, int]:
    return (url.scheme, url.host, url.port or (443 if url.scheme == "https" else 80))


def _checked(origin: tuple[str, str, int], closed: bool) -> None:
    if closed:
        raise httpx.ConnectError("the transport is closed")
    if origin[0] not in ("http", "https"):
        raise httpx.UnsupportedProtocol(f"unsupported scheme {origin[0]!r}")


class AsyncHTTP11Transport(_Lean, httpx.AsyncBaseTransport):
    """Keep-alive HTTP/1.1 connections per origin, reused newest first; one event loop only."""

    def __init__(self, *, max_connections: int,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        super().__init__(max_connections=max_connections, ssl_context=ssl_context)
        self._idle: dict[tuple[str, str, int], deque[_Connection]] = {}
        self._slots: dict[tuple[str, str, int], asyncio.Semaphore] = {}

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        try:
            answer = await self.exchange(
                _origin(request.url), request.method.encode(), request.url.raw_path,
                request.headers.raw, await request.aread(), _timeouts(request))
        except httpx.RequestError as exc:
            exc.request = request
            raise
        return answer.response()

    async def exchange(self, origin: tuple[str, str, int], method: bytes, target: bytes,
                       headers: list[tuple[bytes, bytes]], body: bytes,
                       timeout: dict[str, float | None]) -> Answer:
        """One request on a keep-alive connection of `origin` (scheme, host, port), its answer
        read whole: what `handle_async_request` does once httpx's request is taken apart, for
        a caller that sends the same request over and over and builds its bytes itself (the
        heartbeat). Failures raise httpx's exceptions, with no request attached."""
        _checked(origin, self._closed)
        slots = self._slots.get(origin)
        if slots is None:
            slots = self._slots[origin] = asyncio.Semaphore(self._max_connections)
        if slots.locked():  # a wait, bounded; a free slot is taken at once, with no timer
            try:
                async with asyncio.timeout(timeout.get("pool")):
                    await slots.acquire()
            except TimeoutError:
                raise httpx.PoolTimeout("no connection free in time") from None
        else:
            await slots.acquire()
        try:
            return await self._send(origin, method, target, headers, body, timeout)
        finally:
            slots.release()

    async def _send(self, origin: tuple[str, str, int], method: bytes, target: bytes,
                    headers: list[tuple[bytes, bytes]], body: bytes,
                    timeout: dict[str, float | None]) -> Answer:
        sent = _Sent(method, target, headers, body)
        # Refused before a connection is taken or a byte sent.
        message = _request_head(sent) + body
        conn = self._idle_connection(origin) or await self._connect(origin, timeout)
        assert conn.transport is not None
        conn.busy = True
        with _dropped_on_failure(conn):
            try:
                conn.transport.write(message)
                async with asyncio.timeout(timeout.get("read")):
                    response = await _read_async(conn, _read_response(conn, sent))
            except TimeoutError:
                raise httpx.ReadTimeout("timed out reading the response") from None
        self._finish(conn, origin)
        return response

    def _finish(self, conn: _Connection, origin: tuple[str, str, int]) -> None:
        """Back to the pool if the answer left it fit for another (`keep`: a plain answer with
        nothing beyond it, or h11's word on `Connection: close`, HTTP/1.0 and close-delimited
        bodies); else closed."""
        if conn.keep and not self._closed and not conn.closed:
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


class _SocketConnection(_Buffered):
    """One keep-alive connection on a blocking socket, used by one thread at a time."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__()
        self.sock = sock

    def reusable(self, now: float) -> bool:
        """Idle, open, recent, and silent: a socket readable while idle holds the server's
        hang-up or bytes nobody asked for, and is not reused."""
        if self.closed or self.buffer or now - self.idle_since >= KEEPALIVE_EXPIRY_SECONDS:
            return False
        # poll(2), not select(2): a worker with many sandboxes has descriptors past 1024.
        poller = select.poll()
        poller.register(self.sock, select.POLLIN)
        return not poller.poll(0)

    def close(self) -> None:
        super().close()
        self.sock.close()

    def read(self, reading: Reading, deadline: float | None) -> Answer:
        """Drive a reader: each time it needs bytes, receive them, until `deadline`
        (monotonic; None: no limit)."""
        try:
            while True:
                next(reading)
                self._receive(deadline)
        except StopIteration as done:
            answer: Answer = done.value
            return answer

    def _receive(self, deadline: float | None) -> None:
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            raise TimeoutError
        self.sock.settimeout(left)
        data = self.sock.recv(RECEIVE_BYTES)
        if not data:
            self.closed = True
        elif len(self.buffer) + len(data) > MAX_BUFFERED_BYTES:
            # As the event loop's connection: no answer is larger than the bound.
            self.close()
            self.buffer.clear()
        else:
            self.buffer += data


class HTTP11Transport(_Lean, httpx.BaseTransport):
    """The same HTTP/1.1 for `httpx.Client`, on blocking sockets: keep-alive connections per
    origin, reused newest first, shared by threads (each request holds its connection alone).

    Why: a poller run claims a burst from up to two dozen threads in one interpreter, and each
    claim's poll, ack and first heartbeat went through httpx's client and httpcore's pool: over
    a third of a claim's interpreter time (`python -m bench.claims` measures the claims of a
    burst both ways)."""

    def __init__(self, *, max_connections: int,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        super().__init__(max_connections=max_connections, ssl_context=ssl_context)
        self._idle: dict[tuple[str, str, int], deque[_SocketConnection]] = {}
        self._slots: dict[tuple[str, str, int], threading.BoundedSemaphore] = {}
        self._lock = threading.Lock()  # guards `_idle`, `_slots` and the counts

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        try:
            answer = self.exchange(
                _origin(request.url), request.method.encode(), request.url.raw_path,
                request.headers.raw, request.read(), _timeouts(request))
        except httpx.RequestError as exc:
            exc.request = request
            raise
        return answer.response()

    def exchange(self, origin: tuple[str, str, int], method: bytes, target: bytes,
                 headers: list[tuple[bytes, bytes]], body: bytes,
                 timeout: dict[str, float | None]) -> Answer:
        """One request on a keep-alive connection of `origin`, its answer read whole. Failures
        raise httpx's exceptions, with no request attached."""
        _checked(origin, self._closed)
        with self._lock:
            slots = self._slots.get(origin)
            if slots is None:
                slots = self._slots[origin] = threading.BoundedSemaphore(self._max_connections)
        if not slots.acquire(timeout=timeout.get("pool")):
            raise httpx.PoolTimeout("no connection free in time")
        try:
            return self._send(origin, method, target, headers, body, timeout)
        finally:
            slots.release()

    def _send(self, origin: tuple[str, str, int], method: bytes, target: bytes,
              headers: list[tuple[bytes, bytes]], body: bytes,
              timeout: dict[str, float | None]) -> Answer:
        sent = _Sent(method, target, headers, body)
        # Refused before a connection is taken or a byte sent.
        message = _request_head(sent) + body
        conn = self._idle_connection(origin) or self._connect(origin, timeout)
        conn.busy = True
        with _dropped_on_failure(conn):
            try:
                conn.sock.settimeout(timeout.get("write"))
                conn.sock.sendall(message)
            except TimeoutError:
                raise httpx.WriteTimeout("timed out sending the request") from None
            except OSError as exc:
                raise httpx.WriteError(str(exc) or type(exc).__name__) from exc
            read = timeout.get("read")
            deadline = None if read is None else time.monotonic() + read
            try:
                response = conn.read(_read_response(conn, sent), deadline)
            except TimeoutError:
                raise httpx.ReadTimeout("timed out reading the response") from None
        self._finish(conn, origin)
        return response

    def _finish(self, conn: _SocketConnection, origin: tuple[str, str, int]) -> None:
        """Back to the pool if the answer left it fit for another; else closed."""
        if conn.keep and not self._closed and not conn.closed:
            conn.busy = False
            conn.idle_since = time.monotonic()
            with self._lock:
                self._idle.setdefault(origin, deque()).append(conn)
        else:
            conn.close()

    def _idle_connection(self, origin: tuple[str, str, int]) -> _SocketConnection | None:
        now = time.monotonic()
        while True:
            with self._lock:
                idle = self._idle.get(origin)
                if not idle:
                    return None
                conn = idle.pop()  # newest first: the older ones expire unused
            if conn.reusable(now):
                return conn
            conn.close()

    def _connect(self, origin: tuple[str, str, int],
                 timeout: dict[str, float | None]) -> _SocketConnection:
        scheme, host, port = origin
        try:
            sock = socket.create_connection((host, port), timeout=timeout.get("connect"))
        except TimeoutError:
            raise httpx.ConnectTimeout(f"connecting to {host}:{port} timed out") from None
        except OSError as exc:
            raise httpx.ConnectError(str(exc) or type(exc).__name__) from exc
        try:
            # Each request leaves in one write, its answer read as it comes: no reason to wait
            # on Nagle's algorithm (asyncio sets the same on its connections).
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if scheme == "https":
                sock = self._tls().wrap_socket(sock, server_hostname=host)
        except TimeoutError:
            sock.close()
            raise httpx.ConnectTimeout(f"TLS with {host}:{port} timed out") from None
        except OSError as exc:
            sock.close()
            raise httpx.ConnectError(str(exc) or type(exc).__name__) from exc
        with self._lock:
            self.connections_opened += 1
        return _SocketConnection(sock)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle = [conn for pool in self._idle.values() for conn in pool]
            self._idle.clear()
        for conn in idle:
            conn.close()
