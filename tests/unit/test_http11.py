"""The lean HTTP/1.1 transports (blocking and event loop) against a real TCP server on 127.0.0.1
that answers with scripted bytes: framing (Content-Length, chunked, close-delimited, 1xx, 204),
keep-alive reuse, stale connections, timeouts and failures mapped to httpx's (and so to the
client's) errors; threads sharing the blocking one."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, cast

import h11
import httpx
import pytest

from dispatcher.control.heartbeat import MAX_CONCURRENT_REQUESTS
from dispatcher.workapi import (
    AsyncWorkClient,
    RequestTimeout,
    TransientError,
    WorkClient,
    http11,
)
from dispatcher.workapi.http11 import AsyncHTTP11Transport

HEARTBEAT = (b'{"type":"work_heartbeat","last_heartbeat":"2026-01-01T00:00:01Z",'
             b'"lease_extended":true,"state":"active","ttl_seconds":30}')


def ok(body: bytes = b"{}", *extra: bytes) -> bytes:
    head = [b"HTTP/1.1 200 OK", b"content-type: application/json",
            b"content-length: %d" % len(body), *extra]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


@dataclass
class Server:
    """Answers the n-th request with `script[n]` (the last repeats): bytes to write, or a
    callable that writes (and may close, or wait)."""

    script: list[bytes | Callable[[asyncio.StreamWriter], Awaitable[None]]]
    requests: list[bytes] = field(default_factory=list)
    connections: int = 0
    port: int = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                self.requests.append(head + await reader.readexactly(length))
                step = self.script[min(len(self.requests), len(self.script)) - 1]
                if callable(step):
                    await step(writer)
                    if writer.is_closing():
                        return
                else:
                    writer.write(step)
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass  # the client went away, or the test is over
        finally:
            writer.close()

    async def __aenter__(self) -> Server:
        self._server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._server.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class Flavour:
    """One transport under test, driven from the test's thread: the blocking one directly, the
    event loop's on the server's loop (its connections belong to one loop), each behind an
    httpx client of its kind."""

    def __init__(self, name: str, loop: asyncio.AbstractEventLoop, max_connections: int) -> None:
        self.name, self.loop = name, loop
        self.transport: http11.HTTP11Transport | AsyncHTTP11Transport
        if name == "blocking":
            self.transport = http11.HTTP11Transport(max_connections=max_connections)
            self.client: Any = httpx.Client(transport=self.transport, timeout=2)
        else:
            self.transport = AsyncHTTP11Transport(max_connections=max_connections)
            self.client = httpx.AsyncClient(transport=self.transport, timeout=2)

    def on_loop(self, coroutine: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=30)

    def request(self, method: str, url: str, **options: Any) -> httpx.Response:
        if self.name == "blocking":
            return cast(httpx.Response, self.client.request(method, url, **options))
        return cast(httpx.Response, self.on_loop(self.client.request(method, url, **options)))

    def get(self, url: str, **options: Any) -> httpx.Response:
        return self.request("GET", url, **options)

    def idle(self) -> list[Any]:
        return [conn for pool in self.transport._idle.values() for conn in pool]

    def close(self) -> None:
        if self.name == "blocking":
            self.client.close()
        else:
            self.on_loop(self.client.aclose())


FLAVOURS = ["blocking", "event-loop"]


@contextmanager
def serving(script: list[Any], flavour: str,
            max_connections: int = MAX_CONCURRENT_REQUESTS) -> Iterator[tuple[Server, Flavour]]:
    """The scripted server on an event loop of its own thread, and a client of `flavour`."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server = Server(script)
    try:
        asyncio.run_coroutine_threadsafe(server.__aenter__(), loop).result(timeout=10)
        client = Flavour(flavour, loop, max_connections)
        try:
            yield server, client
        finally:
            client.close()
            asyncio.run_coroutine_threadsafe(server.__aexit__(), loop).result(timeout=10)
    finally:
        # As `asyncio.run` ends: handlers still waiting are cancelled, and close their sockets.
        asyncio.run_coroutine_threadsafe(_cancel_the_rest(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


async def _cancel_the_rest() -> None:
    rest = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    for task in rest:
        task.cancel()
    await asyncio.gather(*rest, return_exceptions=True)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_a_request_is_sent_as_built_and_its_connection_reused(flavour: str) -> None:
    with serving([ok(b'{"n":1}'), ok(b'{"n":2}')], flavour) as (server, client):
        first = client.request("POST", f"{server.url}/v1/x?beta=true&a=b%20c",
                               json={"force": True}, headers={"authorization": "Bearer k"})
        second = client.get(f"{server.url}/v1/y")
    assert first.json() == {"n": 1} and second.json() == {"n": 2}
    assert server.connections == 1
    sent = server.requests[0]
    assert sent.startswith(b"POST /v1/x?beta=true&a=b%20c HTTP/1.1\r\n")
    assert b"\r\nauthorization: Bearer k\r\n" in sent
    assert sent.endswith(b'\r\n\r\n{"force":true}')
    assert server.requests[1].startswith(b"GET /v1/y HTTP/1.1\r\n")


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_chunked_close_delimited_informational_and_empty_answers(flavour: str) -> None:
    chunked = (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
               b"4;ext=1\r\n{\"a\"\r\n4\r\n:12}\r\n0\r\ntrailer: x\r\n\r\n")
    informational = b"HTTP/1.1 100 Continue\r\n\r\n" + ok(b"[1]")
    no_content = b"HTTP/1.1 204 No Content\r\n\r\n"
    close_delimited = b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n{\"end\":true}"

    async def close_after(writer: asyncio.StreamWriter) -> None:
        writer.write(close_delimited)
        await writer.drain()
        writer.close()

    script = [chunked, informational, no_content, close_after, ok(b"[2]")]
    with serving(script, flavour) as (server, client):
        answers = [client.get(f"{server.url}/{i}") for i in range(5)]
    assert answers[0].json() == {"a": 12}
    assert answers[1].status_code == 200 and answers[1].json() == [1]
    assert answers[2].status_code == 204 and answers[2].content == b""
    assert answers[3].json() == {"end": True}
    assert answers[4].json() == [2]
    assert server.connections == 2  # the close-delimited answer ended its connection


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_a_connection_the_server_closed_or_wrote_to_while_idle_is_not_reused(
        flavour: str) -> None:
    async def then_close(writer: asyncio.StreamWriter) -> None:
        writer.write(ok(b"1"))
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.close()  # as a server's keep-alive timeout would

    async def then_408(writer: asyncio.StreamWriter) -> None:
        writer.write(ok(b"2") + b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\n\r\n")
        await writer.drain()

    with serving([then_close, then_408, ok(b"3")], flavour) as (server, client):
        answers = []
        for i in range(3):
            answers.append(client.get(f"{server.url}/{i}").content)
            time.sleep(0.2)
    assert answers == [b"1", b"2", b"3"]
    assert server.connections == 3


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize(
    ("answer", "problem"),
    [
        (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n-5\r\nabcde\r\n0\r\n\r\n",
         "chunk"),
        (b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 12\r\n\r\n{}xxxxxxxxxx",
         "Content-Length"),
        (b"HTTP/1.1 200 OK\r\ncontent-length: -2\r\n\r\n{}", "Content-Length"),
        (b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nx-a: 1\r\n x-smuggled: 2\r\n\r\n{}",
         "folded"),
        (b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nx-a: 1\r\n\tmore\r\n\r\n{}", "folded"),
        (b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nno colon here\r\n\r\n{}", ""),
        (b"HTTP/2 200\r\ncontent-length: 2\r\n\r\n{}", ""),
    ],
    ids=["negative-chunk", "conflicting-length", "negative-length", "folded-space",
         "folded-tab", "no-colon", "not-http11"],
)
def test_a_malformed_answer_is_a_protocol_error_and_its_connection_is_dropped(
        answer: bytes, problem: str, flavour: str) -> None:
    with serving([answer, ok(b'{"fine":1}')], flavour) as (server, client):
        with pytest.raises(httpx.RemoteProtocolError) as raised:
            client.get(f"{server.url}/bad")
        after = client.get(f"{server.url}/next").json()
    assert problem in str(raised.value)
    assert after == {"fine": 1} and server.connections == 2


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_cr_or_lf_in_a_header_value_is_refused_before_a_byte_is_sent(flavour: str) -> None:
    with serving([ok()], flavour) as (server, client):
        refused = []
        for value in ("a\r\nx-injected: 1", "a\nb", "a\rb"):
            try:
                client.get(f"{server.url}/", headers={"anthropic-worker-id": value})
            except httpx.LocalProtocolError as exc:
                refused.append(str(exc))
    assert len(refused) == 3 and all("header value" in text for text in refused)
    assert server.requests == []


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_bytes_arriving_on_an_idle_connection_close_it_and_are_not_kept(flavour: str) -> None:
    """A server (or something on the path) that streams into an idle connection must not
    fill the worker's memory: the connection is closed on the first unasked-for byte (the event
    loop's at once, the blocking one's before it would be reused), never read into a buffer."""
    flood = b"x" * (4 * 1024 * 1024)

    async def then_flood(writer: asyncio.StreamWriter) -> None:
        writer.write(ok(b"1"))
        await writer.drain()
        await asyncio.sleep(0.05)
        try:
            for _ in range(8):  # up to 32 MB, unless the client hangs up first
                writer.write(flood)
                await writer.drain()
        except ConnectionError:
            pass

    with serving([then_flood, ok(b"2")], flavour, max_connections=4) as (server, client):
        first = client.get(f"{server.url}/1").content
        time.sleep(0.3)
        idle = client.idle()
        held = [len(conn.buffer) for conn in idle]
        closed_at_once = [conn.closed for conn in idle]
        second = client.get(f"{server.url}/2").content
        closed = [conn.closed for conn in idle]
    assert first == b"1" and second == b"2"
    assert held == [0] and closed == [True]
    if flavour == "event-loop":
        assert closed_at_once == [True]
    assert server.connections == 2


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_failures_are_httpx_errors_the_client_maps_to_transient_ones(flavour: str) -> None:
    async def silent(writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(5)

    async def hang_up(writer: asyncio.StreamWriter) -> None:
        writer.close()

    with serving([silent, hang_up], flavour) as (server, client):
        raised = []
        for timeout in (0.2, 2.0):
            try:
                client.get(f"{server.url}/", timeout=timeout)
            except httpx.HTTPError as exc:
                raised.append(type(exc))
        with pytest.raises(httpx.ConnectError):
            client.get("http://127.0.0.1:9/")  # discard: nothing listens
    assert raised == [httpx.ReadTimeout, httpx.RemoteProtocolError]


def test_the_work_clients_over_them_parse_replies_and_map_errors() -> None:
    async def silent(writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(5)

    async def hang_up(writer: asyncio.StreamWriter) -> None:
        writer.close()

    options: dict[str, Any] = {"environment_id": "env_1", "environment_key": "sk-ant-oat01-k",
                               "max_retries": 0}

    def beat_thrice(beat: Callable[[float | None], Any]) -> list[Any]:
        out: list[Any] = [beat(None)]
        for _ in range(2):
            try:
                beat(0.3)
            except TransientError as exc:
                out.append(type(exc))
        return out

    script: list[Any] = [ok(HEARTBEAT), silent, hang_up]
    with serving(script, "event-loop") as (server, flavour):
        on_loop = AsyncWorkClient(base_url=server.url, **options, transport=AsyncHTTP11Transport(
            max_connections=MAX_CONCURRENT_REQUESTS))
        outcomes = [beat_thrice(lambda timeout: flavour.on_loop(on_loop.heartbeat(
            "work_1", expected_last_heartbeat="t", timeout=timeout)))]
        flavour.on_loop(on_loop.close())
    with serving(script, "blocking") as (server, _), WorkClient(
            base_url=server.url, **options,
            transport=http11.HTTP11Transport(max_connections=4)) as blocking:
        outcomes.append(beat_thrice(lambda timeout: blocking.heartbeat(
            "work_1", expected_last_heartbeat="t", timeout=timeout)))
    for beat, timeout, dropped in outcomes:
        assert beat.last_heartbeat == "2026-01-01T00:00:01Z" and beat.ttl_seconds == 30
        assert timeout is RequestTimeout
        assert dropped is TransientError


def test_threads_share_the_blocking_transport_each_request_on_a_connection_of_its_own() -> None:
    """A poller run's claim threads send side by side through one client: each answer reaches
    the thread that asked, no more connections open than requests were in flight at once, and
    beyond `max_connections` a request waits for a free one."""
    async def echo_slowly(writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(0.05)
        writer.write(ok(b"{}"))
        await writer.drain()

    with serving([echo_slowly], "blocking", max_connections=4) as (server, client):
        def one(i: int) -> str:
            answer = client.get(f"{server.url}/{i}")
            return str(answer.request.url.path)

        with ThreadPoolExecutor(8) as pool:
            paths = list(pool.map(one, range(32)))
        opened = client.transport.connections_opened
    assert paths == [f"/{i}" for i in range(32)]
    assert opened == 4, "four in flight at most, their connections reused"
    assert len(server.requests) == 32


@pytest.mark.parametrize("transport", [http11.HTTP11Transport, AsyncHTTP11Transport])
def test_a_proxy_from_the_environment_keeps_httpx_own_transport(
        monkeypatch: pytest.MonkeyPatch, transport: type[Any]) -> None:
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "HTTP_PROXY",
                 "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    assert transport.for_url("https://api.anthropic.com", max_connections=1) is not None
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.internal:3128")
    assert transport.for_url("https://api.anthropic.com", max_connections=1) is None
    assert transport.for_url("http://127.0.0.1:8765", max_connections=1) is not None
    monkeypatch.setenv("NO_PROXY", "api.anthropic.com")
    assert transport.for_url("https://api.anthropic.com", max_connections=1) is not None


# --- the plain reading against h11's --------------------------------------------------------
def _read(answer: bytes, reader: Callable[..., http11.Reading], method: bytes = b"GET") -> Any:
    """`reader`'s outcome for an answer whose every byte has arrived, and then the end of the
    stream: the answer and whether the connection could be reused, or the error's type."""
    sent = http11._Sent(method, b"/x", [(b"host", b"h")], b"")
    conn = http11._Buffered()
    conn.busy, conn.closed = True, True
    conn.buffer += answer
    reading = reader(conn, sent)
    try:
        next(reading)
    except StopIteration as done:
        got = done.value
    except (httpx.HTTPError, h11.ProtocolError) as exc:
        return type(exc).__name__
    else:
        raise AssertionError("the reader waited for bytes after the stream's end")
    return got.status, got.reason, got.headers, got.body, conn.keep


@pytest.mark.parametrize("answer", [
    ok(HEARTBEAT, b"date: Mon, 07 Dec 2026 00:00:00 GMT", b"server: uvicorn"),
    ok(b"{}", b"x-obs: caf\xc3\xa9 \t au  lait", b"x-empty:", b"X-Mixed-Case:  v  "),
    ok(b"{}") + b"HTTP/1.1 200 OK\r\n",  # bytes beyond the answer: not reused
    ok(b"{}")[:-1],  # the body cut short
    ok(b"{}", b"content-length: 2"),  # the same length twice
    ok(b"{}", b"content-length: 3"),
    ok(b"{}").replace(b"content-length: 2", b"content-length: +2"),
    ok(b"{}").replace(b"content-length: 2", b"content-length: 99999999999999999999"),
    ok(b"{}").replace(b"content-length: 2", b"content-length : 2"),
    ok(b"{}").replace(b"200 OK", b"200"),
    ok(b"{}").replace(b"200 OK", b"099 Odd"),
    ok(b"{}").replace(b"HTTP/1.1", b"HTTP/1.0"),
    ok(b"{}").replace(b"\r\n", b"\n"),
    ok(b"{}", b"connection: close"),
    ok(b"{}", b"x-a: 1", b" x-smuggled: 2"),
    ok(b"{}", b"x-nul: a\x00b"),
    ok(b"{}", b"x-ctl: a\x01b"),
    ok(b"{}", b"x-\x80: 1"),
    ok(b"{}", b"transfer-encoding: chunked"),
    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
    b"HTTP/1.1 100 Continue\r\n\r\n" + ok(b"[1]"),
    b"HTTP/1.1 204 No Content\r\ncontent-length: 2\r\n\r\n{}",
    b"HTTP/1.1 200 OK\r\n\r\n{\"end\":true}",
    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n",  # no end of head
    b"",
], ids=["uvicorn", "odd-values", "trailing", "short-body", "length-twice", "length-conflict",
        "length-plus", "length-huge", "space-before-colon", "no-reason", "status-099",
        "http10", "bare-lf", "connection-close", "folded", "nul", "control", "obs-name",
        "chunked-with-length", "chunked", "informational", "no-content", "close-delimited",
        "cut-head", "nothing"])
def test_a_plain_reading_gives_what_h11_gives(answer: bytes) -> None:
    """Whatever the answer, reading it (plain where it is plain) gives the same status, reason,
    headers, body and reuse as h11 reading it from its first byte, or the same refusal."""
    assert _read(answer, http11._read_response) == _read(answer, http11._read_with_h11)


def test_a_plain_answer_is_read_without_h11() -> None:
    head = ok(b"{}", b"date: x")
    end = head.index(b"\r\n\r\n")
    sent = http11._Sent(b"POST", b"/x", [(b"host", b"h")], b"")
    assert http11._plain_head(bytearray(head), end, sent) == (
        200, b"OK", [(b"content-type", b"application/json"), (b"content-length", b"2"),
                     (b"date", b"x")], 2)
    assert http11._plain_head(bytearray(head), end, http11._Sent(b"HEAD", b"/x", [], b"")) is None


@pytest.mark.parametrize(("method", "target", "headers", "body", "problem"), [
    (b"GET", b"/a b", [(b"host", b"h")], b"", "target"),
    (b"G T", b"/", [(b"host", b"h")], b"", "method"),
    (b"GET", b"/", [(b"ho st", b"h")], b"", "header name"),
    (b"GET", b"/", [(b"host", b"h\x00")], b"", "header value"),
    (b"GET", b"/", [(b"host", b" h")], b"", "header value"),
    (b"GET", b"/", [], b"", "Host"),
    (b"POST", b"/", [(b"host", b"h")], b"{}", "Content-Length"),
    (b"POST", b"/", [(b"host", b"h"), (b"content-length", b"3")], b"{}", "Content-Length"),
    (b"POST", b"/", [(b"host", b"h"), (b"transfer-encoding", b"chunked")], b"{}", "streamed"),
], ids=["space-in-target", "space-in-method", "space-in-name", "nul-in-value",
        "leading-space", "no-host", "no-length", "wrong-length", "transfer-encoding"])
def test_a_request_h11_would_refuse_is_refused(method: bytes, target: bytes,
                                              headers: list[tuple[bytes, bytes]], body: bytes,
                                              problem: str) -> None:
    """Refused as h11 refuses it; and a body to stream, which h11 would frame in chunks: we
    send whole bodies only."""
    with pytest.raises(httpx.LocalProtocolError, match=problem):
        http11._request_head(http11._Sent(method, target, headers, body))
    if problem == "streamed":
        return
    with pytest.raises(h11.LocalProtocolError):  # h11 refuses it too
        machine = h11.Connection(h11.CLIENT)
        machine.send(h11.Request(method=method, target=target, headers=headers))
        machine.send(h11.Data(data=body))
        machine.send(h11.EndOfMessage())
