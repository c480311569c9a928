"""A worker's Redis client serves as many threads at once as the worker runs: a session worker of
hundreds of slots has a supervisor thread per session, each with a command in flight now and
then, and none may fail for want of a connection (redis-py 8 caps a pool at 100 by default)."""

from __future__ import annotations

import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

from dispatcher.runtime import Runtime

THREADS = 150  # past redis-py 8's default cap of 100 connections a pool


def test_more_commands_in_flight_at_once_than_redis_pys_default_pool(runtime: Runtime) -> None:
    key = f"test-empty-{uuid.uuid4().hex}"
    together = threading.Barrier(THREADS)

    def wait_on_an_empty_list() -> None:
        together.wait(timeout=30)
        # Each holds its connection for the whole second: all 150 are in flight at once.
        runtime.redis.blpop([key], timeout=1)

    with ThreadPoolExecutor(THREADS) as pool:
        for future in [pool.submit(wait_on_an_empty_list) for _ in range(THREADS)]:
            future.result()  # MaxConnectionsError here if the pool refused one
