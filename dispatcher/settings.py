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
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit

from pydantic import (
    AliasChoices,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    ValidationInfo,
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
from dispatcher.lease.model import LeaseMode  # a lease's own field, set from here

__all__ = [
    "Environment",
    "LeaseMode",
    "PullPolicy",
    "SandboxRuntimeKind",
    "SecretDelivery",
    "Settings",
    "SettingsError",
    "credentials_in_userinfo",
    "image_problem",
    "load_settings",
    "sentinel_address",
    "split_redis_credentials",
]

DEFAULT_BASE_URL = "https://api.anthropic.com"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_SESSION_QUEUE = "dispatcher.sessions"
# The brokers the fleet is tested on: RabbitMQ (kombu's `amqp` is py-amqp) and Redis.
BROKER_SCHEMES = ("amqp", "amqps", "pyamqp", "redis", "rediss")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# An image named by content: a local image id, or a repository at a digest.
IMMUTABLE_IMAGE = re.compile(r"^(sha256:[0-9a-f]{64}|[^@\s]+@sha256:[0-9a-f]{64})$")


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
    redis_sentinels: Annotated[list[str], NoDecode] = _env(
        "DISPATCHER_REDIS_SENTINELS", [], description=(
            "Comma-separated `host:port` of Redis Sentinels: every Redis client of the fleet "
            "then asks them for the master of `DISPATCHER_REDIS_SENTINEL_MASTER` and follows "
            "a failover. `DISPATCHER_REDIS_URL` still gives the master's password, user and "
            "database number; its host and port are not used. Unset: no Sentinel."))
    redis_sentinel_master: str | None = _env(
        "DISPATCHER_REDIS_SENTINEL_MASTER", validate_default=True, description=(
            "With Sentinels: the name of the master they monitor (`sentinel monitor NAME ...`)."))
    redis_sentinel_password: SecretStr | None = _env(
        "DISPATCHER_REDIS_SENTINEL_PASSWORD", description=(
            "With Sentinels: the Sentinels' own password (`requirepass` in sentinel.conf), "
            "when they have one; the master's is the one in `DISPATCHER_REDIS_URL`."))
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
    max_session_seconds: float = _env("DISPATCHER_MAX_SESSION_SECONDS", 0.0, ge=0, description=(
        "Longest a session may run, from its first attempt's start (a restarted attempt does "
        "not start it again); past it, the session is stopped gracefully (SIGTERM, the stop "
        "grace, SIGKILL) and its item stopped. 0: no limit. An environment of the "
        "environments file may set its own (`max_session_seconds`)."))
    max_attempts: int = _env("DISPATCHER_MAX_ATTEMPTS", 3, ge=1, description=(
        "Attempts of one session (a lost worker starts a new one) before it is stopped."))
    poll_interval_seconds: float = _env("DISPATCHER_POLL_INTERVAL_SECONDS", 5.0, gt=0,
        description=("Beat period of the poller's watchdog: each run hands over to the next "
                     "itself; this tick starts one when none runs (after a crash)."))
    idle_headroom_seconds: float = _env("DISPATCHER_IDLE_HEADROOM_SECONDS", 0.0, ge=0, le=3600,
        description=(
            "Fleets of several environments: for this many seconds after a session arrives in "
            "an environment with no backlog, a slot of that environment's unused fair share "
            "stays free (one per such session), so its next session starts at once instead of "
            "waiting for a session of a backlogged environment to end (in a fleet of ten slots "
            "or more the idle ones keep a slot together in any case). Longer: quiet "
            "environments' sessions wait less, a backlog elsewhere drains on fewer slots while "
            "they are active. 0 (the default): only that shared slot. It must span the gap "
            "between a quiet environment's sessions to help: a CPU-free model of the fairness "
            "bench needed 8 s, and the burst then drained 24 % slower."))
    heartbeat_tick_seconds: float = _env("DISPATCHER_HEARTBEAT_TICK_SECONDS", 1.0, gt=0,
        description=("How often Celery beat starts the heartbeat task (each lease gets its "
                     "heartbeat when due)."))
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
    fleet_id: str | None = _env("DISPATCHER_FLEET_ID", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        description=(
            "docker runtime, required there: this fleet's own id, on every container as the "
            "`dispatcher.fleet_id` label; the reaper removes only containers of its id. Kept "
            "in the configuration, not in Redis, so a Redis that lost its data does not change "
            "it; two fleets on one engine need two ids."))
    allow_mutable_tag: bool = _env("DISPATCHER_SANDBOX_ALLOW_MUTABLE_TAG", False, description=(
        "docker runtime: accept an image named by a tag (`sandbox:1`); the default refuses it: "
        "name it by digest (`repo@sha256:...`) or by a local image id (`sha256:...`). The tag "
        "is resolved at worker start, logged, and used by its id until the worker restarts."))
    sandbox_user: str = _env("DISPATCHER_SANDBOX_USER", "65534:65534", pattern=r"^\d+(:\d+)?$",
        description=(
            "docker runtime: numeric `uid[:gid]` the container runs as (numeric, so the "
            "secret file and the work directory can be given to it); default `nobody`. "
            "`0` (root) is accepted only when set explicitly."))
    sandbox_cpus: float = _env("DISPATCHER_SANDBOX_CPUS", 1.0, gt=0, description=(
        "CPU limit of one container, in CPUs (`1.5`); of a process sandbox too where it gets "
        "a cgroup (DISPATCHER_PROCESS_CGROUP)."))
    sandbox_memory: str = _env("DISPATCHER_SANDBOX_MEMORY", "2g", pattern=r"^\d+[bkmg]?$",
        description="Memory limit of one container (`512m`, `2g`; tmpfs contents count "
                    "against it); of a process sandbox too where it gets a cgroup.")
    sandbox_pids_limit: int = _env("DISPATCHER_SANDBOX_PIDS_LIMIT", 512, ge=1, description=(
        "Processes and threads one container may hold (a fork bomb stops there); one process "
        "sandbox too where it gets a cgroup."))
    sandbox_cap_add: Annotated[list[str], NoDecode] = _env(
        "DISPATCHER_SANDBOX_CAP_ADD", [], description=(
            "docker runtime: comma-separated capabilities given back (`NET_BIND_SERVICE`); "
            "every other one is dropped."))
    sandbox_read_only: bool = _env("DISPATCHER_SANDBOX_READ_ONLY", True, description=(
        "docker runtime: the container's root file system is read-only; it writes to its "
        "work directory and tmpfs mounts."))
    sandbox_workdir: str = _env("DISPATCHER_SANDBOX_WORKDIR", "/workspace", pattern=r"^/",
        description=(
            "docker runtime: the container's working directory, a tmpfs owned by its user."))
    sandbox_workdir_size: str = _env("DISPATCHER_SANDBOX_WORKDIR_SIZE", "1g",
        pattern=r"^\d+[bkmg]?$", description=(
            "docker runtime: size of the work directory's tmpfs (counts against the memory "
            "limit as it fills)."))
    sandbox_network: str = _env("DISPATCHER_SANDBOX_NETWORK", "bridge", description=(
        "docker runtime: the container's network (`bridge`, `none`, a network name; `host` "
        "is refused). `bridge` because the official runner must reach the API; `none` for "
        "programs that need no network."))
    sandbox_volumes: Annotated[list[str], NoDecode] = _env(
        "DISPATCHER_SANDBOX_VOLUMES", [], description=(
            "docker runtime: comma-separated `source:target[:ro]` mounts of every container."))
    sandbox_tmpfs: Annotated[list[str], NoDecode] = _env(
        "DISPATCHER_SANDBOX_TMPFS", ["/tmp:size=64m"], description=(
            "docker runtime: comma-separated `target[:options]` tmpfs mounts besides the work "
            "directory (`/tmp:size=64m`)."))
    sandbox_labels: Annotated[list[str], NoDecode] = _env(
        "DISPATCHER_SANDBOX_LABELS", [], description=(
            "docker runtime: comma-separated `key=value` labels added to every container."))
    sandbox_pull: PullPolicy = _env("DISPATCHER_SANDBOX_PULL", PullPolicy.MISSING, description=(
        "docker runtime: when a worker pulls the image at start: `missing`, `always`, `never`."))
    sandbox_init: bool = _env("DISPATCHER_SANDBOX_INIT", True, description=(
        "docker runtime: run the engine's init as PID 1, so the command gets SIGTERM's default "
        "action and its zombies are reaped."))
    warm_containers: int = _env("DISPATCHER_WARM_CONTAINERS", 1, ge=0, description=(
        "docker runtime: containers each session worker keeps created and started ahead of "
        "work, idle until a session is bound to one (at most its free session slots; 0: every "
        "session starts a container cold). The default, 1, makes a session that arrives alone "
        "start warm for the cost of one idle container per worker; raise it for bursts. The "
        "image needs `sh`: the container waits for its session's variables on stdin."))
    process_user: str | None = _env("DISPATCHER_PROCESS_USER", description=(
        "process runtime: the user every sandbox runs as (`name`, `uid` or `uid:gid`, no passwd "
        "entry needed), switched to before exec; the worker must be root or hold CAP_SETUID, "
        "CAP_SETGID and CAP_CHOWN. Unset: the worker's own user, whose environment a sandbox "
        "can read."))
    process_rlimits: str = _env("DISPATCHER_PROCESS_RLIMITS", "core=0", description=(
        "process runtime: resource limits of every sandbox, comma-separated `name=soft[:hard]` "
        "with util-linux prlimit's names (`core=0,nofile=1024,as=4294967296`), set by "
        "`prlimit` before exec, or inherited from the worker where it holds the limit itself (a "
        "session worker takes the core limit itself at its start). The default: no core dump, "
        "which would hold the work secret. "
        "Empty: the worker's own limits."))
    process_cgroup: str = _env("DISPATCHER_PROCESS_CGROUP", "auto",
        pattern=r"^(auto|off|/.*)$", description=(
            "process runtime: a cgroup v2 per sandbox, with DISPATCHER_SANDBOX_MEMORY, "
            "_PIDS_LIMIT and _CPUS (or its environment's) as memory.max, pids.max and cpu.max. "
            "`auto`: under the worker's own cgroup where the host delegates one (it hands "
            "memory, pids and cpu to its children and the worker may write it), else none; a "
            "path: that delegated cgroup, refused at start if unusable; `off`: none. One line at "
            "start (`sandbox cgroups`) says which and why."))
    sandbox_output_dir: Path | None = _env("DISPATCHER_SANDBOX_OUTPUT_DIR", description=(
        "Where each attempt's output (stdout and stderr) is kept, as `<work id>/<attempt>.log` "
        "(`dispatcher output WORK_ID` prints them): a process sandbox writes it there as it "
        "runs, a container's is copied before the container is removed; unset: "
        "`~/.local/state/dispatcher/output` of the worker's user."))
    sandbox_output_max_bytes: int = _env("DISPATCHER_SANDBOX_OUTPUT_MAX_BYTES", 1024 * 1024,
        ge=1024, description=(
            "The most of one attempt's output kept, its end (1 MiB)."))
    sandbox_output_keep: int = _env("DISPATCHER_SANDBOX_OUTPUT_KEEP", 1000, ge=1, description=(
        "Work items whose attempts' output files are kept; an attempt's end that finds more "
        "removes the oldest files, down to nine tenths of this."))
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
        return credentials_in_userinfo(value)

    @field_validator("redis_url")
    @classmethod
    def _redis_credentials(cls, value: str) -> str:
        return credentials_in_userinfo(value)

    @field_validator("redis_sentinels", mode="after")
    @classmethod
    def _sentinel_addresses(cls, value: list[str]) -> list[str]:
        for address in value:
            sentinel_address(address)
        return value

    @field_validator("redis_sentinel_master")
    @classmethod
    def _sentinel_master(cls, value: str | None, info: ValidationInfo) -> str | None:
        # Fields are validated in the order they are declared: the URL and Sentinels first.
        sentinels = info.data.get("redis_sentinels")
        if sentinels and not value:
            raise ValueError("not set: the master name is needed with DISPATCHER_REDIS_SENTINELS")
        if value and not sentinels:
            raise ValueError("set without DISPATCHER_REDIS_SENTINELS")
        if sentinels and urlsplit(info.data.get("redis_url", "")).scheme != "redis":
            # TLS through Sentinel needs other connection classes in every client: untested.
            raise ValueError("Sentinel needs a `redis://` DISPATCHER_REDIS_URL (no TLS, no socket)")
        return value

    @field_validator("fleet_id", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        # Compose passes `${DISPATCHER_FLEET_ID:-}` through as empty when the operator left it.
        return value or None

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

    @field_validator("redis_sentinels", "session_queues", "sandbox_env_allow", "sandbox_volumes",
                     "sandbox_tmpfs", "sandbox_labels", "sandbox_cap_add", mode="before")
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
        problem = self._docker_problem()
        if problem is not None:
            raise SettingsError(problem)

    def _docker_problem(self) -> str | None:
        if not self.sandbox_image:
            return "DISPATCHER_SANDBOX_IMAGE is not set: the docker runtime's image"
        if not self.fleet_id:
            return ("DISPATCHER_FLEET_ID is not set: the docker runtime labels every container "
                    "with this fleet's own id, so its reaper removes only its own")
        if self.secret_delivery == SecretDelivery.ENV:
            # The engine shows a container's environment to anyone who can inspect it.
            return ("DISPATCHER_WORK_SECRET_DELIVERY=env is refused with the docker runtime "
                    "(`docker inspect` shows it): use none or file")
        if self.sandbox_network == "host":
            # The host's namespace: every local port (Redis, the engine's TCP socket) is open.
            return "DISPATCHER_SANDBOX_NETWORK=host is refused: it shares the worker's network"
        for label in self.sandbox_labels:
            if "=" not in label or label.startswith("dispatcher."):
                return (f"DISPATCHER_SANDBOX_LABELS: {label!r} is not key=value outside the "
                        "dispatcher.* namespace")
        for where, settings in self._sandboxes():
            if settings.sandbox_network == "host":
                return f"{where}: network host is refused: it shares the worker's network"
            problem = image_problem(settings.sandbox_image or "",
                                    f"{where} image" if settings is not self else where,
                                    allow_mutable=self.allow_mutable_tag)
            if problem is not None:
                return problem
        return None

    def _sandboxes(self) -> list[tuple[str, Settings]]:
        """Each environment's sandbox settings, named as the operator wrote them."""
        found = [("DISPATCHER_SANDBOX_IMAGE", self)]
        for environment in self.environments():
            if environment.sandbox:
                found.append((f"{FILE_VARIABLE} environment {environment.id}",
                              self.sandbox_for(environment.id)))
        return found

    def sandbox_for(self, environment_id: str | None) -> Settings:
        """These settings with the environment's own sandbox image, limits and network."""
        for environment in self.environments():
            if environment.id == environment_id and environment.sandbox:
                return self.model_copy(update=dict(environment.sandbox))
        return self

    def sandbox_images(self) -> list[str]:
        """Every image this fleet's containers run, the fleet's first."""
        images = [s.sandbox_image for _, s in self._sandboxes() if s.sandbox_image]
        return list(dict.fromkeys(images))

    @property
    def output_directory(self) -> Path:
        """Where attempts' output is kept (the setting, or under the user's home)."""
        return self.sandbox_output_dir or Path.home() / ".local/state/dispatcher/output"

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


# Credentials a URL's query may carry (redis-py reads both there too).
_QUERY_CREDENTIALS = ("username", "password")


def credentials_in_userinfo(url: str) -> str:
    """`url` with credentials given in its query (`?password=...`) moved into its user part.

    Celery and kombu mask the password of a URL's user part wherever they show one (`celery
    inspect conf`, Flower, the worker's banner), but not a query's: there it showed in the
    result backend setting, and Celery's masking of the broker URL failed on it (`inspect conf`
    raised). Every client (redis-py, kombu, celery-redbeat) reads the user part the same. A URL
    that gives a credential both ways is refused: which one the server expects would be a
    guess. Messages never show the URL."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    given = {name: value for name, value in query if name in _QUERY_CREDENTIALS}
    if not given:
        return url
    if (given.get("username") and parts.username) or (given.get("password") and parts.password):
        raise ValueError("gives a credential both in the URL's user part and in its query: "
                         "give it once, in the user part (the value is not shown)")
    username = given.get("username") or unquote(parts.username or "")
    password = given.get("password") or unquote(parts.password or "")
    userinfo = quote(username, safe="") + (f":{quote(password, safe='')}" if password else "")
    rest = [(name, value) for name, value in query if name not in _QUERY_CREDENTIALS]
    host = parts.netloc.rpartition("@")[2]
    # Not urlunsplit: it drops the `//` of `unix:///path` when the host is empty.
    return (f"{parts.scheme}://{userinfo}@{host}{parts.path}"
            + (f"?{urlencode(rest)}" if rest else "")
            + (f"#{parts.fragment}" if parts.fragment else ""))


def image_problem(image: str, where: str, *, allow_mutable: bool) -> str | None:
    """Why an image reference is refused: a tag can be moved to another image under a running
    fleet, so sessions would run what nobody reviewed; a digest or an image id cannot."""
    if allow_mutable or IMMUTABLE_IMAGE.match(image):
        return None
    return (f"{where}={image!r} is a mutable tag: name it by digest (repo@sha256:...) or image "
            "id (sha256:...), or set DISPATCHER_SANDBOX_ALLOW_MUTABLE_TAG=true")


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


def sentinel_address(address: str) -> tuple[str, int]:
    """`host:port` (`[v6]:port` too) as a pair; ValueError naming the address otherwise."""
    host, _, port = address.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{address!r} is not host:port")
    return host, int(port)


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
