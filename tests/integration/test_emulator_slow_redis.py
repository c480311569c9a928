"""A Redis slow to answer (a loaded machine, a fork for a snapshot) delays the emulator's
answers; it never turns them into 500s.

redis-py gives up on a reply after 5 s by default (`socket_timeout`), and under load 20+ on two
cores a long poll's reply (a second's block) and the request's own turn on the event loop can
take that long: the request was answered 500 (a `TimeoutError` from the client). Here every
reply from Redis to the emulator is held back for longer than that, by a relay between them.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import httpx
import pytest

from tests.support.isolation import EMULATOR_DB, free_port, redis_url

if TYPE_CHECKING:
    from conftest import EmulatorProcess

pytestmark = pytest.mark.integration

# Longer than redis-py's default reply timeout (5 s), by a margin a loaded machine keeps.
HELD_S = 7.0
CHUNK = 65536


class HoldingRelay:
    """A TCP relay to Redis whose replies can be held back (`hold`) and let go (`release`)."""

    def __init__(self, host: str, port: int) -> None:
        self.upstream = (host, port)
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        self._open = asyncio.Event()
        self._writers: list[asyncio.StreamWriter] = []
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self._ready.wait(5)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self._open.set()
        server = self.loop.run_until_complete(
            asyncio.start_server(self._relay, "127.0.0.1", self.port))
        self._ready.set()
        self.loop.run_forever()
        server.close()
        for writer in self._writers:
            writer.close()
        self.loop.run_until_complete(server.wait_closed())
        self.loop.run_until_complete(asyncio.sleep(0))  # the transports' closing callbacks
        self.loop.close()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        self._writers += [writer, up_writer]

        async def pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter,
                       gated: bool) -> None:
            while chunk := await source.read(CHUNK):
                if gated:
                    await self._open.wait()
                sink.write(chunk)
                await sink.drain()
            sink.close()

        await asyncio.gather(pump(reader, up_writer, False), pump(up_reader, writer, True),
                             return_exceptions=True)

    def hold(self) -> None:
        self.loop.call_soon_threadsafe(self._open.clear)

    def release(self) -> None:
        self.loop.call_soon_threadsafe(self._open.set)

    def close(self) -> None:
        self.release()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)


@pytest.fixture
def relay() -> Iterator[HoldingRelay]:
    target = urlsplit(redis_url(EMULATOR_DB))
    found = HoldingRelay(target.hostname or "127.0.0.1", target.port or 6379)
    yield found
    found.close()


def test_replies_held_past_redis_pys_timeout_are_answered_late_not_500(
        emulator_factory: Callable[..., EmulatorProcess], relay: HoldingRelay) -> None:
    emu = emulator_factory("--redis-url", f"redis://127.0.0.1:{relay.port}/{EMULATOR_DB}")
    env = emu.create_environment()
    for _ in range(2):
        emu.create_session(env)
    with httpx.Client(base_url=emu.base_url, timeout=60) as client:
        def poll(block: bool) -> int:
            params = {"block_ms": 999} if block else {}
            return client.get(emu.work_url(env, "/poll"), params=params,
                              headers=emu.env_headers).status_code

        def stats() -> int:
            return client.get(emu.work_url(env, "/stats"),
                              headers=emu.org_headers).status_code

        relay.hold()
        with ThreadPoolExecutor(3) as pool:
            answers = [pool.submit(poll, True), pool.submit(poll, False), pool.submit(stats)]
            time.sleep(HELD_S)
            early = [a.result() for a in answers if a.done()]
            assert early == [], "answered while Redis's replies were held"
            relay.release()
            statuses = [a.result() for a in answers]
    assert statuses == [200, 200, 200]
