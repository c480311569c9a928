"""Redis restarted empty mid-run: broker, lease registry and beat's schedule all lost.

The fleet runs on a private redis-server of its own, killed and started again empty on the same
port while sessions run (and others wait to be claimed). The promise (docs/architecture.md,
Failures): every session still ends `stopped`, none lost, no two attempts overlap."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.chaos import ChaosFleet, Figures, RedisServer
from tests.support.isolation import free_port

pytestmark = pytest.mark.chaos


def test_redis_restarted_empty(chaos: Callable[..., ChaosFleet],
                               report: Callable[[Figures], None], tmp_path: Path) -> None:
    server = RedisServer(tmp_path, free_port())
    try:
        cf = chaos("Redis restarted empty", ttl=6, redis=server)
        cf.busy_with_sessions()
        cf.restart_redis(server)
        report(cf.finish(timeout=150))
    finally:
        server.stop()


def test_redis_restarted_empty_under_sessions_longer_than_the_ttl(
        chaos: Callable[..., ChaosFleet], report: Callable[[Figures], None],
        tmp_path: Path) -> None:
    """The same restart, with sessions that outlive it by more than a TTL: their leases, written
    back by their supervisors, must be heartbeated again, or they lapse under the sandboxes."""
    server = RedisServer(tmp_path, free_port())
    try:
        cf = chaos("Redis restarted empty, sessions longer than the TTL", ttl=6, redis=server)
        cf.control()
        cf.sessions_worker("s1")
        cf.fleet.wait_slots(4)
        running = cf.create(4, fake_duration=16)
        cf.wait_started(running)
        cf.restart_redis(server)
        report(cf.finish(timeout=120))
    finally:
        server.stop()
