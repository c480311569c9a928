"""A stop of an item that may have been delivered again goes as that delivery, as SDK 2.17's
poller stops an item: forced, with the delivery's own sessions token; after a 401 (the token
expired, or no longer opens the item), gracefully with the environment key, so that a worker
that holds the item by now winds down instead of being killed. A lease the fleet holds is
force-stopped with the environment key. Real Redis, the emulator over HTTP (which mints a
sessions token per delivery, each expiring on its own), another worker as raw HTTP."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import pytest

from dispatcher.control.heartbeat import heartbeat_due_leases
from dispatcher.control.poller import claim
from dispatcher.lease import events as ev
from dispatcher.lease.model import Ending, Phase
from dispatcher.runtime import Runtime
from dispatcher.workapi import NO_HEARTBEAT
from tests.support.inprocess import in_process_runtime, poll_until

pytestmark = pytest.mark.integration

# Leases that lapse a second after their last heartbeat and go back to the queue, so that
# another worker can take the item while the fleet still has a sandbox of it.
LAPSING = ("--lease-expiry", "requeue", "--min-ttl", "1", "--default-ttl", "1")
# A sessions token's life, short enough to outlive in a test.
TOKEN_LIFE_SECONDS = 2


def _stops(emu: Any, work_id: str) -> list[tuple[str, bool]]:
    """The stops of the item the server answered (a 401 is refused before the request log):
    (credential, force), in order."""
    return [(e["credential"], bool(e["force"])) for e in emu.requests_log()
            if e.get("work_id") == work_id and e.get("endpoint") == "stop"]


def _take_over(emu: Any, environment_id: str, work_id: str) -> None:
    """Another worker polls the item the server handed out again, acks it and claims its lease."""
    for _ in range(15):
        item = emu.poll(environment_id, block_ms=999, worker_id="rival")
        if item is not None and item["id"] == work_id:
            break
    else:
        raise AssertionError(f"{work_id} was never handed out again")
    emu.http.post(emu.work_url(environment_id, f"/{work_id}/ack"),
                  headers=emu.env_headers).raise_for_status()
    emu.http.post(emu.work_url(environment_id, f"/{work_id}/heartbeat"), headers=emu.env_headers,
                  params={"expected_last_heartbeat": NO_HEARTBEAT,
                          "desired_ttl_seconds": 60}).raise_for_status()


def _lost_while_running(emu: Any, runtime: Runtime) -> tuple[str, float]:
    """A session running here whose lease lapsed and went to another worker, which claimed it;
    our next heartbeat meets its token (412), so the lease is lost. Returns the work id and when
    our delivery of it was polled."""
    _, work_id = emu.create_session(runtime.environment_id)
    item = poll_until(runtime, work_id)
    polled_at = time.monotonic()
    assert claim(runtime, item)
    runtime.registry.update(work_id, phase=Phase.RUNNING)
    runtime.registry.unschedule_heartbeat(work_id)  # no heartbeat: the lease lapses
    _take_over(emu, runtime.environment_id, work_id)
    runtime.registry.schedule_heartbeat(work_id, runtime.registry.clock.now() - 1)
    heartbeat_due_leases(runtime)
    lease = runtime.registry.get(work_id)
    assert lease is not None and lease.lost, "the other worker's token refused ours: lost"
    return work_id, polled_at


def _sandbox_finished(runtime: Runtime, work_id: str) -> None:
    """The sandbox exited 0 before the kill landed: the session is done, its item stopped."""
    lease = runtime.registry.get(work_id)
    assert lease is not None
    runtime.executor.run(lease, ev.SandboxExited(lease.attempt, 0, draining=False,
                                                 next_task_id="unused"))


def test_a_session_that_ended_after_its_lease_was_lost_is_stopped_with_its_token(
        emulator_factory: Callable[..., Any]) -> None:
    emu = emulator_factory(*LAPSING)
    with in_process_runtime(emu, DISPATCHER_DESIRED_TTL_SECONDS=1) as runtime:
        work_id, _ = _lost_while_running(emu, runtime)
        _sandbox_finished(runtime, work_id)
        assert runtime.registry.get(work_id) is None, "released once the stop was answered"
        assert _stops(emu, work_id) == [("sessions_token", True)], (
            "forced, as our delivery's own sessions token, not the environment key")
        assert emu.get(runtime.environment_id, work_id)["state"] == "stopped"


def test_a_refused_token_falls_back_to_a_graceful_stop_with_the_environment_key(
        emulator_factory: Callable[..., Any], caplog: pytest.LogCaptureFixture) -> None:
    emu = emulator_factory(*LAPSING, "--sessions-token-life", str(TOKEN_LIFE_SECONDS))
    with in_process_runtime(emu, DISPATCHER_DESIRED_TTL_SECONDS=1) as runtime:
        work_id, polled_at = _lost_while_running(emu, runtime)
        # Our delivery's token expires; the other worker's, minted later, opens the item.
        time.sleep(max(0.0, polled_at + TOKEN_LIFE_SECONDS + 0.3 - time.monotonic()))
        with caplog.at_level(logging.INFO, logger="dispatcher"):
            _sandbox_finished(runtime, work_id)
        refused = [r for r in caplog.records if getattr(r, "action", None) == "stop token refused"]
        assert [getattr(r, "status", None) for r in refused] == [401]
        assert _stops(emu, work_id) == [("environment", False)], (
            "after the 401, one graceful stop with the environment key")
        assert runtime.registry.get(work_id) is None, "released once that was answered"
        assert emu.get(runtime.environment_id, work_id)["state"] == "stopping", (
            "the other worker is asked to stop, not killed")


def test_an_ended_item_delivered_again_is_stopped_as_the_new_delivery(
        emulator_factory: Callable[..., Any]) -> None:
    """The history refuses the re-delivery; its stop carries that delivery's token (the first
    one's may have expired by then)."""
    emu = emulator_factory(*LAPSING, "--sessions-token-life", str(TOKEN_LIFE_SECONDS))
    with in_process_runtime(emu, DISPATCHER_DESIRED_TTL_SECONDS=1) as runtime:
        _, work_id = emu.create_session(runtime.environment_id)
        assert claim(runtime, poll_until(runtime, work_id))
        runtime.registry.record_history(work_id, failures=0, ended=Ending.COMPLETED)
        runtime.registry.delete(work_id)  # the record is gone; the history stays
        time.sleep(TOKEN_LIFE_SECONDS + 0.3)  # the first delivery's token has expired
        assert not claim(runtime, poll_until(runtime, work_id)), "not run again"
        assert _stops(emu, work_id) == [("sessions_token", True)]
        assert emu.get(runtime.environment_id, work_id)["state"] == "stopped"


def test_a_lease_the_fleet_holds_is_force_stopped_with_the_environment_key(
        emulator: Any, runtime: Runtime) -> None:
    _, work_id = emulator.create_session(runtime.environment_id)
    assert claim(runtime, poll_until(runtime, work_id))
    runtime.registry.update(work_id, phase=Phase.RUNNING)
    _sandbox_finished(runtime, work_id)
    assert _stops(emulator, work_id) == [("environment", True)]
    assert emulator.get(runtime.environment_id, work_id)["state"] == "stopped"
