"""Answer `healthcheck` work items without starting a session.

The service sends them to probe "the health of containers where work occurs"; no official
worker defines what to probe, so we check what this fleet needs to run a session: the broker and
registry answer, a session slot is free, and the on-work command exists. The result is logged
(and counted) and the item is stopped either way: a healthcheck is never run as a session.
"""

from __future__ import annotations

import logging

from redis.exceptions import RedisError

from dispatcher.events import event
from dispatcher.lease.executor import release
from dispatcher.lease.registry import Lease
from dispatcher.runtime import Runtime
from dispatcher.session.sandbox import CommandError, resolve_command
from dispatcher.settings import SandboxRuntimeKind

__all__ = ["answer", "check"]


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


def answer(runtime: Runtime, lease: Lease) -> None:
    results = check(runtime)
    healthy = all(value == "ok" for value in results.values())
    event("healthcheck answered", level=logging.INFO if healthy else logging.WARNING,
          work_id=lease.work_id, healthy=healthy, **results)
    runtime.metrics.inc("healthchecks", healthy=str(healthy).lower())
    release(runtime, lease, reason="healthcheck answered", outcome="healthcheck")
