"""A drained worker hands its sessions over; a Redis that restarts empty loses no session."""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.support.fleet import AMQP, REDIS, Fleet, assert_no_overlap, on_brokers
from tests.support.isolation import free_port
from tests.support.waiting import wait_for

pytestmark = pytest.mark.acceptance


@on_brokers((REDIS, "threads"), (REDIS, "prefork"), (AMQP, "threads"), names="fleet,pool")
def test_a_drained_worker_hands_its_session_to_another(fleet: Fleet, pool: str) -> None:
    fleet.worker("control", concurrency=4, queues="dispatcher.control", beat=True)
    fleet.worker("s1", pool=pool, concurrency=2, queues="dispatcher.sessions")
    fleet.wait_slots(2)
    work_id = fleet.create(fake_duration=6)
    fleet.wait_event(work_id, "started")
    fleet.worker("s2", pool=pool, concurrency=2, queues="dispatcher.sessions")
    fleet.wait_slots(4)
    fleet.kill("s1", signal.SIGTERM)

    fleet.wait_event(work_id, "started", count=2, timeout=30)
    fleet.wait_stopped([work_id], timeout=30)
    first, second = fleet.events(work_id, "started")[:2]
    assert fleet.events(work_id, "sigterm"), "the drained attempt was asked to stop"
    assert second["env"]["ANTHROPIC_WORK_ID"] == work_id
    assert fleet.events(work_id, "exited")[-1]["reason"] == "completed"
    assert fleet.stack.processes["s1"].wait(timeout=20) == 0, "the drain ended in time"
    assert_no_overlap(fleet, work_id, death_times={})
    statuses = [r["status"] for r in fleet.emulator.requests_log()
                if r.get("work_id") == work_id and r.get("endpoint") == "heartbeat"]
    assert 412 not in statuses, "the lease was held throughout"
    assert first["pid"] != second["pid"]


@pytest.fixture
def private_redis() -> Iterator[str]:
    """A Redis of this test's own: it is emptied mid-run, which the shared one must never be."""
    server = shutil.which("redis-server")
    assert server, "redis-server is needed (./dev installs it)"
    port = free_port()
    process = subprocess.Popen([server, "--port", str(port), "--bind", "127.0.0.1",
                                "--save", "", "--appendonly", "no"],
                               stdout=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}"
    wait_for(lambda: _answers(url), timeout=10, what="private redis")
    yield url
    process.terminate()
    process.wait(timeout=10)


def _answers(url: str) -> bool:
    try:
        with redis.Redis.from_url(url) as r:
            return bool(r.ping())
    except redis.RedisError:
        return False


def test_a_redis_restarted_empty_loses_no_session(emulator: Any, tmp_path: Path,
                                                  private_redis: str) -> None:
    fleet = Fleet(emulator, tmp_path, private_redis)
    try:
        fleet.worker("w1", concurrency=6, beat=True)
        running = [fleet.create(fake_duration=8) for _ in range(3)]
        for work_id in running:
            fleet.wait_event(work_id, "started")
        with redis.Redis.from_url(private_redis) as r:
            r.flushall()
        time.sleep(2)
        later = fleet.create(fake_duration=1)
        fleet.wait_stopped([*running, later], timeout=60)
        for work_id in running:
            assert len(fleet.events(work_id, "started")) == 1, "not restarted"
            assert fleet.events(work_id, "exited")[0]["reason"] == "completed"
        assert fleet.events(later, "exited"), "the fleet still claims new work"
        assert "lease re-registered" in fleet.log("w1")
        assert "re-acquired" in fleet.log("w1"), "beat took its lock back"
    finally:
        fleet.stop_all()


@on_brokers(AMQP)
def test_a_dropped_broker_connection_neither_loses_nor_repeats_a_session(fleet: Fleet) -> None:
    """RabbitMQ closes every connection of the fleet's vhost mid-session: the running session,
    acked as it started, is never redelivered (no second run), the workers reconnect, and the
    session gate comes back with them (the next sessions start at once)."""
    fleet.worker("control", concurrency=4, queues="dispatcher.control", beat=True)
    fleet.worker("s1", concurrency=2, queues="dispatcher.sessions")
    fleet.wait_slots(2)
    running = fleet.create(fake_duration=8)
    fleet.wait_event(running, "started")
    vhost = fleet.overrides["DISPATCHER_BROKER_URL"].rsplit("/", 1)[1]
    subprocess.run(["rabbitmqctl", "-q", "close_all_connections", "--vhost", vhost,
                    "test: a dropped connection"], check=True, capture_output=True, timeout=60)
    wait_for(lambda: "Connection to broker lost" in fleet.log("s1"), timeout=10,
             what="the session worker saw its connection drop")
    later = fleet.create(fake_duration=1)
    fleet.wait_stopped([running, later], timeout=60)
    assert len(fleet.events(running, "started")) == 1, "never redelivered, never restarted"
    assert fleet.events(running, "exited")[0]["reason"] == "completed"
    assert len(fleet.events(later, "started")) == 1
