"""The worker's bootsteps: what a Celery worker of the fleet runs beside its tasks.

- `SlotAdvertiser`: advertise its session slots every few seconds (`capacity`); on the docker
  runtime, withdraw them while the engine does not answer or lacks an image
  (`session/engine_health.py`).
- `MetricsEndpoint`: serve the fleet's metrics, when a port is set.
- `ContainerReaper`: on a session worker of the docker runtime, remove the fleet's containers
  whose attempt no longer runs.
- `WarmContainers`: on a session worker of the docker runtime, keep its warm pool filled.
- `RevokeRelay`: on a prefork worker, hand an operator's plain revoke of a running session to
  the lease machine (its child cannot see it).
- `SessionGate` (a consumer step, `celery/broker.py`): on RabbitMQ, take no session message
  without a free pool slot.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Container, Iterable
from typing import TYPE_CHECKING, Any

from celery import bootsteps
from redis.exceptions import RedisError

from dispatcher.celery.broker import SessionGate
from dispatcher.celery.names import CONTROL_QUEUE, SESSION_RUN
from dispatcher.control.bridge import on_running_task_revoked
from dispatcher.control.capacity import (
    ADVERTISE_INTERVAL_SECONDS,
    ENGINE_DOWN,
    ENGINE_NO_IMAGE,
    ENGINE_UP,
)
from dispatcher.logs import event
from dispatcher.runtime import Runtime, get_runtime
from dispatcher.settings import SandboxRuntimeKind

if TYPE_CHECKING:
    from dispatcher.metrics import FleetCollector

__all__ = ["CONTROL_RESERVE", "ContainerReaper", "MetricsEndpoint", "RevokeRelay",
           "SlotAdvertiser", "WarmContainers", "consumes_sessions", "install", "pool_name",
           "running_revoked", "session_slots"]

# Pool slots kept free for control tasks on a worker that consumes both queues: one for the
# poller's long-poll, one for heartbeat, bridge and recovery ticks; and one more for each
# further environment, whose poller holds a slot of its own.
CONTROL_RESERVE = 2
# How often a prefork worker's main process looks for revoked running sessions: a plain revoke
# is seen this long after it came, at most, then stops like any operator stop.
REVOKE_RELAY_SECONDS = 0.5
# At a worker's stop, how long it waits for its idle warm containers' removal (about 0.1 s
# each on a busy engine); what is left, the reaper removes once the pool's owner key expires.
WARM_POOL_EMPTY_SECONDS = 10.0


def session_slots(*, concurrency: int, queues: list[str], configured: int | None,
                  control_queue: str, session_queues: list[str], environments: int = 1) -> int:
    """Sessions this worker may run at once."""
    if not any(q in session_queues for q in queues):
        return 0
    if configured is not None:
        return configured
    reserve = CONTROL_RESERVE + max(0, environments - 1) if control_queue in queues else 0
    return max(1, concurrency - reserve)

def consumes_sessions(worker: Any, session_queues: list[str]) -> bool:
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
        self._lock = threading.Lock()  # one advertisement at a time: the loop's, the probe's
        self.engine = ""  # no engine to watch (the process runtime, or no session slots)

    def start(self, worker: Any) -> None:
        runtime = get_runtime()
        queues = list(worker.app.amqp.queues.consume_from or worker.app.amqp.queues)
        self.slots = session_slots(
            concurrency=worker.concurrency, queues=queues,
            configured=runtime.settings.session_slots, control_queue=CONTROL_QUEUE,
            session_queues=runtime.settings.session_queues,
            environments=len(runtime.environments),
        )
        self.queues = queues
        self.pool = pool_name(type(worker.pool))
        runtime.capacity.register(worker.hostname)
        event("worker ready", worker=worker.hostname, slots=self.slots, pool=self.pool,
              queues=",".join(queues))
        if self.slots and runtime.settings.sandbox_runtime == SandboxRuntimeKind.DOCKER:
            self.engine = ENGINE_UP  # the start-up check found it answering
            threading.Thread(target=self._watch_engine, name="dispatcher-engine",
                             daemon=True).start()
        self._thread = threading.Thread(target=self._run, name="dispatcher-slots", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._advertise()
            self._stop.wait(ADVERTISE_INTERVAL_SECONDS)

    def _advertise(self) -> None:
        runtime = get_runtime()
        with self._lock:
            try:
                if self.slots and not runtime.capacity.is_draining(self.worker.hostname):
                    runtime.capacity.advertise(hostname=self.worker.hostname, slots=self.slots,
                                               pool=self.pool, queues=self.queues,
                                               engine=self.engine)
            except RedisError as exc:
                event("slot advertisement failed", level=logging.WARNING, error=str(exc))

    def _watch_engine(self) -> None:
        """Withdraw the slots while the engine does not answer or lacks an image, give them
        back when it can start sandboxes again: advertised at once, not at the next round, so
        the poller stops feeding a worker that cannot start a sandbox within a probe's interval
        and timeout. The warm pool beside it follows (`engine_status`)."""
        from dispatcher.session.engine_health import (
            PROBE_INTERVAL_SECONDS,
            EngineProbe,
            engine_status,
        )

        probe = EngineProbe(get_runtime().settings)
        changed_at = time.monotonic()
        while not self._stop.wait(PROBE_INTERVAL_SECONDS):
            state = probe.state()
            if state == self.engine:
                continue
            before, self.engine = self.engine, state
            engine_status.set(state)
            self._advertise()
            self._say_engine_changed(probe, before, time.monotonic() - changed_at)
            changed_at = time.monotonic()
        probe.close()

    def _say_engine_changed(self, probe: Any, before: str, after_seconds: float) -> None:
        """One line for each edge: the engine gone or back, an image lost or back."""
        from dispatcher.session.engine_health import image_setting

        worker, withdrawn = self.worker.hostname, "session slots withdrawn; running sessions go on"
        if before == ENGINE_DOWN:
            event("engine answers again", worker=worker, address=probe.address,
                  slots=self.slots if self.engine == ENGINE_UP else 0,
                  after_seconds=round(after_seconds, 1))
        elif before == ENGINE_NO_IMAGE and self.engine == ENGINE_UP:
            event("sandbox image present again", worker=worker, slots=self.slots,
                  after_seconds=round(after_seconds, 1))
        if self.engine == ENGINE_DOWN:
            event("engine unavailable", level=logging.WARNING, worker=worker,
                  address=probe.address, error=probe.error, slots_withdrawn=self.slots,
                  action_taken=withdrawn)
        elif self.engine == ENGINE_NO_IMAGE:
            settings = get_runtime().settings
            event("sandbox image missing", level=logging.WARNING, worker=worker,
                  image=probe.missing, setting=image_setting(settings, probe.missing),
                  address=probe.address, slots_withdrawn=self.slots,
                  action_taken=f"{withdrawn}; load the image back (the id resolved at start) "
                               "or restart the worker to resolve its reference again")

    def stop(self, worker: Any) -> None:
        self._stop.set()

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
    servers = {e.id: ServerStats(WorkClient.from_settings(
        runtime.settings, environment_id=e.id, environment_key=e.key.get_secret_value(),
        max_retries=0, timeout=timeout)) for e in runtime.environments}
    return FleetCollector(runtime.metrics, runtime.registry, runtime.capacity, servers,
                          environments=list(servers))

class ContainerReaper(bootsteps.StartStopStep):
    """On a session worker of the docker runtime: remove, at start and then every second, the
    fleet's containers whose attempt no longer runs (see dispatcher/session/reaper.py)."""

    requires = ("celery.worker.components:Pool",)

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        self._stop = threading.Event()

    def start(self, worker: Any) -> None:
        runtime = get_runtime()
        if (runtime.settings.sandbox_runtime != SandboxRuntimeKind.DOCKER
                or not consumes_sessions(worker, runtime.settings.session_queues)):
            return
        from dispatcher.session.container import log_pinned_images
        from dispatcher.session.reaper import Reaper

        log_pinned_images()
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

# Pools whose tasks run in processes of their own: a socket the main process attached is not
# theirs to write to, so their claims attach the warm container's stdin themselves.
FORKING_POOLS = ("prefork", "processes")


class WarmContainers(bootsteps.StartStopStep):
    """On a session worker of the docker runtime: keep containers started ahead of work, up to
    DISPATCHER_WARM_CONTAINERS and the slots its running sessions leave free
    (dispatcher/session/warm_pool.py). In the main process: a prefork child claims from the same
    pool through Redis."""

    requires = ("celery.worker.components:Pool",)

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        self.pool: Any = None
        self._thread: threading.Thread | None = None

    def start(self, worker: Any) -> None:
        runtime = get_runtime()
        settings = runtime.settings
        if (settings.sandbox_runtime != SandboxRuntimeKind.DOCKER or not settings.warm_containers
                or not consumes_sessions(worker, settings.session_queues)):
            return
        from dispatcher.session.warm_book import WarmBook
        from dispatcher.session.warm_pool import WarmPool

        queues = list(worker.app.amqp.queues.consume_from or worker.app.amqp.queues)
        slots = session_slots(concurrency=worker.concurrency, queues=queues,
                              configured=settings.session_slots, control_queue=CONTROL_QUEUE,
                              session_queues=settings.session_queues,
                              environments=len(runtime.environments))
        from dispatcher.session.engine_health import engine_status

        self.pool = WarmPool(settings, WarmBook(runtime.redis, prefix=settings.key_prefix),
                             worker=worker.hostname, slots=slots,
                             environments=[e.id for e in runtime.environments],
                             busy=_running_sessions, engine_usable=engine_status.usable,
                             attach_stdin=pool_name(type(worker.pool)) not in FORKING_POOLS)
        engine_status.on_usable(self.pool.engine_back)
        event("warm pool", worker=worker.hostname, target=min(slots, settings.warm_containers),
              owner=self.pool.owner)
        self._thread = threading.Thread(target=self.pool.run, name="dispatcher-warm-pool",
                                        daemon=True)
        self._thread.start()

    def stop(self, worker: Any) -> None:
        if self.pool is not None and self._thread is not None:
            self.pool.stop()
            self._thread.join(WARM_POOL_EMPTY_SECONDS)


def _running_sessions() -> int:
    """Session tasks this worker runs now (its main process sees every pool's requests)."""
    from celery.worker import state as worker_state

    return sum(1 for request in list(worker_state.active_requests)
               if getattr(request, "name", None) == SESSION_RUN)


def running_revoked(active: Iterable[Any], revoked: Container[str], *,
                    relayed: Container[str]) -> list[tuple[str, str]]:
    """(task id, work id) of each running session task in the revoked set, not relayed yet."""
    return [(request.id, request.kwargs["work_id"]) for request in active
            if getattr(request, "name", None) == SESSION_RUN and request.id in revoked
            and request.id not in relayed and "work_id" in (request.kwargs or {})]


class RevokeRelay(bootsteps.StartStopStep):
    """On a prefork worker: an operator's plain revoke of a running session stops it.

    A plain revoke (`celery control revoke`, Flower's Revoke) only adds the task id to the
    revoked set of the worker's main process (celery/worker/control.py, `_revoke`: an active
    request is skipped); no signal fires, and the task runs on. The threads pool's supervisor
    reads that set, which it shares; a prefork child holds its own copy, empty. So the main
    process looks for its running session tasks in the set and hands each to the lease
    machine, whose stop flag the child's supervisor reads in the registry like any stop."""

    requires = ("celery.worker.components:Pool",)

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        self._stop = threading.Event()

    def start(self, worker: Any) -> None:
        if pool_name(type(worker.pool)) != "prefork":
            return
        threading.Thread(target=self._run, name="dispatcher-revokes", daemon=True).start()

    def _run(self) -> None:
        from celery.worker import state as worker_state

        relayed: set[str] = set()
        while not self._stop.wait(REVOKE_RELAY_SECONDS):
            for task_id, work_id in running_revoked(list(worker_state.active_requests),
                                                    worker_state.revoked, relayed=relayed):
                try:
                    on_running_task_revoked(get_runtime(), task_id=task_id, work_id=work_id)
                    relayed.add(task_id)
                except RedisError as exc:  # tried again next pass
                    event("revoke not bridged", level=logging.ERROR, work_id=work_id,
                          error=str(exc))
            relayed &= {request.id for request in list(worker_state.active_requests)}

    def stop(self, worker: Any) -> None:
        self._stop.set()


def install(app: Any) -> None:
    app.steps["worker"].add(SlotAdvertiser)
    app.steps["worker"].add(RevokeRelay)
    app.steps["worker"].add(MetricsEndpoint)
    app.steps["worker"].add(ContainerReaper)
    app.steps["worker"].add(WarmContainers)
    app.steps["consumer"].add(SessionGate)
