"""One settings model, read from the environment at the edge (CLI, Celery app start-up).

Names users of the official CLI already know keep their `ANTHROPIC_*` spelling; the
dispatcher's own knobs live under `DISPATCHER_`. Core code never reads the environment: it is
handed a `Settings`.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

__all__ = ["LeaseMode", "Settings", "SettingsError", "load_settings"]

DEFAULT_BASE_URL = "https://api.anthropic.com"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_SESSION_QUEUE = "dispatcher.sessions"


class LeaseMode(StrEnum):
    # The dispatcher heartbeats from ack to release; the sandbox never does.
    DISPATCHER = "dispatcher"
    # The sandbox claims the lease itself (`ant beta:worker run`, SDK `handle_item`).
    RUNNER = "runner"
    # The dispatcher holds the lease until the sandbox starts, then hands over the token.
    HANDOFF = "handoff"


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
        "The self-hosted environment (`env_...`) this fleet works for. Required by workers."))
    environment_key: SecretStr | None = _env("ANTHROPIC_ENVIRONMENT_KEY", description=(
        "The environment key (Bearer) for worker calls. Required by workers; given to sandboxes."))
    api_key: SecretStr | None = _env("ANTHROPIC_API_KEY", description=(
        "Organisation key for operator commands (`show`, `update`). Never given to a sandbox."))
    webhook_signing_key: SecretStr | None = _env("ANTHROPIC_WEBHOOK_SIGNING_KEY", description=(
        "The webhook signing key (`whsec_...`), read as the SDK reads it. Needed by "
        "`dispatcher webhooks` alone; never given to workers or sandboxes."))

    # --- the dispatcher's own knobs ---------------------------------------------------------
    redis_url: str = _env("DISPATCHER_REDIS_URL", DEFAULT_REDIS_URL, description=(
        "Redis for the Celery broker, the result backend and the lease registry."))
    on_work: str | None = _env("DISPATCHER_ON_WORK", description=(
        "The per-session command, split like a shell would (never run through one)."))
    lease_mode: LeaseMode = _env("DISPATCHER_LEASE_MODE", LeaseMode.DISPATCHER, description=(
        "Who heartbeats a session's lease: dispatcher, runner or handoff."))
    worker_id: str | None = _env("DISPATCHER_WORKER_ID", description=(
        "Anthropic-Worker-ID sent on poll; default `<hostname>-dispatcher`."))
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
    poll_interval_seconds: float = _env("DISPATCHER_POLL_INTERVAL_SECONDS", 1.0, gt=0,
        description="Beat period of the poller task.")
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
    metrics_port: int | None = _env("DISPATCHER_METRICS_PORT", ge=0, le=65535, description=(
        "Port of the Prometheus endpoint a worker serves; unset: no endpoint."))
    metrics_host: str = _env("DISPATCHER_METRICS_HOST", "127.0.0.1", min_length=1, description=(
        "Address the Prometheus endpoint listens on; `0.0.0.0` for a scraper on another host."))

    @field_validator("session_queues", "sandbox_env_allow", mode="before")
    @classmethod
    def _split_commas(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    def require_worker(self) -> tuple[str, SecretStr]:
        """What a worker cannot start without; raises naming the first missing variable."""
        if not self.environment_id:
            raise SettingsError("ANTHROPIC_ENVIRONMENT_ID is not set: the environment to work for")
        if self.environment_key is None:
            raise SettingsError("ANTHROPIC_ENVIRONMENT_KEY is not set: the environment key")
        return self.environment_id, self.environment_key

    @property
    def default_session_queue(self) -> str:
        return self.session_queues[0]


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
