"""Work items in Redis, one JSON string each, changed by compare-and-set in one round trip.

A change reads the item, decides in Python (`lifecycle`), then writes it with `swap`: a Lua
script that writes only if the item is still exactly as read, together with what goes with it
(the environment's lease index, the stream entries the change drops), and otherwise answers the
item as it is now, to decide again on. The process remembers the last state it read or wrote of
each item (`known`), so a change of an item nobody else touched meanwhile (a lease's next
heartbeat) is one round trip: the swap itself checks that the remembered state is still the
stored one. A remembered state is only ever a guess: nothing is answered from it that the swap
did not confirm (a refusal, which writes nothing, is decided again on the item as read).
"""

from __future__ import annotations

from typing import Any

from redis.asyncio import Redis

from .batch import CommandBatch
from .keys import CONSUMER_GROUP, EmulatorKeys
from .records import WorkRecord

__all__ = ["REMEMBERED_ITEMS", "Items"]

# Items whose last state the process keeps, the least recently changed forgotten first: every
# lease of the heartbeat capacity benchmark's largest step (20,000) and some. A state is ~1 KB.
REMEMBERED_ITEMS = 25_000


class Items:
    def __init__(self, redis: Redis, batch: CommandBatch, keys: EmulatorKeys, *,
                 remembered: int = REMEMBERED_ITEMS) -> None:
        self.redis = redis
        self.batch = batch
        self.keys = keys
        self.remembered = remembered
        self._known: dict[str, str] = {}
        self._swap = redis.register_script(self._SWAP)

    def known(self, work_id: str) -> str | None:
        """The item as this process last read or wrote it (maybe changed since), if kept."""
        return self._known.get(work_id)

    def remember(self, work_id: str, raw: str) -> None:
        self._known.pop(work_id, None)  # to the end: the most recently changed
        self._known[work_id] = raw
        if len(self._known) > self.remembered:
            del self._known[next(iter(self._known))]

    async def read(self, work_id: str) -> str | None:
        """The item as stored now (None: there is none)."""
        raw = await self.batch.execute("GET", self.keys.work(work_id))
        if raw is None:
            return None
        text = raw.decode() if isinstance(raw, bytes) else str(raw)
        self.remember(work_id, text)
        return text

    # KEYS[1]: the item; KEYS[2]: its environment's leases (work id -> lapse time); KEYS[3]: its
    # environment's stream. ARGV[1]: the item as read; ARGV[2]: the item to write; ARGV[3]: its
    # id; ARGV[4]: its lease's lapse time ('': it holds none); ARGV[5]: the consumer group;
    # ARGV[6..]: stream entries to acknowledge and delete. Returns 1 once written; the item as
    # stored now if it is not as read (false: it is gone), having written nothing.
    _SWAP = """
local stored = redis.call('GET', KEYS[1])
if stored ~= ARGV[1] then return stored end
redis.call('SET', KEYS[1], ARGV[2])
if ARGV[4] == '' then
  redis.call('ZREM', KEYS[2], ARGV[3])
else
  redis.call('ZADD', KEYS[2], ARGV[4], ARGV[3])
end
for i = 6, #ARGV do
  redis.call('XACK', KEYS[3], ARGV[5], ARGV[i])
  redis.call('XDEL', KEYS[3], ARGV[i])
end
return 1
"""

    async def swap(self, expected: str, record: WorkRecord,
                   drop_entries: list[str]) -> tuple[bool, str | None]:
        """Write `record` if the item is still `expected`: (True, as written), else (False, the
        item as stored now, None if it is gone)."""
        written = record.dumps()
        lapses = "" if record.lease_expires_at is None else repr(record.lease_expires_at)
        environment = record.environment_id
        keys = [self.keys.work(record.id), self.keys.leases(environment),
                self.keys.stream(environment)]
        args = [expected, written, record.id, lapses, CONSUMER_GROUP, *drop_entries]
        reply: Any = await self.batch.run_script(self._swap, keys, args)
        if reply == 1:
            self.remember(record.id, written)
            return True, written
        if reply is None:
            self._known.pop(record.id, None)
            return False, None
        current = reply.decode() if isinstance(reply, bytes) else str(reply)
        self.remember(record.id, current)
        return False, current
