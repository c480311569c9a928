"""Answer `healthcheck` work items without starting a session.

The service sends them to probe "the health of containers where work occurs"; no official
worker defines what to probe, so we check what this fleet needs to run a session: the broker and
registry answer, a session slot is free, and the on-work command exists. The result is logged
(and counted) and the item is stopped either way (the lease machine's `AnswerHealthcheck`): a
healthcheck is never run as a session.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from redis.exceptions import RedisError

from dispatcher.session.sandbox import CommandError, resolve_command
from dispatcher.settings import SandboxRuntimeKind

if TYPE_CHECKING:
    from dispatcher.runtime import Runtime

__all__ = ["check"]


def check(runtime: Runtime) -> dict[str, str]:
    """Each check's name and `ok` or what is wrong."""
    results: dict[str, str] = {}
    try:
        runtime.redis.ping()
        results["redis"] = "ok"
        # The item being checked holds a slot itself, so a full fleet has no slot left over.
        results["slots"] = "ok" if runtime.capacity.total_slots() > 0 else "no live session slots"
    except RedisError as exc:
        results["redis"] = f"unreachable: {exc}"
    # A control-only host need not have the sandbox; containers run no on-work command.
    if (runtime.settings.on_work is not None
            and runtime.settings.sandbox_runtime == SandboxRuntimeKind.PROCESS):
        try:
            resolve_command(runtime.settings.on_work)
            results["on_work"] = "ok"
        except CommandError as exc:
            results["on_work"] = str(exc)
    return results
