"""Faults between hosts: fleet members in network namespaces of their own, links cut for real.

Each scenario runs the chaos fleet (real `celery` processes, a private redis-server, the
emulator) with some members as separate hosts (`hosts.py`): a session worker whose packets to
Redis are dropped by nftables while the rest of the fleet goes on, then healed. The promise
(docs/reliability.md, "Partitions"): never two live sandboxes of one session, no session lost,
none run twice after it completed, every session ends `stopped`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from urllib.parse import urlsplit, urlunsplit

import pytest
from chaos_fleet import ChaosFleet, Figures
from fleet import wait_for
from hosts import Host, Link, Network, unavailable

pytestmark = pytest.mark.chaos

# Sessions long enough that the cut lands while each one's first attempt runs.
SESSION_SECONDS = 20
# A lease TTL like a real fleet's: the self-fencing bound must not rest on a short TTL.
TTL_SECONDS = 30
# How long a cut lasts before it is healed: past recovery's threshold, so the session has
# moved to another worker by then.
CUT_SECONDS = 25


@pytest.fixture
def network() -> Iterator[Network]:
    why = unavailable()
    if why is not None:
        pytest.skip(f"partition scenarios need network namespaces: {why}")
    net = Network()
    try:
        yield net
    finally:
        net.close()


def _via(url: str, link: Link) -> str:
    """`url` with its host and port replaced by the link's, as a host on the bridge sees it."""
    parts = urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    return urlunsplit(parts._replace(netloc=f"{userinfo}@{link.address}" if userinfo
                                     else link.address))


def _sessions_worker_on(cf: ChaosFleet, host: Host, name: str, *, redis: Link,
                        api: Link, concurrency: int = 4) -> None:
    env = {**cf.fleet.env(), "DISPATCHER_REDIS_URL": _via(cf.fleet.redis_url, redis),
           "ANTHROPIC_BASE_URL": _via(cf.fleet.emulator.base_url, api)}
    cf.fleet.stack.worker(name, env, pool="threads", concurrency=concurrency,
                          queues="dispatcher.sessions", wrapper=host.argv())
    cf.specs[name] = {"kind": "worker", "host": host.name}


def _links(cf: ChaosFleet, network: Network) -> tuple[Link, Link]:
    redis_port = urlsplit(cf.fleet.redis_url).port
    api_port = urlsplit(cf.fleet.emulator.base_url).port
    assert redis_port and api_port
    return network.link("redis", redis_port), network.link("workapi", api_port)


def test_session_worker_cut_from_redis(chaos: Callable[..., ChaosFleet],
                                       report: Callable[[Figures], None],
                                       network: Network) -> None:
    cf = chaos("Session worker cut from Redis, then healed", ttl=TTL_SECONDS)
    redis, api = _links(cf, network)
    host = network.host("s1")
    cf.control()
    _sessions_worker_on(cf, host, "s1", redis=redis, api=api)
    cf.fleet.wait_slots(4)
    work_ids = cf.create(3, fake_duration=SESSION_SECONDS)
    cf.wait_started(work_ids)
    cf.sessions_worker("s2")  # the rest of the fleet, where the sessions go on
    cf.fleet.wait_slots(8)
    on_s1 = cf.running_on("s1")
    assert sorted(on_s1) == sorted(work_ids), "every first attempt runs on the host cut off"

    host.cut(redis)
    cf.fault("session worker cut from Redis")
    cut_at = time.time()
    wait_for(lambda: all(len(cf.fleet.events(w, "started")) >= 2 for w in work_ids),
             timeout=60, interval=0.2, what="every session started again elsewhere")
    time.sleep(max(0.0, cut_at + CUT_SECONDS - time.time()))
    host.heal()
    report(cf.finish(timeout=120))
