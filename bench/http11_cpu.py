"""CPU per heartbeat request of the client side, by transport: httpx's own and ours.

    python -m bench.http11_cpu [--requests 4000] [--concurrency 1 64 256]

A tiny keep-alive HTTP/1.1 server in another process answers every request with a heartbeat
reply, so the figure is the client process's own CPU time (request building, the transport,
parsing into the model) divided by the requests sent through `AsyncWorkClient.heartbeat`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import socket
import time
from typing import Any

import httpx

from dispatcher.control.heartbeat import MAX_CONCURRENT_REQUESTS
from dispatcher.workapi import AsyncWorkClient
from dispatcher.workapi.http11 import AsyncHTTP11Transport

BODY = (b'{"type":"work_heartbeat","last_heartbeat":"2026-01-01T00:00:01.123456Z",'
        b'"lease_extended":true,"state":"active","ttl_seconds":30}')
REPLY = (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
         + str(len(BODY)).encode() + b"\r\n\r\n" + BODY)
# Connections each transport may open: the heartbeat's limit of requests in flight.
MAX_CONNECTIONS = MAX_CONCURRENT_REQUESTS


def _serve(sock: socket.socket) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")  # requests here carry no body
                writer.write(REPLY)
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(handle, sock=sock, backlog=1024)
        await server.serve_forever()

    asyncio.run(main())


async def _measure(url: str, transport: Any, requests: int, concurrency: int) -> float:
    client = AsyncWorkClient(base_url=url, environment_id="env_bench", environment_key="k",
                             max_retries=0, transport=transport)
    limit = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with limit:
            await client.heartbeat(f"work_{i % 1000}", expected_last_heartbeat="t")

    await asyncio.gather(*(one(i) for i in range(concurrency)))  # warm: connections open
    start = time.process_time()
    await asyncio.gather(*(one(i) for i in range(requests)))
    spent = time.process_time() - start
    await client.close()
    return spent / requests * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 64, 256])
    args = parser.parse_args()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = multiprocessing.Process(target=_serve, args=(sock,), daemon=True)
    server.start()
    transports: dict[str, Any] = {
        "httpx": lambda: httpx.AsyncHTTPTransport(
            limits=httpx.Limits(max_connections=MAX_CONNECTIONS)),
        "http11": lambda: AsyncHTTP11Transport(max_connections=MAX_CONNECTIONS),
    }
    results: dict[str, dict[int, float]] = {}
    try:
        for name, make in transports.items():
            results[name] = {c: round(asyncio.run(_measure(url, make(), args.requests, c)), 3)
                             for c in args.concurrency}
    finally:
        server.terminate()
    print(json.dumps({"cpu_ms_per_request": results, "requests": args.requests}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
