"""The pool a user names on the command line is the pool the worker runs.

The app's default pool is threads, and Celery's CLI cannot tell an explicit `-P prefork` from
its own default: with `worker_pool` configured, `-P prefork` silently ran threads, so the
prefork-parametrised acceptance tests tested threads. These start real workers and look at what
runs: Celery's banner, our `worker ready` line and advertisement, and the processes themselves.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
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
    # A prefork pool is child processes of the worker; a threads pool has none. Either has one
    # more child: the sandboxes' guardian.
    def pool_children() -> list[int]:
        return [pid for pid in _children(process.pid) if not _is_guardian(pid)]

    assert len([pid for pid in _children(process.pid) if _is_guardian(pid)]) == 1
    if expected == "prefork":
        wait_for(lambda: len(pool_children()) == CONCURRENCY, timeout=10,
                 what="the pool's child processes")
    else:
        assert pool_children() == []


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


def test_a_prefork_worker_has_one_guardian_for_all_its_children(fleet: Fleet) -> None:
    """One guardian per worker, not one per slot: the main process starts it before its pool
    forks, and each child's sandboxes go to it. SIGKILL of the whole worker, children and all,
    still ends every sandbox."""
    fleet.worker("control", concurrency=4, queues="dispatcher.control", beat=True)
    worker = fleet.worker("s1", pool="prefork", concurrency=CONCURRENCY,
                          queues="dispatcher.sessions")
    fleet.wait_slots(CONCURRENCY)
    work_ids = [fleet.create(fake_duration=120) for _ in range(CONCURRENCY)]
    for work_id in work_ids:
        fleet.wait_event(work_id, "started")
    runners = {fleet.events(work_id, "started")[0]["ppid"] for work_id in work_ids}
    assert len(runners) == CONCURRENCY, "each session ran in a pool child of its own"

    children = _children(worker.pid)
    guardians = [pid for pid in children if _is_guardian(pid)]
    assert len(guardians) == 1, "one guardian, the main process's"
    assert not any(_is_guardian(grandchild) for child in children
                   for grandchild in _children(child)), "no child started one of its own"
    assert len(fleet.sandbox_pids_alive()) == CONCURRENCY

    os.kill(worker.pid, signal.SIGSTOP)  # no replacement children forked meanwhile
    for pid in [*(c for c in children if c not in guardians), worker.pid]:
        with contextlib.suppress(ProcessLookupError):  # a child that ended by itself
            os.kill(pid, signal.SIGKILL)
    wait_for(lambda: fleet.sandbox_pids_alive() == [], timeout=10,
             what="every sandbox ended by the guardian")
    wait_for(lambda: not _is_guardian(guardians[0]), timeout=10, what="the guardian's exit")


def _is_guardian(pid: int) -> bool:
    try:
        alive = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        return alive and b"guardian.py" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
