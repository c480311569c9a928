"""`dispatcher status --check` as a container health check runs it: a subprocess reading a real
Redis, whose registry state is written through the real LeaseRegistry and Capacity classes.
Each answer comes quickly, whatever it is: no broadcast to the fleet, no long Redis timeout."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from dispatcher.celery.keys import CeleryKeys
from dispatcher.control.capacity import ADVERTISE_INTERVAL_SECONDS, Capacity
from dispatcher.lease.model import Lease, Phase
from dispatcher.lease.registry import LeaseRegistry
from tests.support.bounds import STATUS_CHECK_SECONDS
from tests.support.isolation import free_port, integration_db, redis_url

pytestmark = pytest.mark.integration

DISPATCHER = Path(sys.executable).with_name("dispatcher")


class Fleet:
    def __init__(self, r: redis.Redis, url: str, prefix: str) -> None:
        self.redis, self.url, self.prefix = r, url, prefix
        self.registry = LeaseRegistry(r, prefix=prefix)
        self.capacity = Capacity(r, prefix=prefix)
        self.done = threading.Event()

    def healthy(self) -> None:
        """A session worker with free slots, a beat holding its lock, a lease beaten 3 s ago.
        The workers go on advertising, as live ones do, until the test ends: a check whose
        interpreter takes seconds to start on a busy machine must not find them gone."""
        self._advertise()
        # A live beat renews its lock; this one holds it for the longest a check may take.
        self.redis.set(CeleryKeys(self.prefix).beat_lock, "token", px=60_000)
        self.add_lease("work_ok", beaten_ago=3)
        threading.Thread(target=self._keep_advertising, daemon=True).start()

    def _advertise(self) -> None:
        self.capacity.advertise(hostname="sessions@h", slots=4, pool="threads",
                                queues=["dispatcher.sessions"])
        self.capacity.advertise(hostname="control@h", slots=0, pool="threads",
                                queues=["dispatcher.control"])

    def _keep_advertising(self) -> None:
        while not self.done.wait(ADVERTISE_INTERVAL_SECONDS):
            self._advertise()

    def add_lease(self, work_id: str, *, beaten_ago: float, ttl: int = 30) -> None:
        now = time.time()
        self.registry.create(Lease(work_id=work_id, session_id=f"sesn_{work_id}",
                                   environment_id="env_1", mode="dispatcher",
                                   queue="dispatcher.sessions", phase=Phase.RUNNING,
                                   worker="sessions@h", claimed_at=now - 60, ttl_seconds=ttl,
                                   heartbeat_ok_at=now - beaten_ago), work_json="{}")

    def check(self, url: str | None = None) -> tuple[int, str, float]:
        own = ("ANTHROPIC_", "DISPATCHER_")
        env = {k: v for k, v in os.environ.items() if not k.startswith(own)}
        env.update(DISPATCHER_REDIS_URL=url or self.url, DISPATCHER_KEY_PREFIX=self.prefix)
        started = time.monotonic()
        done = subprocess.run([str(DISPATCHER), "status", "--check"], env=env,
                              capture_output=True, text=True, timeout=30)
        return done.returncode, done.stdout + done.stderr, time.monotonic() - started


@pytest.fixture
def fleet() -> Iterator[Fleet]:
    url = redis_url(integration_db())
    prefix = f"check{uuid.uuid4().hex[:8]}"
    r = redis.Redis.from_url(url, decode_responses=True)
    fleet = Fleet(r, url, prefix)
    try:
        yield fleet
    finally:
        fleet.done.set()
        for key in r.scan_iter(f"{prefix}:*"):
            r.delete(key)
        r.close()



def test_a_healthy_fleet_exits_0(fleet: Fleet) -> None:
    fleet.healthy()
    code, output, took = fleet.check()
    assert (code, output.strip()) == (0, "ok: the fleet can work")
    assert took < STATUS_CHECK_SECONDS


def test_no_live_session_slots(fleet: Fleet) -> None:
    fleet.healthy()
    fleet.capacity.set_draining("sessions@h")
    code, output, took = fleet.check()
    assert code == 5 and "no live session slots" in output, output
    assert took < STATUS_CHECK_SECONDS


def test_beat_lock_not_held(fleet: Fleet) -> None:
    fleet.healthy()
    fleet.redis.delete(CeleryKeys(fleet.prefix).beat_lock)
    code, output, took = fleet.check()
    assert code == 5 and "beat's lock is not held" in output, output
    assert took < STATUS_CHECK_SECONDS


def test_a_lease_overdue_for_its_heartbeat(fleet: Fleet) -> None:
    fleet.healthy()
    fleet.add_lease("work_late", beaten_ago=25, ttl=30)
    code, output, took = fleet.check()
    assert code == 5 and "1 lease(s) overdue for a heartbeat: work_late" in output, output
    assert took < STATUS_CHECK_SECONDS


def test_redis_unreachable(fleet: Fleet) -> None:
    code, output, took = fleet.check(url=f"redis://127.0.0.1:{free_port()}/0")
    assert code == 3 and output.startswith("dispatcher status: Redis: "), output
    assert took < STATUS_CHECK_SECONDS


def _sigint_as_in_a_terminal() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_watch_redraws_until_ctrl_c(fleet: Fleet) -> None:
    fleet.healthy()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC_", "DISPATCHER_"))}
    env.update(DISPATCHER_REDIS_URL=fleet.url, DISPATCHER_KEY_PREFIX=fleet.prefix)
    # SIGINT as a terminal sends it, even when this test runs where SIGINT is ignored (a
    # background job of a non-interactive shell): an ignored SIGINT stays ignored across exec.
    with subprocess.Popen([str(DISPATCHER), "status", "--watch", "--interval", "0.2"],
                          env=env, stdout=subprocess.PIPE, text=True,
                          preexec_fn=_sigint_as_in_a_terminal) as process:
        try:
            assert process.stdout is not None
            summaries = 0
            while summaries < 2:
                line = process.stdout.readline()
                assert line, "status --watch ended on its own"
                summaries += line.startswith("1 leases held; 2 live workers")
            process.send_signal(signal.SIGINT)
            assert process.wait(timeout=10) == 0
        finally:
            if process.poll() is None:
                process.kill()
