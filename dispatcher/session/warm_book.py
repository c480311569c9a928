"""The warm pool's book in Redis: which warm containers are ready, whose they are, and to which
attempt each claimed one is bound.

A warm container is created before any work is known, so its labels cannot name a work item or
an attempt (labels are fixed at creation). What the reaper must know is kept here instead:

- `ready:<worker>:<environment>` (list): ids of the worker's idle containers, ready to claim.
  Claiming pops one and records its binding in one script, so an id is always either ready or
  bound, never neither: the pool's reconciliation may remove a container that is neither.
- `bound` (hash): container id -> `{"work_id", "attempt"}` of the attempt it runs. The reaper
  judges a bound container exactly as a cold one with those labels.
- `owner:<owner>` (string, expiring): the pool's size, rewritten every tick by the worker that
  owns it; a warm container's `dispatcher.warm_owner` label names its owner. An unbound warm
  container whose owner's key expired belongs to a dead worker: the reaper removes it.
- `owners` (set): owners ever seen, so status and metrics can sum the live ones' sizes.

Redis losing its data loses no container: an unbound container's owner writes its key back
within a tick, and a bound one whose binding is gone looks unbound and stays while its owner
lives; the supervisor removes it at its session's end as always.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from redis import Redis

__all__ = ["OWNER_TTL_SECONDS", "Binding", "WarmBook"]

# An owner rewrites its key every pool tick (well under a second): a key this old means the
# worker is gone. Long enough to ride out a Redis restart or a loaded host's slow tick.
OWNER_TTL_SECONDS = 10

# Pop a ready container and bind it, atomically: see the module's docstring.
_CLAIM = """
local id = redis.call('LPOP', KEYS[1])
if id then redis.call('HSET', KEYS[2], id, ARGV[1]) end
return id
"""


@dataclass(frozen=True)
class Binding:
    work_id: str
    attempt: int


class WarmBook:
    def __init__(self, redis: Redis, *, prefix: str) -> None:
        self.redis = redis
        self.prefix = f"{prefix}:warm"
        self.bound_key = f"{self.prefix}:bound"
        self.owners_key = f"{self.prefix}:owners"
        self._claim = redis.register_script(_CLAIM)

    def ready_key(self, worker: str, environment: str) -> str:
        return f"{self.prefix}:ready:{worker}:{environment}"

    def owner_key(self, owner: str) -> str:
        return f"{self.prefix}:owner:{owner}"

    # --- the session's side ----------------------------------------------------------------

    def claim(self, worker: str, environment: str, binding: Binding) -> str | None:
        """A ready container of the worker's pool, now bound to the attempt; None: empty."""
        value = json.dumps({"work_id": binding.work_id, "attempt": binding.attempt})
        found = self._claim(keys=[self.ready_key(worker, environment), self.bound_key],
                            args=[value])
        return None if found is None else str(found)

    def unbind(self, container_id: str) -> None:
        """The container is gone: its binding with it."""
        self.redis.hdel(self.bound_key, container_id)

    def bindings(self, container_ids: list[str]) -> dict[str, Binding]:
        if not container_ids:
            return {}
        found: dict[str, Binding] = {}
        for container_id, raw in zip(container_ids,
                                     self.redis.hmget(self.bound_key, container_ids),
                                     strict=True):
            if raw:
                data = json.loads(raw)
                found[container_id] = Binding(str(data["work_id"]), int(data["attempt"]))
        return found

    # --- the pool's side -------------------------------------------------------------------

    def ready(self, worker: str, environment: str) -> list[str]:
        return [str(i) for i in self.redis.lrange(self.ready_key(worker, environment), 0, -1)]

    def add_ready(self, worker: str, environment: str, container_id: str) -> None:
        self.redis.rpush(self.ready_key(worker, environment), container_id)

    def take_ready(self, worker: str, environment: str) -> str | None:
        """A ready container taken out of the pool (unbound), to be removed."""
        found = self.redis.rpop(self.ready_key(worker, environment))
        return None if found is None else str(found)

    def forget_ready(self, worker: str, environment: str, container_id: str) -> bool:
        """Take one id out of the ready list; False: a claim took it first."""
        return bool(self.redis.lrem(self.ready_key(worker, environment), 0, container_id))

    def clear(self, worker: str, environment: str) -> None:
        """At a worker's start: ids a previous run of the same name left are not ours."""
        self.redis.delete(self.ready_key(worker, environment))

    def alive(self, owner: str, size: int) -> None:
        """The owner lives and holds `size` ready containers; both expire with it."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.set(self.owner_key(owner), size, ex=OWNER_TTL_SECONDS)
        pipe.sadd(self.owners_key, owner)
        pipe.execute()

    def gone(self, owner: str) -> None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.delete(self.owner_key(owner))
        pipe.srem(self.owners_key, owner)
        pipe.execute()

    # --- the reaper's, status' and metrics' side ---------------------------------------------

    def live_owners(self, owners: list[str]) -> set[str]:
        if not owners:
            return set()
        values = self.redis.mget([self.owner_key(o) for o in owners])
        return {o for o, v in zip(owners, values, strict=True) if v is not None}

    def sizes(self) -> dict[str, int]:
        """Each live owner's ready containers; owners whose key expired are forgotten."""
        owners = sorted(str(o) for o in self.redis.smembers(self.owners_key))
        if not owners:
            return {}
        values = self.redis.mget([self.owner_key(o) for o in owners])
        dead = [o for o, v in zip(owners, values, strict=True) if v is None]
        if dead:
            self.redis.srem(self.owners_key, *dead)
        return {o: int(v) for o, v in zip(owners, values, strict=True) if v is not None}
