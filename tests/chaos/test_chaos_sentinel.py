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

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
from chaos_fleet import ChaosFleet, Figures, RedisServer
from fleet import FLEET_REDIS_DB, wait_for

from dispatcher.ops.stack import free_port

pytestmark = pytest.mark.chaos

MASTER_NAME = "chaos"
# How long the Sentinel waits on a silent master before it calls it down: short, so the
# failover lands while the sessions started before the kill still run (6 s each).
DOWN_AFTER_MS = 1000
# Bounds a failover attempt that stalls (a replica that will not take the promotion).
FAILOVER_TIMEOUT_MS = 5000


class SentinelServer:
    """One `redis-sentinel` process monitoring `master` under MASTER_NAME, with a quorum of 1."""

    def __init__(self, workdir: Path, master: RedisServer) -> None:
        self.port = free_port()
        workdir.mkdir()
        config = workdir / "sentinel.conf"  # Sentinel rewrites it: its own copy, writable
        config.write_text("\n".join([
            f"port {self.port}", "bind 127.0.0.1", f"dir {workdir}",
            f"sentinel monitor {MASTER_NAME} 127.0.0.1 {master.port} 1",
            f"sentinel down-after-milliseconds {MASTER_NAME} {DOWN_AFTER_MS}",
            f"sentinel failover-timeout {MASTER_NAME} {FAILOVER_TIMEOUT_MS}", ""]))
        with open(workdir / "sentinel.log", "ab") as log:
            self.process = subprocess.Popen([_sentinel_binary(), str(config)], stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        self.client = redis.Redis(port=self.port, decode_responses=True,
                                  socket_timeout=2, socket_connect_timeout=2)

    def master_port(self) -> int | None:
        try:
            address = self.client.sentinel_get_master_addr_by_name(MASTER_NAME)
        except redis.RedisError:
            return None
        return int(address[1]) if address else None

    def knows_replica(self, port: int) -> bool:
        """The Sentinel has found the replica (through the master's INFO) and it is healthy:
        before that, killing the master leaves nothing to promote."""
        try:
            replicas = self.client.sentinel_slaves(MASTER_NAME)
        except redis.RedisError:
            return False
        return any(int(r["port"]) == port and not (r["is_sdown"] or r["is_odown"])
                   for r in replicas)

    def stop(self) -> None:
        self.client.close()
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)


def _sentinel_binary() -> str:
    found = shutil.which("redis-sentinel")
    if found is None:
        pytest.fail("redis-sentinel is missing: `apt-get install redis-sentinel` (./dev does)")
    return found


def test_redis_master_killed_sentinel_promotes_the_replica(
        chaos: Callable[..., ChaosFleet], report: Callable[[Figures], None],
        tmp_path: Path) -> None:
    (tmp_path / "master").mkdir()
    (tmp_path / "replica").mkdir()
    master = RedisServer(tmp_path / "master", free_port())
    replica = RedisServer(tmp_path / "replica", free_port(), "--replicaof", "127.0.0.1",
                          str(master.port))
    sentinel = SentinelServer(tmp_path / "sentinel", master)
    try:
        wait_for(lambda: sentinel.knows_replica(replica.port), timeout=30,
                 what="the Sentinel to find the replica")
        cf = chaos("Redis master killed, Sentinel promotes the replica", ttl=6, redis=master)
        cf.fleet.overrides.update({"DISPATCHER_REDIS_SENTINELS": f"127.0.0.1:{sentinel.port}",
                                   "DISPATCHER_REDIS_SENTINEL_MASTER": MASTER_NAME})
        cf.busy_with_sessions()
        master.kill()
        cf.fault("Redis master killed (SIGKILL)")
        wait_for(lambda: sentinel.master_port() == replica.port, timeout=30,
                 what="the Sentinel to promote the replica")
        # The test's own reads (slots, leases) follow the new master too.
        cf.fleet.redis.close()
        cf.fleet.redis = redis.Redis(port=replica.port, db=FLEET_REDIS_DB,
                                     decode_responses=True)
        report(cf.finish(timeout=150))
    finally:
        sentinel.stop()
        replica.stop()
        master.stop()
