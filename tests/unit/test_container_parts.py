"""The docker runtime's pure parts: what a container is made of, the reaper's verdict, and the
detection of the official runner. Tables, no engine (the engine is in the acceptance tests)."""

from __future__ import annotations

import dataclasses
import io
import os
import tarfile
from collections.abc import Iterator
from typing import Any

import pytest

from dispatcher.lease.model import Lease, Phase
from dispatcher.session import reaper as reaper_module
from dispatcher.session.container import (
    CONTAINER_SECRET_PATH,
    container_labels,
    container_name,
    create_arguments,
    host_config_arguments,
    secret_archive,
)
from dispatcher.session.reaper import Found, judge
from dispatcher.session.runner_detect import find_runner, lease_mode_problem, program_texts
from dispatcher.session.sandbox import SandboxSpec, SandboxStartError
from dispatcher.settings import Settings, SettingsError, load_settings

SECRET = "c2Vzc2lvbnNfdG9rZW4-SECRET"
DIGEST = "sha256:" + "ab" * 32
IMAGE = f"registry.example.com/sandbox@{DIGEST}"


_ENV: list[pytest.MonkeyPatch] = []


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The host's variables stay out of a test, and a test's stay in it."""
    for name in list(os.environ):
        if name.startswith(("ANTHROPIC_", "DISPATCHER_", "DOCKER_")):
            monkeypatch.delenv(name)
    _ENV.append(monkeypatch)
    yield
    _ENV.pop()


def _settings(**env: str) -> Settings:
    base = {"DISPATCHER_SANDBOX_RUNTIME": "docker", "DISPATCHER_SANDBOX_IMAGE": IMAGE,
            "ANTHROPIC_ENVIRONMENT_ID": "env_1", "DISPATCHER_KEY_PREFIX": "fleet",
            "DISPATCHER_FLEET_ID": "blue"}
    for name, value in {**base, **env}.items():
        _ENV[-1].setenv(name, value)
    return load_settings()


def _spec(secret_file: str | None = None) -> SandboxSpec:
    env = {"PATH": "/host/bin", "HOME": "/root", "LANG": "C.UTF-8",
           "ANTHROPIC_WORK_ID": "work_1", "ANTHROPIC_ENVIRONMENT_KEY": "sk-ant-oat01-k"}
    return SandboxSpec(argv=[], env=env, stdin=f'{{"secret": "{SECRET}"}}'.encode(),
                       work_id="work_1", session_id="sesn_1", attempt=2, secret_file=secret_file)


@pytest.mark.parametrize("secret_file", [None, SECRET])
def test_the_secret_is_never_in_the_environment_labels_or_command(secret_file: str | None,
                                                                  ) -> None:
    arguments = create_arguments(_settings(DISPATCHER_SANDBOX_COMMAND="run --x"),
                                 _spec(secret_file))
    assert SECRET not in repr(arguments)
    assert arguments["command"] == ["run", "--x"]
    assert arguments["stdin_open"] is True and arguments["detach"] is False
    env = arguments["environment"]
    assert "PATH" not in env and "HOME" not in env, "the image's own PATH and HOME stay"
    assert env["LANG"] == "C.UTF-8" and env["ANTHROPIC_WORK_ID"] == "work_1"
    assert ("ANTHROPIC_WORK_SECRET_FILE" in env) == (secret_file is not None)


def test_labels_name_the_fleet_environment_work_session_and_attempt() -> None:
    settings = _settings(DISPATCHER_SANDBOX_LABELS="team=a, cost=b")
    assert container_labels(settings, _spec()) == {
        "team": "a", "cost": "b", "dispatcher.fleet": "fleet", "dispatcher.fleet_id": "blue",
        "dispatcher.environment": "env_1",
        "dispatcher.work_id": "work_1", "dispatcher.session_id": "sesn_1",
        "dispatcher.attempt": "2"}


@pytest.mark.parametrize(("prefix", "expected"), [
    ("fleet", "fleet-work_1-2"),
    ("a/b c", "a-b-c-work_1-2"),
    ("_x", "x-work_1-2"),
])
def test_one_container_name_per_attempt(prefix: str, expected: str) -> None:
    assert container_name(_settings(DISPATCHER_KEY_PREFIX=prefix), _spec()) == expected


CONFINED = {
    "network_mode": "bridge", "init": True, "binds": {},
    "tmpfs": {"/workspace": "size=1g,uid=65534,gid=65534", "/tmp": "size=64m"},
    "cap_drop": ["ALL"], "cap_add": [], "security_opt": ["no-new-privileges"],
    "pids_limit": 512, "nano_cpus": 1_000_000_000, "mem_limit": "2g", "memswap_limit": "2g",
    "read_only": True,
}


@pytest.mark.parametrize(("env", "changed"), [
    ({}, {}),
    ({"DISPATCHER_SANDBOX_NETWORK": "none", "DISPATCHER_SANDBOX_INIT": "false"},
     {"network_mode": "none", "init": False}),
    ({"DISPATCHER_SANDBOX_VOLUMES": "/a:/b,/c:/d:ro", "DISPATCHER_SANDBOX_TMPFS":
      "/tmp:size=8m,/run", "DISPATCHER_SANDBOX_CPUS": "1.5", "DISPATCHER_SANDBOX_MEMORY": "512m"},
     {"binds": {"/a": {"bind": "/b", "mode": "rw"}, "/c": {"bind": "/d", "mode": "ro"}},
      "tmpfs": {"/workspace": "size=1g,uid=65534,gid=65534", "/tmp": "size=8m", "/run": ""},
      "nano_cpus": 1_500_000_000, "mem_limit": "512m", "memswap_limit": "512m"}),
    ({"DISPATCHER_SANDBOX_CAP_ADD": "NET_BIND_SERVICE, CHOWN", "DISPATCHER_SANDBOX_PIDS_LIMIT":
      "64", "DISPATCHER_SANDBOX_READ_ONLY": "false", "DISPATCHER_SANDBOX_USER": "1000:50",
      "DISPATCHER_SANDBOX_WORKDIR": "/work", "DISPATCHER_SANDBOX_WORKDIR_SIZE": "10m"},
     {"cap_add": ["NET_BIND_SERVICE", "CHOWN"], "pids_limit": 64, "read_only": False,
      "tmpfs": {"/work": "size=10m,uid=1000,gid=50", "/tmp": "size=64m"}}),
])
def test_host_config_is_confined_unless_a_setting_loosens_it(env: dict[str, str],
                                                             changed: dict[str, Any]) -> None:
    assert host_config_arguments(_settings(**env)) == {**CONFINED, **changed}


def test_a_container_runs_as_nobody_in_its_work_directory_by_default() -> None:
    arguments = create_arguments(_settings(), _spec())
    assert (arguments["user"], arguments["working_dir"]) == ("65534:65534", "/workspace")
    assert arguments["image"] == IMAGE
    assert create_arguments(_settings(), _spec(), image=DIGEST)["image"] == DIGEST


def test_the_secret_directory_is_a_volume_of_the_container_only_when_it_gets_a_secret() -> None:
    """A read-only root file system takes no copied file outside a volume."""
    assert create_arguments(_settings(), _spec())["volumes"] is None
    assert create_arguments(_settings(), _spec(SECRET))["volumes"] == ["/run/dispatcher"]


@pytest.mark.parametrize(("image", "allowed"), [
    (DIGEST, True),
    (IMAGE, True),
    ("sandbox@sha256:" + "ab" * 31, False),  # too short: not a digest
    ("sandbox:1", False),
    ("sandbox", False),
    ("registry.example.com:5000/sandbox:latest", False),
])
def test_a_mutable_tag_is_refused_unless_allowed_naming_the_setting(image: str,
                                                                   allowed: bool) -> None:
    settings = _settings(DISPATCHER_SANDBOX_IMAGE=image)
    if allowed:
        settings.require_sandbox()
    else:
        with pytest.raises(SettingsError, match="DISPATCHER_SANDBOX_ALLOW_MUTABLE_TAG") as caught:
            settings.require_sandbox()
        assert "\n" not in str(caught.value)
    _settings(DISPATCHER_SANDBOX_IMAGE=image,
              DISPATCHER_SANDBOX_ALLOW_MUTABLE_TAG="true").require_sandbox()


def test_a_malformed_volume_fails_the_attempt_with_its_name() -> None:
    with pytest.raises(SandboxStartError, match="DISPATCHER_SANDBOX_VOLUMES"):
        host_config_arguments(_settings(DISPATCHER_SANDBOX_VOLUMES="/only-one"))


@pytest.mark.parametrize(("user", "uid", "gid"), [(None, 0, 0), ("1000", 1000, 1000),
                                                  ("1000:50", 1000, 50)])
def test_the_secret_file_is_0600_and_the_container_users(user: str | None, uid: int,
                                                         gid: int) -> None:
    with tarfile.open(fileobj=io.BytesIO(secret_archive(SECRET, user))) as tar:
        (entry,) = tar.getmembers()
        assert f"/run/dispatcher/{entry.name}" == CONTAINER_SECRET_PATH
        assert (entry.mode, entry.uid, entry.gid) == (0o600, uid, gid)
        extracted = tar.extractfile(entry)
        assert extracted is not None and extracted.read() == SECRET.encode()


@pytest.mark.parametrize(("env", "message"), [
    ({"DISPATCHER_SANDBOX_IMAGE": ""}, "DISPATCHER_SANDBOX_IMAGE is not set"),
    ({"DISPATCHER_WORK_SECRET_DELIVERY": "env"}, "DISPATCHER_WORK_SECRET_DELIVERY=env"),
    ({"DISPATCHER_SANDBOX_LABELS": "novalue"}, "DISPATCHER_SANDBOX_LABELS"),
    ({"DISPATCHER_SANDBOX_LABELS": "dispatcher.fleet=x"}, "DISPATCHER_SANDBOX_LABELS"),
    ({"DISPATCHER_FLEET_ID": ""}, "DISPATCHER_FLEET_ID is not set"),
    ({"DISPATCHER_SANDBOX_NETWORK": "host"}, "DISPATCHER_SANDBOX_NETWORK=host"),
])
def test_sandbox_settings_the_docker_runtime_refuses(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        _settings(**env).require_sandbox()


@pytest.mark.parametrize(("name", "value"), [("DISPATCHER_SANDBOX_USER", "nobody"),
                                             ("DISPATCHER_FLEET_ID", "a/b"),
                                             ("DISPATCHER_SANDBOX_PIDS_LIMIT", "0"),
                                             ("DISPATCHER_SANDBOX_WORKDIR", "work"),
                                             ("DISPATCHER_SANDBOX_MEMORY", "lots"),
                                             ("DISPATCHER_SANDBOX_RUNTIME", "podman")])
def test_malformed_runtime_settings_are_named(name: str, value: str) -> None:
    with pytest.raises(SettingsError, match=name):
        _settings(**{name: value})


def test_the_process_runtime_needs_none_of_it() -> None:
    _settings(DISPATCHER_SANDBOX_RUNTIME="process", DISPATCHER_SANDBOX_IMAGE="",
              DISPATCHER_WORK_SECRET_DELIVERY="env").require_sandbox()


# --- the reaper's verdict ----------------------------------------------------------------------
def _lease(attempt: int, phase: str = Phase.RUNNING) -> Lease:
    return Lease(work_id="w", session_id="s", environment_id="e", mode="dispatcher",
                 queue="q", phase=phase, attempt=attempt)


@pytest.mark.parametrize(("lease", "suspected", "reaped", "suspect"), [
    (_lease(1), False, False, False),  # its own attempt runs: kept
    (_lease(2), False, True, False),  # superseded: at once
    (_lease(2, Phase.DISPATCHED), False, True, False),
    (None, False, False, True),  # lease gone: maybe a registry reset, look again
    (None, True, True, False),  # still gone on the next pass
    (_lease(1, Phase.RELEASING), False, False, True),
    (_lease(1, Phase.RELEASING), True, True, False),
    (_lease(1), True, False, False),  # rewritten since: kept, forgiven
])
def test_the_reaper_removes_containers_no_running_attempt_owns(
        lease: Lease | None, suspected: bool, reaped: bool, suspect: bool) -> None:
    found = Found("c1", "w", 1)
    verdict = judge([found], {"w": lease} if lease else {}, {"c1"} if suspected else set())
    assert (found in verdict.reap, "c1" in verdict.suspect) == (reaped, suspect)


# --- the official runner -----------------------------------------------------------------------
@pytest.mark.parametrize(("text", "found"), [
    ("docker run -i img ant beta:worker run", "beta:worker run"),
    ("ant beta:worker  run --x", "beta:worker run"),
    ("# ant beta:worker run\nexec my-program", None),
    ("exec my-program  # not ant beta:worker run", None),
    ("ant beta:worker poll --on-work x", None),
    ("python -c 'w.handle_item()'", "handle_item"),
])
def test_the_runner_is_found_in_code_not_in_comments(text: str, found: str | None) -> None:
    result = find_runner([("spawn.sh", text)])
    assert (result[1] if result else None) == found


def test_a_python_program_is_judged_by_its_code_not_its_strings(tmp_path: Any) -> None:
    mentions = tmp_path / "mentions.py"
    mentions.write_text('"""Behaves like `ant beta:worker run` and handle_item."""\nprint(1)\n')
    calls = tmp_path / "calls.py"
    calls.write_text("import asyncio\nasyncio.run(worker.handle_item())\n")
    assert find_runner(program_texts(["python", str(mentions)])) is None
    assert find_runner(program_texts(["python", str(calls)])) == (str(calls), "handle_item")


def test_only_the_default_mode_is_refused() -> None:
    texts = [("spawn.sh", "exec ant beta:worker run")]
    problem = lease_mode_problem(_settings(), texts)
    assert problem and "set DISPATCHER_LEASE_MODE=runner" in problem and "spawn.sh" in problem
    assert lease_mode_problem(_settings(DISPATCHER_LEASE_MODE="dispatcher"), texts) is None
    assert lease_mode_problem(_settings(DISPATCHER_LEASE_MODE="runner"), texts) is None
    assert lease_mode_problem(_settings(), [("spawn.sh", "exec my-program")]) is None


@pytest.mark.parametrize(("env", "refused_with"), [
    # The SDK called directly reads the secret from ANTHROPIC_WORK_SECRET alone.
    ({"DISPATCHER_SANDBOX_RUNTIME": "process"}, None),
    ({"DISPATCHER_SANDBOX_RUNTIME": "process", "DISPATCHER_WORK_SECRET_DELIVERY": "env"}, None),
    ({"DISPATCHER_SANDBOX_RUNTIME": "process", "DISPATCHER_WORK_SECRET_DELIVERY": "file"},
     "DISPATCHER_WORK_SECRET_DELIVERY=file does not reach it"),
    ({"DISPATCHER_SANDBOX_RUNTIME": "process", "DISPATCHER_WORK_SECRET_DELIVERY": "none"},
     "DISPATCHER_WORK_SECRET_DELIVERY=none does not reach it"),
    # A container never gets the secret in its environment: the entry point must read it.
    ({}, "run dispatcher/session/stdin_runner.py as the container's command"),
    ({"DISPATCHER_WORK_SECRET_DELIVERY": "file"}, "stdin_runner.py"),
])
def test_the_sdks_runner_called_directly_is_refused_where_the_secret_cannot_reach_it(
        env: dict[str, str], refused_with: str | None) -> None:
    settings = _settings(DISPATCHER_LEASE_MODE="runner", DISPATCHER_ON_WORK="run.py", **env)
    problem = lease_mode_problem(settings, [("run.py", "asyncio.run(worker.handle_item())")])
    assert (problem is None) == (refused_with is None)
    if refused_with is not None:
        assert problem is not None and refused_with in problem and "run.py" in problem


@pytest.mark.parametrize("env", [
    {"DISPATCHER_SANDBOX_RUNTIME": "process"},
    {"DISPATCHER_SANDBOX_RUNTIME": "process", "DISPATCHER_WORK_SECRET_DELIVERY": "file"},
    {}, {"DISPATCHER_WORK_SECRET_DELIVERY": "none"},
])
def test_the_stdin_entry_point_is_a_runner_that_every_delivery_reaches(
        env: dict[str, str]) -> None:
    texts = [("image r:1", "/opt/sdk/bin/python /opt/dispatcher/stdin_runner.py")]
    assert find_runner(texts) == ("image r:1", "stdin_runner")
    assert "DISPATCHER_LEASE_MODE=runner" in str(lease_mode_problem(_settings(**env), texts))
    assert lease_mode_problem(_settings(DISPATCHER_LEASE_MODE="runner", **env), texts) is None


@pytest.mark.parametrize(("env", "delivery"), [
    ({"DISPATCHER_SANDBOX_RUNTIME": "process"}, "env"),  # as the SDK reads it
    ({}, "none"),  # docker: only inside the work JSON on stdin, never in `docker inspect`
    ({"DISPATCHER_WORK_SECRET_DELIVERY": "file"}, "file"),
    ({"DISPATCHER_SANDBOX_RUNTIME": "process", "DISPATCHER_WORK_SECRET_DELIVERY": "none"},
     "none"),
])
def test_the_secrets_default_delivery_is_the_one_the_runtimes_runner_reads(
        env: dict[str, str], delivery: str) -> None:
    assert _settings(**env).secret_delivery.value == delivery


def test_a_container_is_labelled_with_its_sessions_environment_not_the_fleets_first() -> None:
    settings = _settings()
    spec = dataclasses.replace(_spec(), environment_id="env_2")
    assert container_labels(settings, spec)["dispatcher.environment"] == "env_2"


def test_the_reaper_reads_work_and_attempt_from_labels() -> None:
    def listed(**labels: str) -> dict[str, Any]:
        return {"Id": "c1", "Labels": labels}

    both = {"dispatcher.work_id": "w", "dispatcher.attempt": "1"}
    assert reaper_module._parse(listed(**both)) == Found("c1", "w", 1)
    assert reaper_module._parse(listed(**{"dispatcher.work_id": "w"})) is None
    assert reaper_module._parse(listed(**{**both, "dispatcher.attempt": "x"})) is None


# --- per environment ----------------------------------------------------------------------------
OTHER = "registry.example.com/gpu@sha256:" + "cd" * 32


def _with_environments(tmp_path: Any, table: str, **env: str) -> Settings:
    path = tmp_path / "environments.toml"
    path.write_text('[[environment]]\nid = "env_1"\nkey = "k1"\n\n'
                    f'[[environment]]\nid = "env_2"\nkey = "k2"\n{table}\n')
    _ENV[-1].setenv("DISPATCHER_ENVIRONMENTS_FILE", str(path))
    _settings(**env)
    _ENV[-1].delenv("ANTHROPIC_ENVIRONMENT_ID")
    return load_settings()


def test_an_environment_gets_its_own_image_limits_and_network(tmp_path: Any) -> None:
    settings = _with_environments(tmp_path, f'image = "{OTHER}"\ncpus = 4\nmemory = "8g"\n'
                                  'pids_limit = 64\nnetwork = "none"')
    settings.require_sandbox()
    own = settings.sandbox_for("env_2")
    assert (own.sandbox_image, own.sandbox_cpus, own.sandbox_memory, own.sandbox_pids_limit,
            own.sandbox_network) == (OTHER, 4.0, "8g", 64, "none")
    host = host_config_arguments(own)
    assert (host["nano_cpus"], host["mem_limit"], host["pids_limit"]) == (4 * 10**9, "8g", 64)
    assert host["network_mode"] == "none" and host["cap_drop"] == ["ALL"]
    assert settings.sandbox_for("env_1") is settings, "the fleet's settings for the other"
    assert settings.sandbox_images() == [IMAGE, OTHER]


@pytest.mark.parametrize(("table", "message"), [
    ('image = "gpu:latest"', "environment env_2 image='gpu:latest' is a mutable tag"),
    ('network = "host"', "environment env_2: network host is refused"),
])
def test_an_environments_sandbox_is_checked_as_the_fleets(tmp_path: Any, table: str,
                                                         message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        _with_environments(tmp_path, table).require_sandbox()


@pytest.mark.parametrize("table", ['memory = "lots"', "cpus = 0", "pids_limit = 0",
                                   'image = ""', "gpus = 1"])
def test_a_malformed_sandbox_field_names_its_entry(tmp_path: Any, table: str) -> None:
    with pytest.raises(SettingsError, match="entry 2"):
        _with_environments(tmp_path, table).environments()
