"""The worker's signal handlers: what a Celery worker of the fleet does at its turning points.

- At start (`worker_init`): refuse to run without what a worker needs (one clear line, exit);
  a session worker starts its sandboxes' guardian before its pool forks, and once logging is
  up (`worker_ready`) says how its sandboxes are confined. Once started (`worker_ready`, and
  in each prefork child `worker_process_init`), the process's start-up objects are set aside
  from the garbage collector's full passes (`heap`).
- On SIGTERM (`worker_shutting_down`): mark itself draining, so the poller stops counting its
  slots and its running sessions hand over to new attempts elsewhere within the grace period.
- When a session task's message arrives (`task_received`): the time, for its `start path` line;
  and, in Redis, which worker took it, so recovery tells a message waiting in its queue from a
  lost one on either broker (`lease/deliveries.py`), with the start's reads in the same round
  trip on the threads pool (`session/receipts.py`).
- On an operator's revoke of a session task (`task_revoked`): the lease machine stops the work
  item on the server too (`bridge`).
- Always: Celery's per-task log lines for the control ticks are dropped.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from celery.concurrency.thread import TaskPool as ThreadTaskPool
from celery.signals import (
    task_received,
    task_revoked,
    worker_init,
    worker_process_init,
    worker_ready,
    worker_shutting_down,
)
from redis.exceptions import RedisError

from dispatcher.celery.bootsteps import consumes_sessions
from dispatcher.celery.names import CONTROL_TASKS, SESSION_RUN
from dispatcher.control.bridge import on_task_revoked
from dispatcher.heap import freeze_startup_heap
from dispatcher.logs import event
from dispatcher.runtime import get_runtime
from dispatcher.session.receipts import received, write_receipt
from dispatcher.session.runtimes import (
    adopt_sandbox_limits,
    check_sandbox,
    sandbox_lines,
    start_guardian,
)
from dispatcher.session.sandbox import CommandError, EngineError
from dispatcher.settings import SettingsError

__all__ = ["quiet_control_ticks"]


# What a session worker's start found out about its sandboxes, logged once logging is set up
# (Celery configures it after `worker_init`).
_START_LINES: list[tuple[str, dict[str, object]]] = []


@worker_init.connect
def _check_worker_settings(sender: Any = None, **_: Any) -> None:
    runtime = get_runtime()
    try:
        runtime.settings.require_environments()
        if consumes_sessions(sender, runtime.settings.session_queues):
            check_sandbox(runtime.settings)  # control-only hosts run no sandbox
            adopt_sandbox_limits(runtime.settings)
            try:
                start_guardian(runtime.settings)
            except OSError as exc:
                raise SystemExit(
                    f"dispatcher: the sandboxes' guardian could not start: {exc}") from None
            _START_LINES.extend(sandbox_lines(runtime.settings))
        runtime.redis.ping()
    except (SettingsError, CommandError, EngineError) as exc:
        raise SystemExit(f"dispatcher: {exc}") from None
    except RedisError as exc:
        raise SystemExit(
            f"dispatcher: Redis at DISPATCHER_REDIS_URL does not answer: {exc}"
        ) from None


@worker_ready.connect
def _say_how_sandboxes_run(**_: Any) -> None:
    for action, fields in _START_LINES:
        event(action, logging.INFO, **fields)
    _START_LINES.clear()


@worker_ready.connect
@worker_process_init.connect
def _started(**_: Any) -> None:
    """The worker, or a prefork pool's child, is up: what it made so far lives as long as it."""
    freeze_startup_heap()


@worker_shutting_down.connect
def _drain(sender: Any = None, sig: str = "", how: str = "", exitcode: int = 0, **_: Any) -> None:
    runtime = get_runtime()
    try:
        runtime.capacity.set_draining(str(sender))
    except RedisError as exc:
        event("drain flag not set", level=logging.ERROR, worker=sender, error=str(exc))
        return
    event("worker draining", worker=sender, signal=sig, how=how,
          grace_seconds=runtime.settings.stop_grace_seconds)


@task_received.connect
def _received(sender: Any = None, request: Any = None, **_: Any) -> None:
    # The consumer's thread, before the message is acknowledged: one round trip, the receipt
    # and, where the task runs in this process, its start's reads (`session/receipts.py`).
    if request is None or getattr(request, "name", None) != SESSION_RUN:
        return
    at = time.monotonic()
    runtime = get_runtime()
    worker = request.hostname or ""
    work_id = _work_id(request) if _runs_here(sender) else None
    reads, written_at = None, None
    try:
        reads = write_receipt(runtime.registry, runtime.deliveries, request.id, worker=worker,
                              work_id=work_id)
        written_at = time.monotonic()
    except RedisError as exc:
        # Nothing runs twice: the task starts as usual; if it does not, recovery finds the
        # message neither queued nor received and moves the session to a new attempt.
        event("receipt not recorded", level=logging.ERROR, task_id=request.id, error=str(exc))
    received(request.id, at=at, written_at=written_at, reads=reads)


def _runs_here(consumer: Any) -> bool:
    """Whether the consumer's pool runs tasks in its own process (threads), where the task can
    take what the receipt read; a prefork child cannot, and the reads (the work item's secret
    among them) are not kept in the parent."""
    return isinstance(getattr(consumer, "pool", None), ThreadTaskPool)


def _work_id(request: Any) -> str | None:
    work_id = (getattr(request, "kwargs", None) or {}).get("work_id")
    return work_id if isinstance(work_id, str) and work_id else None


@task_revoked.connect
def _revoked(request: Any = None, terminated: bool = False, signum: int | None = None,
             expired: bool = False, **_: Any) -> None:
    if request is None or getattr(request, "task", None) != SESSION_RUN or expired:
        return
    work_id = (getattr(request, "kwargs", None) or {}).get("work_id")
    if not work_id:
        return
    try:
        on_task_revoked(get_runtime(), task_id=request.id, work_id=work_id,
                        terminated=terminated, signum=signum)
    except RedisError as exc:
        event("revoke not bridged", level=logging.ERROR, work_id=work_id, error=str(exc))

class _QuietControlTicks(logging.Filter):
    """Drop Celery's per-task INFO lines for the control ticks (four a second, every second);
    their own lifecycle lines say what happened. Warnings and errors always pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.INFO:
            return True
        text = " ".join(str(a) for a in _args(record)) + " " + str(record.msg)
        return not any(name in text for name in CONTROL_TASKS)


def _args(record: logging.LogRecord) -> list[object]:
    args = record.args
    if isinstance(args, dict):
        return [*args.values()]
    return list(args or ())


def quiet_control_ticks() -> None:
    # httpx logs every request at INFO: a few per second per worker, none of them news.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    quiet = _QuietControlTicks()
    for name in ("celery.app.trace", "celery.worker.strategy", "celery.worker.request",
                 "celery.beat"):
        logging.getLogger(name).addFilter(quiet)
