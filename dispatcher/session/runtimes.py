"""Which sandbox runtime runs an attempt, and the one interface the supervisor drives.

The supervisor (`attempt.py`) starts, signals, waits on and finally kills a sandbox without
knowing whether it is a process group (`sandbox.py`) or a container (`container.py`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from dispatcher.logs import event
from dispatcher.session.cgroups import (
    CgroupError,
    SessionCgroup,
    find_parent,
    limits_of,
    parent_for,
    remove_left_behind,
)
from dispatcher.session.confine import (
    Confinement,
    ConfinementError,
    adopt_core_limit,
    can_switch_to,
    confinement_of,
)
from dispatcher.session.guardian_link import GUARDIAN
from dispatcher.session.output import LiveOutput
from dispatcher.session.runner_detect import lease_mode_problem, program_texts
from dispatcher.session.sandbox import Sandbox, SandboxSpec, SandboxStartError, resolve_command
from dispatcher.settings import SandboxRuntimeKind, Settings, SettingsError

if TYPE_CHECKING:
    from redis import Redis

    from dispatcher.metrics import Metrics

__all__ = ["RunningSandbox", "WarmClaim", "adopt_sandbox_limits", "check_sandbox", "start_sandbox",
           "warm_claim"]


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
    return Sandbox.start(spec, confinement_of(settings.process_user, settings.process_rlimits),
                         _live_output(settings, spec), _cgroup(settings, spec))


def _cgroup(settings: Settings, spec: SandboxSpec) -> SessionCgroup | None:
    """The sandbox's own cgroup, with its environment's limits, where the host offers one."""
    parent = parent_for(settings.process_cgroup)
    if parent is None:
        return None
    own = settings.sandbox_for(spec.environment_id)
    limits = limits_of(own.sandbox_memory, own.sandbox_pids_limit, own.sandbox_cpus)
    try:
        return SessionCgroup(parent, spec.work_id, spec.attempt, limits)
    except OSError as exc:  # a sandbox without the limits it is promised never runs
        raise SandboxStartError(f"no cgroup for the sandbox under {parent.path}: {exc}") from None


def _live_output(settings: Settings, spec: SandboxSpec) -> LiveOutput | None:
    """The attempt's output file; None (the worker's own stdout then) when it cannot be made:
    a full or read-only disk must not fail the session."""
    try:
        return LiveOutput(settings.output_directory, spec.work_id, spec.attempt,
                          max_bytes=settings.sandbox_output_max_bytes,
                          keep=settings.sandbox_output_keep)
    except OSError as exc:
        event("output not kept", level=logging.WARNING, work_id=spec.work_id,
              attempt=spec.attempt, error=str(exc))
        return None


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
        _check_cgroup(settings)
        texts = program_texts(resolve_command(settings.on_work))
    problem = lease_mode_problem(settings, texts)
    if problem is not None:
        raise SettingsError(problem)


def _check_cgroup(settings: Settings) -> None:
    """A named cgroup that cannot be used refuses the start; what killed workers left in a
    usable one goes."""
    try:
        parent, _ = find_parent(settings.process_cgroup)
    except CgroupError as exc:
        raise SettingsError(str(exc)) from None
    if parent is not None:
        remove_left_behind(parent)


def adopt_sandbox_limits(settings: Settings) -> None:
    """At a session worker's start, after `check_sandbox`: the worker takes its process
    sandboxes' core limit, which they then inherit without a `prlimit` on their start path
    (`confine.py`)."""
    if settings.sandbox_runtime == SandboxRuntimeKind.PROCESS:
        adopt_core_limit(confinement_of(settings.process_user, settings.process_rlimits))


def start_guardian(settings: Settings) -> None:
    """At a session worker's start, before its pool forks: one guardian for the worker's main
    process and every pool child forked later (`guardian_link.py`), not one per child.
    OSError when it cannot start."""
    if settings.sandbox_runtime == SandboxRuntimeKind.PROCESS:
        GUARDIAN.start()


def sandbox_lines(settings: Settings) -> list[tuple[str, dict[str, object]]]:
    """The start-up lines about the sandboxes (action, fields), for a worker `check_sandbox`
    passed: whether process sandboxes get a cgroup, and why not."""
    if settings.sandbox_runtime != SandboxRuntimeKind.PROCESS:
        return []
    parent, why = find_parent(settings.process_cgroup)
    if parent is None:
        return [("sandbox cgroups", {"used": False, "reason": why,
                                     "limits": "rlimits only (DISPATCHER_PROCESS_RLIMITS)"})]
    limits = limits_of(settings.sandbox_memory, settings.sandbox_pids_limit, settings.sandbox_cpus)
    return [("sandbox cgroups", {"used": True, "parent": str(parent.path),
                                 **{name.replace(".", "_"): value
                                    for name, value in limits.files().items()}})]


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
