"""Many concurrent pollers never receive the same item twice (no reclaim in play)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
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
