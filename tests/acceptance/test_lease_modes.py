"""Lease modes, healthchecks and unknown work types, with a real fleet."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from tests.support.fleet import Fleet
from tests.support.waiting import wait_for

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


def _official_recipe(fleet: Fleet, tmp_path: Path) -> None:
    """DISPATCHER_ON_WORK as the official docs write it: a script that runs `ant beta:worker
    run`. Here `ant` is the fake session program, which claims its lease as the runner does
    (first heartbeat NO_HEARTBEAT, then the token echoed) when the item asks for it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    ant = bin_dir / "ant"
    ant.write_text(f"#!/bin/sh\nexec {sys.executable} -m dispatcher.emulator.fake_session\n")
    ant.chmod(0o755)
    spawn = tmp_path / "spawn.sh"
    spawn.write_text("#!/bin/sh\n# the runner claims the work item's lease itself\n"
                     "exec ant beta:worker run\n")
    spawn.chmod(0o755)
    fleet.overrides["DISPATCHER_ON_WORK"] = str(spawn)
    fleet.overrides["PATH"] = f"{bin_dir}:{os.environ['PATH']}"


def test_the_official_runner_is_refused_in_the_default_mode_naming_the_setting(
        fleet: Fleet, tmp_path: Path) -> None:
    _official_recipe(fleet, tmp_path)
    worker = fleet.worker("w1", beat=True)
    assert worker.wait(timeout=60) != 0, "the worker refused to start"
    lines = [x for x in fleet.log("w1").splitlines() if x.startswith("dispatcher: ")]
    assert len(lines) == 1, fleet.log("w1")[-2000:]
    assert "`beta:worker run` in " in lines[0] and "spawn.sh" in lines[0]
    assert "set DISPATCHER_LEASE_MODE=runner" in lines[0]


@pytest.mark.parametrize(("delivery", "variable"), [("file", "ANTHROPIC_WORK_SECRET_FILE"),
                                                    ("env", "ANTHROPIC_WORK_SECRET")])
def test_the_official_runner_works_in_runner_mode_and_no_session_meets_a_412(
        fleet: Fleet, tmp_path: Path, delivery: str, variable: str) -> None:
    _official_recipe(fleet, tmp_path)
    fleet.overrides["DISPATCHER_LEASE_MODE"] = "runner"
    fleet.overrides["DISPATCHER_WORK_SECRET_DELIVERY"] = delivery
    fleet.worker("w1", beat=True)
    work_ids = [fleet.create(fake_duration=2, fake_heartbeat=1) for _ in range(3)]
    fleet.wait_stopped(work_ids, timeout=60)
    for work_id in work_ids:
        assert fleet.events(work_id, "exited")[0]["reason"] == "completed"
        names = fleet.events(work_id, "started")[0]["env_names"]
        (other,) = {"ANTHROPIC_WORK_SECRET_FILE", "ANTHROPIC_WORK_SECRET"} - {variable}
        assert variable in names and other not in names, "the secret the chosen way only"
        beats = _heartbeats(fleet, work_id)
        assert beats[0]["expected_last_heartbeat"] == "NO_HEARTBEAT"
        assert all(b["status"] == 200 for b in beats), "no heartbeat was refused"
