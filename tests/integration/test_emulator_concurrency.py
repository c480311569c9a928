"""Concurrent callers: pollers never receive one item twice (no reclaim in play), and a process
never decides on its memory of an item another process has changed."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING

import httpx
import pytest

if TYPE_CHECKING:
    from conftest import EmulatorProcess

pytestmark = pytest.mark.integration

POLLERS = 8
ITEMS = 160
NO_RECLAIM_MS = 600_000  # far beyond the test, so every delivery is a first delivery


def test_concurrent_pollers_get_each_item_once(emulator: EmulatorProcess) -> None:
    env = emulator.create_environment()
    created = {emulator.create_session(env)[1] for _ in range(ITEMS)}
    delivered: list[str] = []
    lock = threading.Lock()
    deadline = time.monotonic() + 30

    def poller(index: int) -> None:
        with httpx.Client(base_url=emulator.base_url, timeout=10,
                          headers={**emulator.env_headers,
                                   "anthropic-worker-id": f"w{index}"}) as client:
            empty = 0
            while empty < 3 and time.monotonic() < deadline:
                work = client.get(emulator.work_url(env, "/poll"),
                                  params={"block_ms": 50,
                                          "reclaim_older_than_ms": NO_RECLAIM_MS}).json()
                if work is None:
                    empty += 1
                    continue
                empty = 0
                with lock:
                    delivered.append(work["id"])
                if len(delivered) % 2:  # ack half: acked or not, no second delivery
                    client.post(emulator.work_url(env, f"/{work['id']}/ack"))

    threads = [threading.Thread(target=poller, args=(i,)) for i in range(POLLERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    duplicates = [w for w, n in Counter(delivered).items() if n > 1]
    assert duplicates == []
    assert set(delivered) == created
    stats = emulator.http.get(emulator.work_url(env, "/stats"), headers=emulator.org_headers)
    assert stats.json()["workers_polling"] == POLLERS
    assert stats.json()["depth"] == 0


def test_more_requests_at_once_than_redis_py_pools_by_default_all_get_answers(
        emulator: EmulatorProcess) -> None:
    """150 long polls held open at once, and stats calls beside them: each holds a Redis
    connection, past redis-py's default pool of 100; a request waits for one, never dropped."""
    env = emulator.create_environment()

    async def main() -> list[int]:
        limits = httpx.Limits(max_connections=300, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=emulator.base_url, timeout=30,
                                     limits=limits) as client:
            polls = [client.get(emulator.work_url(env, "/poll"), params={"block_ms": 999},
                                headers={**emulator.env_headers, "anthropic-worker-id": f"w{i}"})
                     for i in range(150)]
            stats = [client.get(emulator.work_url(env, "/stats"), headers=emulator.org_headers)
                     for _ in range(50)]
            return [r.status_code for r in await asyncio.gather(*polls, *stats)]

    assert asyncio.run(main()) == [200] * 200


def test_an_item_changed_by_another_process_is_decided_on_as_stored(
        emulator_factory: Callable[..., EmulatorProcess]) -> None:
    """Each process remembers the items it changed; a change made meanwhile by another process
    on the same keys is seen: the remembered state is a guess the write checks, never an
    answer. (A stale memory would accept the old token, or write the old metadata back.)"""
    first = emulator_factory()
    second = emulator_factory("--key-prefix", first.prefix,
                              "--environment-key", first.environment_key,
                              "--api-key", first.api_key)
    env = first.create_environment()
    _, work_id = first.create_session(env)
    assert first.poll(env, block_ms=500) is not None
    first.http.post(first.work_url(env, f"/{work_id}/ack"), headers=first.env_headers)

    def beat(emu: EmulatorProcess, expected: str) -> httpx.Response:
        return emu.http.post(emu.work_url(env, f"/{work_id}/heartbeat"),
                             params={"expected_last_heartbeat": expected},
                             headers=first.env_headers)  # the second's keys are the first's

    token = beat(first, "NO_HEARTBEAT").json()["last_heartbeat"]
    newer = beat(second, token).json()["last_heartbeat"]
    refused = beat(first, token)  # the first remembers `token` as the current one
    assert refused.status_code == 412
    assert refused.json()["error"]["details"]["current_state"]["last_heartbeat"] == newer
    second.http.post(second.work_url(env, f"/{work_id}"), headers=first.org_headers,
                     json={"metadata": {"set_by": "second"}}).raise_for_status()
    assert beat(first, newer).status_code == 200  # remembered before the metadata changed
    assert first.get(env, work_id)["metadata"] == {"set_by": "second"}
