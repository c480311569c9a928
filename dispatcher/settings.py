"""One settings model, read from the environment at the edge (CLI, Celery app start-up).

Names users of the official CLI already know keep their `ANTHROPIC_*` spelling; the
dispatcher's own knobs live under `DISPATCHER_`. Core code never reads the environment: it is
handed a `Settings`.
"""

from __future__ import annotations

import re
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

from pydantic import (
    AliasChoices,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    field_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from dispatcher.environments import (
    FILE_VARIABLE,
    Environment,
    EnvironmentsError,
    check_key,
    load_environments_file,
)

__all__ = [
    "Environment",
    "LeaseMode",
    "PullPolicy",
    "SandboxRuntimeKind",
    "SecretDelivery",
    "Settings",
    "SettingsError",
    "load_settings",
    "split_redis_credentials",
]

DEFAULT_BASE_URL = "https://api.anthropic.com"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_SESSION_QUEUE = "dispatcher.sessions"
# The brokers the fleet is tested on: RabbitMQ (kombu's `amqp` is py-amqp) and Redis.
BROKER_SCHEMES = ("amqp", "amqps", "pyamqp", "redis", "rediss")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class LeaseMode(StrEnum):
    # The dispatcher heartbeats from ack to release; the sandbox never does.
    DISPATCHER = "dispatcher"
    # The sandbox claims the lease itself (`ant beta:worker run`, SDK `handle_item`).
    RUNNER = "runner"
    # The dispatcher holds the lease until the sandbox starts, then hands over the token.
    HANDOFF = "handoff"


class SandboxRuntimeKind(StrEnum):
    # The on-work command in its own process group (the official CLI's contract).
    PROCESS = "process"
    # One container per attempt, through the Docker Engine API.
    DOCKER = "docker"


class PullPolicy(StrEnum):
    MISSING = "missing"  # pull at worker start when the engine lacks the image
    ALWAYS = "always"  # pull at every worker start
    NEVER = "never"  # never pull: a missing image refuses the start


class SecretDelivery(StrEnum):
    """How a sandbox that holds its own lease (runner, handoff) gets the work secret."""

    FILE = "file"  # a 0600 file named by ANTHROPIC_WORK_SECRET_FILE
    ENV = "env"  # ANTHROPIC_WORK_SECRET, as the SDK's handle_item reads it (processes only)
    NONE = "none"  # only on stdin, inside the work JSON (read by dispatcher's stdin_runner.py)


class SettingsError(Exception):
    """A setting is missing or malformed; the message is one line naming the variable."""


def _env(name: str, default: Any = None, **kwargs: Any) -> Any:
    return Field(default, validation_alias=AliasChoices(name), **kwargs)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(extra="ignore", populate_by_name=False, frozen=True)

    # --- names shared with the official CLI -------------------------------------------------
    base_url: str = _env("ANTHROPIC_BASE_URL", DEFAULT_BASE_URL, description=(
        "Work API base URL; point it at `dispatcher emulator` to rehearse locally."))
    environment_id: str | None = _env("ANTHROPIC_ENVIRONMENT_ID", description=(
        "The self-hosted environment (`env_...`) this fleet works for. Workers need it, or "
        "`DISPATCHER_ENVIRONMENTS_FILE`."))
    environment_key: SecretStr | None = _env("ANTHROPIC_ENVIRONMENT_KEY", description=(
        "The environment key (Bearer) for worker calls; given to that environment's sandboxes."))
    api_key: SecretStr | None = _env("ANTHROPIC_API_KEY", description=(
        "Organisation key for operator commands (`show`, `update`). Never given to a sandbox."))
    webhook_signing_key: SecretStr | None = _env("ANTHROPIC_WEBHOOK_SIGNING_KEY", description=(
        "The webhook signing key (`whsec_...`), read as the SDK reads it. Needed by "
        "`dispatcher webhooks` alone; never given to workers or sandboxes."))

    # --- the dispatcher's own knobs ---------------------------------------------------------
    environments_file: Path | None = _env(FILE_VARIABLE, description=(
        "A TOML file of the environments one fleet serves, instead of the two variables above: "
        "`[[environment]]` tables of `id`, `key` or `key_file`, optional `max_sessions` and "
        "`queue` (see docs/configuration.md). Read by workers only."))
    redis_url: str = _env("DISPATCHER_REDIS_URL", DEFAULT_REDIS_URL, description=(
        "Redis for the lease registry, beat's lock and task results; the Celery broker too "
        "unless `DISPATCHER_BROKER_URL` names another."))
    broker_url: str | None = _env("DISPATCHER_BROKER_URL", description=(
        "Celery's broker when it is not Redis: RabbitMQ (`amqp://user:pass@host:5672/vhost`), "
        "a vhost per fleet. Unset: `DISPATCHER_REDIS_URL` is the broker too."))
    on_work: str | None = _env("DISPATCHER_ON_WORK", description=(
        "The per-session command, split like a shell would (never run through one)."))
    lease_mode: LeaseMode = _env("DISPATCHER_LEASE_MODE", LeaseMode.DISPATCHER, description=(
        "Who heartbeats a session's lease: dispatcher, runner or handoff."))
    worker_id: str | None = Field(
        None, validation_alias=AliasChoices("ANTHROPIC_WORKER_ID", "DISPATCHER_WORKER_ID"),
        description=("Anthropic-Worker-ID sent on poll (as the CLI, which reads the same "
                     "variable; `DISPATCHER_WORKER_ID` is read too); default "
                     "`<hostname>-<random>`, unique per process as the SDK's."))
    key_prefix: str = _env("DISPATCHER_KEY_PREFIX", "dispatcher", description=(
        "Prefix of every Redis key the fleet writes (registry, Celery queues and results, "
        "beat), so fleets and the emulator can share one Redis."))
    session_slots: int | None = _env("DISPATCHER_SESSION_SLOTS", ge=1, description=(
        "Sessions one worker runs at once; default: its concurrency, less 2 kept for "
        "control tasks when it also consumes the control queue."))
    session_queues: Annotated[list[str], NoDecode] = _env(
        "DISPATCHER_SESSION_QUEUES", [DEFAULT_SESSION_QUEUE], description=(
            "Comma-separated session queues a work item's `queue` metadata may name; "
            "the first is the default."))
    desired_ttl_seconds: int | None = _env("DISPATCHER_DESIRED_TTL_SECONDS", ge=1, description=(
        "Lease TTL asked of the server on each heartbeat; unset lets the server choose."))
    stop_grace_seconds: float = _env("DISPATCHER_STOP_GRACE_SECONDS", 30.0, ge=0, description=(
        "Between SIGTERM and SIGKILL on a graceful stop (the CLI waits 30 s too)."))
    max_attempts: int = _env("DISPATCHER_MAX_ATTEMPTS", 3, ge=1, description=(
        "Attempts of one session (a lost worker starts a new one) before it is stopped."))
    poll_interval_seconds: float = _env("DISPATCHER_POLL_INTERVAL_SECONDS", 5.0, gt=0,
        description=("Beat period of the poller's watchdog: each run hands over to the next "
                     "itself; this tick starts one when none runs (after a crash)."))
    heartbeat_tick_seconds: float = _env("DISPATCHER_HEARTBEAT_TICK_SECONDS", 1.0, gt=0,
        description="Beat period of the heartbeat task (each lease is beaten when due).")
    bridge_interval_seconds: float = _env("DISPATCHER_BRIDGE_INTERVAL_SECONDS", 1.0, gt=0,
        description="Beat period of the stop bridge that scans `list` for stop requests.")
    webhooks: bool = _env("DISPATCHER_WEBHOOKS", False, description=(
        "The fleet is woken by `dispatcher webhooks`: beat's poll tick becomes the slow sweep "
        "below. Set it where beat runs."))
    webhook_sweep_seconds: float = _env("DISPATCHER_WEBHOOK_SWEEP_SECONDS", 60.0, ge=1,
        description="With webhooks: period of the sweep that claims what a lost delivery left.")
    webhooks_host: str = _env("DISPATCHER_WEBHOOKS_HOST", "127.0.0.1", min_length=1, description=(
        "Address `dispatcher webhooks` listens on; `0.0.0.0` behind a proxy on another host."))
    webhooks_port: int = _env("DISPATCHER_WEBHOOKS_PORT", 8790, ge=0, le=65535, description=(
        "Port `dispatcher webhooks` listens on (0: any free port, printed at start)."))
    http_timeout_seconds: float = _env("DISPATCHER_HTTP_TIMEOUT_SECONDS", 10.0, gt=0,
        description="Upper bound of any one Work API request (a long-poll adds its block).")
    sandbox_env_allow: Annotated[list[str], NoDecode] = _env(
        "DISPATCHER_SANDBOX_ENV_ALLOW", ["PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR"],
        description="Comma-separated variables of the worker passed on to sandboxes.")
    sandbox_runtime: SandboxRuntimeKind = _env(
        "DISPATCHER_SANDBOX_RUNTIME", SandboxRuntimeKind.PROCESS, description=(
            "Where a session runs: `process` (DISPATCHER_ON_WORK in its own process group) or "
            "`docker` (one container per attempt, through the Docker Engine API)."))
    work_secret_delivery: SecretDelivery | None = _env(
        "DISPATCHER_WORK_SECRET_DELIVERY", description=(
            "runner and handoff modes: how the sandbox gets the work secret besides stdin: "
            "`env` (ANTHROPIC_WORK_SECRET, as the SDK's `handle_item` reads it; process "
            "runtime only), `file` (0600, path in ANTHROPIC_WORK_SECRET_FILE) or `none`. "
            "Unset: `env` in the process runtime, `none` in the docker runtime (the entry "
            "point `dispatcher/session/stdin_runner.py` reads it from stdin)."))
    docker_host: str | None = _env("DOCKER_HOST", description=(
        "docker runtime: the engine's address (`unix://`, `tcp://`, `ssh://`); "
        "default the local socket."))
    sandbox_image: str | None = _env("DISPATCHER_SANDBOX_IMAGE", description=(
        "docker runtime: the image of every session container. Required with `docker`."))
    sandbox_command: str | None = _env("DISPATCHER_SANDBOX_COMMAND", description=(
        "docker runtime: the container's command, split like a shell would; "
        "unset: the image's own."))
    sandbox_user: str | None = _env("DISPATCHER_SANDBOX_USER", pattern=r"^\d+(:\d+)?$",
        description=(
            "docker runtime: numeric `uid[:gid]` the container runs as (numeric, so the "
            "secret file can be given to it); unset: the image's user, and the secret file is "
            "root's: set it when the image's user is not root."))
    sandbox_cpus: float | None = _env("DISPATCHER_SANDBOX_CPUS", gt=0, description=(
        "docker runtime: CPU limit of one container, in CPUs (`1.5`)."))
    sandbox_memory: str | None = _env("DISPATCHER_SANDBOX_MEMORY", pattern=r"^\d+[bkmg]?$",
        description="docker runtime: memory limit of one container (`512m`, `2g`).")
    sandbox_network: str = _env("DISPATCHER_SANDBOX_NETWORK", "bridge", description=(
        "docker runtime: the container's network (`bridge`, `none`, `host`, a network name)."))
    sandbox_volumes: Annotated[list[str], NoDecode] = _env(
        "DISPATCHER_SANDBOX_VOLUMES", [], description=(
            "docker runtime: comma-separated `source:target[:ro]` mounts of every container."))
    sandbox_tmpfs: Annotated[list[str], NoDecode] = _env(
        "DISPATCHER_SANDBOX_TMPFS", [], description=(
            "docker runtime: comma-separated `target[:options]` tmpfs mounts "
            "(`/tmp:size=64m`)."))
    sandbox_labels: Annotated[list[str], NoDecode] = _env(
        "DISPATCHER_SANDBOX_LABELS", [], description=(
            "docker runtime: comma-separated `key=value` labels added to every container."))
    sandbox_pull: PullPolicy = _env("DISPATCHER_SANDBOX_PULL", PullPolicy.MISSING, description=(
        "docker runtime: when a worker pulls the image at start: `missing`, `always`, `never`."))
    sandbox_init: bool = _env("DISPATCHER_SANDBOX_INIT", True, description=(
        "docker runtime: run the engine's init as PID 1, so the command gets SIGTERM's default "
        "action and its zombies are reaped."))
    metrics_port: int | None = _env("DISPATCHER_METRICS_PORT", ge=0, le=65535, description=(
        "Port of the Prometheus endpoint a worker serves; unset: no endpoint."))
    metrics_host: str = _env("DISPATCHER_METRICS_HOST", "127.0.0.1", min_length=1, description=(
        "Address the Prometheus endpoint listens on; `0.0.0.0` for a scraper on another host."))

    @field_validator("environment_id")
    @classmethod
    def _plain_id(cls, value: str | None) -> str | None:
        # It goes into every request's URL path: `..` or `/` would walk it. Imported here: the
        # client package costs its import only to processes that work for an environment.
        from dispatcher.workapi.models import check_id

        return check_id(value, "the environment id") if value is not None else None

    @field_validator("broker_url")
    @classmethod
    def _known_broker(cls, value: str | None) -> str | None:
        # Empty is unset (compose passes `${DISPATCHER_BROKER_URL:-}` through). The message
        # names the scheme only: the URL carries the broker's password.
        if not value:
            return None
        if urlsplit(value).scheme not in BROKER_SCHEMES:
            raise ValueError(f"scheme {urlsplit(value).scheme!r} is not one of "
                             f"{', '.join(BROKER_SCHEMES)}")
        return value

    @field_validator("worker_id")
    @classmethod
    def _header_safe(cls, value: str | None) -> str | None:
        # Sent as the Anthropic-Worker-ID header: a control character could not be sent.
        if value is not None and _CONTROL.search(value):
            raise ValueError("contains a control character (a trailing newline?)")
        return value

    @field_validator("environment_key", "api_key")
    @classmethod
    def _plain_key(cls, value: SecretStr | None) -> SecretStr | None:
        # A key read from a mounted file often ends in a newline; sent as is, every request
        # fails and is retried as a transient error, so refuse it at start-up instead.
        return check_key(value) if value is not None else None

    @field_validator("session_queues", "sandbox_env_allow", "sandbox_volumes", "sandbox_tmpfs",
                     "sandbox_labels", mode="before")
    @classmethod
    def _split_commas(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    # The environments, read on first use: only workers need them (beat, Flower and the
    # webhook receiver never get a key, nor the file).
    _environments: tuple[Environment, ...] | None = PrivateAttr(None)

    def environments(self) -> tuple[Environment, ...]:
        """The environments this fleet serves, in the order given; empty if none is set.
        Raises SettingsError naming the variable when they cannot be read."""
        if self._environments is None:
            self._environments = self._read_environments()
        return self._environments

    def _read_environments(self) -> tuple[Environment, ...]:
        if self.environments_file is None:
            if self.environment_id and self.environment_key is not None:
                return (Environment(id=self.environment_id, key=self.environment_key),)
            return ()
        if self.environment_id or self.environment_key is not None:
            # Two sources of truth: which key goes with which id would be a guess.
            raise SettingsError(f"{FILE_VARIABLE} and ANTHROPIC_ENVIRONMENT_ID/_KEY are both "
                                "set: give the environments one way")
        try:
            return load_environments_file(self.environments_file,
                                          session_queues=self.session_queues)
        except EnvironmentsError as exc:
            raise SettingsError(f"{FILE_VARIABLE} is invalid: {exc}") from None

    def require_environments(self) -> tuple[Environment, ...]:
        """What a worker cannot start without; raises naming the first missing variable."""
        environments = self.environments()
        if environments:
            return environments
        if not self.environment_id:
            raise SettingsError("ANTHROPIC_ENVIRONMENT_ID is not set: the environment to work "
                                f"for (or {FILE_VARIABLE} for several)")
        raise SettingsError("ANTHROPIC_ENVIRONMENT_KEY is not set: the environment key")

    def require_worker(self) -> tuple[str, SecretStr]:
        """The only environment's id and key (raises naming the first missing variable, and
        when several environments are served: a caller must then name the one it acts for)."""
        environments = self.require_environments()
        if len(environments) > 1:
            raise SettingsError(f"{FILE_VARIABLE} lists several environments: name one")
        return environments[0].id, environments[0].key

    def environment(self, environment_id: str) -> Environment:
        """The environment of that id; SettingsError if this fleet does not serve it."""
        for environment in self.require_environments():
            if environment.id == environment_id:
                return environment
        raise SettingsError(f"environment {environment_id} is not one this fleet serves")

    def require_sandbox(self) -> None:
        """What the chosen sandbox runtime cannot start without; raises naming the variable."""
        if self.sandbox_runtime != SandboxRuntimeKind.DOCKER:
            return
        if not self.sandbox_image:
            raise SettingsError("DISPATCHER_SANDBOX_IMAGE is not set: the docker runtime's image")
        if self.secret_delivery == SecretDelivery.ENV:
            # The engine shows a container's environment to anyone who can inspect it.
            raise SettingsError("DISPATCHER_WORK_SECRET_DELIVERY=env is refused with the docker "
                                "runtime (`docker inspect` shows it): use none or file")
        for label in self.sandbox_labels:
            if "=" not in label or label.startswith("dispatcher."):
                raise SettingsError(f"DISPATCHER_SANDBOX_LABELS: {label!r} is not key=value "
                                    "outside the dispatcher.* namespace")

    @property
    def secret_delivery(self) -> SecretDelivery:
        """The work secret's delivery: the setting, else the one the runtime's runner reads
        (the SDK's environment variable for processes; stdin alone for containers, whose
        environment `docker inspect` shows)."""
        if self.work_secret_delivery is not None:
            return self.work_secret_delivery
        if self.sandbox_runtime == SandboxRuntimeKind.DOCKER:
            return SecretDelivery.NONE
        return SecretDelivery.ENV

    @property
    def default_session_queue(self) -> str:
        return self.session_queues[0]


def split_redis_credentials(url: str) -> tuple[str, dict[str, str]]:
    """A Redis URL without its credentials, and the credentials as client options (beat's).

    `celery inspect conf` and Flower's Config tab show every setting; Celery masks the values of
    names that look secret (PASS, KEY, ...) and the broker and backend URLs, but not
    `redbeat_redis_url`. So that URL carries no password: it travels in
    `redbeat_redis_options`, whose `password` Celery masks and redbeat hands to the client.
    """
    parts = urlsplit(url)
    options: dict[str, str] = {}
    if parts.username:
        options["username"] = unquote(parts.username)
    if parts.password:
        options["password"] = unquote(parts.password)
    query = []
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name in ("username", "password"):  # redis-py reads these from the query too
            options[name] = value
        else:
            query.append((name, value))
    host = parts.netloc.rpartition("@")[2]
    # Not urlunsplit: it drops the `//` of `unix:///path` when the host is empty.
    bare = f"{parts.scheme}://{host}{parts.path}" + (f"?{urlencode(query)}" if query else "")
    return bare, options


def _field_env_name(field: str) -> str:
    alias = Settings.model_fields[field].validation_alias
    assert isinstance(alias, AliasChoices)
    return str(alias.choices[0])


def load_settings(**overrides: Any) -> Settings:
    """Read the settings, turning a validation error into one line that names the variable."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = str(first["loc"][0]) if first["loc"] else ""
        name = _field_env_name(field) if field in Settings.model_fields else field
        raise SettingsError(f"{name} is invalid: {first['msg']}") from None
