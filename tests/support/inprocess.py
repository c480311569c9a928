"""Dispatcher functions run in-process against real Redis (the worker's integration database,
a unique key prefix) and the emulator over HTTP; only Celery's `send_task` is a stand-in that
records what would be sent."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from dispatcher.lease.model import Lease, Phase
from dispatcher.ops.stack import FAKE_SESSION
from dispatcher.runtime import Runtime
from dispatcher.settings import load_settings
from tests.support.isolation import integration_db, redis_url

__all__ = ["IN_PROCESS_PREFIX", "SentTasks", "close_runtime", "held_items", "in_process_runtime",
           "poll_until", "stop_item"]

# Every in-process runtime's keys start with it (then a unique suffix): a test can check that
# none is left.
IN_PROCESS_PREFIX = "badinput"


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
    prefix = f"{IN_PROCESS_PREFIX}{uuid.uuid4().hex[:8]}"
    settings = load_settings(**{
        "ANTHROPIC_BASE_URL": emulator.base_url, "ANTHROPIC_ENVIRONMENT_ID": environment_id,
        "ANTHROPIC_ENVIRONMENT_KEY": emulator.environment_key,
        "DISPATCHER_REDIS_URL": redis_url(integration_db()), "DISPATCHER_KEY_PREFIX": prefix,
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


def held_items(emulator: Any, runtime: Runtime, n: int, *, phase: str = Phase.RUNNING,
               **fields: Any) -> list[str]:
    """N items created on the server and recorded as held (newest last), as the poller and a
    session worker would leave them."""
    ids = []
    for _ in range(n):
        session_id, work_id = emulator.create_session(runtime.environment_id, metadata={})
        item = emulator.get(runtime.environment_id, work_id)
        now = time.time()
        lease = Lease(work_id=work_id, session_id=session_id,
                      environment_id=runtime.environment_id, mode="dispatcher",
                      queue="dispatcher.sessions", phase=phase, task_id=f"t-{work_id}",
                      worker="w@h", claimed_at=now, dispatched_at=now, pulse_at=now,
                      created_at=item["created_at"])
        for name, value in fields.items():
            setattr(lease, name, value)
        runtime.registry.create(lease, work_json="{}")
        ids.append(work_id)
    return ids


def stop_item(emulator: Any, runtime: Runtime, work_id: str) -> None:
    """The server asked to stop the item (an operator's graceful stop)."""
    emulator.http.post(emulator.work_url(runtime.environment_id, f"/{work_id}/stop"),
                       headers=emulator.org_headers, json={"force": False}).raise_for_status()
