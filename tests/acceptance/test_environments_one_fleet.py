"""Two environments, one fleet: real celery worker and beat, the emulator over HTTP with a key of
its own per environment (a key on the other environment is refused with 403), and the fake
session recording what each sandbox got."""

from __future__ import annotations

import hashlib
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from dispatcher.workapi import WorkClient
from tests.support.fleet import Fleet
from tests.support.waiting import wait_for

pytestmark = pytest.mark.acceptance

# A combined worker of concurrency 9 serving two environments keeps 3 pool slots for control
# tasks (two pollers, the ticks): 6 session slots. b may hold 2 at most, so a's share is 4.
CONCURRENCY = 9
SLOTS = 6
B_MAX = 2


class Environment:
    def __init__(self, fleet: Fleet, name: str) -> None:
        emulator = fleet.emulator
        self.key = f"sk-ant-oat01-{uuid.uuid4().hex}"
        response = emulator.http.post("/v1/environments", headers=emulator.org_headers, json={
            "name": name, "config": {"type": "self_hosted"}, "environment_key": self.key})
        response.raise_for_status()
        self.id = str(response.json()["id"])
        self.key_sha = hashlib.sha256(self.key.encode()).hexdigest()
        self.admin = WorkClient(base_url=emulator.base_url, environment_id=self.id,
                                api_key=emulator.api_key)
        self.emulator = emulator

    def create(self, **metadata: str) -> str:
        return str(self.emulator.create_session(self.id, metadata=metadata)[1])

    def stopped(self, work_ids: list[str]) -> bool:
        return all(self.admin.get(w).state == "stopped" for w in work_ids)


@pytest.fixture
def served(fleet: Fleet, tmp_path: Path) -> Iterator[tuple[Environment, Environment]]:
    """A combined worker with beat serving two environments, b with a maximum."""
    a, b = Environment(fleet, "a"), Environment(fleet, "b")
    (tmp_path / "a.key").write_text(a.key + "\n")
    (tmp_path / "a.key").chmod(0o600)
    fleet.serve_environments(f'[[environment]]\nid = "{a.id}"\nkey_file = "a.key"\n\n'
                             f'[[environment]]\nid = "{b.id}"\nkey = "{b.key}"\n'
                             f"max_sessions = {B_MAX}\n")
    fleet.overrides["DISPATCHER_DESIRED_TTL_SECONDS"] = "10"  # a heartbeat every ~3 s
    try:
        fleet.worker("w1", concurrency=CONCURRENCY, beat=True)
        fleet.wait_slots(SLOTS)
        yield a, b
    finally:
        a.admin.close()
        b.admin.close()


def _own_environment(fleet: Fleet, environment: Environment, work_ids: list[str]) -> None:
    for work_id in work_ids:
        started = fleet.events(work_id, "started")
        assert len(started) == 1, f"{work_id} started {len(started)} times"
        assert started[0]["env"]["ANTHROPIC_ENVIRONMENT_ID"] == environment.id
        assert started[0]["environment_key_sha256"] == environment.key_sha, "its own key"


def test_two_environments_share_one_fleet_each_with_its_own_key(
        fleet: Fleet, served: tuple[Environment, Environment]) -> None:
    a, b = served
    held: list[tuple[int, int]] = []
    done = threading.Event()

    def sample() -> None:
        keys = [f"{fleet.prefix}:leases-of:{e.id}" for e in (a, b)]
        while not done.is_set():
            pipe = fleet.redis.pipeline(transaction=False)
            for key in keys:
                pipe.zcard(key)
            count_a, count_b = pipe.execute()
            held.append((int(count_a), int(count_b)))
            done.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        work_a = [a.create(**{"fake.duration": "2"}) for _ in range(8)]
        work_b = [b.create(**{"fake.duration": "2"}) for _ in range(8)]
        wait_for(lambda: a.stopped(work_a) and b.stopped(work_b), timeout=120, interval=0.5,
                 what="every session of both environments")
    finally:
        done.set()
        sampler.join(timeout=5)

    _own_environment(fleet, a, work_a)
    _own_environment(fleet, b, work_b)
    assert max(n_a + n_b for n_a, n_b in held) <= SLOTS, "never more than the fleet's slots"
    assert max(n_b for _, n_b in held) <= B_MAX, "b's max_sessions"
    assert any(n_a and n_b for n_a, n_b in held), "both environments ran at once"
    assert max(n_a for n_a, _ in held) > SLOTS // 2, "a used what b's maximum left"
    assert fleet.sandbox_pids_alive() == []


def test_heartbeats_and_stops_work_per_environment(
        fleet: Fleet, served: tuple[Environment, Environment]) -> None:
    a, b = served
    long_a, long_b = a.create(**{"fake.duration": "60"}), b.create(**{"fake.duration": "60"})
    for work_id in (long_a, long_b):
        fleet.wait_event(work_id, "started")

    def beaten(work_id: str) -> int:
        # The claim is the first; the heartbeat tick's, with the server's token, the rest.
        return sum(1 for e in fleet.emulator.requests_log()
                   if e.get("endpoint") == "heartbeat" and e.get("work_id") == work_id
                   and e.get("status") == 200
                   and e.get("expected_last_heartbeat") != "NO_HEARTBEAT")

    wait_for(lambda: beaten(long_a) >= 2 and beaten(long_b) >= 2, timeout=30,
             what="two heartbeats of each environment's lease")
    a.admin.stop(long_a)
    b.admin.stop(long_b, force=True)
    wait_for(lambda: a.stopped([long_a]) and b.stopped([long_b]), timeout=30,
             what="both stopped")
    assert fleet.events(long_a, "sigterm"), "a's graceful stop reached its sandbox"
    assert not fleet.events(long_b, "sigterm"), "b's forced stop killed at once"
    _own_environment(fleet, a, [long_a])
    _own_environment(fleet, b, [long_b])
    wait_for(lambda: fleet.sandbox_pids_alive() == [], timeout=10, what="no sandbox left")
    log = fleet.log("w1")
    assert a.key not in log and b.key not in log, "no key in the worker's log"
