"""What a Celery worker of the fleet does besides running tasks.

- At start: refuse to run without what a worker needs (one clear line, then exit).
- While up: advertise its session slots every few seconds (`capacity`).
- On SIGTERM (warm shutdown): mark itself draining, so the poller stops counting its slots and
  its running sessions hand over to new attempts elsewhere within the stop grace period.
- On an operator's revoke of a session task: stop the work item on the server (`bridge`).
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any

from celery import bootsteps
from celery.signals import task_revoked, worker_init, worker_shutting_down
from redis.exceptions import RedisError

from dispatcher.celery.names import CONTROL_QUEUE, CONTROL_TASKS, SESSION_RUN
from dispatcher.control.bridge import on_task_revoked
from dispatcher.control.capacity import ADVERTISE_INTERVAL_SECONDS
from dispatcher.logs import event
from dispatcher.runtime import Runtime, get_runtime
from dispatcher.session.runtimes import check_sandbox
from dispatcher.session.sandbox import CommandError, EngineError
from dispatcher.settings import SandboxRuntimeKind, SettingsError

if TYPE_CHECKING:
    from dispatcher.metrics import FleetCollector

__all__ = ["CONTROL_RESERVE", "SlotAdvertiser", "pool_name", "session_slots"]

# Pool slots kept free for control tasks on a worker that consumes both queues: one for the
# poller's long-poll, one for heartbeat, bridge and recovery ticks.
CONTROL_RESERVE = 2


def session_slots(*, concurrency: int, queues: list[str], configured: int | None,
                  control_queue: str, session_queues: list[str]) -> int:
    """Sessions this worker may run at once."""
    if not any(q in session_queues for q in queues):
        return 0
    if configured is not None:
        return configured
    reserve = CONTROL_RESERVE if control_queue in queues else 0
    return max(1, concurrency - reserve)


@worker_init.connect
def _check_worker_settings(sender: Any = None, **_: Any) -> None:
    runtime = get_runtime()
    try:
        runtime.settings.require_worker()
        if _consumes_sessions(sender, runtime.settings.session_queues):
            check_sandbox(runtime.settings)  # control-only hosts run no sandbox
        runtime.redis.ping()
    except (SettingsError, CommandError, EngineError) as exc:
        raise SystemExit(f"dispatcher: {exc}") from None
    except RedisError as exc:
        raise SystemExit(
            f"dispatcher: Redis at DISPATCHER_REDIS_URL does not answer: {exc}"
        ) from None


def _consumes_sessions(worker: Any, session_queues: list[str]) -> bool:
    queues = worker.app.amqp.queues if worker is not None else {}
    consumed = getattr(queues, "consume_from", None) or queues
    return any(q in session_queues for q in consumed)


def pool_name(pool_cls: type) -> str:
    """The `-P` name of the pool a worker really runs ("threads", "prefork", ...), read from the
    pool object, never from settings or the command line (which Celery may have overridden)."""
    from celery.concurrency import ALIASES

    path = f"{pool_cls.__module__}:{pool_cls.__qualname__}"
    names = [name for name, target in ALIASES.items() if target == path]
    return names[0] if names else pool_cls.__module__.rsplit(".", 1)[-1]


class SlotAdvertiser(bootsteps.StartStopStep):
    """Advertises this worker's session slots from its main process."""

    requires = ("celery.worker.components:Pool",)

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        self.worker = worker
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, worker: Any) -> None:
        runtime = get_runtime()
        queues = list(worker.app.amqp.queues.consume_from or worker.app.amqp.queues)
        self.slots = session_slots(
            concurrency=worker.concurrency, queues=queues,
            configured=runtime.settings.session_slots, control_queue=CONTROL_QUEUE,
            session_queues=runtime.settings.session_queues,
        )
        self.queues = queues
        self.pool = pool_name(type(worker.pool))
        runtime.capacity.register(worker.hostname)
        event("worker ready", worker=worker.hostname, slots=self.slots, pool=self.pool,
              queues=",".join(queues))
        self._thread = threading.Thread(target=self._run, name="dispatcher-slots", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        runtime = get_runtime()
        while not self._stop.is_set():
            try:
                if self.slots and not runtime.capacity.is_draining(self.worker.hostname):
                    runtime.capacity.advertise(hostname=self.worker.hostname, slots=self.slots,
                                               pool=self.pool, queues=self.queues)
            except RedisError as exc:
                event("slot advertisement failed", level=logging.WARNING, error=str(exc))
            self._stop.wait(ADVERTISE_INTERVAL_SECONDS)

    def stop(self, worker: Any) -> None:
        self._stop.set()


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


class MetricsEndpoint(bootsteps.StartStopStep):
    """Serves fleet metrics from the worker's main process when DISPATCHER_METRICS_PORT is set.
    Counters live in Redis, so the pool kind does not matter."""

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        self.server: Any = None

    def start(self, worker: Any) -> None:
        from dispatcher.metrics import serve

        runtime = get_runtime()
        settings = runtime.settings
        if settings.metrics_port is None:
            return
        self.server = serve(host=settings.metrics_host, port=settings.metrics_port,
                            collector=fleet_collector(runtime))
        event("metrics endpoint", worker=worker.hostname, host=settings.metrics_host,
              port=self.server.server_port)

    def stop(self, worker: Any) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


def fleet_collector(runtime: Runtime) -> FleetCollector:
    """The exporter's collector over this worker's registry, with server figures from a client
    of its own: no retries and a short timeout, so a scrape never waits on the API's backoff."""
    from dispatcher.metrics import EXPORTER_HTTP_TIMEOUT_SECONDS, FleetCollector, ServerStats
    from dispatcher.workapi import WorkClient

    timeout = min(runtime.settings.http_timeout_seconds, EXPORTER_HTTP_TIMEOUT_SECONDS)
    client = WorkClient.from_settings(runtime.settings, max_retries=0, timeout=timeout)
    return FleetCollector(runtime.metrics, runtime.registry, runtime.capacity,
                          ServerStats(client))


class ContainerReaper(bootsteps.StartStopStep):
    """On a session worker of the docker runtime: remove, at start and then every second, the
    fleet's containers whose attempt no longer runs (see dispatcher/session/reaper.py)."""

    requires = ("celery.worker.components:Pool",)

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        self._stop = threading.Event()

    def start(self, worker: Any) -> None:
        runtime = get_runtime()
        if (runtime.settings.sandbox_runtime != SandboxRuntimeKind.DOCKER
                or not _consumes_sessions(worker, runtime.settings.session_queues)):
            return
        from dispatcher.session.reaper import Reaper

        reaper = Reaper(runtime.settings, runtime.registry)
        threading.Thread(target=self._run, args=(reaper,), name="dispatcher-reaper",
                         daemon=True).start()

    def _run(self, reaper: Any) -> None:
        from dispatcher.session.reaper import REAP_INTERVAL_SECONDS

        while not self._stop.is_set():
            try:
                reaper.run_once()
            except Exception as exc:  # the engine or Redis away: try again next pass
                event("reaper pass failed", level=logging.WARNING, error=str(exc))
            self._stop.wait(REAP_INTERVAL_SECONDS)

    def stop(self, worker: Any) -> None:
        self._stop.set()


def install(app: Any) -> None:
    app.steps["worker"].add(SlotAdvertiser)
    app.steps["worker"].add(MetricsEndpoint)
    app.steps["worker"].add(ContainerReaper)
    quiet_control_ticks()


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
