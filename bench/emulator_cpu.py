"""The emulator's own CPU per request, by endpoint: create, poll, ack, heartbeat, list.

    python -m bench.emulator_cpu [--leases 2000] [--rounds 3] [--concurrency 64]
                                 [--profile DIR]

Starts an emulator process (and, unless `DISPATCHER_REDIS_URL` names one, a Redis of its own),
then sends each kind of request in turn from a lean keep-alive HTTP/1.1 client in this process:
`--leases` sessions created, each item polled, acked and claimed (a `NO_HEARTBEAT` heartbeat),
then `--rounds` heartbeats of every lease with the token of the last, then `list` pages of 100.
The figure of a phase is the emulator process's user+system CPU (from /proc) over the phase
divided by its requests: what the emulator spends per request, whatever the client costs.
With `--profile DIR`, each phase is also sampled by py-spy (`pip install py-spy`), one file of
collapsed stacks per phase (`DIR/<phase>.txt`): where that CPU goes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from bench.proc import cpu_seconds
from dispatcher.emulator.config import MAX_LIST_LIMIT
from dispatcher.ops.stack import API_HEADERS, LocalStack, free_port

# The heartbeat a fleet asks for at the capacity target (20,000 leases, a beat every 10 s).
TTL_SECONDS = 30
NO_RECLAIM_MS = 600_000
# py-spy's samples a second with `--profile`: enough for a phase of a few seconds, at a cost to
# the emulator (py-spy reads its memory from outside) that the CPU figures do not count.
PROFILE_RATE_HZ = 500
# py-spy attaches in about half a second; a phase started before it would be missed in part.
PROFILE_ATTACH_S = 1.0


class _Connection:
    """One keep-alive connection; a request at a time, the reply's body as bytes."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def request(self, head: bytes, body: bytes = b"") -> tuple[int, bytes]:
        self.writer.write(head + body)
        status_line = await self.reader.readuntil(b"\r\n\r\n")
        status = int(status_line[9:12])
        length = 0
        for line in status_line.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        return status, await self.reader.readexactly(length) if length else b""


class Client:
    """A pool of keep-alive connections, each request built by hand: little client CPU, so the
    machine's cores go to the emulator being measured."""

    def __init__(self, host: str, port: int, connections: int) -> None:
        self.host, self.port, self.size = host, port, connections
        self.free: asyncio.Queue[_Connection] = asyncio.Queue()

    async def open(self) -> None:
        for _ in range(self.size):
            reader, writer = await asyncio.open_connection(self.host, self.port)
            self.free.put_nowait(_Connection(reader, writer))

    async def send(self, method: str, path: str, headers: dict[str, str],
                   body: Any = None) -> tuple[int, Any]:
        raw = json.dumps(body).encode() if body is not None else b""
        lines = [f"{method} {path} HTTP/1.1", f"host: {self.host}:{self.port}",
                 *(f"{k}: {v}" for k, v in headers.items()), f"content-length: {len(raw)}"]
        if raw:
            lines.append("content-type: application/json")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode()
        connection = await self.free.get()
        try:
            status, reply = await connection.request(head, raw)
        finally:
            self.free.put_nowait(connection)
        return status, json.loads(reply) if reply else None

    async def close(self) -> None:
        while not self.free.empty():
            self.free.get_nowait().writer.close()


class _Profiler:
    """py-spy sampling the emulator through one phase, to `DIR/<phase>.txt` (collapsed stacks)."""

    def __init__(self, directory: Path | None, pid: int) -> None:
        self.directory, self.pid = directory, pid
        self.process: subprocess.Popen[bytes] | None = None

    async def start(self, phase: str) -> None:
        if self.directory is None:
            return
        self.process = subprocess.Popen(
            [shutil.which("py-spy") or "py-spy", "record", "--pid", str(self.pid),
             "--format", "raw", "--rate", str(PROFILE_RATE_HZ), "--nonblocking",
             "-o", str(self.directory / f"{phase}.txt")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        await asyncio.sleep(PROFILE_ATTACH_S)

    def stop(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGINT)  # py-spy writes its file, then exits
            self.process.wait()
            self.process = None


async def _phase(name: str, pid: int, jobs: list[Callable[[], Awaitable[Any]]],
                 concurrency: int, results: dict[str, Any],
                 profiler: _Profiler | None = None) -> list[Any]:
    if profiler is not None:
        await profiler.start(name)
    try:
        return await _measured(name, pid, jobs, concurrency, results)
    finally:
        if profiler is not None:
            profiler.stop()


async def _measured(name: str, pid: int, jobs: list[Callable[[], Awaitable[Any]]],
                    concurrency: int, results: dict[str, Any]) -> list[Any]:
    limit = asyncio.Semaphore(concurrency)

    async def one(job: Callable[[], Awaitable[Any]]) -> Any:
        async with limit:
            return await job()

    load = os.getloadavg()[0]
    cpu, wall = cpu_seconds(pid), time.monotonic()
    found = list(await asyncio.gather(*(one(job) for job in jobs)))
    spent, took = cpu_seconds(pid) - cpu, time.monotonic() - wall
    results[name] = {"requests": len(jobs), "emulator_cpu_ms": round(spent / len(jobs) * 1000, 3),
                     "per_s": round(len(jobs) / took), "load_1min": round(load, 2)}
    print(f"{name}: {results[name]}", flush=True)
    return found


async def drive(stack: LocalStack, pid: int, *, leases: int, rounds: int,
                concurrency: int, profile: Path | None = None) -> dict[str, Any]:
    host, port = stack.base_url.removeprefix("http://").split(":")
    client = Client(host, int(port), concurrency)
    await client.open()
    org = {**API_HEADERS, "x-api-key": stack.api_key}
    env = {**API_HEADERS, "authorization": f"Bearer {stack.environment_key}"}
    environment = stack.environment_id
    work = f"/v1/environments/{environment}/work"
    results: dict[str, Any] = {}
    profiler = _Profiler(profile, pid)
    body = {"environment_id": environment, "agent": "bench", "metadata": {}}
    await _phase("create", pid, [lambda: client.send("POST", "/v1/sessions", org, body)] * leases,
                 concurrency, results, profiler)
    # No reclaim: on a loaded machine a poll phase may outlast the default 5 s, and an item
    # delivered twice would be claimed twice.
    poll = f"{work}/poll?reclaim_older_than_ms={NO_RECLAIM_MS}"
    polled = await _phase("poll", pid, [lambda: client.send("GET", poll, env)] * leases,
                          concurrency, results, profiler)
    ids = [item["id"] for status, item in polled if status == 200 and item]
    await _phase("ack", pid, [lambda w=w: client.send("POST", f"{work}/{w}/ack", env)
                              for w in ids], concurrency, results, profiler)
    tokens: dict[str, str] = {w: "NO_HEARTBEAT" for w in ids}

    def beat(w: str) -> Callable[[], Awaitable[Any]]:
        async def send() -> None:
            path = (f"{work}/{w}/heartbeat?expected_last_heartbeat={tokens[w]}"
                    f"&desired_ttl_seconds={TTL_SECONDS}")
            status, reply = await client.send("POST", path, env)
            if status != 200:
                raise RuntimeError(f"heartbeat {w}: {status} {reply}")
            tokens[w] = reply["last_heartbeat"]
        return send

    await _phase("claim", pid, [beat(w) for w in ids], concurrency, results, profiler)
    for _ in range(rounds):
        await _phase("heartbeat", pid, [beat(w) for w in ids], concurrency, results, profiler)
    pages = max(1, leases // 10)
    await _phase("list", pid, [lambda: client.send("GET", f"{work}?limit={MAX_LIST_LIMIT}", env)]
                 * pages, min(concurrency, 8), results, profiler)
    await client.close()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--leases", type=int, default=2000,
                        help="sessions created, polled, acked and claimed (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="heartbeats of every lease after its claim (default %(default)s)")
    parser.add_argument("--concurrency", type=int, default=64,
                        help="requests in flight at once, one connection each (default "
                             "%(default)s)")
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="sample each phase with py-spy into DIR/<phase>.txt")
    parser.add_argument("--emulator-arg", action="append", default=[],
                        help="passed on to `dispatcher emulator` (repeatable)")
    args = parser.parse_args()
    if args.profile is not None:
        if shutil.which("py-spy") is None:
            parser.error("--profile needs py-spy on PATH (pip install py-spy)")
        args.profile.mkdir(parents=True, exist_ok=True)
    redis_url = os.environ.get("DISPATCHER_REDIS_URL") or f"redis://127.0.0.1:{free_port()}/0"
    with tempfile.TemporaryDirectory() as workdir:
        stack = LocalStack(workdir=Path(workdir), redis_url=redis_url,
                           key_prefix=f"bench-emucpu-{os.getpid()}")
        try:
            stack.ensure_redis()
            stack.start_emulator(*args.emulator_arg)
            pid = stack.processes["emulator"].pid
            results = asyncio.run(drive(stack, pid, leases=args.leases, rounds=args.rounds,
                                        concurrency=args.concurrency,
                                        profile=args.profile))
        finally:
            stack.stop_all()
            _forget(stack)
    print(json.dumps(results, indent=2))
    return 0


def _forget(stack: LocalStack) -> None:
    """Delete this run's keys from a Redis that outlives it."""
    import redis

    client = redis.Redis.from_url(stack.redis_url)
    for key in client.scan_iter(match=f"{stack.key_prefix}*", count=1000):
        client.delete(key)
    client.close()


if __name__ == "__main__":
    raise SystemExit(main())
