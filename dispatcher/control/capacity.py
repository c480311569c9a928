"""Session slots: what each worker advertises, and what the poller may claim.

A worker that consumes a session queue advertises its slots every few seconds with a timestamp;
a worker that stopped advertising (killed, drained, partitioned) drops out of the sum once its
advertisement is older than `WORKER_STALE_SECONDS`. Every held lease takes one slot, whether its
session waits in a queue or runs, so

    free = sum(slots of live, non-draining workers) - held leases

and the poller never claims more than that: work waits on the server (where another fleet can
take it, and where `depth` shows it for autoscaling), not in our queues.

A fleet that serves several environments shares its slots between their pollers
(`claim_allowance`): each environment is entitled to a fair share of the slots (max-min: equal
parts, none above its `max_sessions`, what one cannot use shared among the others), and a
poller may claim beyond its share only what leaves every other environment its unused share, so
a backlog in one never starves another. An environment whose last poll found nothing (idle: not
backlogged) reserves of its unused share only what its recent demand asks: as many slots as
sessions arrived in it lately (`DISPATCHER_IDLE_HEADROOM_SECONDS`; none by default), and the
idle environments together at least a slot (`IDLE_HEADROOM_SLOTS`, in a fleet of ten slots or
more). So the busy ones may use the rest of the fleet, a session arriving in an idle environment
finds a slot at once, and environments with no arrivals lately leave the fleet to the others.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Set
from dataclasses import dataclass

from redis import Redis

from dispatcher.clock import Clock, RedisClock
from dispatcher.control.poll_keys import PollKeys
from dispatcher.lease.keys import Keys

__all__ = ["ENGINE_DOWN", "ENGINE_NO_IMAGE", "ENGINE_UP", "WORKER_STALE_SECONDS", "Capacity",
           "WorkerSlots", "claim_allowance", "desired_slots", "fair_shares", "free_slots",
           "idle_headroom"]

# A worker advertises every ADVERTISE_INTERVAL_SECONDS; three missed advertisements mean gone.
ADVERTISE_INTERVAL_SECONDS = 2.0
WORKER_STALE_SECONDS = 3 * ADVERTISE_INTERVAL_SECONDS
# Worker hashes outlive their staleness a while so `dispatcher status` can show them going.
WORKER_RECORD_TTL_SECONDS = 60
# Slots that environments whose last poll found nothing keep free together at least, out of their
# unused shares, whatever their recent demand: without it a burst in one environment took every
# slot, and a session arriving in a quiet one waited for a burst session to end (p99 4.2x its
# dispatch alone, BENCHMARKS.md, "Fairness"). Never more than a tenth of the fleet
# (`IDLE_HEADROOM_SHARE`), so a small fleet keeps every slot usable while they are silent.
IDLE_HEADROOM_SLOTS = 1
IDLE_HEADROOM_SHARE = 0.1
ENGINE_UP = "up"
ENGINE_DOWN = "down"
# The engine answers but lacks a configured image (removed, pruned): no sandbox can start.
ENGINE_NO_IMAGE = "no-image"


@dataclass(frozen=True)
class WorkerSlots:
    hostname: str
    slots: int
    pool: str
    queues: str
    draining: bool
    seen_at: float  # the fleet's clock (`dispatcher/clock.py`), as the worker last advertised
    live: bool = False  # advertised recently and not draining, as of the read
    # Its container engine as its probe last found it: ENGINE_UP, ENGINE_DOWN, ENGINE_NO_IMAGE,
    # or "" (a worker of the process runtime has none). A live worker whose engine is down or
    # lacks its image keeps running its sessions, but its slots are withdrawn: it cannot start
    # one.
    engine: str = ""

    @property
    def serving(self) -> bool:
        """Its slots count: live, and able to start a sandbox."""
        return self.live and self.engine in ("", ENGINE_UP)


def free_slots(*, total: int, held: int) -> int:
    """Slots the poller may claim for: every lease holds a slot, queued or running (one
    computation, for the poller, the metrics and `dispatcher status`)."""
    return max(0, total - held)


def desired_slots(*, queued: int, pending: int, held: int) -> int:
    """The session slots one environment's work needs now, the autoscalers' signal: every item
    queued on the server (`depth`), every one polled but not yet acknowledged (`pending`: on its
    way to a worker), and every lease the fleet holds (starting or running). Acknowledged items
    leave the server's stream, so none is counted twice."""
    return max(0, queued) + max(0, pending) + max(0, held)


def fair_shares(total: int, maxima: Mapping[str, int | None]) -> dict[str, int]:
    """Each environment's share of `total` slots: equal parts, none above its maximum (None: no
    maximum), what a capped one leaves shared among the rest (max-min fairness). A remainder
    that cannot be split goes one slot each to the first environments in `maxima`'s order."""
    shares = dict.fromkeys(maxima, 0)
    open_ = [e for e in maxima if maxima[e] is None or (maxima[e] or 0) > 0]
    left = max(0, total)
    while left > 0 and open_:
        part = max(1, left // len(open_))
        for environment in list(open_):
            cap = maxima[environment]
            room = part if cap is None else min(part, cap - shares[environment])
            room = min(room, left)
            shares[environment] += room
            left -= room
            if cap is not None and shares[environment] >= cap:
                open_.remove(environment)
            if left == 0:
                break
    return shares


def claim_allowance(environment: str, *, total: int, held: Mapping[str, int],
                    maxima: Mapping[str, int | None], idle: Set[str] = frozenset(),
                    arrived: Mapping[str, int] | None = None, held_elsewhere: int = 0) -> int:
    """How many items `environment`'s poller may claim now.

    `total` is the fleet's live slots, `held` the leases held per environment, `maxima` every
    environment the fleet serves with its `max_sessions` (None: none), `idle` those whose last
    poll found nothing, `arrived` the sessions each environment's polls answered lately (its
    recent demand), `held_elsewhere` leases of no environment in `maxima` (served before a
    configuration change): they take slots all the same. A poller may claim up to its own unused
    share, and beyond it only what leaves each other busy environment its unused share, and the
    idle ones their headroom (`idle_headroom`)."""
    shares = fair_shares(total, maxima)
    free = free_slots(total=total, held=sum(held.get(e, 0) for e in maxima) + held_elsewhere)
    mine = held.get(environment, 0)
    cap = maxima.get(environment)
    room = free if cap is None else max(0, cap - mine)
    unused = {other: max(0, shares[other] - held.get(other, 0)) for other in maxima
              if other != environment}
    quiet = {other: n for other, n in unused.items() if other in idle}
    reserved = (sum(n for other, n in unused.items() if other not in idle)
                + idle_headroom(total, quiet, arrived or {}))
    own = max(0, shares.get(environment, 0) - mine)
    return max(0, min(free, room, max(own, free - reserved)))


def idle_headroom(total: int, unused: Mapping[str, int], arrived: Mapping[str, int]) -> int:
    """The free slots the idle environments keep together, out of their unused shares
    (`unused`, of the idle ones only): each keeps a slot for every session that arrived in it
    lately (`arrived`), never more than its unused share, and together they keep at least
    `IDLE_HEADROOM_SLOTS` (never over a tenth of a fleet of `total` slots), for a session
    arriving in one that was silent."""
    demand = sum(min(n, max(0, arrived.get(e, 0))) for e, n in unused.items())
    floor = min(IDLE_HEADROOM_SLOTS, int(total * IDLE_HEADROOM_SHARE))
    return min(sum(unused.values()), max(floor, demand))


class Capacity:
    def __init__(self, redis: Redis, *, prefix: str, clock: Clock | None = None) -> None:
        self.redis = redis
        self.clock = clock or RedisClock(redis)
        self.keys = Keys(prefix)  # the lease index: every held lease takes a slot
        # Sorted set: worker hostname -> epoch second it last advertised its slots. (Each
        # worker's own hash is a lease key: an attempt's pulse reads its draining flag.)
        self.workers_key = f"{prefix}:workers"
        self.poll_keys = PollKeys(prefix)

    def advertise(self, *, hostname: str, slots: int, pool: str, queues: list[str],
                  engine: str = "") -> None:
        """Advertise `slots`; `engine`: ENGINE_DOWN (ENGINE_NO_IMAGE) withdraws them while the
        worker's container engine does not answer (lacks an image); the worker still counts as
        live: its sessions run on."""
        now = self.clock.now()
        key = self.keys.worker(hostname)
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(
            key,
            mapping={"slots": slots, "pool": pool, "queues": ",".join(queues), "seen_at": now,
                     "engine": engine},
        )
        pipe.expire(key, WORKER_RECORD_TTL_SECONDS)
        pipe.zadd(self.workers_key, {hostname: now})
        # Forget workers whose record expired; reads stay free of side effects.
        pipe.zremrangebyscore(self.workers_key, "-inf", now - WORKER_RECORD_TTL_SECONDS)
        pipe.execute()

    def register(self, hostname: str) -> None:
        """A worker (re)starts: a draining flag left by its previous run no longer holds."""
        self.redis.hdel(self.keys.worker(hostname), "draining")

    def set_draining(self, hostname: str) -> None:
        """The worker is shutting down: its slots no longer count and its sessions hand over."""
        key = self.keys.worker(hostname)
        self.redis.hset(key, "draining", "1")
        self.redis.expire(key, WORKER_RECORD_TTL_SECONDS)

    def is_draining(self, hostname: str) -> bool:
        return self.redis.hget(self.keys.worker(hostname), "draining") == "1"

    def withdraw(self, hostname: str) -> None:
        pipe = self.redis.pipeline(transaction=True)
        pipe.zrem(self.workers_key, hostname)
        pipe.delete(self.keys.worker(hostname))
        pipe.execute()

    def workers(self) -> list[WorkerSlots]:
        names = [str(n) for n in self.redis.zrange(self.workers_key, 0, -1)]
        pipe = self.redis.pipeline(transaction=False)
        for name in names:
            pipe.hgetall(self.keys.worker(name))
        result = []
        now = self.clock.now()
        for name, raw in zip(names, pipe.execute(), strict=True):
            if not raw:
                continue  # its record expired; the next advertisement prunes the name
            seen_at = float(raw.get("seen_at", 0))
            draining = raw.get("draining") == "1"
            result.append(
                WorkerSlots(
                    hostname=name,
                    slots=int(raw.get("slots", 0)),
                    pool=raw.get("pool", ""),
                    queues=raw.get("queues", ""),
                    draining=draining,
                    seen_at=seen_at,
                    live=not draining and now - seen_at < WORKER_STALE_SECONDS,
                    engine=raw.get("engine", ""),
                )
            )
        return result

    def total_slots(self) -> int:
        return sum(w.slots for w in self.workers() if w.serving)

    def live_workers(self) -> set[str]:
        return {w.hostname for w in self.workers() if w.live}

    def free_slots(self) -> int:
        return free_slots(total=self.total_slots(), held=int(self.redis.zcard(self.keys.leases)))

    def allowance(self, environment: str, maxima: Mapping[str, int | None], *,
                  demand_seconds: float = 0.0) -> int:
        """What `environment`'s poller may claim now (`claim_allowance` over Redis' figures):
        an environment's recent demand is the sessions its polls answered within the last
        `demand_seconds` (`note_polled`). With one environment and no maximum this is
        `free_slots`, without further reads."""
        if len(maxima) == 1 and maxima.get(environment, 0) is None:
            return self.free_slots()
        since = self.clock.now() - demand_seconds
        pipe = self.redis.pipeline(transaction=False)
        pipe.zcard(self.keys.leases)
        for other in maxima:
            pipe.zcard(self.keys.environment_leases(other))
            pipe.exists(self.poll_keys.idle(other))
            pipe.zcount(self.poll_keys.arrived(other), since, "+inf")
        everything, *figures = pipe.execute()
        held = {e: int(figures[3 * i]) for i, e in enumerate(maxima)}
        idle = {e for i, e in enumerate(maxima) if figures[3 * i + 1]}
        arrived = {e: int(figures[3 * i + 2]) for i, e in enumerate(maxima)}
        elsewhere = max(0, int(everything) - sum(held.values()))
        return claim_allowance(environment, total=self.total_slots(), held=held, maxima=maxima,
                               idle=idle, arrived=arrived, held_elsewhere=elsewhere)

    def note_polled(self, environment: str, work_id: str | None, *, idle_seconds: int,
                    demand_seconds: float) -> None:
        """A poll's answer, for the fair share: an empty one marks the environment idle for
        `idle_seconds` (its unused share is free for the others); an item takes it back, and
        counts in its recent demand for `demand_seconds`. One round trip."""
        keys = self.poll_keys
        pipe = self.redis.pipeline(transaction=False)
        if work_id is None:
            pipe.set(keys.idle(environment), 1, ex=idle_seconds)
        else:
            pipe.delete(keys.idle(environment))
        if work_id is not None and demand_seconds > 0:
            now = self.clock.now()
            pipe.zadd(keys.arrived(environment), {work_id: now})
            pipe.zremrangebyscore(keys.arrived(environment), "-inf", now - demand_seconds)
            pipe.expire(keys.arrived(environment), max(1, math.ceil(demand_seconds)))
        pipe.execute()
