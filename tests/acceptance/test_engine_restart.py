"""The engine restarted, or robbed of its image, for real: a private dockerd with
`--live-restore` (tests/support/private_engine.py) that a test stops with SIGTERM and starts
again, or removes the image from, while real workers of the docker runtime run sessions on it.
Parallel tests keep the machine's engine.

What the fleet promises (docs/reliability.md, "Engine faults"): with live-restore, sessions
running when dockerd stops run on; none ends and no item is stopped for it; the worker withdraws
its slots while the engine does not answer, or lacks the image, and gives them back when it can
start sandboxes again; the sessions are still supervised afterwards (a stop reaches their
container); a start the fault failed runs once, later, not counted; the warm pool calls the
engine not at all while it is down and refills when it is back; nothing of the fleet is left on
the engine."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

from dispatcher.session.engine_health import IMAGE_CHECK_EVERY, PROBE_INTERVAL_SECONDS
from tests.support.engine_proxy import EngineRelay
from tests.support.fleet import Fleet
from tests.support.private_engine import PrivateEngine
from tests.support.waiting import wait_for

pytestmark = pytest.mark.acceptance

# The bound on both edges of an outage: the probe asks every 0.5 s with a 1 s timeout.
SLOTS_BOUND_SECONDS = 2.0
# A session stopped by the server after the restart: it would outlast the test.
LONG_SESSION_SECONDS = 120
# A session that ends on its own after the restart: longer than the start, the outage and the
# checks made during it take on a loaded machine (about 10 s), checked before it may end.
FINISHING_SESSION_SECONDS = 30


@pytest.fixture
def private_engine() -> Iterator[PrivateEngine]:
    """Named before the fleet in a test, so torn down after it."""
    engine = PrivateEngine("liverestore")
    try:
        yield engine
    finally:
        engine.close()
        assert not engine.mounts(), "the private engine left mounts"


def _running_ids(engine: PrivateEngine, fleet: Fleet) -> dict[str, str]:
    """Work id -> id of its running container, on the private engine."""
    client = engine.client()
    try:
        found = client.containers(filters={"label": f"dispatcher.fleet={fleet.prefix}"})
    finally:
        client.close()
    return {c["Labels"].get("dispatcher.work_id", ""): c["Id"] for c in found}


def _all_containers(engine: PrivateEngine) -> list[str]:
    client = engine.client()
    try:
        return [c["Id"] for c in client.containers(all=True)]
    finally:
        client.close()


def test_a_live_restore_restart_ends_no_session_and_keeps_them_supervised(
        private_engine: PrivateEngine, fleet: Fleet, tmp_path: Path) -> None:
    engine = private_engine
    fleet.use_containers(engine.load_test_image(tmp_path))
    # A relay in front of the private engine holds one create, so that session is being
    # started when dockerd stops: its start meets the outage.
    relay = EngineRelay(upstream=str(engine.socket))
    try:
        _live_restore(engine, relay, fleet)
    finally:
        fleet.stop_all()
        relay.close()
    assert not _all_containers(engine), "nothing of the fleet is left on the engine"


def _live_restore(engine: PrivateEngine, relay: EngineRelay, fleet: Fleet) -> None:
    fleet.overrides["DOCKER_HOST"] = relay.docker_host
    fleet.worker("control", queues="dispatcher.control", beat=True)
    fleet.worker("w1", concurrency=3, queues="dispatcher.sessions")
    fleet.wait_slots(3)
    stopped = fleet.create(fake_duration=LONG_SESSION_SECONDS)
    finishing = fleet.create(fake_duration=FINISHING_SESSION_SECONDS)
    for work_id in (stopped, finishing):
        fleet.wait_event(work_id, "started", timeout=60)
    containers = _running_ids(engine, fleet)
    assert set(containers) == {stopped, finishing}, containers
    relay.delay_create = 120.0
    late = fleet.create(fake_duration=2)
    wait_for(lambda: fleet.lease(late).get("phase") == "running", timeout=30,
             what="the third session's attempt starting its container")
    wait_for(lambda: relay.holding, timeout=30, what="its create held")

    engine.stop()  # SIGTERM: with live-restore, the containers run on
    down_at = time.monotonic()
    wait_for(lambda: fleet.slots() == 0, timeout=10, interval=0.05, what="slots withdrawn")
    withdrawn_after = time.monotonic() - down_at
    code, output = fleet.status_check()
    assert code == 5 and "container engine does not answer" in output, output
    wait_for(lambda: "sandbox not started" in fleet.log("w1"), timeout=30,
             what="the held start failing for the outage")
    for work_id in (stopped, finishing, late):
        lease = fleet.lease(work_id)
        assert lease and not lease.get("ended") and not lease.get("stop"), lease
        assert lease.get("attempt") == "1", lease
        assert fleet.state(work_id) != "stopped", "no item stopped for the engine's outage"
        assert not fleet.events(work_id, "exited"), "no session ended"

    relay.delay_create = 0.0
    engine.start()
    up_at = time.monotonic()
    wait_for(lambda: fleet.slots() == 3, timeout=10, interval=0.05, what="slots given back")
    given_back_after = time.monotonic() - up_at
    running = _running_ids(engine, fleet)
    assert not fleet.events(finishing, "exited"), "the restart came before its end (a slow run)"
    assert running.get(stopped) == containers[stopped], "the same container runs on"
    assert running.get(finishing) == containers[finishing]

    fleet.admin.stop(stopped, force=False)  # reaches its container through the new dockerd
    fleet.wait_event(stopped, "exited", timeout=30)
    assert [e["reason"] for e in fleet.events(stopped, "exited")] == ["sigterm"]
    fleet.wait_stopped([late], timeout=60)
    assert [e["attempt"] for e in fleet.events(late, "started")] == ["2"], \
        "the start the outage failed runs once, not counted"
    assert [e["reason"] for e in fleet.events(late, "exited")] == ["completed"]
    fleet.wait_stopped([stopped, finishing, late], timeout=60)
    assert [e["reason"] for e in fleet.events(finishing, "exited")] == ["completed"]
    for work_id in (stopped, finishing):
        assert len(fleet.events(work_id, "started")) == 1, "every session runs exactly once"
    log = fleet.log("w1")
    assert log.count("engine unavailable") == 1 and log.count("engine answers again") == 1
    assert "ended=failed" not in log
    wait_for(lambda: not _running_ids(engine, fleet), timeout=10, what="containers removed")
    assert withdrawn_after <= SLOTS_BOUND_SECONDS, withdrawn_after
    assert given_back_after <= SLOTS_BOUND_SECONDS, given_back_after


# The probe looks at the images every IMAGE_CHECK_EVERY probes while they are there: a lost
# image is seen within that, and within a probe's interval and timeout after it.
IMAGE_LOST_BOUND_SECONDS = IMAGE_CHECK_EVERY * PROBE_INTERVAL_SECONDS + SLOTS_BOUND_SECONDS


def test_a_lost_image_withdraws_the_slots_and_fails_no_session(
        private_engine: PrivateEngine, fleet: Fleet, tmp_path: Path) -> None:
    engine = private_engine
    image = engine.load_test_image(tmp_path)
    fleet.use_containers(image)
    relay = EngineRelay(upstream=str(engine.socket))
    try:
        _image_lost(engine, relay, fleet, image, tmp_path / "saved.tar")
    finally:
        fleet.stop_all()
        relay.close()
    assert not _all_containers(engine), "nothing of the fleet is left on the engine"


def _image_lost(engine: PrivateEngine, relay: EngineRelay, fleet: Fleet, image: str,
                saved: Path) -> None:
    fleet.overrides["DOCKER_HOST"] = relay.docker_host
    fleet.worker("control", queues="dispatcher.control", beat=True)
    fleet.worker("w1", concurrency=2, queues="dispatcher.sessions")
    fleet.wait_slots(2)
    docker_cli = {**os.environ, "DOCKER_HOST": engine.docker_host}
    subprocess.run(["docker", "save", "-o", str(saved), image], env=docker_cli, check=True,
                   capture_output=True)
    # A session whose create is held while the image goes: its create then meets the loss.
    relay.delay_create = 120.0
    work_id = fleet.create(fake_duration=2)
    wait_for(lambda: relay.holding, timeout=30, what="its create held")

    subprocess.run(["docker", "rmi", "-f", image], env=docker_cli, check=True,
                   capture_output=True)
    lost_at = time.monotonic()
    wait_for(lambda: fleet.slots() == 0, timeout=15, interval=0.05, what="slots withdrawn")
    withdrawn_after = time.monotonic() - lost_at
    code, output = fleet.status_check()
    assert code == 5 and "lacks a sandbox image" in output, output
    line = next(ln for ln in fleet.log("w1").splitlines() if "sandbox image missing" in ln)
    assert image in line and "DISPATCHER_SANDBOX_IMAGE" in line, line
    relay.delay_create = 0.0  # the held create reaches the engine, which lacks the image
    wait_for(lambda: "sandbox not started" in fleet.log("w1"), timeout=30,
             what="the start failing for the lost image")
    lease = fleet.lease(work_id)
    assert lease and not lease.get("ended") and lease.get("attempt") == "1", lease
    assert fleet.state(work_id) != "stopped", "no item stopped for the lost image"

    subprocess.run(["docker", "load", "-i", str(saved)], env=docker_cli, check=True,
                   capture_output=True)  # the same id: what the worker resolved at start
    back_at = time.monotonic()
    wait_for(lambda: fleet.slots() == 2, timeout=10, interval=0.05, what="slots given back")
    given_back_after = time.monotonic() - back_at
    fleet.wait_stopped([work_id], timeout=60)
    assert [e["attempt"] for e in fleet.events(work_id, "started")] == ["2"], \
        "the start that met the lost image runs once, later, not counted"
    assert [e["reason"] for e in fleet.events(work_id, "exited")] == ["completed"]
    log = fleet.log("w1")
    assert log.count("sandbox image missing") == 1, "one line while it is missing"
    assert log.count("sandbox image present again") == 1
    assert "ended=failed" not in log and "engine unavailable" not in log
    assert withdrawn_after <= IMAGE_LOST_BOUND_SECONDS, withdrawn_after
    assert given_back_after <= SLOTS_BOUND_SECONDS, given_back_after


# Several of the pool's reconcile periods (2 s): long enough that a pool that did not follow
# the probe would have called the engine, and failed, meanwhile.
WARM_OUTAGE_SECONDS = 8.0
# The pool's lines that say it called the engine and failed.
POOL_FAILURES = ("warm container not created", "warm pool cannot list its containers")
# A pool call in flight when the probe withdrew the slots ends at once (the socket is gone).
IN_FLIGHT_SECONDS = 1.0


def _pool_failures_during_outage(log: str) -> list[str]:
    """The pool's failure lines logged from IN_FLIGHT_SECONDS after the probe found the engine
    down until it found it back."""
    lines = log.splitlines()
    down = next(i for i, ln in enumerate(lines) if "engine unavailable" in ln)
    back = next(i for i, ln in enumerate(lines) if "engine answers again" in ln)
    since = _logged_at(lines[down]) + IN_FLIGHT_SECONDS
    return [ln for ln in lines[down:back]
            if any(f in ln for f in POOL_FAILURES) and _logged_at(ln) > since]


def _logged_at(line: str) -> float:
    """A celery log line's time, `[2026-12-06 18:03:09,108: ...`, in seconds."""
    stamp = datetime.strptime(line[1:24], "%Y-%m-%d %H:%M:%S,%f")
    return stamp.timestamp()


def _warm_ready(engine: PrivateEngine, fleet: Fleet) -> list[str]:
    client = engine.client()
    try:
        listed = client.containers(filters={"label": "dispatcher.warm_owner"})
    finally:
        client.close()
    bound = set(fleet.redis.hkeys(f"{fleet.prefix}:warm:bound"))
    return [c["Id"] for c in listed if c["Id"] not in bound]


def test_the_warm_pool_follows_the_engine_through_a_live_restore_restart(
        private_engine: PrivateEngine, fleet: Fleet, tmp_path: Path) -> None:
    engine = private_engine
    fleet.use_containers(engine.load_test_image(tmp_path))
    fleet.overrides.update({"DOCKER_HOST": engine.docker_host,
                            "DISPATCHER_WARM_CONTAINERS": "2"})
    try:
        fleet.worker("w1", concurrency=5, beat=True)  # 3 session slots
        wait_for(lambda: len(_warm_ready(engine, fleet)) == 2, timeout=60,
                 what="2 warm containers ready")
        running = fleet.create(fake_duration=LONG_SESSION_SECONDS)
        fleet.wait_event(running, "started", timeout=60)
        wait_for(lambda: len(_warm_ready(engine, fleet)) == 2, timeout=60,
                 what="the pool refilled after the bind")
        before = set(_warm_ready(engine, fleet))

        engine.stop()
        wait_for(lambda: fleet.slots() == 0, timeout=10, interval=0.05, what="slots withdrawn")
        # The outage lasts: a pool that retried on its own would back off past the bound.
        outage_over = time.monotonic() + WARM_OUTAGE_SECONDS
        wait_for(lambda: time.monotonic() >= outage_over, timeout=WARM_OUTAGE_SECONDS + 1,
                 what="the outage's end")
        engine.start()
        # The containers that outlived the restart are dropped: the restarted engine no longer
        # closes their stdin (dispatcher/session/warm_pool.py, `engine_back`).
        wait_for(lambda: len(set(_warm_ready(engine, fleet)) - before) == 2, timeout=60,
                 interval=0.1, what="the pool refilled with new containers")
        assert not _pool_failures_during_outage(fleet.log("w1")), \
            "the pool called the engine while the probe said it was down"
        assert not before & set(_all_containers(engine)), "the old ones removed"

        fleet.admin.stop(running, force=False)
        fleet.wait_event(running, "exited", timeout=30)
        after = fleet.create(fake_duration=1)
        fleet.wait_stopped([running, after], timeout=60)
        assert [e["reason"] for e in fleet.events(running, "exited")] == ["sigterm"]
        assert [e["reason"] for e in fleet.events(after, "exited")] == ["completed"]
    finally:
        fleet.stop_all()
    wait_for(lambda: not _all_containers(engine), timeout=15,
             what="no warm container leaked (docker ps -a on the private engine)")
