"""A Redis restart at the two moments the soak run found leases with no keeper: just after an
ack (the record cannot be written yet) and while a finished session's release is failing (the
record and the item's history are erased). A private redis-server each, killed and started
again empty; the emulator over HTTP; the real supervisor with a real sandbox."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from dispatcher.control.heartbeat import heartbeat_due_leases
from dispatcher.control.poller import claim
from dispatcher.lease.model import Ending, Phase
from dispatcher.runtime import Runtime
from dispatcher.session.attempt import Outcome, SessionAttempt, run_attempt
from tests.support.inprocess import in_process_runtime, poll_until
from tests.support.isolation import free_port
from tests.support.waiting import wait_for

pytestmark = pytest.mark.integration

# How long a redis-server may take to answer after its start on a busy machine.
REDIS_START_TIMEOUT_SECONDS = 20.0


class PrivateRedis:
    """A redis-server of the test's own, without persistence: a restart starts it empty."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}"
        self.processes: list[subprocess.Popen[bytes]] = []

    def start(self) -> None:
        self.processes.append(subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        deadline = time.monotonic() + REDIS_START_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            try:
                if redis.Redis.from_url(self.url, socket_connect_timeout=0.5).ping():
                    return
            except redis.RedisError:
                time.sleep(0.02)
        raise AssertionError("the private redis-server did not answer")

    def kill(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=10)

    def restart_after(self, seconds: float) -> threading.Thread:
        thread = threading.Thread(target=lambda: (time.sleep(seconds), self.start()))
        thread.start()
        return thread


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
def runtime(emulator: Any, private_redis: PrivateRedis) -> Iterator[Runtime]:
    with in_process_runtime(emulator, DISPATCHER_REDIS_URL=f"{private_redis.url}/0") as rt:
        yield rt


def _state(emulator: Any, runtime: Runtime, work_id: str) -> str:
    return str(emulator.get(runtime.environment_id, work_id)["state"])


# The ack is slowed so Redis can be killed while it is in flight, after the poller's reads.
ACK_LATENCY_MS = 1500


def _claim_with_redis_killed_during_the_ack(emulator: Any, runtime: Runtime,
                                            private_redis: PrivateRedis, work_id: str, *,
                                            back_after: float | None = None) -> bool:
    """Claim with Redis killed halfway through the ack; started again `back_after` seconds
    after the kill (timed from the kill: the poll before it takes a varying time)."""
    item = poll_until(runtime, work_id)
    emulator.set_faults(latency_ms=ACK_LATENCY_MS, endpoints=["ack"])
    claimed: list[bool] = []
    poller = threading.Thread(target=lambda: claimed.append(claim(runtime, item)))
    poller.start()
    time.sleep(ACK_LATENCY_MS / 2000)
    private_redis.kill()
    restarted = None if back_after is None else private_redis.restart_after(back_after)
    poller.join(timeout=60)
    if restarted is not None:
        restarted.join()
    return bool(claimed and claimed[0])


def test_an_item_acked_while_redis_restarts_is_recorded_and_run(
        emulator: Any, runtime: Runtime, private_redis: PrivateRedis) -> None:
    """The record's write is retried for 1.5 s: a restart in between loses nothing."""
    _, work_id = emulator.create_session(runtime.environment_id, metadata={})
    # Back 0.3 s after the kill: the first write fails, a retry lands.
    assert _claim_with_redis_killed_during_the_ack(emulator, runtime, private_redis, work_id,
                                                   back_after=0.3)
    lease = runtime.registry.get(work_id)
    assert lease is not None and lease.phase == Phase.DISPATCHED, "recorded once Redis was back"
    assert [t["kwargs"]["work_id"] for t in runtime.app.sent] == [work_id], "and published"
    assert _state(emulator, runtime, work_id) == "active", "and claimed, not stopped"


def test_an_item_acked_while_redis_stays_down_is_stopped_not_stranded(
        emulator: Any, runtime: Runtime, private_redis: PrivateRedis) -> None:
    _, work_id = emulator.create_session(runtime.environment_id, metadata={})
    assert not _claim_with_redis_killed_during_the_ack(emulator, runtime, private_redis,
                                                       work_id)
    private_redis.start()
    # Its session went out while the ack was in flight; with no record, its attempt finds
    # nothing to start (`attempt skipped`), and nobody could beat it.
    assert runtime.registry.get(work_id) is None
    assert _state(emulator, runtime, work_id) == "stopped", "stopped, not left in starting"


def test_a_finished_session_whose_release_fails_across_a_redis_restart_is_not_run_again(
        emulator: Any, runtime: Runtime, private_redis: PrivateRedis,
        caplog: pytest.LogCaptureFixture) -> None:
    """The session exits 0 while the API refuses stops; Redis restarts empty meanwhile. The
    supervisor, still waiting for its release, writes the ending lease back with its history:
    the stop is retried until it lands, and the item is never dispatched again."""
    _, work_id = emulator.create_session(runtime.environment_id,
                                         metadata={"fake.duration": "0.2"})
    assert claim(runtime, poll_until(runtime, work_id))
    task = runtime.app.sent[0]
    emulator.set_faults(error_rate=1.0, error_status=503, endpoints=["stop"])
    outcome: list[Outcome] = []
    supervisor = threading.Thread(target=lambda: outcome.append(run_attempt(
        runtime, SessionAttempt(work_id=work_id, session_id=task["kwargs"]["session_id"],
                                attempt=1, task_id=task["task_id"], worker="restarts@test"))))
    supervisor.start()
    # The failed release's last effect is its log line: from then on the supervisor remembers
    # the ending lease. Killing Redis while it still performs the release's writes would leave
    # it only the running lease it remembered before.
    wait_for(lambda: any("release deferred" in r.getMessage() and work_id in r.getMessage()
                         for r in caplog.records), timeout=30, what="the release to fail")
    lease = runtime.registry.get(work_id)
    assert lease is not None and lease.phase == Phase.RELEASING, "the release is failing"
    assert supervisor.is_alive(), "the supervisor stays while its release is pending"
    private_redis.kill()
    private_redis.start()
    deadline = time.monotonic() + 30
    while runtime.registry.get(work_id) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    back = runtime.registry.get(work_id)
    assert back is not None and back.phase == Phase.RELEASING, "written back, still ending"
    assert back.ended == Ending.COMPLETED
    assert runtime.registry.history(work_id).ended == Ending.COMPLETED, "its history too"
    emulator.reset_faults()
    deadline = time.monotonic() + 30
    while runtime.registry.get(work_id) is not None and time.monotonic() < deadline:
        runtime.registry.schedule_heartbeat(work_id, time.time() - 1)
        heartbeat_due_leases(runtime)
        time.sleep(0.2)
    supervisor.join(timeout=30)
    assert outcome == [Outcome.COMPLETED]
    assert runtime.registry.get(work_id) is None, "released once the stop landed"
    assert _state(emulator, runtime, work_id) == "stopped"
    assert len(runtime.app.sent) == 1, "never dispatched again"
