"""Redis restarted empty mid-run: broker, lease registry and beat's schedule all lost.

The fleet runs on a private redis-server of its own, killed and started again empty on the same
port while sessions run (and others wait to be claimed). The promise (docs/architecture.md,
Failures): every session still ends `stopped`, none lost, no two attempts overlap."""

from __future__ import annotations

import time
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
        cf.control()
        cf.sessions_worker("s1")
        cf.sessions_worker("s2")
        cf.fleet.wait_slots(8)
        first = cf.create(8, fake_duration=6)
        cf.wait_started(first[:4])
        cf.create(6, fake_duration=2)
        time.sleep(cf.rng.uniform(0.5, 1.5))
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
