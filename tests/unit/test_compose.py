"""docker-compose.yml, checked without a Docker engine: every service, its command, its
environment, its health check and its stop grace period agree with the code they run.

Compose's `${NAME:-default}` interpolation is resolved as with an empty environment (defaults
only), which is what `docker compose up` does on a machine without a `.env` file.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from dispatcher.emulator.cli import ENV_API_KEY, ENV_ENVIRONMENT_KEY
from dispatcher.settings import Settings

yaml = pytest.importorskip("yaml", reason="PyYAML is not installed: add it to the dev extra")

COMPOSE = Path(__file__).resolve().parents[2] / "docker-compose.yml"
FLEET = ("worker", "control", "beat", "flower")
REQUIRED_ENV = ("ANTHROPIC_BASE_URL", "ANTHROPIC_ENVIRONMENT_ID", "ANTHROPIC_ENVIRONMENT_KEY",
                "DISPATCHER_REDIS_URL", "DISPATCHER_ON_WORK")
EMULATOR_ENV = {ENV_ENVIRONMENT_KEY, ENV_API_KEY}
GRACE_MARGIN_SECONDS = 15
INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])([^}]*))?\}")
DURATION = re.compile(r"(\d+(?:\.\d+)?)(h|ms|m|s|us)")
def setting_names() -> set[str]:
    names: set[str] = set()
    for field in Settings.model_fields.values():
        alias = field.validation_alias
        choices = getattr(alias, "choices", [alias])
        names.update(str(choice) for choice in choices if choice)
    return names


def interpolate(value: str) -> str:
    def default(match: re.Match[str]) -> str:
        operator, word = match.group(2), match.group(3)
        return word if operator in (":-", "-") else ""

    return INTERPOLATION.sub(default, value).replace("$$", "$")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(loaded, dict)
    return loaded


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = compose["services"]
    return found


def argv(service: dict[str, Any]) -> list[str]:
    command = service["command"]
    words = shlex.split(command) if isinstance(command, str) else [str(w) for w in command]
    return [interpolate(word) for word in words]


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): interpolate(str(v)) for k, v in env.items()}


def option(words: list[str], short: str, long: str) -> str | None:
    """The value of `-Q x`, `-Qx`, `--queues x` or `--queues=x`."""
    for i, word in enumerate(words):
        if word in (short, long):
            return words[i + 1]
        if word.startswith(long + "="):
            return word.split("=", 1)[1]
        if word.startswith(short) and len(word) > len(short) and not word.startswith("--"):
            return word[len(short):]
    return None


def seconds(duration: str) -> float:
    scale = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 0.000001}
    parts = DURATION.findall(duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"bad duration {duration!r}"
    return sum(float(n) * scale[u] for n, u in parts)


def test_every_service_exists(services: dict[str, dict[str, Any]]) -> None:
    assert {"redis", "emulator", *FLEET} <= set(services)


@pytest.mark.parametrize(("name", "subcommand", "queue"), [
    ("worker", "worker", "dispatcher.sessions"),
    ("control", "worker", "dispatcher.control"),
    ("beat", "beat", None),
    ("flower", "flower", None),
])
def test_fleet_commands(services: dict[str, dict[str, Any]], name: str, subcommand: str,
                        queue: str | None) -> None:
    words = argv(services[name])
    assert words[0] == "celery"
    assert option(words, "-A", "--app") == "dispatcher"
    positionals = [w for i, w in enumerate(words[1:], 1)
                   if not w.startswith("-") and words[i - 1] not in ("-A", "--app")]
    assert positionals[0] == subcommand
    if queue is not None:
        assert option(words, "-Q", "--queues") == queue


def test_worker_node_names_are_unique_per_host(services: dict[str, dict[str, Any]]) -> None:
    names = [option(argv(services[n]), "-n", "--hostname") for n in ("worker", "control")]
    assert all(name and name.endswith("@%h") for name in names), names
    assert len(set(names)) == len(names)


def test_redis_and_emulator_commands(services: dict[str, dict[str, Any]]) -> None:
    assert argv(services["redis"])[0] == "redis-server"
    assert argv(services["emulator"])[:2] == ["dispatcher", "emulator"]


@pytest.mark.parametrize("name", FLEET)
def test_fleet_environment(services: dict[str, dict[str, Any]], name: str) -> None:
    env = environment(services[name])
    missing = [var for var in REQUIRED_ENV if not env.get(var)]
    assert not missing, f"{name}: {missing} unset or empty"
    assert env["ANTHROPIC_BASE_URL"].startswith(("http://", "https://"))
    assert env["DISPATCHER_REDIS_URL"].startswith("redis://")
    Settings(**{k: v for k, v in env.items() if k in setting_names()})  # every value validates


def test_every_prefixed_variable_is_known(compose: dict[str, Any]) -> None:
    used = {m.group(1) for m in INTERPOLATION.finditer(COMPOSE.read_text())}
    for service in compose["services"].values():
        used |= set(environment(service))
    prefixed = {n for n in used if n.startswith(("DISPATCHER_", "ANTHROPIC_"))}
    unknown = prefixed - setting_names() - EMULATOR_ENV
    assert not unknown, f"not a setting nor an emulator variable: {sorted(unknown)}"


def test_worker_stop_grace_covers_the_sandbox_grace(services: dict[str, dict[str, Any]]) -> None:
    default = Settings.model_fields["stop_grace_seconds"].default
    configured = float(environment(services["worker"]).get("DISPATCHER_STOP_GRACE_SECONDS",
                                                             default))
    period = seconds(str(services["worker"]["stop_grace_period"]))
    assert period >= max(default, configured) + GRACE_MARGIN_SECONDS


def test_beat_has_no_health_check(services: dict[str, dict[str, Any]]) -> None:
    """A standby beat waits on celery-redbeat's lock and never ticks: a tick-based check would
    restart healthy standbys in a loop."""
    assert "healthcheck" not in services["beat"]


@pytest.mark.parametrize("name", ["redis", "emulator", *(n for n in FLEET if n != "beat")])
def test_health_checks(services: dict[str, dict[str, Any]], name: str) -> None:
    check = services[name]["healthcheck"]
    for key in ("interval", "timeout"):
        if key in check:
            assert seconds(str(check[key])) > 0
    assert int(check.get("retries", 1)) >= 1
    test = check["test"]
    if isinstance(test, str):
        test = ["CMD-SHELL", test]
    kind, words = test[0], [interpolate(str(w)) for w in test[1:]]
    assert kind in ("CMD", "CMD-SHELL") and words
    if kind == "CMD-SHELL":
        words = shlex.split(words[0])
    if words[:2] == ["python", "-c"]:
        compile(words[2], f"{name} healthcheck", "exec")
        ports = {str(p).split(":")[-1] for p in services[name].get("ports", [])}
        url_port = re.search(r"127\.0\.0\.1:(\d+)", words[2])
        assert url_port and (not ports or url_port.group(1) in ports)
    if words[:3] == ["celery", "-A", "dispatcher"]:
        node = option(argv(services[name]), "-n", "--hostname")
        destination = option(words, "-d", "--destination")
        assert node and destination, "a worker's ping must name its own node"
        assert destination.split("@")[0] == node.split("@")[0]


def emulator_flags_from_help() -> set[str]:
    done = subprocess.run([sys.executable, "-m", "dispatcher.ops.cli", "emulator", "--help"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", done.stdout))


def test_emulator_flags_are_accepted(services: dict[str, dict[str, Any]]) -> None:
    flags = emulator_flags_from_help()
    words = argv(services["emulator"])[2:]
    given = {w.split("=", 1)[0] for w in words if w.startswith("--")}
    unknown = given - flags
    assert not unknown, f"`dispatcher emulator --help` knows no {sorted(unknown)}"
    env = environment(services["emulator"])
    assert set(env) <= EMULATOR_ENV | setting_names()


def test_emulator_and_fleet_agree(services: dict[str, dict[str, Any]]) -> None:
    emulator = argv(services["emulator"])
    fleet = environment(services["worker"])
    port = option(emulator, "--port", "--port")
    assert port and fleet["ANTHROPIC_BASE_URL"] == f"http://emulator:{port}"
    keys = environment(services["emulator"])
    assert keys[ENV_ENVIRONMENT_KEY] == fleet["ANTHROPIC_ENVIRONMENT_KEY"]
    assert option(emulator, "--redis-url", "--redis-url") != fleet["DISPATCHER_REDIS_URL"], (
        "the emulator must keep its keys out of the fleet's Redis database"
    )
