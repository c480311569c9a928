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
from dataclasses import dataclass, replace
from urllib.parse import urlsplit, urlunsplit

import pytest

from dispatcher.celery.application import BEAT_LOCK_TIMEOUT_SECONDS
from dispatcher.celery.broker import AMQP_HEARTBEAT_SECONDS
from tests.support import isolation
from tests.support.chaos import ChaosFleet, Figures
from tests.support.hosts import Host, Link, Network, unavailable

pytestmark = pytest.mark.chaos
MakeChaos = Callable[..., ChaosFleet]
Report = Callable[[Figures], None]

# Sessions long enough that the cut lands while each one's first attempt runs.
SESSION_SECONDS = 20
# A lease TTL like a real fleet's: the self-fencing bound must not rest on a short TTL.
TTL_SECONDS = 30
# How long a cut lasts before it is healed: past recovery's threshold, so the session has
# moved to another worker by then.
CUT_SECONDS = 25


@pytest.fixture
def network() -> Iterator[Network]:
    """The hosts' network; a test names it first, so it is torn down after the fleet: a
    namespace deleted under a running worker would fault its shutdown, not the scenario."""
    why = unavailable()
    if why is not None:
        # A failure, not a skip: CI runs as root with the tools `./dev test` installs, and a
        # skipped scenario would pass for a tested one.
        pytest.fail(f"partition scenarios need network namespaces: {why}")
    net = Network(subnet=isolation.worker_index())
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


@dataclass(frozen=True)
class Links:
    """The shared services as the hosts reach them; `broker` only with RabbitMQ as the broker
    (on the default, Redis is the broker too: one link, one cut)."""

    redis: Link
    api: Link
    broker: Link | None = None


def _env_on(cf: ChaosFleet, links: Links) -> dict[str, str]:
    env = {**cf.fleet.env(), "DISPATCHER_REDIS_URL": _via(cf.fleet.redis_url, links.redis),
           "ANTHROPIC_BASE_URL": _via(cf.fleet.emulator.base_url, links.api)}
    if links.broker is not None:
        env["DISPATCHER_BROKER_URL"] = _via(env["DISPATCHER_BROKER_URL"], links.broker)
    return env


def _sessions_worker_on(cf: ChaosFleet, host: Host, name: str, links: Links, *,
                        concurrency: int = 4) -> None:
    cf.fleet.stack.worker(name, _env_on(cf, links), pool="threads",
                          concurrency=concurrency, queues="dispatcher.sessions",
                          wrapper=host.argv())
    cf.specs[name] = {"kind": "worker", "host": host.name}


def _control_on(cf: ChaosFleet, host: Host, name: str, links: Links) -> None:
    """A control worker with beat embedded, on `host`."""
    cf.fleet.stack.worker(name, _env_on(cf, links), pool="threads", concurrency=4,
                          queues="dispatcher.control", beat=True, wrapper=host.argv())
    cf.specs[name] = {"kind": "worker", "host": host.name}


def _links(cf: ChaosFleet, network: Network, *, broker: str | None = None) -> Links:
    """The fleet's links; `broker`: a RabbitMQ vhost's URL, made the whole fleet's broker and
    given a link of its own."""
    redis_port = urlsplit(cf.fleet.redis_url).port
    api_port = urlsplit(cf.fleet.emulator.base_url).port
    assert redis_port and api_port
    links = Links(network.link("redis", redis_port), network.link("workapi", api_port))
    if broker is None:
        return links
    cf.fleet.overrides["DISPATCHER_BROKER_URL"] = broker
    amqp = urlsplit(broker)
    assert amqp.hostname and amqp.port
    return replace(links, broker=network.link("amqp", amqp.port, amqp.hostname))


def test_session_worker_cut_from_redis(network: Network, chaos: MakeChaos,
                                       report: Report) -> None:
    cf = chaos("Session worker cut from Redis, then healed", ttl=TTL_SECONDS)
    links = _links(cf, network)
    host = network.host("s1")
    cf.control()
    _sessions_worker_on(cf, host, "s1", links)
    cf.fleet.wait_slots(4)
    work_ids = cf.create(3, fake_duration=SESSION_SECONDS)
    cf.wait_started(work_ids)
    cf.sessions_worker("s2")  # the rest of the fleet, where the sessions go on
    cf.fleet.wait_slots(8)
    on_s1 = cf.running_on("s1")
    assert sorted(on_s1) == sorted(work_ids), "every first attempt runs on the host cut off"

    cut_at = time.time()
    host.cut(links.redis)
    cf.fault("session worker cut from Redis")
    cf.watch_cut(work_ids, cut_at=cut_at)
    time.sleep(max(0.0, cut_at + CUT_SECONDS - time.time()))
    host.heal()
    report(cf.finish(timeout=120))


def _fleet_with_sessions_on_host(cf: ChaosFleet, network: Network, *, count: int = 3,
                                 broker: str | None = None) -> tuple[Host, Links, list[str]]:
    """A control worker here, session worker s1 on a host of its own running `count` sessions,
    and s2 here with free slots, where sessions may go on."""
    links = _links(cf, network, broker=broker)
    host = network.host("s1")
    cf.control()
    _sessions_worker_on(cf, host, "s1", links)
    cf.fleet.wait_slots(4)
    work_ids = cf.create(count, fake_duration=SESSION_SECONDS)
    cf.wait_started(work_ids)
    cf.sessions_worker("s2")
    cf.fleet.wait_slots(8)
    return host, links, work_ids


def test_session_worker_cut_from_the_work_api(network: Network, chaos: MakeChaos,
                                              report: Report) -> None:
    """The sessions go on (the control plane heartbeats them); their releases, which the cut
    host cannot send, are not lost."""
    cf = chaos("Session worker cut from the Work API", ttl=TTL_SECONDS)
    host, links, _ = _fleet_with_sessions_on_host(cf, network)
    host.cut(links.api)
    cf.fault("session worker cut from the Work API")
    time.sleep(SESSION_SECONDS + 5)
    host.heal()
    report(cf.finish(timeout=120))


def test_session_host_isolated(network: Network, chaos: MakeChaos,
                               report: Report) -> None:
    cf = chaos("Session host isolated, then healed", ttl=TTL_SECONDS)
    host, _, work_ids = _fleet_with_sessions_on_host(cf, network)
    cut_at = time.time()
    host.isolate()
    cf.fault("session host isolated")
    cf.watch_cut(work_ids, cut_at=cut_at)
    time.sleep(5)
    host.heal()
    report(cf.finish(timeout=120))


def test_session_worker_hears_redis_but_is_not_heard(network: Network, chaos: MakeChaos,
                                                     report: Report) -> None:
    """An asymmetric cut: the host's packets reach Redis, Redis's replies never come back."""
    cf = chaos("Session worker: replies from Redis dropped", ttl=TTL_SECONDS)
    host, links, work_ids = _fleet_with_sessions_on_host(cf, network)
    cut_at = time.time()
    host.cut(links.redis, direction="in")
    cf.fault("replies from Redis dropped")
    cf.watch_cut(work_ids, cut_at=cut_at)
    host.heal()
    report(cf.finish(timeout=120))


def _control_worker_cut(cf: ChaosFleet, network: Network, *, cut: str, fault: str,
                        standby_beat: bool, stop_one: bool = False,
                        broker: str | None = None) -> None:
    """Control worker c1 with beat on a host of its own, session worker s1 running sessions,
    then a standby control worker c2 here (with beat or not; started once c1's beat holds the
    lock); c1's link `cut` (a field of `Links`) is cut for a session's length, then healed.
    `stop_one`: a stop is asked for while the cut stands."""
    links = _links(cf, network, broker=broker)
    host = network.host("c1")
    _control_on(cf, host, "c1", links)
    cf.sessions_worker("s1")
    cf.fleet.wait_slots(4)
    work_ids = cf.create(3, fake_duration=SESSION_SECONDS)
    cf.wait_started(work_ids)
    cf.control("c2", beat=standby_beat)
    link = getattr(links, cut)
    assert isinstance(link, Link)
    host.cut(link)
    cf.fault(fault)
    if stop_one:
        time.sleep(3)
        cf.stop(work_ids[0])
    time.sleep(SESSION_SECONDS)
    host.heal()


def test_control_worker_cut_from_redis(network: Network, chaos: MakeChaos,
                                       report: Report) -> None:
    """The control worker with beat is cut off; a standby control worker with beat elsewhere
    takes over once the cut beat's lock lapses: no lease lapses, and a stop still reaches its
    sandbox, later by at most that lapse (no tick is scheduled meanwhile)."""
    cf = chaos("Control worker with beat cut from Redis", ttl=TTL_SECONDS)
    cf.stop_bound_seconds += BEAT_LOCK_TIMEOUT_SECONDS
    _control_worker_cut(cf, network, cut="redis", fault="control worker cut from Redis",
                        standby_beat=True, stop_one=True)
    report(cf.finish(timeout=120))


def test_control_worker_cut_from_the_work_api(network: Network, chaos: MakeChaos,
                                              report: Report) -> None:
    """Heartbeats the cut worker takes fail; another control worker's ticks keep every lease."""
    cf = chaos("Control worker with beat cut from the Work API", ttl=TTL_SECONDS)
    _control_worker_cut(cf, network, cut="api", fault="control worker cut from the Work API",
                        standby_beat=False)
    report(cf.finish(timeout=120))


# --- RabbitMQ as the broker: the broker and Redis cut apart ------------------------------------

def test_session_worker_cut_from_the_broker(network: Network, chaos: MakeChaos,
                                            rabbitmq_vhost: Callable[..., str],
                                            report: Report) -> None:
    """Redis still reachable: its sessions (acked as they started) run on to completion, their
    pulses and stop flags through Redis; a stop reaches one of them; new sessions go to s2."""
    cf = chaos("Session worker cut from RabbitMQ (Redis reachable)", ttl=TTL_SECONDS)
    host, links, work_ids = _fleet_with_sessions_on_host(cf, network, broker=rabbitmq_vhost())
    assert links.broker is not None
    host.cut(links.broker)
    cf.fault("session worker cut from the broker")
    time.sleep(2)
    cf.stop(work_ids[0])
    later = cf.create(3, fake_duration=3)
    # One of them may be handed to the cut worker's channel (RabbitMQ believes it alive):
    # it comes back to the queue when RabbitMQ closes that connection for silence.
    waited = time.time()
    cf.wait_started(later, timeout=3 * AMQP_HEARTBEAT_SECONDS + 30)
    cf.moved_after_s = round(time.time() - waited, 2)  # the figures' "moved after"
    assert not set(later) & set(cf.running_on("s1")), "new sessions go to the reachable worker"
    time.sleep(max(0.0, SESSION_SECONDS - (time.time() - waited)))
    host.heal()
    report(cf.finish(timeout=120))


def test_control_worker_cut_from_the_broker(network: Network, chaos: MakeChaos,
                                            rabbitmq_vhost: Callable[..., str],
                                            report: Report) -> None:
    """Redis still reachable: the cut worker's beat can publish no tick; the standby's ticks
    keep every lease, and a stop still reaches its sandbox."""
    cf = chaos("Control worker with beat cut from RabbitMQ (Redis reachable)", ttl=TTL_SECONDS)
    cf.stop_bound_seconds += BEAT_LOCK_TIMEOUT_SECONDS
    _control_worker_cut(cf, network, cut="broker", fault="control worker cut from the broker",
                        standby_beat=True, stop_one=True, broker=rabbitmq_vhost())
    report(cf.finish(timeout=120))


def test_slow_lossy_work_api_link(network: Network, chaos: MakeChaos,
                                  report: Report) -> None:
    """Every fleet member on hosts whose Work API link has 2 s of latency and 5 % loss."""
    cf = chaos("Work API link: 2 s latency, 5 % loss", ttl=TTL_SECONDS)
    links = _links(cf, network)
    control, sessions = network.host("c1"), network.host("s1")
    _control_on(cf, control, "c1", links)
    _sessions_worker_on(cf, sessions, "s1", links)
    links.api.delay = 2.0
    for host in (control, sessions):
        host.loss(links.api, 5)
    cf.fault("2 s latency and 5 % loss on the Work API link", 2)
    cf.fleet.wait_slots(4, timeout=60)
    cf.create(4, fake_duration=5)
    report(cf.finish(timeout=180))
