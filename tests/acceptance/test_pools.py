"""The pool a user names on the command line is the pool the worker runs.

The app's default pool is threads, and Celery's CLI cannot tell an explicit `-P prefork` from
its own default: with `worker_pool` configured, `-P prefork` silently ran threads, so the
prefork-parametrised acceptance tests tested threads. These start real workers and look at what
runs: Celery's banner, our `worker ready` line and advertisement, and the processes themselves.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from dispatcher.control.capacity import Capacity
from tests.support.fleet import Fleet
from tests.support.waiting import wait_for

pytestmark = pytest.mark.acceptance

CONCURRENCY = 2
# What Celery's banner says after `concurrency: N`, by our (`-P`) pool name.
BANNER = {"prefork": "prefork", "threads": "thread"}


def _ppid(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if _ppid(int(entry.name)) == pid:
                    found.append(int(entry.name))
            except (FileNotFoundError, ProcessLookupError, IndexError):
                continue
    return found


def _start(fleet: Fleet, name: str, pool_args: list[str],
           env: dict[str, str]) -> subprocess.Popen[bytes]:
    args = ["worker", "-n", f"{name}@%h", *pool_args, "-c", str(CONCURRENCY), "-l", "INFO",
            "--without-mingle", "--without-gossip", "-Q", "dispatcher.sessions"]
    process = fleet.stack.celery(name, args, env)
    wait_for(lambda: "worker ready" in fleet.log(name) or process.poll() is not None,
             timeout=60, what=f"{name} ready")
    assert process.poll() is None, fleet.log(name)
    return process


@pytest.mark.parametrize(("pool_args", "exported", "expected"), [
    ([], None, "threads"),
    (["-P", "prefork"], None, "prefork"),
    (["--pool", "prefork"], None, "prefork"),
    (["--pool=prefork"], None, "prefork"),
    (["-Pprefork"], None, "prefork"),
    (["-P", "threads"], None, "threads"),
    ([], "prefork", "prefork"),
    (["-P", "threads"], "prefork", "threads"),
], ids=["default", "-P prefork", "--pool prefork", "--pool=prefork", "-Pprefork",
        "-P threads", "exported prefork", "-P over exported"])
def test_the_worker_runs_the_pool_the_command_line_names(
        fleet: Fleet, pool_args: list[str], exported: str | None, expected: str) -> None:
    env = {k: v for k, v in fleet.env().items() if k != "CELERY_WORKER_POOL"}
    if exported:
        env["CELERY_WORKER_POOL"] = exported
    process = _start(fleet, "w1", pool_args, env)

    log = fleet.log("w1")
    assert f"concurrency: {CONCURRENCY} ({BANNER[expected]})" in log, log
    ready = re.search(r"worker ready .*", log)
    assert ready and f"pool={expected} " in ready.group(0), log
    advertised = wait_for(lambda: {w.hostname: w.pool for w in
                                   Capacity(fleet.redis, prefix=fleet.prefix).workers()},
                          timeout=10, what="the advertisement")
    assert advertised == {fleet.hostname("w1"): expected}
    # A prefork pool is child processes of the worker; a threads pool has none.
    if expected == "prefork":
        wait_for(lambda: len(_children(process.pid)) == CONCURRENCY, timeout=10,
                 what="the pool's child processes")
    else:
        assert _children(process.pid) == []


@pytest.mark.parametrize("pool", ["threads", "prefork"])
def test_a_session_runs_where_its_pool_runs_tasks(fleet: Fleet, pool: str) -> None:
    """`LocalStack.worker(pool=...)`, which the other acceptance tests use, gives that pool:
    the session's sandbox is started by a prefork child, or by the worker itself on threads."""
    fleet.worker("control", concurrency=4, queues="dispatcher.control", beat=True)
    worker = fleet.worker("s1", pool=pool, concurrency=CONCURRENCY,
                          queues="dispatcher.sessions")
    fleet.wait_slots(CONCURRENCY)
    work_id = fleet.create(fake_duration=3)
    fleet.wait_event(work_id, "started")

    runner = fleet.events(work_id, "started")[0]["ppid"]  # whose session task spawned it
    if pool == "prefork":
        assert runner != worker.pid
        assert _ppid(runner) == worker.pid, "the session ran in one of the worker's children"
    else:
        assert runner == worker.pid
    fleet.wait_stopped([work_id], timeout=30)
