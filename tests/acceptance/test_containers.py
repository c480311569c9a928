"""The docker sandbox runtime on a real engine, with real workers: one container per attempt,
fed on stdin, stopped and removed through the engine, and reaped when its worker is killed."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from dispatcher.session.container import engine as engine_client
from dispatcher.settings import Settings
from tests.support.fleet import Fleet
from tests.support.waiting import wait_for

pytestmark = pytest.mark.acceptance

CONTRACT = ("ANTHROPIC_SESSION_ID", "ANTHROPIC_WORK_ID", "ANTHROPIC_ENVIRONMENT_ID",
            "ANTHROPIC_ENVIRONMENT_KEY", "ANTHROPIC_BASE_URL", "DISPATCHER_ATTEMPT")
# The supervisor acts on a stop within 0.2 s; the rest is the engine's kill and our polling.
STOP_BOUND_SECONDS = 2.0
MISSING_IMAGE = "dispatcher-no-such-image@sha256:" + "0" * 64


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _secret(fleet: Fleet, work_id: str) -> str:
    raw = fleet.redis.get(f"{fleet.prefix}:work:{work_id}")
    assert raw, "the work item is in the registry while its session runs"
    secret = json.loads(str(raw))["secret"]
    assert secret
    return str(secret)


def _inspect(container_id: str) -> str:
    """What `docker inspect` shows, as an operator would see it (the CLI)."""
    return subprocess.run(["docker", "inspect", container_id], capture_output=True, text=True,
                          check=True).stdout


def _running_of(fleet: Fleet, engine: Any, work_id: str) -> list[dict[str, Any]]:
    return [c for c in fleet.containers(engine, running=True)
            if c["Labels"].get("dispatcher.work_id") == work_id]


def test_sessions_run_once_in_containers_with_the_contract_and_no_secret_in_sight(
        container_fleet: Fleet, engine: Any) -> None:
    fleet = container_fleet
    fleet.worker("w1", beat=True)
    work_ids = [fleet.create(fake_duration=3) for _ in range(3)]
    for work_id in work_ids:
        fleet.wait_event(work_id, "started", timeout=60)
        secret = _secret(fleet, work_id)
        (container,) = _running_of(fleet, engine, work_id)
        shown = _inspect(container["Id"])
        assert secret not in shown, "the secret is in no env, label, command or inspect field"
        labels = container["Labels"]
        assert labels["dispatcher.fleet"] == fleet.prefix
        assert labels["dispatcher.environment"] == fleet.environment_id
        assert labels["dispatcher.attempt"] == "1"
        assert labels["dispatcher.session_id"] == fleet.events(work_id, "started")[0][
            "session_id"]
        started = fleet.events(work_id, "started")[0]
        assert started["stdin_work_id"] == work_id, "the work JSON came on stdin"
        assert started["stdin_secret_sha256"] == _sha(secret), "its secret with it"
        assert started["file_secret_sha256"] == "", "no secret file in dispatcher mode"
        names = started["env_names"].split()
        assert set(CONTRACT) <= set(names)
        assert "DISPATCHER_REDIS_URL" not in names and "ANTHROPIC_API_KEY" not in names
    fleet.wait_stopped(work_ids, timeout=60)
    for work_id in work_ids:
        assert len(fleet.events(work_id, "started")) == 1, "exactly once"
        assert fleet.events(work_id, "exited")[0]["reason"] == "completed"
    wait_for(lambda: not fleet.containers(engine), timeout=10, what="containers removed")


def test_a_container_of_the_default_settings_is_confined(container_fleet: Fleet,
                                                       engine: Any) -> None:
    """The fleet's settings name only the image, the network this machine has and the records
    mount: the rest is the runtime's defaults. The session still runs, as nobody, writing only
    where it may."""
    fleet = container_fleet
    fleet.worker("w1", beat=True)
    work_id = fleet.create(fake_duration=3)
    fleet.wait_event(work_id, "started", timeout=60)
    (container,) = _running_of(fleet, engine, work_id)
    shown = json.loads(_inspect(container["Id"]))[0]
    host = shown["HostConfig"]
    assert host["CapDrop"] == ["ALL"] and not host["CapAdd"]
    assert host["SecurityOpt"] == ["no-new-privileges"]
    assert host["PidsLimit"] == 512
    assert host["Memory"] == 2 * 1024**3 and host["MemorySwap"] == 2 * 1024**3
    assert host["NanoCpus"] == 1_000_000_000
    assert host["ReadonlyRootfs"] is True
    assert set(host["Tmpfs"]) == {"/workspace", "/tmp"}
    assert shown["Config"]["User"] == "65534:65534"
    assert shown["Config"]["WorkingDir"] == "/workspace"
    assert shown["Config"]["Labels"]["dispatcher.fleet_id"] == fleet.overrides[
        "DISPATCHER_FLEET_ID"]
    assert shown["Image"] == fleet.overrides["DISPATCHER_SANDBOX_IMAGE"], "run by its id"
    fleet.wait_stopped([work_id], timeout=30)
    assert fleet.events(work_id, "exited")[0]["reason"] == "completed"
    assert "sandbox image resolved" in fleet.log("w1")


def _stop_and_time(fleet: Fleet, engine: Any, *, force: bool,
                   ignore_sigterm: bool = False) -> tuple[str, float]:
    fleet.worker("w1", beat=True)
    metadata: dict[str, Any] = {"fake_duration": 60}
    if ignore_sigterm:
        metadata["fake_ignore_sigterm"] = 1
    work_id = fleet.create(**metadata)
    fleet.wait_event(work_id, "started", timeout=60)
    wait_for(lambda: _running_of(fleet, engine, work_id), timeout=10, what="container running")
    fleet.admin.stop(work_id, force=force)
    return work_id, time.monotonic()


def test_a_graceful_stop_reaches_the_container_as_sigterm_and_removes_it(
        container_fleet: Fleet, engine: Any) -> None:
    fleet = container_fleet
    work_id, asked = _stop_and_time(fleet, engine, force=False)
    wait_for(lambda: fleet.events(work_id, "sigterm"), timeout=10, interval=0.02,
             what="SIGTERM in the container")
    assert time.monotonic() - asked < STOP_BOUND_SECONDS
    # The session writes its exit a moment after the SIGTERM it handles: wait for it.
    fleet.wait_event(work_id, "exited", timeout=10)
    assert fleet.events(work_id, "exited")[0]["reason"] == "sigterm"
    wait_for(lambda: not fleet.containers(engine), timeout=10, what="container removed")
    fleet.wait_stopped([work_id], timeout=30)


def test_a_forced_stop_kills_the_container_at_once(container_fleet: Fleet, engine: Any) -> None:
    fleet = container_fleet
    work_id, asked = _stop_and_time(fleet, engine, force=True)
    wait_for(lambda: not _running_of(fleet, engine, work_id), timeout=10, interval=0.02,
             what="container killed")
    assert time.monotonic() - asked < STOP_BOUND_SECONDS
    assert not fleet.events(work_id, "sigterm"), "a forced stop gives no grace"
    wait_for(lambda: not fleet.containers(engine), timeout=10, what="container removed")


def test_a_container_that_ignores_sigterm_is_killed_after_the_grace(
        container_fleet: Fleet, engine: Any) -> None:
    fleet = container_fleet  # DISPATCHER_STOP_GRACE_SECONDS=2 in test fleets
    work_id, asked = _stop_and_time(fleet, engine, force=False, ignore_sigterm=True)
    fleet.wait_event(work_id, "sigterm", timeout=10)
    wait_for(lambda: not _running_of(fleet, engine, work_id), timeout=10, interval=0.05,
             what="container killed")
    waited = time.monotonic() - asked
    assert 2.0 <= waited < 2.0 + STOP_BOUND_SECONDS, waited
    assert not fleet.events(work_id, "exited"), "it never ended by itself"
    wait_for(lambda: not fleet.containers(engine), timeout=10, what="container removed")
    fleet.wait_stopped([work_id], timeout=30)


def _running_on_w1(fleet: Fleet, *, sessions: int, duration: int,
                   pool: str = "threads") -> list[str]:
    """A control worker and one session worker "w1" with a slot per session, all running."""
    fleet.worker("control", queues="dispatcher.control", beat=True)
    fleet.worker("w1", pool=pool, concurrency=sessions, queues="dispatcher.sessions")
    fleet.wait_slots(sessions)
    work_ids = [fleet.create(fake_duration=duration) for _ in range(sessions)]
    for work_id in work_ids:
        fleet.wait_event(work_id, "started", timeout=60)
    return work_ids


@pytest.mark.parametrize("pool", ["threads", "prefork"])
def test_a_killed_session_worker_leaves_no_container_and_its_sessions_run_again(
        container_fleet: Fleet, engine: Any, pool: str) -> None:
    fleet = container_fleet
    work_ids = _running_on_w1(fleet, sessions=2, duration=6, pool=pool)
    assert len(fleet.containers(engine, running=True)) == 2
    fleet.worker("w2", pool=pool, concurrency=2, queues="dispatcher.sessions")
    fleet.kill("w1", signal.SIGKILL)
    killed_at = time.monotonic()

    def first_attempts_running() -> list[dict[str, Any]]:
        return [c for c in fleet.containers(engine, running=True)
                if c["Labels"]["dispatcher.attempt"] == "1"]

    wait_for(lambda: not first_attempts_running(), timeout=10, interval=0.2,
             what="the killed worker's containers reaped")
    assert time.monotonic() - killed_at <= 10
    fleet.wait_stopped(work_ids, timeout=90)
    for work_id in work_ids:
        attempts = [e["attempt"] for e in fleet.events(work_id, "started")]
        assert attempts == ["1", "2"], attempts
        assert fleet.events(work_id, "exited")[-1]["reason"] == "completed"
    assert "container reaped" in fleet.log("w2")


def test_a_worker_starting_on_the_host_reaps_what_a_killed_one_left(
        container_fleet: Fleet, engine: Any) -> None:
    """The host's only session worker is SIGKILLed: its containers run on, unsupervised, until
    a session worker starts there again; its reaper removes them at start."""
    fleet = container_fleet
    # Longer than recovery's threshold (8 s without pulses) and its tick, with room to spare:
    # attempt 1's container must still be running when attempt 2 is made.
    (work_id,) = _running_on_w1(fleet, sessions=1, duration=20)
    fleet.kill("w1", signal.SIGKILL)
    wait_for(lambda: fleet.lease(work_id).get("attempt") == "2", timeout=30,
             what="recovery moved the session to attempt 2")
    assert _running_of(fleet, engine, work_id), "nobody has removed attempt 1 yet"
    fleet.worker("w2", concurrency=1, queues="dispatcher.sessions")
    wait_for(lambda: "container reaped" in fleet.log("w2"), timeout=30, what="reaped at start")
    fleet.wait_stopped([work_id], timeout=60)
    assert [e["attempt"] for e in fleet.events(work_id, "started")] == ["1", "2"]
    assert fleet.events(work_id, "exited")[-1]["reason"] == "completed"


def test_a_drained_worker_stops_its_containers_gracefully_and_hands_the_sessions_over(
        container_fleet: Fleet, engine: Any) -> None:
    fleet = container_fleet
    (work_id,) = _running_on_w1(fleet, sessions=1, duration=4)
    fleet.worker("w2", concurrency=1, queues="dispatcher.sessions")
    fleet.kill("w1", signal.SIGTERM)
    fleet.wait_event(work_id, "sigterm", timeout=10)
    fleet.wait_stopped([work_id], timeout=60)
    assert [e["attempt"] for e in fleet.events(work_id, "started")] == ["1", "2"]
    assert [e["reason"] for e in fleet.events(work_id, "exited")] == ["sigterm", "completed"]
    assert "attempt restarted" in fleet.log("w1")


@pytest.mark.parametrize("delivery", ["file", None])
def test_runner_mode_gives_the_container_its_secret_never_in_inspect(
        container_fleet: Fleet, engine: Any, delivery: str | None) -> None:
    """`file`: a 0600 file; unset (`none`): only the work JSON on stdin, as a read-only root
    file system still allows."""
    fleet = container_fleet
    fleet.overrides["DISPATCHER_LEASE_MODE"] = "runner"
    if delivery is not None:
        fleet.overrides["DISPATCHER_WORK_SECRET_DELIVERY"] = delivery
    fleet.worker("w1", beat=True)
    work_id = fleet.create(fake_duration=3)
    fleet.wait_event(work_id, "started", timeout=60)
    secret = _secret(fleet, work_id)
    (container,) = _running_of(fleet, engine, work_id)
    assert secret not in _inspect(container["Id"])
    started = fleet.events(work_id, "started")[0]
    assert started["stdin_secret_sha256"] == _sha(secret)
    if delivery == "file":
        assert started["file_secret_sha256"] == _sha(secret)
        assert started["file_mode"] == "600"
        assert "ANTHROPIC_WORK_SECRET_FILE" in started["env_names"].split()
    else:
        assert started["file_secret_sha256"] == ""
        assert "ANTHROPIC_WORK_SECRET" not in started["env_names"]
    # The test sandbox never heartbeats: the item is stopped when the container exits.
    fleet.wait_stopped([work_id], timeout=30)


def test_a_container_that_cannot_start_is_a_failed_attempt_and_its_item_is_stopped(
        container_fleet: Fleet, engine: Any) -> None:
    fleet = container_fleet
    fleet.overrides["DISPATCHER_SANDBOX_NETWORK"] = "no-such-network"
    fleet.worker("w1", beat=True)
    work_id = fleet.create(fake_duration=1)
    fleet.wait_stopped([work_id], timeout=30)
    wait_for(lambda: "sandbox not started" in fleet.log("w1"), timeout=10, what="log line")
    line = next(x for x in fleet.log("w1").splitlines() if "sandbox not started" in x)
    assert "no-such-network" in line, "the engine's message is in the log line"
    assert not fleet.containers(engine), "the container that failed to start was removed"


@pytest.mark.parametrize(("env", "expected"), [
    ({"DOCKER_HOST": "unix:///nonexistent/docker.sock"}, "does not answer (DOCKER_HOST)"),
    ({"DISPATCHER_SANDBOX_IMAGE": MISSING_IMAGE},
     "is not on the engine and DISPATCHER_SANDBOX_PULL=never"),
    ({"DISPATCHER_SANDBOX_IMAGE": MISSING_IMAGE, "DISPATCHER_SANDBOX_PULL": "missing"},
     "could not be pulled (DISPATCHER_SANDBOX_PULL=missing)"),
    ({"DISPATCHER_SANDBOX_IMAGE": "dispatcher-test-sandbox:latest"},
     "is a mutable tag: name it by digest (repo@sha256:...) or image id (sha256:...), or set "
     "DISPATCHER_SANDBOX_ALLOW_MUTABLE_TAG=true"),
    ({"DISPATCHER_SANDBOX_IMAGE": ""}, "DISPATCHER_SANDBOX_IMAGE is not set"),
])
def test_a_session_worker_that_cannot_run_containers_refuses_to_start_with_one_line(
        container_fleet: Fleet, env: dict[str, str], expected: str) -> None:
    fleet = container_fleet
    fleet.overrides.update(env)
    worker = fleet.worker("w1", queues="dispatcher.sessions")
    assert worker.wait(timeout=90) != 0
    lines = [x for x in fleet.log("w1").splitlines() if x.startswith("dispatcher: ")]
    assert len(lines) == 1 and expected in lines[0], fleet.log("w1")[-2000:]
    assert "Traceback" not in fleet.log("w1")


def test_the_official_runner_as_the_containers_command_is_refused_in_the_default_mode(
        container_fleet: Fleet) -> None:
    fleet = container_fleet
    fleet.overrides["DISPATCHER_SANDBOX_COMMAND"] = "ant beta:worker run"
    worker = fleet.worker("w1", queues="dispatcher.sessions")
    assert worker.wait(timeout=90) != 0
    assert "set DISPATCHER_LEASE_MODE=runner" in fleet.log("w1")


def _recipe() -> dict[str, str]:
    """The settings of the container recipe in docs/operations.md, as an operator copies them."""
    text = (Path(__file__).parents[2] / "docs" / "operations.md").read_text()
    section = text[text.index("## The container runtime"):]
    block = section[section.index("```sh\n") + 6:]
    block = block[:block.index("```")]
    settings: dict[str, str] = {}
    for line in block.splitlines():
        words = shlex.split(line, comments=True)
        if words[:1] == ["export"]:
            settings.update(word.split("=", 1) for word in words[1:])
    assert settings["DISPATCHER_SANDBOX_RUNTIME"] == "docker", block
    return settings


def test_the_operations_recipe_runs_sessions(container_fleet: Fleet, engine: Any) -> None:
    """The documented settings, with this machine's image and network (no registry, no
    bridge): the session runs as the unprivileged user, with its limits, and reads the secret
    file given to that user."""
    fleet = container_fleet
    recipe = _recipe()
    local = {"DISPATCHER_SANDBOX_IMAGE": fleet.overrides["DISPATCHER_SANDBOX_IMAGE"],
             "DISPATCHER_FLEET_ID": fleet.overrides["DISPATCHER_FLEET_ID"],
             "DISPATCHER_SANDBOX_NETWORK": "none"}
    fleet.overrides.update({**recipe, **local})
    fleet.worker("w1", beat=True)
    work_id = fleet.create(fake_duration=3)
    fleet.wait_event(work_id, "started", timeout=60)
    secret = _secret(fleet, work_id)
    (container,) = _running_of(fleet, engine, work_id)
    config = engine.inspect_container(container["Id"])
    assert config["Config"]["User"] == recipe["DISPATCHER_SANDBOX_USER"]
    assert config["HostConfig"]["NanoCpus"] == 2_000_000_000
    assert config["HostConfig"]["Memory"] == 4 * 1024**3
    assert config["Config"]["Labels"]["team"] == "agents"
    started = fleet.events(work_id, "started")[0]
    assert started["file_secret_sha256"] == _sha(secret), "the unprivileged user read it"
    fleet.wait_stopped([work_id], timeout=30)
    assert fleet.events(work_id, "exited")[0]["reason"] == "completed"


def test_each_process_talks_to_the_engine_through_its_own_client(engine: Any) -> None:
    """A forked pool child never uses its parent's client (it would share its sockets)."""
    settings = Settings()
    parent = engine_client(settings)
    assert engine_client(settings) is parent, "one client per process, reused"
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: answer through the pipe, never return into pytest
        try:
            child = engine_client(settings)
            os.write(write, b"1" if child is not parent and child.ping() else b"0")
        finally:
            os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    assert os.read(read, 1) == b"1"
    os.close(read)


def test_a_socket_the_worker_may_not_use_is_named_as_a_permission_problem(
        tmp_path: Path) -> None:
    """The check a session worker makes at start, run without root's power to ignore file
    modes (as a worker outside the engine's group would), against a socket it may not use."""
    path = tmp_path / "docker.sock"
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(path))
        server.listen()
        path.chmod(0)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DISPATCHER_", "DOCKER"))}
        env.update({"DISPATCHER_SANDBOX_RUNTIME": "docker", "DISPATCHER_SANDBOX_IMAGE":
                    MISSING_IMAGE, "DISPATCHER_FLEET_ID": "any", "DOCKER_HOST": f"unix://{path}"})
        result = subprocess.run(
            ["setpriv", "--bounding-set=-dac_override,-dac_read_search", sys.executable, "-c",
             "from dispatcher.session.runtimes import check_sandbox\n"
             "from dispatcher.settings import load_settings\n"
             "check_sandbox(load_settings())"],
            env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "EngineError: permission denied on the Docker engine at unix://" in result.stderr, (
        result.stderr[-2000:])


def test_two_fleets_with_one_prefix_and_environment_leave_each_others_containers_alone(
        container_fleet: Fleet, engine: Any, emulator: Any, tmp_path: Path) -> None:
    """Blue and green: the same key prefix and environment on one engine, each with its own
    Redis database and fleet id. Each reaper runs every second while the other fleet's
    sessions run; a reaper that judged by prefix and environment would find them leaseless in
    its own registry and remove them within two passes."""
    blue = container_fleet
    (tmp_path / "green").mkdir()
    green = Fleet(emulator, tmp_path / "green", blue.redis_url.rsplit("/", 1)[0], twin_of=blue)
    green.redis.flushdb()
    green.use_containers(blue.overrides["DISPATCHER_SANDBOX_IMAGE"])
    try:
        assert (green.prefix, green.environment_id) == (blue.prefix, blue.environment_id)
        blue.worker("w1", beat=True, concurrency=4)  # 2 of them kept for control tasks
        green.worker("w1", beat=True, concurrency=4)
        blue.wait_slots(2)
        green.wait_slots(2)
        work_ids = [blue.create(fake_duration=8) for _ in range(4)]

        def running(fleet: Fleet) -> list[dict[str, Any]]:
            return fleet.containers(engine, running=True)

        wait_for(lambda: running(blue) and running(green), timeout=60,
                 what="sessions of both fleets running at once")
        wait_for(lambda: all(b.events(w, "exited") for w in work_ids for b in (blue, green)
                             if b.events(w, "started")) and all(
                     any(b.events(w, "started") for b in (blue, green)) for w in work_ids),
                 timeout=90, what="every session ended")
        for work_id in work_ids:
            started = [e for b in (blue, green) for e in b.events(work_id, "started")]
            assert [e["attempt"] for e in started] == ["1"], "one attempt, never cut short"
            exited = [e for b in (blue, green) for e in b.events(work_id, "exited")]
            assert [e["reason"] for e in exited] == ["completed"]
        for fleet in (blue, green):
            assert "container reaped" not in fleet.log("w1")
        blue.wait_stopped(work_ids, timeout=30)
        wait_for(lambda: not green.containers(engine), timeout=10, what="green's removed")
    finally:
        green.stop_all()
        for container in green.containers(engine):
            engine.remove_container(container["Id"], force=True, v=True)


def test_an_environments_own_limits_apply_and_each_attempts_output_is_kept(
        container_fleet: Fleet, engine: Any, tmp_path: Path) -> None:
    """An environment of the environments file with its own limits; the container's stdout
    and stderr copied before its removal, and printed by `dispatcher output`."""
    fleet = container_fleet
    fleet.serve_environments(fleet.environment_entry(memory="256m", cpus=0.5, pids_limit=100))
    output = tmp_path / "output"
    fleet.overrides["DISPATCHER_SANDBOX_OUTPUT_DIR"] = str(output)
    fleet.worker("w1", beat=True)
    work_id = fleet.create(fake_duration=2)
    fleet.wait_event(work_id, "started", timeout=60)
    (container,) = _running_of(fleet, engine, work_id)
    host = engine.inspect_container(container["Id"])["HostConfig"]
    assert (host["Memory"], host["NanoCpus"], host["PidsLimit"]) == (256 * 1024**2, 5 * 10**8,
                                                                      100)
    fleet.wait_stopped([work_id], timeout=30)
    wait_for(lambda: not fleet.containers(engine), timeout=10, what="container removed")
    env = {**os.environ, "DISPATCHER_SANDBOX_OUTPUT_DIR": str(output)}
    shown = subprocess.run([sys.executable, "-m", "dispatcher.ops.cli", "output", work_id],
                           env=env, capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    header, *lines = shown.stdout.splitlines()
    assert header == f"== attempt 1 ({output}/{work_id}/1.log) =="
    # Two streams, two pipes: the engine may receive them in either order.
    assert sorted(lines) == [f"attempt 1 of {work_id} on stderr",
                             f"attempt 1 of {work_id} on stdout"]
