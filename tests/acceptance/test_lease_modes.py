"""Lease modes, healthchecks and unknown work types, with a real fleet."""

from __future__ import annotations

import pytest
from fleet import Fleet, wait_for

pytestmark = pytest.mark.acceptance


def _heartbeats(fleet: Fleet, work_id: str) -> list[dict[str, object]]:
    return [r for r in fleet.emulator.requests_log()
            if r.get("work_id") == work_id and r.get("endpoint") == "heartbeat"]


def test_runner_mode_leaves_the_lease_to_the_sandbox(fleet: Fleet) -> None:
    fleet.overrides["DISPATCHER_LEASE_MODE"] = "runner"
    fleet.worker("w1", beat=True)
    work_id = fleet.create(fake_duration=2, fake_heartbeat=1)
    fleet.wait_stopped([work_id], timeout=30)
    beats = fleet.events(work_id, "heartbeat")
    assert beats and all(b["status"] == 200 for b in beats), "the sandbox owned the lease"
    assert fleet.events(work_id, "exited")[0]["reason"] == "completed"
    # The sandbox claimed with NO_HEARTBEAT; had the dispatcher beaten first, that was a 412.
    server_beats = _heartbeats(fleet, work_id)
    assert server_beats[0]["expected_last_heartbeat"] == "NO_HEARTBEAT"
    assert len(server_beats) == len(beats), "every heartbeat came from the sandbox"


def test_handoff_mode_passes_the_lease_token_to_the_sandbox(fleet: Fleet) -> None:
    fleet.overrides["DISPATCHER_LEASE_MODE"] = "handoff"
    fleet.worker("w1", beat=True)
    work_id = fleet.create(fake_duration=2, fake_heartbeat=1)
    fleet.wait_stopped([work_id], timeout=30)
    token = fleet.events(work_id, "started")[0]["env"]["ANTHROPIC_WORK_LAST_HEARTBEAT"]
    assert token, "the sandbox got the dispatcher's lease token"
    server_beats = _heartbeats(fleet, work_id)
    assert server_beats[0]["expected_last_heartbeat"] == "NO_HEARTBEAT", "dispatcher claimed"
    assert any(b["expected_last_heartbeat"] == token for b in server_beats), "sandbox continued"
    assert all(b["status"] == 200 for b in server_beats), "no beat was refused"
    assert fleet.events(work_id, "exited")[0]["reason"] == "completed"


def test_a_healthcheck_is_answered_without_a_session(fleet: Fleet) -> None:
    fleet.worker("w1", beat=True)
    item = fleet.emulator.healthcheck(fleet.environment_id)
    fleet.wait_stopped([item["id"]], timeout=30)
    assert fleet.records(item["id"]) == []
    wait_for(lambda: "healthcheck answered" in fleet.log("w1"), timeout=10, what="log line")
    assert "healthy=True" in fleet.log("w1")


def test_an_unknown_work_type_is_stopped_and_never_run(fleet: Fleet) -> None:
    fleet.worker("w1", beat=True)
    item = fleet.emulator.enqueue(fleet.environment_id, "mystery", {"fake.duration": "1"})
    fleet.wait_stopped([item["id"]], timeout=30)
    assert fleet.records(item["id"]) == []
    assert "unknown work type" in fleet.log("w1")
