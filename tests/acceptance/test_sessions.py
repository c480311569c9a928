"""The dispatcher end to end: real celery processes, real Redis, the emulator over HTTP; the
tests marked `on_brokers` run with RabbitMQ as the broker too."""

from __future__ import annotations

import hashlib
import subprocess
import time

import pytest

from tests.support.fleet import AMQP, CELERY, REDIS, Fleet, _alive, assert_no_overlap, on_brokers
from tests.support.waiting import wait_for

pytestmark = pytest.mark.acceptance

CONTRACT = {"ANTHROPIC_SESSION_ID", "ANTHROPIC_WORK_ID", "ANTHROPIC_ENVIRONMENT_ID",
            "ANTHROPIC_ENVIRONMENT_KEY", "ANTHROPIC_BASE_URL"}


@on_brokers(REDIS, AMQP)
def test_fifty_sessions_run_exactly_once_with_the_cli_contract(fleet: Fleet) -> None:
    fleet.worker("w1", concurrency=12, beat=True)
    work_ids = [fleet.create(fake_duration=0.3) for _ in range(50)]
    fleet.wait_stopped(work_ids, timeout=120)

    key_sha = hashlib.sha256(fleet.emulator.environment_key.encode()).hexdigest()
    for work_id in work_ids:
        started = fleet.events(work_id, "started")
        assert len(started) == 1, f"{work_id} started {len(started)} times"
        record = started[0]
        env = record["env"]
        assert env["ANTHROPIC_WORK_ID"] == work_id
        assert env["ANTHROPIC_ENVIRONMENT_ID"] == fleet.environment_id
        assert env["ANTHROPIC_BASE_URL"] == fleet.emulator.base_url
        assert env["ANTHROPIC_SESSION_ID"] == record["stdin_session_id"]
        assert record["stdin_work_id"] == work_id
        assert record["environment_key_sha256"] == key_sha
        assert record["stdin_secret_sha256"], "the work secret reaches the sandbox on stdin"
        assert set(record["env_names"]) >= CONTRACT
        assert "ANTHROPIC_API_KEY" not in record["env_names"]
        assert not any(n.startswith("DISPATCHER_REDIS") for n in record["env_names"])
        assert len(fleet.events(work_id, "exited")) == 1
    assert fleet.sandbox_pids_alive() == []


# Under the earlier server model too (a `stopping` heartbeat extended, leases re-queued).
@on_brokers((REDIS, "threads", "sdk-2.17"), (REDIS, "prefork", "sdk-2.17"),
            (AMQP, "threads", "sdk-2.17"), (REDIS, "threads", "earlier"),
            names="fleet,pool,server_model")
def test_stops_reach_the_sandbox(fleet: Fleet, pool: str, server_model: str) -> None:
    fleet.worker("w1", pool=pool, concurrency=6, beat=True)
    graceful = fleet.create(fake_duration=60)
    stubborn = fleet.create(fake_duration=60, fake_ignore_sigterm=1)
    forced = fleet.create(fake_duration=60)
    for work_id in (graceful, stubborn, forced):
        fleet.wait_event(work_id, "started")

    requested = time.time()
    fleet.admin.stop(graceful)
    fleet.admin.stop(stubborn)
    fleet.admin.stop(forced, force=True)
    fleet.wait_stopped([graceful, stubborn, forced], timeout=30)

    term = fleet.events(graceful, "sigterm")
    assert term and term[0]["time"] - requested < 2.0, "graceful stop seen within 2 s"
    assert fleet.events(graceful, "exited"), "graceful stop lets the sandbox exit on its own"
    assert fleet.events(stubborn, "sigterm")
    assert not fleet.events(stubborn, "exited"), "a sandbox that ignores SIGTERM is killed"
    assert not fleet.events(forced, "sigterm"), "a forced stop kills at once, no SIGTERM"
    wait_for(lambda: fleet.sandbox_pids_alive() == [], timeout=10, what="no sandbox left")


@on_brokers(REDIS, AMQP)
def test_a_session_stopped_while_queued_never_starts(fleet: Fleet) -> None:
    fleet.overrides["DISPATCHER_SESSION_QUEUES"] = "dispatcher.sessions,dispatcher.gpu"
    fleet.worker("w1", concurrency=6, beat=True, queues="dispatcher.control,dispatcher.sessions")
    queued = fleet.create(fake_duration=1, queue="dispatcher.gpu")
    fleet.wait_slots(4)
    wait_for(lambda: fleet.state(queued) == "active", timeout=20, what="claimed and queued")
    fleet.admin.stop(queued)
    fleet.wait_stopped([queued], timeout=20)
    fleet.worker("gpu", concurrency=2, queues="dispatcher.gpu")
    time.sleep(3)
    assert fleet.records(queued) == [], "the stopped session never started"


@on_brokers((REDIS, "threads", "sdk-2.17"), (REDIS, "prefork", "sdk-2.17"),
            (AMQP, "prefork", "sdk-2.17"), (REDIS, "threads", "earlier"),
            names="fleet,pool,server_model")
def test_a_killed_session_worker_hands_the_session_to_another(fleet: Fleet, pool: str,
                                                              server_model: str) -> None:
    fleet.worker("control", concurrency=4, queues="dispatcher.control", beat=True)
    fleet.worker("s1", pool=pool, concurrency=2, queues="dispatcher.sessions")
    fleet.worker("s2", pool=pool, concurrency=2, queues="dispatcher.sessions")
    fleet.wait_slots(4)
    work_id = fleet.create(fake_duration=6)
    fleet.wait_event(work_id, "started")
    first = fleet.events(work_id, "started")[0]
    victim = "s1" if fleet.hostname("s1") in _worker_of(fleet, work_id) else "s2"
    fleet.kill(victim)
    wait_for(lambda: not _alive(first["pid"]), timeout=5, interval=0.02,
             what="orphaned sandbox killed")
    killed_at = time.time()

    fleet.wait_event(work_id, "started", count=2, timeout=30)
    fleet.wait_stopped([work_id], timeout=30)
    second = fleet.events(work_id, "started")[1]
    assert second["time"] >= killed_at - 0.5, "attempt 2 started after attempt 1 died"
    assert second["env"]["ANTHROPIC_WORK_ID"] == work_id
    assert fleet.events(work_id, "exited"), "attempt 2 ran to completion"
    statuses = [r["status"] for r in fleet.emulator.requests_log()
                if r.get("work_id") == work_id and r.get("endpoint") == "heartbeat"]
    assert statuses and 412 not in statuses, "the lease was never lost"
    assert_no_overlap(fleet, work_id, death_times={first["pid"]: killed_at})


@on_brokers((REDIS, "threads"), (REDIS, "prefork"), (AMQP, "threads"), names="fleet,pool")
def test_an_operator_revoke_stops_the_work_item(fleet: Fleet, pool: str) -> None:
    fleet.worker("w1", pool=pool, concurrency=6, beat=True)
    work_id = fleet.create(fake_duration=60)
    fleet.wait_event(work_id, "started")
    task_id = fleet.lease(work_id)["task_id"]
    # The command line's spelling of revoke(terminate=True), what Flower's Terminate sends.
    subprocess.run([CELERY, "-A", "dispatcher", "control", "terminate", "SIGTERM", task_id],
                   env=fleet.env(), check=True, capture_output=True, timeout=30)
    fleet.wait_stopped([work_id], timeout=20)
    assert fleet.events(work_id, "sigterm"), "the sandbox was asked to stop"


@on_brokers((REDIS, "threads"), (REDIS, "prefork"), names="fleet,pool")
def test_an_operators_plain_revoke_stops_a_running_session_gracefully(fleet: Fleet,
                                                                     pool: str) -> None:
    """`celery control revoke` without terminate (Flower's Revoke): the sandbox gets SIGTERM and
    the item is stopped on the server, on either pool. A running task never hears of a plain
    revoke itself; a prefork child does not even share the revoked set."""
    fleet.worker("w1", pool=pool, concurrency=6, beat=True)
    work_id = fleet.create(fake_duration=60)
    fleet.wait_event(work_id, "started")
    task_id = fleet.lease(work_id)["task_id"]
    subprocess.run([CELERY, "-A", "dispatcher", "control", "revoke", task_id],
                   env=fleet.env(), check=True, capture_output=True, timeout=30)
    fleet.wait_stopped([work_id], timeout=20)
    assert fleet.events(work_id, "sigterm"), "the sandbox was asked to stop, not killed"
    assert [e["reason"] for e in fleet.events(work_id, "exited")] == ["sigterm"]


@on_brokers(REDIS, AMQP)
def test_a_full_worker_holds_no_session_message(fleet: Fleet) -> None:
    """Sessions created while one worker's pool is full start on the worker with room at once,
    never wait behind the busy one (Redis: Celery's disable_prefetch; RabbitMQ: the session
    gate) for recovery to move them on after 30 s."""
    fleet.worker("control", concurrency=4, queues="dispatcher.control", beat=True)
    fleet.worker("s1", concurrency=1, queues="dispatcher.sessions")
    fleet.wait_slots(1)
    busy = fleet.create(fake_duration=60)
    fleet.wait_event(busy, "started")
    fleet.worker("s2", concurrency=2, queues="dispatcher.sessions")
    fleet.wait_slots(3)
    created = time.time()
    later = [fleet.create(fake_duration=1) for _ in range(2)]
    fleet.wait_stopped(later, timeout=20)
    for work_id in later:
        (started,) = fleet.events(work_id, "started")
        assert started["time"] - created < 10, "started at once, not moved on by recovery"
    assert "attempt restarted" not in fleet.log("control")


def _worker_of(fleet: Fleet, work_id: str) -> str:
    return str(wait_for(lambda: fleet.lease(work_id).get("worker"), timeout=10, what="worker"))

