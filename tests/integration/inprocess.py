"""Dispatcher functions run in-process against real Redis (db 10, a unique key prefix) and the
emulator over HTTP; only Celery's `send_task` is a stand-in that records what would be sent."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from dispatcher.ops.stack import FAKE_SESSION
from dispatcher.runtime import Runtime
from dispatcher.settings import load_settings

__all__ = ["REDIS_BASE", "SentTasks", "close_runtime", "in_process_runtime", "poll_until"]

REDIS_BASE = os.environ.get("DISPATCHER_TEST_REDIS", "redis://127.0.0.1:6379")


class SentTasks:
    """Celery's app as the lease executor sees it: records what would be published and
    revoked."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.revoked: list[str] = []
        self.control = self

    def send_task(self, name: str, **kwargs: Any) -> None:
        self.sent.append({"name": name, **kwargs})

    def revoke(self, task_id: str, **kwargs: Any) -> None:
        self.revoked.append(task_id)


def poll_until(runtime: Runtime, work_id: str, timeout_polls: int = 15) -> Any:
    client = runtime.client(max_retries=0)
    for _ in range(timeout_polls):
        item = client.poll(block_ms=999)
        if item is not None and item.id == work_id:
            return item
    raise AssertionError(f"{work_id} was never delivered")


@contextmanager
def in_process_runtime(emulator: Any, **overrides: Any) -> Iterator[Runtime]:
    """A runtime for a fresh environment of `emulator`; every key it wrote is removed after."""
    environment_id = emulator.create_environment()
    prefix = f"badinput{uuid.uuid4().hex[:8]}"
    settings = load_settings(**{
        "ANTHROPIC_BASE_URL": emulator.base_url, "ANTHROPIC_ENVIRONMENT_ID": environment_id,
        "ANTHROPIC_ENVIRONMENT_KEY": emulator.environment_key,
        "DISPATCHER_REDIS_URL": f"{REDIS_BASE}/10", "DISPATCHER_KEY_PREFIX": prefix,
        "DISPATCHER_ON_WORK": FAKE_SESSION, "DISPATCHER_DESIRED_TTL_SECONDS": 30,
        "DISPATCHER_SANDBOX_ENV_ALLOW": "PATH,DISPATCHER_FAKE_RECORD_DIR",
        "DISPATCHER_STOP_GRACE_SECONDS": 1, **overrides})
    rt = Runtime(settings=settings, app=SentTasks())
    try:
        yield rt
    finally:
        close_runtime(rt)


def close_runtime(rt: Runtime) -> None:
    """Remove every key the runtime wrote (its prefix's) and close its connections."""
    for key in rt.redis.scan_iter(f"{rt.settings.key_prefix}:*", count=1000):
        rt.redis.delete(key)
    rt.close()
