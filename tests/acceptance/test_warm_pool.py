"""The warm pool on a real engine, with real workers: a session bound to a container started
ahead of it, fed and stopped as a cold one, removed after it; the pool refilled; the reaper
leaving a live worker's idle containers and removing a dead worker's."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import time
from typing import Any

import pytest

from dispatcher.metrics import Metrics, warm_starts
from dispatcher.session.warm_book import WarmBook
from tests.support.fleet import Fleet
from tests.support.waiting import wait_for

pytestmark = pytest.mark.acceptance

OWNER = "dispatcher.warm_owner"
# As for a cold container: the supervisor acts within 0.2 s; the rest is the engine.
STOP_BOUND_SECONDS = 2.0
# A dead worker's owner key expires after 10 s; then two reaper passes a second apart.
DEAD_OWNER_REAPED_SECONDS = 10 + 2 + 8


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _warm(fleet: Fleet, engine: Any) -> list[dict[str, Any]]:
    """The fleet's warm containers, running and idle or bound."""
    return [c for c in fleet.containers(engine, running=True) if OWNER in c["Labels"]]


def _ready(fleet: Fleet, engine: Any, count: int) -> list[str]:
    wait_for(lambda: len(_warm(fleet, engine)) >= count, timeout=60,
             what=f"{count} warm container(s) ready")
    return [c["Id"] for c in _warm(fleet, engine)]


def _claimable(fleet: Fleet) -> int:
    """Warm containers a claim can take now: ready in the pool's book (the engine lists a
    container as running before the pool has attached its stdin and booked it)."""
    book = WarmBook(fleet.redis, prefix=fleet.prefix)
    return sum(int(fleet.redis.llen(key))
               for key in fleet.redis.scan_iter(book.ready_key("*", "*")))


def _host(fleet: Fleet, work_id: str) -> str:
    """The container the session ran in, as its hostname (the id's first 12 characters)."""
    return str(fleet.events(work_id, "started")[0]["host"])


def _warm_fleet(fleet: Fleet, *, warm: int = 1, **worker: Any) -> None:
    fleet.overrides["DISPATCHER_WARM_CONTAINERS"] = str(warm)
    fleet.worker("w1", beat=True, **worker)


# threads: the claim writes to the stdin the pool attached in the same process; prefork: the
# child attaches itself at claim.
@pytest.mark.parametrize(("pool", "delivery"), [("threads", None), ("threads", "file"),
                                                ("prefork", "file")])
def test_a_session_runs_in_a_warm_container_which_goes_with_it_and_is_replaced(
        container_fleet: Fleet, engine: Any, pool: str, delivery: str | None) -> None:
    fleet = container_fleet
    if delivery is not None:
        fleet.overrides.update({"DISPATCHER_LEASE_MODE": "runner",
                                "DISPATCHER_WORK_SECRET_DELIVERY": delivery})
    _warm_fleet(fleet, pool=pool)
    (warm_id,) = _ready(fleet, engine, 1)
    work_id = fleet.create(fake_duration=3)
    fleet.wait_event(work_id, "started", timeout=60)
    assert _host(fleet, work_id) == warm_id[:12], "the session ran in the warm container"
    secret = json.loads(str(fleet.redis.get(f"{fleet.prefix}:work:{work_id}")))["secret"]
    shown = subprocess.run(["docker", "inspect", warm_id], capture_output=True, text=True,
                           check=True).stdout
    assert secret not in shown, "no env, label or command of the container holds the secret"
    assert work_id not in shown, "its labels and environment were fixed before the work came"
    started = fleet.events(work_id, "started")[0]
    assert started["stdin_work_id"] == work_id and started["stdin_secret_sha256"] == _sha(secret)
    names = started["env_names"].split()
    assert {"ANTHROPIC_SESSION_ID", "ANTHROPIC_WORK_ID", "ANTHROPIC_ENVIRONMENT_ID",
            "ANTHROPIC_ENVIRONMENT_KEY", "DISPATCHER_ATTEMPT"} <= set(names)
    assert "DISPATCHER_REDIS_URL" not in names and "ANTHROPIC_WORK_SECRET" not in names
    if delivery == "file":
        assert started["file_secret_sha256"] == _sha(secret) and started["file_mode"] == "600"
    fleet.wait_stopped([work_id], timeout=60)
    assert fleet.events(work_id, "exited")[0]["reason"] == "completed"
    wait_for(lambda: warm_id not in {c["Id"] for c in fleet.containers(engine)}, timeout=10,
             what="the session's container removed")
    (refill,) = _ready(fleet, engine, 1)
    assert refill != warm_id, "a new container, never the used one again"
    counted = warm_starts(Metrics(fleet.redis, prefix=fleet.prefix).values())
    assert counted == {"hit": 1}
    assert "start=warm" in fleet.log("w1")


def test_the_pool_refills_and_a_session_beyond_it_starts_cold(container_fleet: Fleet,
                                                              engine: Any) -> None:
    fleet = container_fleet
    _warm_fleet(fleet, warm=1)
    _ready(fleet, engine, 1)
    first, second = fleet.create(fake_duration=4), fleet.create(fake_duration=4)
    fleet.wait_event(first, "started", timeout=60)
    fleet.wait_event(second, "started", timeout=60)
    fleet.wait_stopped([first, second], timeout=60)
    counted = warm_starts(Metrics(fleet.redis, prefix=fleet.prefix).values())
    assert counted == {"hit": 1, "miss": 1}, counted
    # The refill began at the first claim; on two busy cores the engine may still be creating
    # it when both sessions end. It is claimable once the pool's book has it.
    wait_for(lambda: _claimable(fleet) >= 1, timeout=60, what="the pool refilled")
    third = fleet.create(fake_duration=1)
    fleet.wait_event(third, "started", timeout=60)
    assert warm_starts(Metrics(fleet.redis, prefix=fleet.prefix).values())["hit"] == 2
    fleet.wait_stopped([third], timeout=60)


def _running_warm(fleet: Fleet, engine: Any, **metadata: Any) -> tuple[str, str]:
    _warm_fleet(fleet)
    (warm_id,) = _ready(fleet, engine, 1)
    work_id = fleet.create(fake_duration=60, **metadata)
    fleet.wait_event(work_id, "started", timeout=60)
    assert _host(fleet, work_id) == warm_id[:12]
    return work_id, warm_id


def test_a_graceful_stop_reaches_the_warm_session_as_sigterm(container_fleet: Fleet,
                                                             engine: Any) -> None:
    fleet = container_fleet
    work_id, warm_id = _running_warm(fleet, engine)
    fleet.admin.stop(work_id, force=False)
    asked = time.monotonic()
    wait_for(lambda: fleet.events(work_id, "sigterm"), timeout=10, interval=0.02,
             what="SIGTERM in the session")
    assert time.monotonic() - asked < STOP_BOUND_SECONDS
    fleet.wait_event(work_id, "exited", timeout=10)
    assert fleet.events(work_id, "exited")[0]["reason"] == "sigterm"
    wait_for(lambda: warm_id not in {c["Id"] for c in fleet.containers(engine)}, timeout=10,
             what="container removed")
    fleet.wait_stopped([work_id], timeout=30)


def test_a_warm_session_that_ignores_sigterm_is_killed_after_the_grace(
        container_fleet: Fleet, engine: Any) -> None:
    fleet = container_fleet  # DISPATCHER_STOP_GRACE_SECONDS=2 in test fleets
    work_id, warm_id = _running_warm(fleet, engine, fake_ignore_sigterm=1)
    fleet.admin.stop(work_id, force=False)
    asked = time.monotonic()
    fleet.wait_event(work_id, "sigterm", timeout=10)
    wait_for(lambda: warm_id not in {c["Id"] for c in fleet.containers(engine, running=True)},
             timeout=10, interval=0.05, what="container killed")
    waited = time.monotonic() - asked
    assert 2.0 <= waited < 2.0 + STOP_BOUND_SECONDS, waited
    assert not fleet.events(work_id, "exited"), "it never ended by itself"
    fleet.wait_stopped([work_id], timeout=30)


def test_a_forced_stop_kills_the_warm_session_at_once(container_fleet: Fleet,
                                                      engine: Any) -> None:
    fleet = container_fleet
    work_id, warm_id = _running_warm(fleet, engine)
    fleet.admin.stop(work_id, force=True)
    asked = time.monotonic()
    wait_for(lambda: warm_id not in {c["Id"] for c in fleet.containers(engine, running=True)},
             timeout=10, interval=0.02, what="container killed")
    assert time.monotonic() - asked < STOP_BOUND_SECONDS
    assert not fleet.events(work_id, "sigterm"), "a forced stop gives no grace"
    fleet.wait_stopped([work_id], timeout=30)


def test_a_pool_of_zero_starts_every_session_cold(container_fleet: Fleet, engine: Any) -> None:
    fleet = container_fleet
    _warm_fleet(fleet, warm=0)
    work_id = fleet.create(fake_duration=2)
    fleet.wait_event(work_id, "started", timeout=60)
    (container,) = fleet.containers(engine, running=True)
    assert container["Labels"]["dispatcher.work_id"] == work_id, "a cold, labelled container"
    assert not _warm(fleet, engine)
    fleet.wait_stopped([work_id], timeout=30)
    assert not warm_starts(Metrics(fleet.redis, prefix=fleet.prefix).values())
    assert "warm pool" not in fleet.log("w1")


def test_the_reaper_leaves_a_live_workers_warm_containers_and_removes_a_dead_ones(
        container_fleet: Fleet, engine: Any) -> None:
    fleet = container_fleet
    fleet.overrides["DISPATCHER_WARM_CONTAINERS"] = "2"
    fleet.worker("control", queues="dispatcher.control", beat=True)
    fleet.worker("w1", concurrency=2, queues="dispatcher.sessions")
    w1_ids = set(_ready(fleet, engine, 2))
    fleet.worker("w2", concurrency=2, queues="dispatcher.sessions")
    wait_for(lambda: len(_warm(fleet, engine)) == 4, timeout=60, what="both pools full")
    wait_for(lambda: fleet.log("w2").count("warm pool") >= 1, timeout=10, what="w2's pool")
    # Several passes of both reapers: none removes a warm container of a live worker.
    time.sleep(3)
    assert w1_ids <= {c["Id"] for c in _warm(fleet, engine)}
    assert "container reaped" not in fleet.log("w1") + fleet.log("w2")
    fleet.kill("w1", signal.SIGKILL)
    killed_at = time.monotonic()
    wait_for(lambda: not w1_ids & {c["Id"] for c in fleet.containers(engine)},
             timeout=DEAD_OWNER_REAPED_SECONDS + 10, interval=0.2,
             what="the dead worker's warm containers reaped")
    assert time.monotonic() - killed_at <= DEAD_OWNER_REAPED_SECONDS
    assert "warm=True" in fleet.log("w2")
    assert len(_warm(fleet, engine)) == 2, "w2's own pool untouched"
