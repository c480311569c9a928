"""docker-compose.yml and the Dockerfile, checked without a Docker engine.

Two kinds of checks. The compose file resolved with the quick start's env file
(deploy/emulator.env) must agree with the code it runs: commands, variables, health checks,
stop grace periods. And the files must hold no default that is unsafe against the real service:
no on-work command in the image, no port published beyond 127.0.0.1, no default password or
key, keys only in the services that use them, images pinned to exact versions.

Compose's `${NAME:-default}`, `${NAME:?message}` and `${NAME:+word}` interpolation is resolved
here as compose does it, from a given environment.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from dispatcher.emulator.cli import (
    ENV_API_KEY,
    ENV_ENVIRONMENT_KEY,
    ENV_WEBHOOK_SIGNING_KEY,
    ENV_WEBHOOK_URL,
)
from dispatcher.settings import Settings

yaml = pytest.importorskip("yaml", reason="PyYAML is not installed: add it to the dev extra")

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
EMULATOR_ENV = ROOT / "deploy" / "emulator.env"
REAL_OVERRIDE = ROOT / "deploy" / "real-service.yml"
REAL_ENV_EXAMPLE = ROOT / "deploy" / "real-service.env.example"
FLEET = ("worker", "control", "beat", "flower")
WORKERS = ("worker", "control")
WORKER_ENV = ("ANTHROPIC_BASE_URL", "ANTHROPIC_ENVIRONMENT_ID", "ANTHROPIC_ENVIRONMENT_KEY",
              "DISPATCHER_REDIS_URL", "DISPATCHER_ON_WORK")
EMULATOR_VARIABLES = {ENV_ENVIRONMENT_KEY, ENV_API_KEY, ENV_WEBHOOK_URL, ENV_WEBHOOK_SIGNING_KEY}
# What beat and Flower may be given: Redis, beat how it schedules the poller, and Flower its own
# options. Never a key.
REDIS_ONLY_ENV = {"DISPATCHER_REDIS_URL", "DISPATCHER_BROKER_URL", "DISPATCHER_KEY_PREFIX",
                  "DISPATCHER_WEBHOOKS", "DISPATCHER_WEBHOOK_SWEEP_SECONDS"}
# Services that run only under their own profile (`--profile NAME`): optional parts.
PROFILED = {"emulator": ["emulator"], "webhooks": ["webhooks"], "rabbitmq": ["rabbitmq"]}
# Variables that must have no default anywhere: the operator sets them, or nothing starts.
NO_DEFAULT = ("ANTHROPIC_ENVIRONMENT_ID", "ANTHROPIC_ENVIRONMENT_KEY", "ANTHROPIC_API_KEY",
              "DISPATCHER_ON_WORK", "FLOWER_BASIC_AUTH", "ANTHROPIC_WEBHOOK_SIGNING_KEY",
              "RABBITMQ_PASSWORD", "DISPATCHER_BROKER_URL", "REDIS_PASSWORD")
SECRET_NAME = re.compile(r"KEY|PASSWORD|SECRET|TOKEN|AUTH", re.IGNORECASE)
TEST_FLOWER_AUTH = "tester:a-password-of-the-test"
TEST_REDIS_PASSWORD = "0123456789abcdef0123456789abcdef"
REDIS_SECRET = "/run/secrets/redis_password"
GRACE_MARGIN_SECONDS = 15
INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])([^}]*))?\}")
DURATION = re.compile(r"(\d+(?:\.\d+)?)(h|ms|m|s|us)")
EXACT_TAG = re.compile(r"^[\w./-]+(:\d+\.\d+\.\d+[\w.-]*)?(@sha256:[0-9a-f]{64})?$")


class Unset(Exception):
    """A `${NAME:?message}` whose variable is not set: compose refuses to start."""


def setting_names() -> set[str]:
    names: set[str] = set()
    for field in Settings.model_fields.values():
        alias = field.validation_alias
        choices = getattr(alias, "choices", [alias])
        names.update(str(choice) for choice in choices if choice)
    return names


def interpolate(value: str, env: Mapping[str, str]) -> str:
    """`value` as compose resolves it from `env`; raises Unset for a required variable."""

    def resolve(match: re.Match[str]) -> str:
        name, operator, word = match.group(1), match.group(2) or "", match.group(3) or ""
        present = name in env and (env[name] != "" or not operator.startswith(":"))
        if operator.endswith("-"):
            return env[name] if present else word
        if operator.endswith("?"):
            if not present:
                raise Unset(f"{name}: {word}")
            return env[name]
        if operator.endswith("+"):
            return word if present else ""
        return env.get(name, "")

    return INTERPOLATION.sub(resolve, value).replace("$$", "$")


def read_env_file(path: Path) -> dict[str, str]:
    """A compose env file: NAME=value lines, `#` comments, values taken verbatim."""
    pairs = (line.split("=", 1) for line in path.read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#"))
    return {name.strip(): value for name, value in pairs}


QUICK_START_ENV = {**read_env_file(EMULATOR_ENV), "FLOWER_BASIC_AUTH": TEST_FLOWER_AUTH,
                   "REDIS_PASSWORD": TEST_REDIS_PASSWORD}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(loaded, dict)
    return loaded


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = compose["services"]
    return found


def argv(service: dict[str, Any], env: Mapping[str, str] = QUICK_START_ENV) -> list[str]:
    command = service["command"]
    words = shlex.split(command) if isinstance(command, str) else [str(w) for w in command]
    return [interpolate(word, env) for word in words]


def raw_environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): str(v) for k, v in env.items()}


def environment(service: dict[str, Any],
                env: Mapping[str, str] = QUICK_START_ENV) -> dict[str, str]:
    return {k: interpolate(v, env) for k, v in raw_environment(service).items()}


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


def check_words(service: dict[str, Any]) -> list[str]:
    test = service["healthcheck"]["test"]
    if isinstance(test, str):
        test = ["CMD-SHELL", test]
    words = [interpolate(str(w), QUICK_START_ENV) for w in test[1:]]
    return shlex.split(words[0]) if test[0] == "CMD-SHELL" else words


# --- the compose file agrees with the code ----------------------------------------------------
def test_every_service_exists(services: dict[str, dict[str, Any]]) -> None:
    assert {"redis", "emulator", "webhooks", *FLEET} <= set(services)


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
    names = [option(argv(services[n]), "-n", "--hostname") for n in WORKERS]
    assert all(name and name.endswith("@%h") for name in names), names
    assert len(set(names)) == len(names)


def redis_script(command: list[str]) -> str:
    """The shell script that starts Redis: `sh -c SCRIPT`."""
    assert command[:2] == ["sh", "-c"], command
    return command[2]


def test_redis_emulator_and_webhooks_commands(services: dict[str, dict[str, Any]]) -> None:
    assert "exec docker-entrypoint.sh redis-server " in redis_script(argv(services["redis"]))
    assert argv(services["emulator"])[:2] == ["dispatcher", "emulator"]
    assert argv(services["webhooks"])[:2] == ["dispatcher", "webhooks"]


def test_webhooks_wake_the_fleet_they_share_redis_with(
        services: dict[str, dict[str, Any]]) -> None:
    """The receiver publishes to the fleet's broker; beat's sweep replaces the poll tick only
    when asked; the emulator signs with the key the receiver verifies with."""
    on = {**QUICK_START_ENV, "DISPATCHER_WEBHOOKS": "true",
          "ANTHROPIC_WEBHOOK_SIGNING_KEY": "whsec_dGVzdA=="}
    receiver = environment(services["webhooks"], on)
    assert receiver["DISPATCHER_REDIS_URL"] == environment(services["beat"])["DISPATCHER_REDIS_URL"]
    assert Settings(**{k: v for k, v in environment(services["beat"], on).items()
                       if k in setting_names()}).webhooks
    assert not Settings(**{k: v for k, v in environment(services["beat"]).items()
                           if k in setting_names()}).webhooks
    emulator = environment(services["emulator"], on)
    assert emulator[ENV_WEBHOOK_SIGNING_KEY] == receiver["ANTHROPIC_WEBHOOK_SIGNING_KEY"]
    port = option(argv(services["webhooks"]), "--port", "--port")
    assert port and services["webhooks"]["ports"] == [f"127.0.0.1:{port}:{port}"]


@pytest.mark.parametrize("name", FLEET)
def test_fleet_environment(services: dict[str, dict[str, Any]], name: str) -> None:
    env = environment(services[name])
    needed = WORKER_ENV if name in WORKERS else ("DISPATCHER_REDIS_URL",)
    missing = [var for var in needed if not env.get(var)]
    assert not missing, f"{name}: {missing} unset or empty"
    assert env["DISPATCHER_REDIS_URL"].startswith("redis://")
    if name in WORKERS:
        assert env["ANTHROPIC_BASE_URL"].startswith(("http://", "https://"))
    Settings(**{k: v for k, v in env.items() if k in setting_names()})  # every value validates


def test_every_prefixed_variable_is_known(compose: dict[str, Any]) -> None:
    used = {m.group(1) for m in INTERPOLATION.finditer(COMPOSE.read_text())}
    for service in compose["services"].values():
        used |= set(raw_environment(service))
    prefixed = {n for n in used if n.startswith(("DISPATCHER_", "ANTHROPIC_"))}
    unknown = prefixed - setting_names() - EMULATOR_VARIABLES
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


@pytest.mark.parametrize("name", ["redis", "emulator", "webhooks",
                                  *(n for n in FLEET if n != "beat")])
def test_health_checks(services: dict[str, dict[str, Any]], name: str) -> None:
    check = services[name]["healthcheck"]
    for key in ("interval", "timeout"):
        if key in check:
            assert seconds(str(check[key])) > 0
    assert int(check.get("retries", 1)) >= 1
    assert check["test"][0] in ("CMD", "CMD-SHELL")
    words = check_words(services[name])
    assert words
    if words[:2] == ["python", "-c"]:
        compile(words[2], f"{name} healthcheck", "exec")
        ports = {str(p).split(":")[-1] for p in services[name].get("ports", [])}
        url_port = re.search(r"127\.0\.0\.1:(\d+)", words[2])
        assert url_port and (not ports or url_port.group(1) in ports)


@pytest.mark.parametrize("name", WORKERS)
def test_workers_are_checked_from_redis_not_by_broadcast(
        services: dict[str, dict[str, Any]], name: str) -> None:
    """`celery inspect ping` broadcasts to the whole fleet from every container; the status
    check reads Redis only."""
    words = check_words(services[name])
    assert words == ["dispatcher", "status", "--check"]
    done = subprocess.run([sys.executable, "-m", "dispatcher.ops.cli", "status", "--help"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "--check" in done.stdout, done.stderr


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
    assert set(env) <= EMULATOR_VARIABLES | setting_names()


def test_emulator_and_fleet_agree(services: dict[str, dict[str, Any]]) -> None:
    emulator = argv(services["emulator"])
    fleet = environment(services["worker"])
    port = option(emulator, "--port", "--port")
    assert port and fleet["ANTHROPIC_BASE_URL"] == f"http://emulator:{port}"
    keys = environment(services["emulator"])
    assert keys[ENV_ENVIRONMENT_KEY] == fleet["ANTHROPIC_ENVIRONMENT_KEY"]
    assert option(emulator, "--redis-url", "--redis-url") is None, "argv would show its password"
    assert keys["DISPATCHER_REDIS_URL"] != fleet["DISPATCHER_REDIS_URL"], (
        "the emulator must keep its keys out of the fleet's Redis database"
    )


# --- Redis requires a password ----------------------------------------------------------------
def test_redis_requires_the_password_of_a_compose_secret(
        compose: dict[str, Any], services: dict[str, dict[str, Any]]) -> None:
    """Redis reads the password from the secret into its configuration on stdin (the last
    argument `-`, which the image's entrypoint leaves last); neither argv nor its environment
    holds it, and its health check authenticates."""
    assert compose["secrets"]["redis_password"] == {"environment": "REDIS_PASSWORD"}
    redis = services["redis"]
    assert redis["secrets"] == ["redis_password"]
    real = yaml.safe_load(REAL_OVERRIDE.read_text())["services"]["redis"]
    for script in (redis_script(argv(redis)), redis_script(argv(real))):
        start, _, config = script.partition("<<EOF\n")
        words = shlex.split(start.replace("\\\n", " "))
        assert words[-1] == "-", "the config is read from stdin"
        assert config.strip().splitlines() == [f"requirepass $(cat {REDIS_SECRET})", "EOF"]
        assert TEST_REDIS_PASSWORD not in script
    assert "environment" not in redis
    check = " ".join(redis["healthcheck"]["test"])
    assert "REDISCLI_AUTH=" in check and REDIS_SECRET in check and "PONG" in check


@pytest.mark.parametrize("name", [*FLEET, "webhooks", "emulator"])
def test_every_redis_client_carries_the_password(services: dict[str, dict[str, Any]],
                                                 name: str) -> None:
    url = environment(services[name])["DISPATCHER_REDIS_URL"]
    assert url.startswith(f"redis://:{TEST_REDIS_PASSWORD}@redis:6379/"), url
    assert TEST_REDIS_PASSWORD not in " ".join(argv(services[name]))
    env = {k: v for k, v in QUICK_START_ENV.items() if k != "REDIS_PASSWORD"}
    with pytest.raises(Unset, match="REDIS_PASSWORD"):
        environment(services[name], env)


# --- no unsafe default ------------------------------------------------------------------------
def dockerfile_instructions(keyword: str) -> list[str]:
    lines = DOCKERFILE.read_text().replace("\\\n", " ").splitlines()
    return [line.split(None, 1)[1] for line in lines
            if line.split(None, 1)[:1] == [keyword] and len(line.split(None, 1)) == 2]


def test_the_image_has_no_on_work_command_and_no_key() -> None:
    """A default on-work command makes the start-up check pass against the real service, which
    would then "run" real sessions with it."""
    for keyword in ("ENV", "ARG"):
        for instruction in dockerfile_instructions(keyword):
            assert "DISPATCHER_ON_WORK" not in instruction, instruction
            assert not SECRET_NAME.search(instruction.split("=")[0]), instruction


def test_a_worker_without_on_work_refuses_to_start_naming_it() -> None:
    from dispatcher.session.sandbox import CommandError, resolve_command

    with pytest.raises(CommandError, match=r"^DISPATCHER_ON_WORK is not set"):
        resolve_command(None)


def test_images_are_pinned(services: dict[str, dict[str, Any]]) -> None:
    bases = [words.split()[0] for words in dockerfile_instructions("FROM")]
    assert bases
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    for name, service in services.items():
        image = str(service.get("image", ""))
        if "build" in service:
            assert image == f"dispatcher:{version}", f"{name}: tag the build with the version"
        else:
            bases.append(image)
    for image in bases:
        assert EXACT_TAG.match(image) and (":" in image or "@" in image), (
            f"{image!r} floats: pin an exact version (x.y.z) or a digest"
        )


def published(service: dict[str, Any]) -> list[str]:
    """The host address of each published port ("" when compose would bind every interface)."""
    hosts = []
    for port in service.get("ports", []):
        if isinstance(port, dict):
            hosts.append(interpolate(str(port.get("host_ip", "")), {}))
            continue
        parts = interpolate(str(port), {}).rsplit(":", 2)
        hosts.append(parts[0] if len(parts) == 3 else "")
    return hosts


def test_ports_are_published_on_loopback_only(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        assert "network_mode" not in service, f"{name}: host networking publishes every port"
        for host in published(service):
            assert host == "127.0.0.1", f"{name} publishes a port on {host or 'every interface'}"


def test_optional_services_run_only_under_their_profile(
        services: dict[str, dict[str, Any]]) -> None:
    for name, profiles in PROFILED.items():
        assert services[name].get("profiles") == profiles
    for name, service in services.items():
        depends = service.get("depends_on") or {}
        assert not set(PROFILED) & set(depends), f"{name} would pull an optional service in"
        if name not in PROFILED:
            assert "profiles" not in service, f"{name} must run without a profile"


@pytest.mark.parametrize("variable", NO_DEFAULT)
def test_no_default_for_keys_passwords_or_the_on_work_command(variable: str) -> None:
    for path in (COMPOSE, REAL_OVERRIDE):
        for match in INTERPOLATION.finditer(path.read_text()):
            if match.group(1) == variable:
                operator = match.group(2) or ""
                assert operator.endswith("?") or (operator.endswith("-") and not match.group(3)), (
                    f"{path.name}: {match.group(0)} gives {variable} a default"
                )


def test_no_literal_secret_in_the_compose_files() -> None:
    for path in (COMPOSE, REAL_OVERRIDE, REAL_ENV_EXAMPLE):
        text = path.read_text()
        assert "sk-ant-" not in text, f"{path.name} holds a key"
        assert "change-me" not in text, f"{path.name} holds a default password"
    for name, value in read_env_file(REAL_ENV_EXAMPLE).items():
        if SECRET_NAME.search(name):
            assert value == "", f"the example gives {name} a value"


@pytest.mark.parametrize("variable", ["ANTHROPIC_ENVIRONMENT_KEY", "DISPATCHER_ON_WORK",
                                      "ANTHROPIC_ENVIRONMENT_ID"])
def test_workers_refuse_to_start_without(services: dict[str, dict[str, Any]],
                                         variable: str) -> None:
    env = {k: v for k, v in QUICK_START_ENV.items() if k != variable}
    for name in WORKERS:
        with pytest.raises(Unset, match=variable):
            environment(services[name], env)


def test_rabbitmq_is_optional_and_refuses_to_start_without_its_password(
        services: dict[str, dict[str, Any]]) -> None:
    """The broker's user has no default password: the container's command checks for one
    before RabbitMQ starts; the fleet reaches it only through the operator's broker URL."""
    rabbitmq = services["rabbitmq"]
    assert environment(rabbitmq)["RABBITMQ_DEFAULT_PASS"] == ""
    script = argv(rabbitmq)[2]
    assert script.startswith('test -n "$RABBITMQ_DEFAULT_PASS" || {') and "exit 1" in script
    for name in FLEET:
        assert environment(services[name])["DISPATCHER_BROKER_URL"] == ""
        url = "amqp://dispatcher:pw@rabbitmq:5672/dispatcher"
        given = environment(services[name], {**QUICK_START_ENV, "DISPATCHER_BROKER_URL": url})
        assert given["DISPATCHER_BROKER_URL"] == url


def test_flower_refuses_to_start_without_credentials(
        services: dict[str, dict[str, Any]]) -> None:
    env = {k: v for k, v in QUICK_START_ENV.items() if k != "FLOWER_BASIC_AUTH"}
    with pytest.raises(Unset, match="FLOWER_BASIC_AUTH"):
        environment(services["flower"], env)
    assert environment(services["flower"])["FLOWER_BASIC_AUTH"] == TEST_FLOWER_AUTH


def test_keys_reach_only_the_services_that_use_them(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        given = set(raw_environment(service))
        if name in ("beat", "flower"):
            extra = {n for n in given - REDIS_ONLY_ENV if not n.startswith("FLOWER_")}
            assert not extra, f"{name} needs Redis only, but is given {sorted(extra)}"
        if name != "emulator":
            assert "ANTHROPIC_API_KEY" not in given, f"{name}: the organisation key"
        if "ANTHROPIC_ENVIRONMENT_KEY" in given:
            assert name in WORKERS, f"{name} is given the environment key"
        if "ANTHROPIC_WEBHOOK_SIGNING_KEY" in given:
            assert name == "webhooks", f"{name} is given the webhook signing key"
        assert "env_file" not in service, f"{name}: an env_file gives it every variable"


# --- the real-service variant -----------------------------------------------------------------
def test_the_real_service_variant() -> None:
    override = yaml.safe_load(REAL_OVERRIDE.read_text())
    assert "emulator" not in override["services"]
    redis_command = redis_script(argv(override["services"]["redis"]))
    assert "--appendonly yes" in redis_command
    assert "noeviction" in redis_command
    example = read_env_file(REAL_ENV_EXAMPLE)
    assert example["ANTHROPIC_BASE_URL"] == "https://api.anthropic.com"
    required = {m.group(1) for path in (COMPOSE, REAL_OVERRIDE)
                for m in INTERPOLATION.finditer(path.read_text()) if m.group(2) == ":?"}
    assert required <= set(example), f"the example misses {sorted(required - set(example))}"
