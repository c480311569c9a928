"""Per-process resources of the Celery tasks: settings, Redis, the registry, API clients.

Built lazily and once per process id, because prefork children must not share a parent's HTTP
connections (redis-py pools re-create themselves after fork; httpx clients do not).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from redis import Redis

from dispatcher.control.capacity import Capacity
from dispatcher.lease.executor import Executor
from dispatcher.lease.machine import Policy
from dispatcher.lease.registry import LeaseRegistry
from dispatcher.metrics import Metrics
from dispatcher.settings import Settings, load_settings
from dispatcher.workapi import WorkClient

__all__ = ["Runtime", "get_runtime", "reset_runtime"]

# Redis calls from tasks must fail fast when Redis is gone, so a task logs one clear line and
# beat tries again next tick instead of hanging a pool slot.
REDIS_SOCKET_TIMEOUT_SECONDS = 5.0
# Most calls retry inside the client; loops with their own cadence (poll, heartbeat) do not.
CLIENT_RETRIES = 2


@dataclass
class Runtime:
    """What a process's tasks share, each part built once and handed on explicitly. `app` is
    what publishes and revokes tasks: the fleet's Celery app, or a stand-in a test gives."""

    settings: Settings
    app: Any

    @cached_property
    def redis(self) -> Redis:
        return Redis.from_url(
            self.settings.redis_url,
            decode_responses=True,
            socket_timeout=REDIS_SOCKET_TIMEOUT_SECONDS,
            socket_connect_timeout=REDIS_SOCKET_TIMEOUT_SECONDS,
        )

    @cached_property
    def registry(self) -> LeaseRegistry:
        return LeaseRegistry(self.redis, prefix=self.settings.key_prefix)

    @cached_property
    def capacity(self) -> Capacity:
        return Capacity(self.redis, prefix=self.settings.key_prefix)

    @cached_property
    def metrics(self) -> Metrics:
        return Metrics(self.redis, prefix=self.settings.key_prefix)

    @cached_property
    def executor(self) -> Executor:
        """Performs the lease machine's decisions: the only writer of lease records."""
        return Executor(self, Policy(max_attempts=self.settings.max_attempts))

    @property
    def environment_id(self) -> str:
        environment_id, _ = self.settings.require_worker()
        return environment_id

    def client(self, *, max_retries: int = CLIENT_RETRIES) -> WorkClient:
        """A client for this process; one per retry policy, kept for connection reuse."""
        cache: dict[int, WorkClient] = self.__dict__.setdefault("_clients", {})
        if max_retries not in cache:
            cache[max_retries] = WorkClient.from_settings(self.settings, max_retries=max_retries)
        return cache[max_retries]


_lock = threading.Lock()
_runtimes: dict[int, Runtime] = {}


def get_runtime() -> Runtime:
    """This process's runtime, for the fleet's Celery app."""
    from dispatcher.celery import app

    pid = os.getpid()
    with _lock:
        runtime = _runtimes.get(pid)
        if runtime is None:
            _runtimes.clear()  # entries of a parent process are useless after fork
            runtime = _runtimes[pid] = Runtime(settings=load_settings(), app=app)
        return runtime


def reset_runtime() -> None:
    with _lock:
        _runtimes.clear()
