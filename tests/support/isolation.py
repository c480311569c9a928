"""What keeps parallel test workers apart: Redis databases and TCP ports of each worker's own.

`./dev test` runs the suite in pytest-xdist workers (`gw0`, `gw1`, ...; one process when run
without `-n`, which counts as worker 0). Every test talks to one Redis, $DISPATCHER_TEST_REDIS
(default redis://127.0.0.1:6379, 16 databases as Redis ships), and workers must never see,
let alone flush, each other's keys:

    db 15            the emulators': every server writes under a key prefix of its own and
                     deletes its keys when it stops, so all workers share it
    db 1 + 2 * N     worker N's fleets: a fleet test FLUSHES it before it starts, so it is the
                     worker's alone (a fleet reads Celery's keys under its prefix, but a flush
                     is the plain proof that nothing of an earlier test is left)
    db 2 + 2 * N     worker N's in-process runtimes and integration tests: each under a prefix
                     of its own; the db is the worker's so a test may check "none of our keys
                     left" without seeing another worker's tests at work
    db 0             the demo's (`test_demo.py`), which keeps its keys under a prefix of its own,
                     as `./dev demo` does in db 0 of the machine's Redis

That allows 7 workers (N = 0..6); `./dev test` runs fewer.

Ports: each worker binds from a range of its own below the kernel's ephemeral range (which
starts at 32768), so a port one worker found free is never handed to another worker's server,
nor to an outgoing connection, between the check and the server's bind. (The demo, a product
command, picks its own ports from the kernel; it runs in one test.) $DISPATCHER_TEST_PORTS_START
moves every worker's range, for a second run beside the first.
"""

from __future__ import annotations

import itertools
import os
import socket

__all__ = ["DEMO_DB", "EMULATOR_DB", "REDIS_BASE", "fleet_db", "free_port", "integration_db",
           "redis_url", "worker_index"]

REDIS_BASE = os.environ.get("DISPATCHER_TEST_REDIS", "redis://127.0.0.1:6379").rstrip("/")
EMULATOR_DB = 15
DEMO_DB = 0
MAX_WORKERS = 7  # databases 1..14 in pairs; 0 is the demo's and 15 the emulators'
# Port ranges: worker N binds from PORTS_START + N * PORTS_PER_WORKER upwards. 7 x 1,500 ports
# end at 30,500, below the ephemeral range (32768-60999 on Linux) the kernel picks from. A second
# run on the same machine (a developer's beside CI) sets $DISPATCHER_TEST_PORTS_START lower, and
# $DISPATCHER_TEST_REDIS to a Redis of its own, to keep clear of the first.
PORTS_START = int(os.environ.get("DISPATCHER_TEST_PORTS_START", "20000"))
PORTS_PER_WORKER = 1500


def worker_index() -> int:
    """This process's xdist worker number (`gw3` -> 3); 0 without xdist."""
    name = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    index = int(name.removeprefix("gw"))
    if index >= MAX_WORKERS:
        raise RuntimeError(f"xdist worker {name}: the test Redis has databases for "
                           f"{MAX_WORKERS} workers (tests/support/isolation.py); run fewer")
    return index


def fleet_db() -> int:
    """The database this worker's fleet tests flush and run their fleets on."""
    return 1 + 2 * worker_index()


def integration_db() -> int:
    """The database of this worker's in-process runtimes and integration tests."""
    return 2 + 2 * worker_index()


def redis_url(db: int) -> str:
    return f"{REDIS_BASE}/{db}"


def _ports() -> itertools.cycle[int]:
    first = PORTS_START + worker_index() * PORTS_PER_WORKER
    return itertools.cycle(range(first, first + PORTS_PER_WORKER))


_candidates = _ports()


def free_port() -> int:
    """A port of this worker's range that nothing listens on now; the next call gives another
    (a server stopped a moment ago may still hold its port in TIME_WAIT)."""
    for _ in range(PORTS_PER_WORKER):
        port = next(_candidates)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in worker {worker_index()}'s range")
