"""Many concurrent pollers never receive the same item twice (no reclaim in play)."""

from __future__ import annotations

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
