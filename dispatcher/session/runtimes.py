"""Which sandbox runtime runs an attempt, and the one interface the supervisor drives.

The supervisor (`attempt.py`) starts, signals, waits on and finally kills a sandbox without
knowing whether it is a process group (`sandbox.py`) or a container (`container.py`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from dispatcher.session.confine import (
    Confinement,
    ConfinementError,
    can_switch_to,
    confinement_of,
)
from dispatcher.session.runner_detect import lease_mode_problem, program_texts
from dispatcher.session.sandbox import Sandbox, SandboxSpec, resolve_command
from dispatcher.settings import SandboxRuntimeKind, Settings, SettingsError

if TYPE_CHECKING:
    from redis import Redis

    from dispatcher.metrics import Metrics

__all__ = ["RunningSandbox", "WarmClaim", "check_sandbox", "start_sandbox", "warm_claim"]


class RunningSandbox(Protocol):
    started_at: float

    def describe(self) -> dict[str, str | int]:
        """Fields naming the sandbox in log lines (`pid` or `container`)."""
        ...

    def wait(self, timeout: float) -> int | None:
        """The exit code, or None while it still runs after `timeout` seconds."""
        ...

    def signal_group(self, signum: int) -> None:
        """Send a signal to everything of the sandbox (SIGTERM, SIGKILL)."""
        ...

    def kill_group(self) -> None:
        """Kill whatever is left at once and free the sandbox; safe to call again."""
        ...


# Starts the session in a warm container of the worker's pool; None: none, start it cold.
WarmClaim = Callable[[Settings, SandboxSpec], "RunningSandbox | None"]


def start_sandbox(settings: Settings, spec: SandboxSpec, *,
                  warm: WarmClaim | None = None) -> RunningSandbox:
    """Start the attempt's sandbox (warm when the pool has a container); SandboxStartError when
    it cannot start."""
    if settings.sandbox_runtime == SandboxRuntimeKind.DOCKER:
        from dispatcher.session.container import ContainerSandbox  # docker only where used

        if warm is not None and (found := warm(settings, spec)) is not None:
            return found
        return ContainerSandbox.start(settings, spec)
    return Sandbox.start(spec, confinement_of(settings.process_user, settings.process_rlimits))


def warm_claim(settings: Settings, redis: Redis, metrics: Metrics, *,
               worker: str) -> WarmClaim | None:
    """How an attempt on `worker` claims from its warm pool; None: the pool is off."""
    if settings.sandbox_runtime != SandboxRuntimeKind.DOCKER or not settings.warm_containers:
        return None
    import functools

    from dispatcher.session.warm_book import WarmBook
    from dispatcher.session.warm_pool import claim_warm

    book = WarmBook(redis, prefix=settings.key_prefix)
    return functools.partial(claim_warm, book=book, worker=worker, metrics=metrics)


def check_sandbox(settings: Settings) -> None:
    """At a session worker's start: the sandbox can be started, and the lease mode suits what it
    runs. Raises CommandError, SettingsError or EngineError with one line for the operator."""
    settings.require_sandbox()
    if settings.sandbox_runtime == SandboxRuntimeKind.DOCKER:
        from dispatcher.session.container import check_engine, sandbox_texts

        check_engine(settings)
        texts = sandbox_texts(settings)
    else:
        _check_confinement(settings)
        texts = program_texts(resolve_command(settings.on_work))
    problem = lease_mode_problem(settings, texts)
    if problem is not None:
        raise SettingsError(problem)


def _check_confinement(settings: Settings) -> Confinement:
    """The process runtime's user and limits can be applied by this worker."""
    try:
        confinement = confinement_of(settings.process_user, settings.process_rlimits)
    except ConfinementError as exc:
        raise SettingsError(str(exc)) from None
    uid, gid = confinement.uid, confinement.gid
    if uid is not None and gid is not None and not can_switch_to(uid, gid):
        raise SettingsError(f"DISPATCHER_PROCESS_USER={settings.process_user}: this worker "
                            "cannot switch users (it is neither root nor holds CAP_SETUID, "
                            "CAP_SETGID and CAP_CHOWN); unset it to run sandboxes as the "
                            "worker's own user")
    return confinement
