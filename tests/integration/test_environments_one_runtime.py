"""One fleet, two environments, each with a key of its own on the emulator (which refuses a key
on any environment but its own): every call is made with the lease's own environment's key,
and the pollers share the fleet's slots fairly. Real Redis and the emulator over HTTP."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dispatcher.control.bridge import scan_server_stops
from dispatcher.control.heartbeat import heartbeat_due_leases
from dispatcher.control.poll_keys import PollKeys
from dispatcher.control.poller import drain, run_poller
from dispatcher.metrics import FleetCollector
from dispatcher.ops.stack import FAKE_SESSION
from dispatcher.runtime import Runtime
from dispatcher.session.attempt import _spec
from dispatcher.settings import load_settings
from tests.support.inprocess import SentTasks, close_runtime
from tests.support.isolation import integration_db, redis_url

pytestmark = pytest.mark.integration

GPU = "dispatcher.gpu"


def _environment(emulator: Any, key: str) -> str:
    """An environment that only `key` opens (the emulator's per-environment key)."""
    response = emulator.http.post("/v1/environments", headers=emulator.org_headers, json={
        "name": "multi", "config": {"type": "self_hosted"}, "environment_key": key})
    response.raise_for_status()
    return str(response.json()["id"])


@pytest.fixture
def two(emulator: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Runtime]:
    for name in ("ANTHROPIC_ENVIRONMENT_ID", "ANTHROPIC_ENVIRONMENT_KEY"):
        monkeypatch.delenv(name, raising=False)
    keys = [f"sk-ant-oat01-{uuid.uuid4().hex}" for _ in range(2)]
    a, b = (_environment(emulator, key) for key in keys)
    (tmp_path / "b.key").write_text(keys[1] + "\n")
    (tmp_path / "b.key").chmod(0o600)
    path = tmp_path / "environments.toml"
    path.write_text(f'[[environment]]\nid = "{a}"\nkey = "{keys[0]}"\n\n'
                    f'[[environment]]\nid = "{b}"\nkey_file = "b.key"\nqueue = "{GPU}"\n')
    prefix = f"multienv{uuid.uuid4().hex[:8]}"
    settings = load_settings(**{
        "ANTHROPIC_BASE_URL": emulator.base_url, "DISPATCHER_ENVIRONMENTS_FILE": str(path),
        "DISPATCHER_REDIS_URL": redis_url(integration_db()), "DISPATCHER_KEY_PREFIX": prefix,
        "DISPATCHER_ON_WORK": FAKE_SESSION, "DISPATCHER_DESIRED_TTL_SECONDS": 30,
        "DISPATCHER_SESSION_QUEUES": f"dispatcher.sessions,{GPU}"})
    rt = Runtime(settings=settings, app=SentTasks())
    rt.keys = dict(zip((a, b), keys, strict=True))  # type: ignore[attr-defined]
    try:
        yield rt
    finally:
        close_runtime(rt)


def _slots(runtime: Runtime, slots: int) -> None:
    runtime.capacity.advertise(hostname="w@h", slots=slots, pool="threads",
                               queues=["dispatcher.sessions", GPU])


def test_each_environment_is_worked_with_its_own_key(emulator: Any, two: Runtime) -> None:
    runtime = two
    a, b = (e.id for e in runtime.environments)
    _slots(runtime, 4)
    _, work_a = emulator.create_session(a)
    _, work_b = emulator.create_session(b)
    assert run_poller(runtime, environment_id=a, run_seconds=1.5) == 1
    assert run_poller(runtime, environment_id=b, run_seconds=1.5) == 1

    lease_a, lease_b = runtime.registry.get(work_a), runtime.registry.get(work_b)
    assert lease_a is not None and lease_b is not None
    assert (lease_a.environment_id, lease_a.queue) == (a, "dispatcher.sessions")
    assert (lease_b.environment_id, lease_b.queue) == (b, GPU), "b's own session queue"
    assert runtime.registry.held_by_environment([a, b]) == {a: 1, b: 1}

    # Heartbeats: the emulator answers 403 to a key on another environment.
    for work_id in (work_a, work_b):
        runtime.registry.schedule_heartbeat(work_id, 0)
    tally = heartbeat_due_leases(runtime)
    assert (tally.sent, tally.failed, tally.lost) == (2, 0, 0)
    collector = FleetCollector(runtime.metrics, runtime.registry, runtime.capacity, None,
                               environments=[a, b])
    families = {f.name: f for f in collector.collect()}
    beats = {(s.labels["environment"], s.labels["result"]): s.value
             for s in families["dispatcher_heartbeats"].samples if s.name.endswith("_total")}
    assert (beats[a, "ok"], beats[b, "ok"], beats[a, "failed"], beats[b, "failed"]) == (
        1, 1, 0, 0), "counted per environment"
    held = {s.labels["environment"]: s.value for s in families["dispatcher_leases_held"].samples}
    assert held == {a: 1, b: 1}

    # Stops: each environment's list, with its key.
    emulator.http.post(emulator.work_url(b, f"/{work_b}/stop"), headers=emulator.org_headers,
                       json={"force": False}).raise_for_status()
    assert scan_server_stops(runtime) == 1
    # Still queued: its task revoked and its lease released (stopped on the server) at once.
    assert runtime.registry.get(work_b) is None
    assert runtime.app.revoked == [lease_b.task_id]
    assert emulator.get(b, work_b)["state"] == "stopped"
    untouched = runtime.registry.get(work_a)
    assert untouched is not None and untouched.stop == ""
    listed = {e["environment_id"] for e in emulator.requests_log()
              if e.get("endpoint") == "list" and e.get("status") == 200}
    assert {a, b} <= listed

    # A session gets its own environment's id and key, never the other's.
    spec = _spec(runtime, lease_a, runtime.registry.work_json(lease_a.work_id))
    assert spec.env["ANTHROPIC_ENVIRONMENT_ID"] == a
    assert spec.env["ANTHROPIC_ENVIRONMENT_KEY"] == runtime.keys[a]  # type: ignore[attr-defined]
    assert spec.environment_id == a


def test_two_busy_environments_share_the_slots(emulator: Any, two: Runtime) -> None:
    runtime = two
    a, b = (e.id for e in runtime.environments)
    _slots(runtime, 4)
    for environment in (a, b, a, b, a, b, a, b):
        emulator.create_session(environment)

    claimed: dict[str, int] = {}

    def poll(environment: str) -> None:
        claimed[environment] = run_poller(runtime, environment_id=environment, run_seconds=3)

    threads = [threading.Thread(target=poll, args=(e,)) for e in (a, b)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert claimed == {a: 2, b: 2}, "each its half of 4 slots, with work waiting for both"
    assert runtime.capacity.free_slots() == 0

    # One environment's session ends: its slot is its own again, not the other's.
    held_a = [lease for lease in runtime.registry.all() if lease.environment_id == a]
    runtime.registry.delete(held_a[0].work_id)
    started = time.monotonic()
    assert run_poller(runtime, environment_id=b, run_seconds=1.0) == 0
    assert time.monotonic() - started >= 1.0
    assert run_poller(runtime, environment_id=a, run_seconds=1.5) == 1


def test_a_session_arriving_in_an_idle_environment_keeps_a_slot_of_its_share_free(
        emulator: Any, two: Runtime) -> None:
    """The poll that answered b's session notes it; once b's poll finds nothing more, b is idle,
    and its recent arrival keeps the rest of its share free from a for the window."""
    runtime = two
    runtime.settings = runtime.settings.model_copy(update={"idle_headroom_seconds": 30.0})
    a, b = (e.id for e in runtime.environments)
    _slots(runtime, 4)  # below ten slots: no shared slot, only demand keeps one free
    emulator.create_session(b)
    assert run_poller(runtime, environment_id=b, run_seconds=1.5) == 1
    keys = PollKeys(runtime.settings.key_prefix)
    assert runtime.redis.exists(keys.idle(b)), "its last poll found nothing"
    assert runtime.redis.zcard(keys.arrived(b)) == 1
    # a may claim its half (2), not b's second slot: it stays free while b's session is recent.
    assert runtime.capacity.allowance(a, runtime.maxima, demand_seconds=30.0) == 2
    # Past the window (here: none), b's unused slot is a's to take.
    assert runtime.capacity.allowance(a, runtime.maxima, demand_seconds=0.0) == 3


def test_a_wake_up_drains_each_environment_with_its_own_key(emulator: Any,
                                                             two: Runtime) -> None:
    """Webhook mode: a delivery names no environment, so each environment's queue is drained,
    each by its own drain (its own wake-up flag and lock)."""
    runtime = two
    a, b = (e.id for e in runtime.environments)
    _slots(runtime, 4)
    work_b = {emulator.create_session(b)[1] for _ in range(2)}
    assert drain(runtime, environment_id=a, reclaim_older_than_ms=2000, wake=True) == 0
    assert drain(runtime, environment_id=b, reclaim_older_than_ms=2000, wake=True) == 2
    assert set(runtime.registry.held_ids()) == work_b
    keys = PollKeys(runtime.settings.key_prefix)
    assert not any(runtime.redis.exists(keys.wanted(e)) for e in (a, b))
