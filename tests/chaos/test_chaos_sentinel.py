"""Redis fails over to its replica mid-run, and the fleet follows through Sentinel.

A private master, a replica of it (`--replicaof`) and one Sentinel watching them; the fleet is
configured for the Sentinel (`DISPATCHER_REDIS_SENTINELS`), with a `DISPATCHER_REDIS_URL` that
names the master, whose host and port the fleet must then not use. The master is killed with
SIGKILL while sessions run and others wait; the Sentinel promotes the replica about a second
later. The promise (docs/reliability.md): every session still ends `stopped`, none lost, no two
attempts overlap: the registry, the broker, the result backend and beat all carry on at the new
master.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from tests.support.chaos import ChaosFleet, Figures, RedisServer
from tests.support.isolation import fleet_db, free_port
from tests.support.sentinel import SentinelServer
from tests.support.waiting import wait_for

pytestmark = pytest.mark.chaos

# How long the Sentinel waits on a silent master before it calls it down: short, so the
# failover lands while the sessions started before the kill still run (6 s each).
DOWN_AFTER_MS = 1000
# The leases' TTL: the fleet cannot heartbeat while its registry has no master, so a lease goes
# the failover's length plus up to an interval (a third of this) without one. The Sentinel's
# failover takes about a second alone and over four on two busy cores (a CI run saw 6.6 s
# between beats with 6 s); this leaves it room without making the promise a weaker one.
TTL_SECONDS = 10
# Bounds a failover attempt that stalls (a replica that will not take the promotion).
FAILOVER_TIMEOUT_MS = 5000


def test_redis_master_killed_sentinel_promotes_the_replica(
        chaos: Callable[..., ChaosFleet], report: Callable[[Figures], None],
        tmp_path: Path) -> None:
    (tmp_path / "master").mkdir()
    (tmp_path / "replica").mkdir()
    master = RedisServer(tmp_path / "master", free_port())
    replica = RedisServer(tmp_path / "replica", free_port(), "--replicaof", "127.0.0.1",
                          str(master.port))
    sentinel = SentinelServer(tmp_path / "sentinel", master.port,
                              f"sentinel down-after-milliseconds {{name}} {DOWN_AFTER_MS}",
                              f"sentinel failover-timeout {{name}} {FAILOVER_TIMEOUT_MS}")
    try:
        wait_for(lambda: sentinel.knows_replica(replica.port), timeout=30,
                 what="the Sentinel to find the replica")
        cf = chaos("Redis master killed, Sentinel promotes the replica", ttl=TTL_SECONDS,
                   redis=master)
        cf.fleet.overrides.update({"DISPATCHER_REDIS_SENTINELS": sentinel.address,
                                   "DISPATCHER_REDIS_SENTINEL_MASTER": sentinel.master_name})
        cf.busy_with_sessions()
        master.kill()
        cf.fault("Redis master killed (SIGKILL)")
        wait_for(lambda: sentinel.master_port() == replica.port, timeout=30,
                 what="the Sentinel to promote the replica")
        # The test's own reads (slots, leases) follow the new master too.
        cf.fleet.redis.close()
        cf.fleet.redis = redis.Redis(port=replica.port, db=fleet_db(),
                                     decode_responses=True)
        report(cf.finish(timeout=150))
    finally:
        sentinel.stop()
        replica.stop()
        master.stop()
