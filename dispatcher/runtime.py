"""Per-process resources of the Celery tasks: settings, Redis, the registry, API clients.

Built lazily and once per process id, because prefork children must not share a parent's HTTP
connections (redis-py pools re-create themselves after fork; httpx clients do not).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

from redis import Redis

from dispatcher.celery.keys import CeleryKeys
from dispatcher.celery.names import SESSION_RUN
from dispatcher.celery.waiting import RedisQueues, Unseen, Waiting
from dispatcher.clock import RedisClock
from dispatcher.control.capacity import Capacity
from dispatcher.control.pacing import Pacing
from dispatcher.lease.deliveries import Deliveries
from dispatcher.lease.executor import Executor, SessionTask
from dispatcher.lease.machine import Policy
from dispatcher.lease.registry import LeaseRegistry
from dispatcher.metrics import Metrics
from dispatcher.perprocess import PerProcess
from dispatcher.redis_connect import connect, is_redis
from dispatcher.settings import Environment, Settings, SettingsError, load_settings
from dispatcher.workapi import WorkClient
from dispatcher.workapi.http11 import HTTP11Transport

__all__ = ["Runtime", "get_runtime", "reset_runtime", "use_app"]

# Redis calls from tasks must fail fast when Redis is gone, so a task logs one clear line and
# beat tries again next tick instead of hanging a pool slot.
REDIS_SOCKET_TIMEOUT_SECONDS = 5.0
# Most calls retry inside the client; loops with their own cadence (poll, heartbeat) do not.
CLIENT_RETRIES = 2
# Requests one process's client has in flight at once, as httpx's own pool allows: more than a
# poller run's claims and polls side by side (24), or a threads pool's sessions stopping at once
# in all but the largest pools, where a request beyond waits for a connection (the client's
# timeout bounds the wait).
CLIENT_CONNECTIONS = 100


@dataclass
class Runtime:
    """What a process's tasks share, each part built once and handed on explicitly. `app` is
    what publishes and revokes tasks: the fleet's Celery app, or a stand-in a test gives."""

    settings: Settings
    app: Any

    @cached_property
    def redis(self) -> Redis:
        return connect(self.settings, timeout=REDIS_SOCKET_TIMEOUT_SECONDS)

    @cached_property
    def clock(self) -> RedisClock:
        """The fleet's one clock (Redis's), for every time another host compares."""
        return RedisClock(self.redis)

    @cached_property
    def registry(self) -> LeaseRegistry:
        return LeaseRegistry(self.redis, prefix=self.settings.key_prefix, clock=self.clock)

    @cached_property
    def deliveries(self) -> Deliveries:
        return Deliveries(self.redis, prefix=self.settings.key_prefix, clock=self.clock)

    @cached_property
    def waiting(self) -> Waiting:
        """Which session messages wait in the broker's queue: read on Redis (the fleet's own, or
        another named by `DISPATCHER_BROKER_URL`); RabbitMQ cannot tell."""
        url = self.settings.broker_url
        if url is not None and not is_redis(url):
            return Unseen()
        redis = self.redis if url is None else connect(self.settings, url=url,
                                                       timeout=REDIS_SOCKET_TIMEOUT_SECONDS)
        return RedisQueues(redis, prefix=CeleryKeys(self.settings.key_prefix).broker)

    @cached_property
    def capacity(self) -> Capacity:
        return Capacity(self.redis, prefix=self.settings.key_prefix, clock=self.clock)

    @cached_property
    def metrics(self) -> Metrics:
        return Metrics(self.redis, prefix=self.settings.key_prefix)

    @cached_property
    def pacing(self) -> Pacing:
        """The server's pacing, shared by the fleet: each environment's "throttled until"."""
        return Pacing(self.redis, prefix=self.settings.key_prefix, metrics=self.metrics)

    @cached_property
    def executor(self) -> Executor:
        """Performs the lease machine's decisions: the only writer of lease records. It is given
        what it acts through, never the runtime."""
        return Executor(
            registry=self.registry, deliveries=self.deliveries, counters=self.metrics,
            client=lambda environment_id: self.client(environment_id=environment_id,
                                                      max_retries=0),
            publish=self._publish_session, revoke=lambda task_id: self.app.control.revoke(task_id),
            healthcheck=self._healthcheck, desired_ttl_seconds=self.settings.desired_ttl_seconds,
            policy=Policy(max_attempts=self.settings.max_attempts), pacing=self.pacing)

    def _publish_session(self, task: SessionTask) -> None:
        self.app.send_task(
            SESSION_RUN,
            kwargs={"work_id": task.work_id, "session_id": task.session_id,
                    "attempt": task.attempt},
            task_id=task.task_id, queue=task.queue,
            kwargsrepr=f"work_id={task.work_id} session_id={task.session_id} "
                       f"attempt={task.attempt}")

    def _healthcheck(self) -> dict[str, str]:
        # Imported when an item asks: it reaches the session plane's sandbox module, which a
        # control-only process otherwise never loads.
        from dispatcher.control.healthcheck import check

        return check(self)

    @cached_property
    def environments(self) -> tuple[Environment, ...]:
        """The environments the fleet serves (at least one: a worker refuses to start without)."""
        return self.settings.require_environments()

    @property
    def maxima(self) -> dict[str, int | None]:
        """Each environment's `max_sessions`, in configuration order: the fair share's input."""
        return {e.id: e.max_sessions for e in self.environments}

    def environment(self, environment_id: str | None = None) -> Environment:
        """The environment of that id; None: the only one (refused when there are several, so
        no caller can pick one by accident and act with another environment's key)."""
        if environment_id is not None:
            return self.settings.environment(environment_id)
        if len(self.environments) > 1:
            raise SettingsError("several environments are served: the caller must name one")
        return self.environments[0]

    @property
    def environment_id(self) -> str:
        """The only environment's id (see `environment`)."""
        return self.environment().id

    def client(self, *, environment_id: str | None = None,
               max_retries: int = CLIENT_RETRIES) -> WorkClient:
        """A client for an environment (None: the only one), with its key; one per environment
        and retry policy, kept for connection reuse, over the lean HTTP/1.1 transport (unless a
        proxy applies: `HTTP11Transport.for_url`)."""
        environment = self.environment(environment_id)
        cache: dict[tuple[str, int], WorkClient] = self.__dict__.setdefault("_clients", {})
        if (environment.id, max_retries) not in cache:
            cache[environment.id, max_retries] = WorkClient.from_settings(
                self.settings, environment_id=environment.id,
                environment_key=environment.key.get_secret_value(), max_retries=max_retries,
                transport=HTTP11Transport.for_url(self.settings.base_url,
                                                  max_connections=CLIENT_CONNECTIONS))
        return cache[environment.id, max_retries]

    def close(self) -> None:
        """Close the runtime's connections: its Work API clients and Redis."""
        for client in self.__dict__.pop("_clients", {}).values():
            client.close()
        if "redis" in self.__dict__:
            self.redis.close()
        waiting = self.__dict__.get("waiting")
        if isinstance(waiting, RedisQueues) and waiting.redis is not self.__dict__.get("redis"):
            waiting.redis.close()


_runtime = PerProcess(lambda: Runtime(settings=load_settings(), app=_apps[0]))
# The fleet's Celery app, named by the app's module as it builds it (`use_app`). Not imported
# here: the app's bootsteps and signals use this module, so an import would close a cycle.
_apps: list[Any] = []


def use_app(app: Any) -> None:
    """Name the Celery app this process's runtime publishes and revokes with."""
    _apps[:] = [app]


def get_runtime() -> Runtime:
    """This process's runtime, for the fleet's Celery app (see `use_app`)."""
    if not _apps:
        raise RuntimeError("no Celery app yet: import dispatcher.celery.application first")
    return _runtime.get()


def reset_runtime() -> None:
    _runtime.pop()
