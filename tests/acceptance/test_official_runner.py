"""The official runner, SDK `EnvironmentWorker.handle_item` unmodified, as the on-work program of
runner mode, through a real fleet against the emulator's scripted agent:

* in a process: the SDK's documented recipe (`handle_item()`, the secret from
  ANTHROPIC_WORK_SECRET, the process runtime's default delivery);
* in a container of the image built from Debian's packages (`bench/runner_image.py`), whose
  command is the stdin entry point (`stdin_runner.py`: the secret only inside the work JSON on
  stdin, the docker runtime's default), on a user-defined bridge network, reaching the emulator
  at the bridge's gateway.

Every tool result the emulator records must be the one the script expects, each call once;
a stop during a long call ends the runner as asked, and a session worker SIGKILLed during one
hands the session on: the other worker's runner carries the script to its end.
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import docker
import pytest

from bench.runner_image import RunnerImageError, ensure_image
from tests.support.emulator import under_both_models
from tests.support.engine import ensure_engine
from tests.support.fleet import Fleet, flush_fleet_db
from tests.support.official_runner import (
    ON_WORK,
    SCRIPT,
    check_results,
    scripted_session,
)
from tests.support.waiting import wait_for

pytestmark = pytest.mark.acceptance

# After the script's turn ends the runner waits this long for more, then ends the item.
MAX_IDLE_S = 0.5
SESSIONS = 2


# --- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def runner_image() -> str:
    """The official runner's image, by its id (the runtime refuses a mutable tag); a build that
    cannot finish fails the test with its line."""
    client = ensure_engine()
    try:
        tag = ensure_image()
    except RunnerImageError as exc:
        pytest.fail(str(exc), pytrace=False)
    return str(client.inspect_image(tag)["Id"])


@pytest.fixture(scope="session")
def bridge() -> Iterator[tuple[str, str]]:
    """A user-defined bridge network of the engine (the test engine has no default bridge), and
    its gateway: the host's address as a container on it sees it."""
    client = ensure_engine()
    name = f"dispatcher-runner-{uuid.uuid4().hex[:8]}"
    client.create_network(name, driver="bridge")
    try:
        config = client.inspect_network(name)["IPAM"]["Config"][0]
        yield name, str(config["Gateway"])
    finally:
        client.remove_network(name)
        client.close()


def _runner_mode(tmp_path: Path) -> dict[str, str]:
    """Runner mode with the SDK's documented on-work program, in processes."""
    return {"DISPATCHER_LEASE_MODE": "runner",
            "DISPATCHER_ON_WORK": f"{sys.executable} {ON_WORK} {tmp_path / 'work'} {MAX_IDLE_S}"}


@pytest.fixture
def runner_fleet(fleet: Fleet, tmp_path: Path) -> Fleet:
    """Runner mode with the SDK's documented on-work program, in processes."""
    fleet.overrides.update(_runner_mode(tmp_path))
    return fleet


@pytest.fixture
def container_runner_fleet(emulator_factory: Callable[..., Any], tmp_path: Path,
                           runner_image: str, bridge: tuple[str, str]) -> Iterator[Fleet]:
    """Runner mode in containers of the runner image, on the bridge; the emulator listens where
    the containers reach it, and the fleet uses that address too (it hands its own to them)."""
    network, gateway = bridge
    emulator = emulator_factory("--host", "0.0.0.0")
    base = os.environ.get("DISPATCHER_TEST_REDIS", "redis://127.0.0.1:6379")
    fleet = Fleet(emulator, tmp_path, base)
    fleet.use_containers(runner_image)
    fleet.overrides.update({
        "ANTHROPIC_BASE_URL": f"http://{gateway}:{emulator.port}",
        "DISPATCHER_LEASE_MODE": "runner",
        "DISPATCHER_SANDBOX_NETWORK": network,
        "DISPATCHER_SANDBOX_TMPFS": "/tmp",
        "DISPATCHER_SANDBOX_COMMAND": "/opt/sdk/bin/python /opt/dispatcher/stdin_runner.py "
                                      f"--workdir /tmp --max-idle {MAX_IDLE_S}",
    })
    engine = docker.APIClient(version="auto", timeout=60)
    try:
        yield fleet
    finally:
        fleet.stop_all()
        leftover = fleet.containers(engine)
        for container in leftover:
            engine.remove_container(container["Id"], force=True)
        engine.close()
        assert not leftover, "containers of the fleet outlived it"


# --- helpers -------------------------------------------------------------------------------------
def _scripted(fleet: Fleet, script: list[dict[str, Any]]) -> tuple[str, str]:
    """A session the scripted agent drives; (session id, work id)."""
    return scripted_session(fleet.emulator, fleet.environment_id, script)


def _log(fleet: Fleet, endpoint: str, **match: str) -> list[dict[str, Any]]:
    return [e for e in fleet.emulator.requests_log() if e.get("endpoint") == endpoint
            and all(e.get(k) == v for k, v in match.items())]


def _runs_the_script(fleet: Fleet) -> None:
    fleet.worker("w1", beat=True)
    sessions = [_scripted(fleet, SCRIPT) for _ in range(SESSIONS)]
    fleet.wait_stopped([work_id for _, work_id in sessions], timeout=180)
    for session_id, work_id in sessions:
        check_results(_log(fleet, "tool_result", session_id=session_id))
        claims = [b for b in _log(fleet, "heartbeat", work_id=work_id)
                  if b["expected_last_heartbeat"] == "NO_HEARTBEAT"]
        assert [c["status"] for c in claims] == [200], "claimed once, by the runner"
        session = fleet.emulator.http.get(f"/v1/sessions/{session_id}",
                                          headers=fleet.emulator.org_headers).json()
        assert session["status"] == "idle"
        assert fleet.lease(work_id).get("attempt", "1") == "1", "one attempt"


def _signals(fleet: Fleet, work_id: str) -> list[str]:
    """The signal steps the worker logged for the item (`terminated`, `killed`)."""
    return [word for line in fleet.log("w1").splitlines() if f"work_id={work_id}" in line
            for word in ("terminated", "killed") if f" {word} work_id=" in f" {line}"]


def _never_finished(fleet: Fleet, session_id: str) -> None:
    """The long call has no result, or the one the SDK sends for a call its stop cancelled."""
    results = _log(fleet, "tool_result", session_id=session_id)
    assert len(results) <= 1, results
    for result in results:
        assert result["is_error"] and "was stopped" in "\n".join(result["content"]), result


def _long_call(marker_dir: str, session: str) -> list[dict[str, Any]]:
    """One bash call that says it started (its shell's pid in a marker file), then runs long."""
    marker = f"{marker_dir}/{session}.started"
    return [{"name": "bash", "input": {"command": f"echo $$ > {marker}; exec sleep 300"}}]


# --- process runtime -----------------------------------------------------------------------------
@under_both_models
def test_handle_item_in_a_process_runs_every_scripted_call(runner_fleet: Fleet) -> None:
    _runs_the_script(runner_fleet)


@pytest.mark.parametrize("force", [False, True])
def test_a_stop_during_a_long_call_ends_handle_item_in_a_process(runner_fleet: Fleet,
                                                                 force: bool) -> None:
    """Graceful: the runner ends within the grace (no SIGKILL). Forced: killed within 2 s."""
    fleet = runner_fleet
    session_id, work_id = _long_call_started(fleet, str(fleet.records_dir), timeout=60)
    shell = int(next(fleet.records_dir.glob("*.started")).read_text())
    requested = time.monotonic()
    fleet.admin.stop(work_id, force=force)
    wait_for(lambda: not _alive(shell), timeout=15 if not force else 5, interval=0.05,
             what="the tool call's shell ended")
    _ended_as_asked(fleet, session_id, work_id, force, time.monotonic() - requested)


def _long_call_started(fleet: Fleet, marker_dir: str, *, timeout: float) -> tuple[str, str]:
    """A worker with a 15 s stop grace runs a session whose one call runs long; returns once
    the call started."""
    fleet.overrides["DISPATCHER_STOP_GRACE_SECONDS"] = "15"
    fleet.worker("w1", beat=True)
    tag = uuid.uuid4().hex[:8]
    session_id, work_id = _scripted(fleet, _long_call(marker_dir, tag))
    marker = fleet.records_dir / f"{tag}.started"
    wait_for(marker.exists, timeout=timeout, what="the long bash call started")
    return session_id, work_id


def _ended_as_asked(fleet: Fleet, session_id: str, work_id: str, force: bool,
                    ended_after: float, *, killed_on_its_way_out: bool = False) -> None:
    """A forced stop killed the runner within 2 s; a graceful one let it end within the grace
    with no SIGKILL. `killed_on_its_way_out`: the container's entry point ends a session on
    SIGTERM as the SDK does, force-stopping its item, so the fleet may see that `stopped` and
    kill a runner already on its way out (after `terminated`, a `killed` may follow)."""
    fleet.wait_stopped([work_id], timeout=30)
    if force:
        assert ended_after < 2.0, f"a forced stop killed it after {ended_after:.1f}s"
        assert _signals(fleet, work_id) == ["killed"]
    else:
        assert ended_after < 15, "ended within the grace"
        signals = _signals(fleet, work_id)
        if killed_on_its_way_out:
            signals = signals[:1]
        assert signals == ["terminated"], "no SIGKILL was needed"
    _never_finished(fleet, session_id)


# The server hands a lapsed lease out again (SDK 2.17's model ends the item instead), six
# seconds after the dead runner's last heartbeat (it beats every ttl/2: 3 s).
LAPSE_COMES_BACK = ("--lease-expiry", "requeue", "--min-ttl", "1", "--default-ttl", "6")
# The long call: long enough to be killed in, short enough to run to its end the second time.
LONG_CALL_S = 8


def test_a_session_worker_killed_mid_tool_hands_the_session_on(
        emulator_factory: Callable[..., Any], tmp_path: Path) -> None:
    """A session worker SIGKILLed while `handle_item` runs a long bash call: its guardian ends
    the runner, the dead runner's lease lapses and comes back, the other session worker claims
    it afresh and a new `handle_item` carries the session on: the call runs again there, to its
    end, and the rest of the script after it, each result recorded once."""
    flush_fleet_db()
    fleet = Fleet(emulator_factory(*LAPSE_COMES_BACK), tmp_path)
    fleet.overrides.update(_runner_mode(tmp_path))
    try:
        fleet.worker("control", concurrency=4, queues="dispatcher.control", beat=True)
        fleet.worker("s1", concurrency=2, queues="dispatcher.sessions")
        fleet.worker("s2", concurrency=2, queues="dispatcher.sessions")
        fleet.wait_slots(4)
        shells = fleet.records_dir / "shells"
        long_call = {"name": "bash", "input": {
            "command": f"echo $$ >> {shells}; sleep {LONG_CALL_S}; echo slept"}}
        session_id, work_id = _scripted(fleet, [long_call, *SCRIPT])
        wait_for(shells.exists, timeout=60, what="the long bash call started")
        first = int(shells.read_text())
        victim = next(name for name in ("s1", "s2")
                      if fleet.hostname(name) in fleet.lease(work_id).get("worker", ""))
        fleet.kill(victim)
        wait_for(lambda: not _alive(first), timeout=5, interval=0.02,
                 what="the killed worker's runner ended with it")
        fleet.wait_stopped([work_id], timeout=120)

        results = _log(fleet, "tool_result", session_id=session_id)
        assert [r["content"] for r in results[:1]] == [["slept"]], (
            "the long call ran to its end, once, on the other worker")
        check_results(results[1:])
        again = [int(pid) for pid in shells.read_text().split()]
        assert len(again) == 2 and again[0] == first, "the call ran again, in a new shell"
        other = "s2" if victim == "s1" else "s1"
        assert f"work_id={work_id}" in fleet.log(other), "carried on by the other worker"
        session = fleet.emulator.http.get(f"/v1/sessions/{session_id}",
                                          headers=fleet.emulator.org_headers).json()
        assert session["status"] == "idle", "the script completed"
    finally:
        fleet.stop_all()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not _zombie(pid)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return False


# --- docker runtime ------------------------------------------------------------------------------
def test_handle_item_in_a_container_runs_every_scripted_call(
        container_runner_fleet: Fleet) -> None:
    _runs_the_script(container_runner_fleet)


@pytest.mark.parametrize("force", [False, True])
def test_a_stop_during_a_long_call_ends_handle_item_in_a_container(
        container_runner_fleet: Fleet, force: bool) -> None:
    fleet = container_runner_fleet
    session_id, work_id = _long_call_started(fleet, "/records", timeout=120)
    engine = docker.APIClient(version="auto", timeout=60)
    try:
        requested = time.monotonic()
        fleet.admin.stop(work_id, force=force)
        wait_for(lambda: not fleet.containers(engine, running=True), timeout=20, interval=0.05,
                 what="the container ended")
        ended_after = time.monotonic() - requested
    finally:
        engine.close()
    _ended_as_asked(fleet, session_id, work_id, force, ended_after, killed_on_its_way_out=True)
