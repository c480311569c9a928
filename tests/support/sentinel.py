"""A `redis-sentinel` process of a test's own, watching one master (`master_name`, quorum 1).

Shared by the integration tests (the clients the fleet builds, through a Sentinel) and the
chaos scenario (a failover to a replica).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import redis

from tests.support.isolation import free_port


class SentinelServer:
    """`lines` are more of sentinel.conf (`sentinel down-after-milliseconds ...`, `requirepass`);
    `{name}` in them is the master's name."""

    def __init__(self, workdir: Path, master_port: int, *lines: str,
                 password: str | None = None) -> None:
        self.port = free_port()
        # A name of its own: Sentinels find each other by the master's name on its hello
        # channel, and a Sentinel another test left watching a port this master reused would
        # otherwise join it and, gone, deny every failover its vote (not elected).
        self.master_name = f"fleet-master-{self.port}"
        workdir.mkdir(parents=True, exist_ok=True)
        config = workdir / "sentinel.conf"  # Sentinel rewrites it: its own copy, writable
        config.write_text("\n".join([
            f"port {self.port}", "bind 127.0.0.1", f"dir {workdir}",
            f"sentinel monitor {self.master_name} 127.0.0.1 {master_port} 1",
            *(line.format(name=self.master_name) for line in lines), ""]))
        with open(workdir / "sentinel.log", "ab") as log:
            self.process = subprocess.Popen([_binary(), str(config)], stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        self.client = redis.Redis(port=self.port, password=password, decode_responses=True,
                                  socket_timeout=2, socket_connect_timeout=2)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def master_port(self) -> int | None:
        """The master's port as the Sentinel names it now; None while it cannot say."""
        try:
            address = self.client.sentinel_get_master_addr_by_name(self.master_name)
        except redis.RedisError:
            return None
        return int(address[1]) if address else None

    def knows_replica(self, port: int) -> bool:
        """The Sentinel has found the replica (through the master's INFO) and it is healthy:
        before that, a failover has nothing to promote."""
        try:
            replicas = self.client.sentinel_slaves(self.master_name)
        except redis.RedisError:
            return False
        return any(int(r["port"]) == port and not (r["is_sdown"] or r["is_odown"])
                   for r in replicas)

    def stop(self) -> None:
        self.client.close()
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)


def _binary() -> str:
    found = shutil.which("redis-sentinel")
    if found is None:
        pytest.fail("redis-sentinel is missing: `apt-get install redis-sentinel` (./dev does)")
    return found
