"""Fleet members as separate hosts on one machine: network namespaces, links that really break.

    Network     a bridge in the root namespace at 198.18.S.1/24 (the benchmarking range, so
                nothing outside the test's own namespaces is ever addressed; S a subnet of the
                network's own, so networks of parallel test workers never share a route), and
                the links:
                one TCP relay per shared service (Redis, the broker, the Work API) listening on
                198.18.S.1 and forwarding to the service on 127.0.0.1
    Host        one network namespace joined to the bridge by a veth pair (198.18.S.N); a
                process started with `host.argv(...)` lives in it, and so do its sandboxes
    cuts        nftables rules inside the host's namespace drop a link's packets in one or both
                directions (`host.cut(link)`), or a share of them (`host.loss(link, 5)`);
                `host.isolate()` takes the host's interface down; `host.heal()` undoes all
    latency     this kernel has no `netem` qdisc, so a link's relay holds every chunk for the
                link's delay before passing it on (`link.delay = 2.0`), in order, both ways

Everything made is removed by `Network.close()` (a namespace's end of its veth goes with it).
Root is needed; `Network.available()` says in one line why not when it cannot be made.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass, field

__all__ = ["Host", "Link", "Network", "unavailable"]

# Network S (0 to 254) takes 198.18.S.0/24: the hub is .1, its hosts .2 and up.
NETWORK_FIRST_OCTETS = "198.18"
PREFIX_LENGTH = 24
MAX_HOSTS = 250
# Relays read what arrives in chunks of this size (bytes): large enough for a Redis pipeline.
CHUNK_BYTES = 65536
RELAY_START_TIMEOUT_SECONDS = 5.0


def unavailable() -> str | None:
    """Why namespaces cannot be made here, in one line; None when they can."""
    if os.geteuid() != 0:
        return "network namespaces need root (the chaos partition scenarios run as root in CI)"
    for tool in ("ip", "nft"):
        if subprocess.run(["which", tool], capture_output=True).returncode != 0:
            return f"`{tool}` is not installed (iproute2, nftables)"
    probe = f"dspprobe{uuid.uuid4().hex[:6]}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@dataclass
class Link:
    """One shared service as the hosts reach it: `hub:port`, relayed to `target`."""

    name: str
    hub: str
    port: int
    target: tuple[str, int]
    delay: float = 0.0  # seconds each chunk is held, each way

    @property
    def address(self) -> str:
        return f"{self.hub}:{self.port}"


@dataclass
class _Rule:
    link: Link
    direction: str  # "both", "out" (host to service), "in" (service to host)
    percent: int  # 100: a cut; less: loss


@dataclass
class Host:
    """A network namespace of its own, on the bridge."""

    name: str
    namespace: str
    address: str
    interface: str  # the namespace's end of its veth
    rules: list[_Rule] = field(default_factory=list)

    def argv(self, *command: str) -> list[str]:
        """`command` run inside this host's namespace (`ip netns exec` execs it: same pid)."""
        return ["ip", "netns", "exec", self.namespace, *command]

    def cut(self, link: Link, *, direction: str = "both") -> None:
        """Drop every packet of `link` in `direction`: established connections hang, new ones
        time out, exactly as on a partitioned network."""
        self.rules.append(_Rule(link, direction, 100))
        self._apply()

    def loss(self, link: Link, percent: int) -> None:
        self.rules.append(_Rule(link, "both", percent))
        self._apply()

    def isolate(self) -> None:
        _ip("-n", self.namespace, "link", "set", self.interface, "down")

    def heal(self) -> None:
        self.rules.clear()
        self._apply()
        _ip("-n", self.namespace, "link", "set", self.interface, "up")

    def _apply(self) -> None:
        """The whole rule set, replaced atomically by one `nft -f`."""
        lines = ["table inet dispatcher_test", "delete table inet dispatcher_test",
                 "table inet dispatcher_test {",
                 "  chain output { type filter hook output priority 0; policy accept;"]
        lines += [f"    {self._match(r, 'out')}" for r in self.rules if r.direction != "in"]
        lines += ["  }", "  chain input { type filter hook input priority 0; policy accept;"]
        lines += [f"    {self._match(r, 'in')}" for r in self.rules if r.direction != "out"]
        lines += ["  }", "}"]
        subprocess.run(["ip", "netns", "exec", self.namespace, "nft", "-f", "-"],
                       input="\n".join(lines) + "\n", check=True, capture_output=True, text=True)

    @staticmethod
    def _match(rule: _Rule, way: str) -> str:
        port = rule.link.port
        hub = rule.link.hub
        where = (f"ip daddr {hub} tcp dport {port}" if way == "out"
                 else f"ip saddr {hub} tcp sport {port}")
        chance = "" if rule.percent >= 100 else f"numgen random mod 100 < {rule.percent} "
        return f"{where} {chance}drop"


class Network:
    """The bridge, its hosts and the relays of the shared services."""

    def __init__(self, subnet: int = 0) -> None:
        """`subnet`: which 198.18.S.0/24 this network takes; networks that exist at once (the
        tests of parallel workers) must each have their own."""
        if not 0 <= subnet <= 254:
            raise ValueError(f"subnet {subnet} is outside 0..254")
        self.hub = f"{NETWORK_FIRST_OCTETS}.{subnet}.1"
        self.subnet = subnet
        self.tag = uuid.uuid4().hex[:5]
        self.bridge = f"dspb{self.tag}"
        self.hosts: list[Host] = []
        self.links: list[Link] = []
        self._numbers = itertools.count(1)
        self._loop = asyncio.new_event_loop()
        self._servers: list[asyncio.base_events.Server] = []
        self._thread = threading.Thread(target=self._loop.run_forever, name="relays", daemon=True)
        _ip("link", "add", self.bridge, "type", "bridge")
        try:
            _ip("addr", "add", f"{self.hub}/{PREFIX_LENGTH}", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
        except subprocess.CalledProcessError:
            self.close()
            raise
        self._thread.start()

    def host(self, name: str) -> Host:
        number = next(self._numbers)
        namespace = f"dsp{self.tag}{name}"
        outside, inside = f"dsp{self.tag}h{number}", f"dsp{self.tag}n{number}"
        _ip("netns", "add", namespace)
        if number > MAX_HOSTS:
            raise ValueError(f"a network holds at most {MAX_HOSTS} hosts")
        host = Host(name, namespace, f"{NETWORK_FIRST_OCTETS}.{self.subnet}.{number + 1}", inside)
        self.hosts.append(host)
        _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
        _ip("link", "set", outside, "master", self.bridge)
        _ip("link", "set", outside, "up")
        _ip("link", "set", inside, "netns", namespace)
        _ip("-n", namespace, "addr", "add", f"{host.address}/{PREFIX_LENGTH}", "dev", inside)
        _ip("-n", namespace, "link", "set", inside, "up")
        _ip("-n", namespace, "link", "set", "lo", "up")
        host.heal()  # an empty rule table, so later changes replace it
        return host

    def link(self, name: str, target_port: int, target_host: str = "127.0.0.1") -> Link:
        """Relay `hub:<a free port>` to the service at `target_host:target_port`."""
        link = Link(name, self.hub, 0, (target_host, target_port))
        future = asyncio.run_coroutine_threadsafe(self._serve(link), self._loop)
        link.port = future.result(timeout=RELAY_START_TIMEOUT_SECONDS)
        self.links.append(link)
        return link

    async def _serve(self, link: Link) -> int:
        async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                up_reader, up_writer = await asyncio.open_connection(*link.target)
            except OSError:
                writer.close()
                return
            # Cancelled only by `close`: ending quietly keeps asyncio's stream callback, which
            # asks the task for its exception, from raising the cancellation at shutdown.
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(_pump(reader, up_writer, link),
                                     _pump(up_reader, writer, link))

        server = await asyncio.start_server(accept, self.hub, 0)
        self._servers.append(server)
        return int(server.sockets[0].getsockname()[1])

    def close(self) -> None:
        for number, host in enumerate(self.hosts, start=1):
            subprocess.run(["ip", "netns", "del", host.namespace], capture_output=True)
            # The namespace's end goes with it, its peer a moment later: delete it now.
            subprocess.run(["ip", "link", "del", f"dsp{self.tag}h{number}"], capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)
        if self._thread.is_alive():
            with contextlib.suppress(TimeoutError, RuntimeError):
                asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(timeout=5)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
        self._loop.close()

    async def _shutdown(self) -> None:
        """Close the listeners, then cancel every relay still copying, and wait for them."""
        for server in self._servers:
            server.close()
        current = asyncio.current_task()
        tasks = [t for t in asyncio.all_tasks() if t is not current]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: Link) -> None:
    """Copy one direction, each chunk held `link.delay` seconds from its arrival, in order."""
    pending: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def deliver() -> None:
        while True:
            due, chunk = await pending.get()
            if not chunk:
                break
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(chunk)
            await writer.drain()

    delivering = asyncio.ensure_future(deliver())
    try:
        while chunk := await reader.read(CHUNK_BYTES):
            pending.put_nowait((time.monotonic() + link.delay, chunk))
        pending.put_nowait((0.0, b""))
        with contextlib.suppress(ConnectionError, OSError):
            await delivering
    except (ConnectionError, OSError):
        pass
    finally:
        delivering.cancel()
        with contextlib.suppress(ConnectionError, OSError, RuntimeError):
            writer.close()
