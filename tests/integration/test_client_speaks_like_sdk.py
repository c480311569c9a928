"""Our client sends what the official SDK (2.17.0, the dev extra's pin) sends, endpoint by endpoint.

Both talk real HTTP to the emulator through a recording reverse proxy on 127.0.0.1, which keeps
each request's method, path, query, headers and body; the two recordings are then compared on
everything the service may judge. What may differ: the user agent, the SDK's own telemetry
headers (`x-stainless-*`), connection management, and the worker id's random part.
"""

from __future__ import annotations

import json
import re
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlsplit

import anthropic
import httpx
import pytest

from dispatcher.workapi import WorkClient
from dispatcher.workapi.client import default_worker_id

if TYPE_CHECKING:
    from conftest import EmulatorProcess

pytestmark = pytest.mark.integration

# Headers the two may differ on without the service seeing a different request.
NOT_COMPARED = re.compile(r"^(user-agent|x-stainless-.*|host|connection|accept-encoding|"
                          r"content-length|anthropic-worker-id|authorization)$")


@dataclass
class Recorded:
    method: str
    path: str
    query: list[tuple[str, str]]
    headers: dict[str, str]
    body: Any


class _Proxy(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, upstream: str) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.upstream = httpx.Client(base_url=upstream, timeout=30)
        self.recorded: list[Recorded] = []
        self.lock = threading.Lock()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as both clients expect
    server: _Proxy

    def _forward(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length) if length else b""
        parts = urlsplit(self.path)
        with self.server.lock:
            self.server.recorded.append(Recorded(
                self.command, parts.path, parse_qsl(parts.query, keep_blank_values=True),
                {k.lower(): v for k, v in self.headers.items()},
                json.loads(body) if body else None))
        headers = {k: v for k, v in self.headers.items()
                   if k.lower() not in ("host", "connection", "accept-encoding")}
        reply = self.server.upstream.request(self.command, self.path, content=body,
                                             headers=headers)
        self.send_response(reply.status_code)
        for name, value in reply.headers.items():
            if name.lower() not in ("content-length", "connection", "transfer-encoding",
                                    "content-encoding"):
                self.send_header(name, value)
        self.send_header("content-length", str(len(reply.content)))
        self.end_headers()
        self.wfile.write(reply.content)

    do_GET = do_POST = _forward

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def proxy(emulator: EmulatorProcess) -> Iterator[_Proxy]:
    server = _Proxy(emulator.base_url)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        server.upstream.close()


def _proxy_url(proxy: _Proxy) -> str:
    return f"http://127.0.0.1:{proxy.server_address[1]}"


def _sdk_calls(emu: EmulatorProcess, base_url: str, env: str, work_id: str) -> None:
    worker = anthropic.Anthropic(auth_token=emu.environment_key, base_url=base_url,
                                 max_retries=0)
    org = anthropic.Anthropic(api_key=emu.api_key, base_url=base_url, max_retries=0)
    work = worker.beta.environments.work
    polled = work.poll(env, block_ms=500, anthropic_worker_id=default_worker_id())
    assert polled is not None and polled.id == work_id
    work.ack(work_id, environment_id=env)
    work.heartbeat(work_id, environment_id=env, expected_last_heartbeat="NO_HEARTBEAT",
                   desired_ttl_seconds=60)
    work.list(env, limit=5)
    work.stats(env)
    org.beta.environments.work.retrieve(work_id, environment_id=env)
    org.beta.environments.work.update(work_id, environment_id=env, metadata={"k": "v"})
    work.stop(work_id, environment_id=env, force=True)
    worker.close()
    org.close()


def _our_calls(emu: EmulatorProcess, base_url: str, env: str, work_id: str) -> None:
    with WorkClient(base_url=base_url, environment_id=env, environment_key=emu.environment_key,
                    api_key=emu.api_key, worker_id=default_worker_id(), max_retries=0) as client:
        polled = client.poll(block_ms=500)
        assert polled is not None and polled.id == work_id
        client.ack(work_id)
        client.heartbeat(work_id, expected_last_heartbeat="NO_HEARTBEAT", desired_ttl_seconds=60)
        client.list(limit=5)
        client.stats()
        client.get(work_id)
        client.update(work_id, {"k": "v"})
        client.stop(work_id, force=True)


def _comparable(recorded: Recorded, work_id: str, emu: EmulatorProcess) -> dict[str, Any]:
    auth = recorded.headers.get("authorization", "")
    kind = {f"Bearer {emu.environment_key}": "environment key",
            f"Bearer {emu.api_key}": "organisation key"}.get(auth, f"other: {auth[:12]}")
    return {
        "method": recorded.method,
        "path": recorded.path.replace(work_id, "{work_id}"),
        "query": sorted(recorded.query),
        "headers": {k: v for k, v in sorted(recorded.headers.items())
                    if not NOT_COMPARED.match(k)},
        "credential": kind,
        "x-api-key": "x-api-key" in recorded.headers,
        "worker id": bool(re.fullmatch(rf"{re.escape(socket.gethostname())}-[0-9a-f]{{12}}",
                                       recorded.headers.get("anthropic-worker-id", ""))),
        "body": recorded.body,
    }


def test_each_endpoint_is_sent_as_the_sdk_sends_it(emulator: EmulatorProcess,
                                                   proxy: _Proxy) -> None:
    env = emulator.create_environment()
    url = _proxy_url(proxy)

    _, sdk_work = emulator.create_session(env)
    _sdk_calls(emulator, url, env, sdk_work)
    sdk = [_comparable(r, sdk_work, emulator) for r in proxy.recorded]
    proxy.recorded.clear()

    _, our_work = emulator.create_session(env)
    _our_calls(emulator, url, env, our_work)
    ours = [_comparable(r, our_work, emulator) for r in proxy.recorded]

    assert len(sdk) == len(ours) == 8
    for theirs, mine in zip(sdk, ours, strict=True):
        # stop and stats: ours, given both keys, sends the environment key, as the SDK's
        # worker client (which holds only that one) does.
        assert mine == theirs, f"{mine['method']} {mine['path']}"
    by_path = {(r["method"], r["path"]): r for r in ours}
    poll = by_path[("GET", f"/v1/environments/{env}/work/poll")]
    assert poll["headers"]["anthropic-version"] == "2026-10-21"
    assert poll["headers"]["anthropic-beta"] == "managed-agents-2026-04-01"
    assert poll["worker id"], "<host>-<12 hex>, as the SDK's poller names itself"
    assert all(("beta", "true") not in r["query"] for r in ours), "no ?beta=true, as the SDK"
