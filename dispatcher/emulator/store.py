"""The emulator's Redis model: a stream and consumer group per environment, one JSON string per
work item, sorted sets for list order, held leases and polling workers.

- poll: reclaim (XAUTOCLAIM) a pending entry idle longer than `reclaim_older_than_ms`, else read
  a new one (XREADGROUP, BLOCK up to `block_ms`) as consumer `<worker id>`. A polled item stays
  `queued` and its entry pending until ack. An entry whose item is no longer queued (stopped
  while queued, or stale) is XACKed, XDELed and skipped: it is never delivered.
- ack: XACK + XDEL of the item's entry, state `starting`, in one write with the item.
- every change: one compare-and-set of the item (`_change`, `items.Items.swap`), with lease
  expiry applied first, so concurrent claimants (two `NO_HEARTBEAT` heartbeats) serialise and
  one wins.
- expiry is lazy: on each request that touches an item, and a sweep of the lapsed leases (a
  sorted set scored by lapse time) on poll, list and stats. No background task.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from collections.abc import Callable
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from . import clock, lifecycle, metadata
from .auth import key_digest
from .batch import CommandBatch
from .config import DEFAULT_LIST_LIMIT, MAX_BLOCK_MS, WORKERS_POLLING_WINDOW_S, EmulatorConfig
from .errors import ApiError, InvalidRequest, NotFound
from .items import Items
from .keys import CONSUMER_GROUP, EmulatorKeys
from .lifecycle import Transition
from .records import WorkRecord, listed_page, new_id, new_token

__all__ = ["Store"]

# The consumer name of a poll that sent no Anthropic-Worker-ID.
ANONYMOUS_CONSUMER = "anonymous"
# Reclaim tries per poll: each try either hands out an entry, drops a dead one, or finds that
# another poller took it; the bound only keeps a pathological race from holding a poll open.
MAX_RECLAIM_ATTEMPTS = 100

Operation = Callable[[WorkRecord], Transition]


def _noop(record: WorkRecord) -> Transition:
    return Transition(body=record.public())


class Store:
    def __init__(self, redis: Redis, config: EmulatorConfig, batch: CommandBatch) -> None:
        self.redis = redis
        self.config = config
        self.keys = EmulatorKeys(config.key_prefix)
        self.items = Items(redis, batch, self.keys)
        self._list_page = redis.register_script(self._LIST_PAGE)
        # Which environment a key digest opens, and whether an environment has a key of its
        # own: written once at creation, so cached for the life of the process (a request
        # costs no lookup after the first). `None`: opened by `--environment-key`.
        self._key_owner: dict[str, str] = {}
        self._own_key: dict[str, str | None] = {}
        # Environments known to exist: never deleted, so a poll or a creation in one costs no
        # lookup after the first.
        self._environments: set[str] = set()
        self._enqueue = redis.register_script(self._ENQUEUE)

    # --- environments and sessions ---------------------------------------------------------
    async def create_environment(self, name: str, config: dict[str, Any], *,
                                 environment_id: str | None = None,
                                 environment_key: str | None = None) -> dict[str, Any]:
        """A new environment; with `environment_id`, that id (kept if it already exists); with
        `environment_key`, opened by that key only (else by `--environment-key`)."""
        if environment_id is not None:
            existing = await self.redis.get(self.keys.environment(environment_id))
            if existing is not None:
                found: dict[str, Any] = json.loads(existing)
                found.pop("emulator_own_key", None)
                return found
        moment = clock.rfc3339()
        environment: dict[str, Any] = {"id": environment_id or new_id("env"),
                       "type": "environment", "name": name,
                       "config": config, "metadata": {}, "created_at": moment,
                       "updated_at": moment, "archived_at": None}
        stream = self.keys.stream(environment["id"])
        await self.redis.xgroup_create(stream, CONSUMER_GROUP, id="0", mkstream=True)
        if environment_key is not None:
            digest = key_digest(environment_key.encode())
            if not await self.redis.hsetnx(self.keys.environment_keys, digest, environment["id"]):
                raise InvalidRequest("environment_key already opens another environment")
            environment["emulator_own_key"] = True
            self._key_owner[digest] = environment["id"]
            self._own_key[environment["id"]] = environment["id"]
        await self.redis.set(self.keys.environment(environment["id"]), json.dumps(environment))
        self._environments.add(environment["id"])
        public = {k: v for k, v in environment.items() if k != "emulator_own_key"}
        return public

    async def environment_of_key(self, digest: str) -> str | None:
        """The environment opened by the key with this digest, if it is an environment's own."""
        if digest in self._key_owner:
            return self._key_owner[digest]
        owner = await self.redis.hget(self.keys.environment_keys, digest)
        if owner is None:
            return None  # not cached: unknown keys are anyone's to send, without end
        self._key_owner[digest] = str(owner)
        return str(owner)

    async def own_key_environment(self, environment_id: str) -> str | None:
        """`environment_id` if it has a key of its own, else None (`--environment-key`)."""
        if environment_id not in self._own_key:
            raw = await self.redis.get(self.keys.environment(environment_id))
            own = raw is not None and bool(json.loads(raw).get("emulator_own_key"))
            if raw is None:
                return None  # not (yet) created: not cached, a creation may follow
            self._own_key[environment_id] = environment_id if own else None
        return self._own_key[environment_id]

    async def tokens_of(self, environment_id: str, work_id: str) -> frozenset[str]:
        """The sessions tokens that open the item's calls now (none for an unknown item)."""
        raw = await self.redis.get(self.keys.work(work_id))
        if raw is None:
            return frozenset()
        record = WorkRecord.loads(str(raw))
        if record.environment_id != environment_id:
            return frozenset()
        return lifecycle.valid_tokens(record, time.time())

    async def environment(self, environment_id: str) -> dict[str, Any]:
        raw = await self.redis.get(self.keys.environment(environment_id))
        if raw is None:
            raise NotFound(f"environment {environment_id} not found")
        self._environments.add(environment_id)
        found: dict[str, Any] = json.loads(raw)
        found.pop("emulator_own_key", None)
        return found

    async def require_environment(self, environment_id: str) -> None:
        """404 unless the environment exists."""
        if environment_id not in self._environments:
            await self.environment(environment_id)

    # KEYS[1]: the environment; KEYS[2]: the list position counter; KEYS[3]: the item; KEYS[4]:
    # the environment's index; KEYS[5]: its stream; KEYS[6], KEYS[7]: a session made with the
    # item, and its event stream. ARGV[1..3]: the item's JSON around its list position and its
    # stream entry id, which only Redis knows; ARGV[4]: its id; ARGV[5]: the session's JSON
    # ('': none); ARGV[6..]: the session's first events. Returns {position, entry id}, or false
    # if the environment does not exist (nothing written). One round trip, not eight: the
    # session and its events, the item, its list position and its stream entry, written at
    # once, so nobody sees the entry before the item is queued, nor the item before its
    # session.
    _ENQUEUE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
if ARGV[5] ~= '' then
  redis.call('SET', KEYS[6], ARGV[5])
  for i = 6, #ARGV do redis.call('XADD', KEYS[7], '*', 'event', ARGV[i]) end
end
local seq = redis.call('INCR', KEYS[2])
local entry = redis.call('XADD', KEYS[5], '*', 'work_id', ARGV[4])
redis.call('SET', KEYS[3], ARGV[1] .. seq .. ARGV[2] .. entry .. ARGV[3])
redis.call('ZADD', KEYS[4], seq, ARGV[4])
return {seq, entry}
"""

    async def enqueue(self, environment_id: str, data: dict[str, Any], meta: dict[str, str], *,
                      work_id: str | None = None,
                      session: tuple[str, str, list[str]] | None = None) -> WorkRecord:
        """Create a queued work item and put it on the environment's stream; with `session`
        (its id, its JSON, its first events' JSON), write the session with it."""
        record = WorkRecord(id=work_id or new_id("work"), environment_id=environment_id,
                            data=data, created_at=clock.rfc3339(), seq=0, secret="",
                            metadata=meta)
        head, middle, tail = _around_seq_and_entry(record)
        session_id, session_json, events = session or ("", "", [])
        keys = [self.keys.environment(environment_id), self.keys.seq, self.keys.work(record.id),
                self.keys.index(environment_id), self.keys.stream(environment_id),
                self.keys.session(session_id), self.keys.events(session_id)]
        reply: Any = await self.items.batch.run_script(
            self._enqueue, keys, [head, middle, tail, record.id, session_json, *events])
        if reply is None:
            raise NotFound(f"environment {environment_id} not found")
        record.seq, record.entry_id = int(reply[0]), str(reply[1])
        self.items.remember(record.id, record.dumps())  # as written: the same fields, in order
        return record

    # --- the Work API ------------------------------------------------------------------------
    async def get(self, environment_id: str, work_id: str) -> dict[str, Any]:
        return await self._body(environment_id, work_id, _noop)

    async def update(self, environment_id: str, work_id: str, patch: Any) -> dict[str, Any]:
        def merge(record: WorkRecord) -> Transition:
            record.metadata = metadata.merge(record.metadata, patch)
            return Transition(body=record.public())

        return await self._body(environment_id, work_id, merge)

    async def ack(self, environment_id: str, work_id: str) -> dict[str, Any]:
        return await self._body(environment_id, work_id,
                                lambda r: lifecycle.ack(r, self.config))

    async def heartbeat(self, environment_id: str, work_id: str, *, expected: str | None,
                        desired_ttl: int | None) -> dict[str, Any]:
        return await self._body(environment_id, work_id, lambda r: lifecycle.heartbeat(
            r, expected=expected, desired_ttl=desired_ttl, config=self.config))

    async def refuse_heartbeat(self, environment_id: str, work_id: str,
                               expected: str | None) -> None:
        """An injected 412: the item's real current state, and no change to it."""
        await self.get(environment_id, work_id)  # expiry applied first, 404 if unknown
        record = WorkRecord.loads(await self._raw(work_id))
        raise lifecycle.precondition_failed(record, expected or "NO_HEARTBEAT", self.config)

    async def stop(self, environment_id: str, work_id: str, *, force: bool) -> dict[str, Any]:
        def stop(record: WorkRecord) -> Transition:
            transition = lifecycle.stop(record, force=force, config=self.config)
            transition.body = record.public()
            return transition

        return await self._body(environment_id, work_id, stop)

    async def poll(self, environment_id: str, *, worker_id: str | None, block_ms: int | None,
                   reclaim_ms: int) -> dict[str, Any] | None:
        await self.require_environment(environment_id)
        seen = None
        if worker_id:  # sent with the sweep's read, in the same round trip
            seen = self.items.batch.submit("ZADD", self.keys.workers(environment_id),
                                           time.time(), worker_id)
        await self.sweep(environment_id)
        if seen is not None:
            await seen
        consumer = worker_id or ANONYMOUS_CONSUMER
        work = await self._reclaim(environment_id, consumer, reclaim_ms)
        if work is None:
            work = await self._read_new(environment_id, consumer, block_ms)
        return work

    # KEYS[1]: the environment's index (work id -> list position, newest highest). ARGV[1]: the
    # highest position to show ("+inf", or "(N": below a cursor's N), ARGV[2]: how many,
    # ARGV[3]: the prefix of an item's key. Reads one id more than asked (is there a next
    # page?); returns how many ids it read, the position of the last one shown, and the shown
    # items' records as one JSON array. One reply to parse, not one per id, score and record:
    # redis-py's parser read 400 replies a page of 100, most of the emulator's CPU for it. The
    # records in one MGET, not a GET each: an eighth less of Redis's time a page of 1,000. (The
    # MGET sent apart, outside the script, cut Redis's time a pass by a quarter but more than
    # doubled the emulator's: a reply of 1,000 strings to parse and join.)
    _LIST_PAGE = """
local rows = redis.call('ZREVRANGEBYSCORE', KEYS[1], ARGV[1], '-inf', 'WITHSCORES',
                        'LIMIT', 0, tonumber(ARGV[2]) + 1)
local read, shown = #rows / 2, math.min(#rows / 2, tonumber(ARGV[2]))
if shown == 0 then return {read, '', '[]'} end
local keys, records = {}, {}
for i = 1, shown do keys[i] = ARGV[3] .. rows[2 * i - 1] end
local found = redis.call('MGET', unpack(keys))  -- false for a record gone meanwhile
for i = 1, shown do
  if found[i] then records[#records + 1] = found[i] end
end
return {read, rows[2 * shown], '[' .. table.concat(records, ',') .. ']'}
"""

    async def list(self, environment_id: str, *, limit: int | None, page: str | None) -> bytes:
        """Newest first; `limit` 1-`max_list_limit`, default 20; `page` is the previous
        `next_page`. The page's JSON, encoded here: the stop bridge lists every held lease each
        second."""
        limit = DEFAULT_LIST_LIMIT if limit is None else limit
        most = self.config.max_list_limit
        if not 1 <= limit <= most:
            raise InvalidRequest(f"limit must be 1-{most}")
        await self.require_environment(environment_id)
        await self.sweep(environment_id)
        newest = "+inf" if page is None else f"({_decode_cursor(page)}"
        read, last, records = await self._list_page(keys=[self.keys.index(environment_id)],
                                                    args=[newest, limit, self.keys.work("")])
        more = int(read) > limit
        return listed_page(_text(records) or "[]", _encode_cursor(int(float(_text(last) or 0)))
                           if more else None)

    async def stats(self, environment_id: str) -> dict[str, Any]:
        await self.require_environment(environment_id)
        await self.sweep(environment_id)
        stream = self.keys.stream(environment_id)
        group = await self._group(stream)
        oldest = await self.redis.xrange(stream, "-", "+", count=1)
        workers = self.keys.workers(environment_id)
        await self.redis.zremrangebyscore(workers, "-inf",
                                          time.time() - WORKERS_POLLING_WINDOW_S)
        return {
            "type": "work_queue_stats",
            "depth": await self._depth(stream, group),
            "pending": int(group.get("pending") or 0),
            "oldest_queued_at": _entry_time(str(oldest[0][0])) if oldest else None,
            "workers_polling": int(await self.redis.zcard(workers)),
        }

    async def sweep(self, environment_id: str) -> None:
        """Apply expiry to every lease that has lapsed (cheap: lapsed ones only)."""
        lapsed = await self.items.batch.execute("ZRANGEBYSCORE", self.keys.leases(environment_id),
                                                "-inf", time.time())
        for work_id in map(str, lapsed):
            try:
                await self._change(environment_id, work_id, _noop)
            except NotFound:
                await self.redis.zrem(self.keys.leases(environment_id), work_id)

    # --- one item, atomically ----------------------------------------------------------------
    async def _body(self, environment_id: str, work_id: str,
                    operation: Operation) -> dict[str, Any]:
        transition = await self._change(environment_id, work_id, operation)
        return transition.body or {}

    async def _change(self, environment_id: str, work_id: str,
                      operation: Operation) -> Transition:
        """Apply lease expiry then `operation` to one item, by compare-and-set (`Items.swap`);
        decided again on the item as stored if it changed meanwhile.

        The expiry is saved even when `operation` refuses (a heartbeat on an item that just
        lapsed and was re-queued still re-queues it), then the refusal is raised.
        """
        raw, remembered = self.items.known(work_id), True
        if raw is None:
            raw, remembered = await self.items.read(work_id), False
        while True:
            record, read = self._own(raw, environment_id, work_id)
            lapse = lifecycle.lapse(record, self.config.lease_expiry, time.time())
            expired = lifecycle.apply_lapse(record, lapse)
            refusal: ApiError | None = None
            try:
                transition = operation(record)
            except ApiError as error:
                refusal, transition = error, Transition()
            if refusal is not None and lapse is lifecycle.Lapse.NONE:
                if not remembered:
                    raise refusal
                # Nothing to write, so no swap confirms the remembered state: read it.
                raw, remembered = await self.items.read(work_id), False
                continue
            drops = [t.drop_entry for t in (expired, transition) if t.drop_entry]
            swapped, raw = await self.items.swap(read, record, drops)
            if swapped:
                break
            remembered = False
        if (expired.enqueue or transition.enqueue) and record.state == "queued":
            await self._push(record)
        if refusal is not None:
            raise refusal
        return transition

    @staticmethod
    def _own(raw: str | None, environment_id: str, work_id: str) -> tuple[WorkRecord, str]:
        """The item and the state it was read from, if the environment holds it."""
        record = None if raw is None else WorkRecord.loads(raw)
        if raw is None or record is None or record.environment_id != environment_id:
            raise NotFound(f"work {work_id} not found in environment {environment_id}")
        return record, raw

    async def _raw(self, work_id: str) -> str:
        raw = await self.items.read(work_id)
        if raw is None:
            raise NotFound(f"work {work_id} not found")
        return raw

    # --- the stream --------------------------------------------------------------------------
    async def _push(self, record: WorkRecord) -> None:
        """Add the stream entry of a (re)queued item, then note it on the item.

        The entry is added after the item is saved as queued, never before: a poller that meets
        an entry whose item is not (yet) queued drops it for good.
        """
        stream = self.keys.stream(record.environment_id)
        entry = str(await self.redis.xadd(stream, {"work_id": record.id}))

        def attach(current: WorkRecord) -> Transition:
            if current.state == "queued" and current.entry_id is None:
                current.entry_id = entry
                return Transition()
            return Transition(drop_entry=entry)  # stopped meanwhile: never deliver it

        try:
            await self._change(record.environment_id, record.id, attach)
        except NotFound:
            await self.redis.xdel(stream, entry)

    async def _reclaim(self, environment_id: str, consumer: str,
                       reclaim_ms: int) -> dict[str, Any] | None:
        """Claim the first pending entry idle longer than `reclaim_ms`, if any.

        XPENDING IDLE finds it in one round trip (most polls have nothing to reclaim, however
        long the pending list); XAUTOCLAIM from there takes it atomically, so two pollers never
        both reclaim one entry. COUNT 1: every entry claimed has its idle time reset, so claim
        only what is handed out.
        """
        stream = self.keys.stream(environment_id)
        for _ in range(MAX_RECLAIM_ATTEMPTS):
            idle: Any = await self.items.batch.execute(
                "XPENDING", stream, CONSUMER_GROUP, "IDLE", reclaim_ms, "-", "+", 1,
                parse_detail=True)
            if not idle:
                return None
            reply: Any = await self.items.batch.execute(
                "XAUTOCLAIM", stream, CONSUMER_GROUP, consumer, reclaim_ms,
                idle[0]["message_id"], "COUNT", 1)
            for entry_id, fields in reply[1]:
                work = await self._deliverable(environment_id, entry_id, fields)
                if work is not None:
                    return work
        return None

    async def _read_new(self, environment_id: str, consumer: str,
                        block_ms: int | None) -> dict[str, Any] | None:
        stream = self.keys.stream(environment_id)
        deadline = time.monotonic() + block_ms / 1000 if block_ms else None
        while True:
            block = None
            if deadline is not None:
                remaining = int((deadline - time.monotonic()) * 1000)
                # BLOCK 0 would wait for ever; out of time means one last non-blocking read.
                block = min(remaining, MAX_BLOCK_MS) if remaining > 0 else None
            reply: Any
            if block is None:  # answered at once: one of the batch's commands
                reply = await self.items.batch.execute(
                    "XREADGROUP", "GROUP", CONSUMER_GROUP, consumer, "COUNT", 1, "STREAMS",
                    stream, ">")
            else:
                reply = await self.redis.xreadgroup(CONSUMER_GROUP, consumer, {stream: ">"},
                                                    count=1, block=block)
            if not reply:
                return None
            entry_id, fields = reply[0][1][0]
            work = await self._deliverable(environment_id, entry_id, fields)
            if work is not None:
                return work

    async def _deliverable(self, environment_id: str, entry_id: str,
                           fields: dict[str, str] | None) -> dict[str, Any] | None:
        """The entry's item as delivered (a sessions token minted, the secret shown) if it may
        be delivered; otherwise the entry is dropped for good (in the item's write if any)."""
        work_id = (fields or {}).get("work_id")

        def deliver(record: WorkRecord) -> Transition:
            return lifecycle.deliver(record, entry_id, token=new_token(), config=self.config,
                                     now=time.time())

        try:
            if work_id:
                return (await self._change(environment_id, work_id, deliver)).body
        except NotFound:
            pass
        stream = self.keys.stream(environment_id)
        await self.redis.xack(stream, CONSUMER_GROUP, entry_id)
        await self.redis.xdel(stream, entry_id)
        return None

    async def _group(self, stream: str) -> dict[str, Any]:
        try:
            groups = await self.redis.xinfo_groups(stream)
        except ResponseError:
            return {}
        for group in groups:
            if group.get("name") == CONSUMER_GROUP:
                found: dict[str, Any] = group
                return found
        return {}

    async def _depth(self, stream: str, group: dict[str, Any]) -> int:
        """The group's lag, bounded by what the stream holds.

        Every entry on the stream is either undelivered or pending (acked and dropped entries
        are deleted), so `XLEN - pending` is the exact count. Redis 7.0 reports no lag, or a
        stale one (after the stream was emptied by XDEL), once entries were deleted.
        """
        undelivered = max(0, int(await self.redis.xlen(stream)) - int(group.get("pending") or 0))
        lag = group.get("lag")
        return undelivered if lag is None else min(int(lag), undelivered)



def _text(value: bytes | str | None) -> str | None:
    """A reply of the client (made with decode_responses=True, so always str or None)."""
    return value.decode() if isinstance(value, bytes) else value


def _entry_time(entry_id: str) -> str:
    """A stream entry id is `<epoch ms>-<seq>`: the moment the item was (re)queued."""
    return clock.from_epoch(int(entry_id.split("-")[0]) / 1000)


def _encode_cursor(seq: int) -> str:
    """Opaque to clients; the list position of the last item shown. Items added later have
    higher positions, so a page never shifts under concurrent inserts."""
    raw = json.dumps({"before": seq}).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(page: str) -> int:
    try:
        raw = base64.urlsafe_b64decode(page + "=" * (-len(page) % 4))
        before = json.loads(raw)["before"]
    except (binascii.Error, ValueError, KeyError, TypeError) as exc:
        raise InvalidRequest("page: not a cursor this server returned") from exc
    if not isinstance(before, int):
        raise InvalidRequest("page: not a cursor this server returned")
    return before


def _around_seq_and_entry(record: WorkRecord) -> tuple[str, str, str]:
    """The record's JSON cut around its `seq` and `entry_id` values (the entry id's quotes
    kept outside the cut), for Redis to fill in: the pieces joined with the values are
    exactly `record.dumps()` once the record holds them."""
    seq_mark, entry_mark = f"seq-{new_token()}", f"entry-{new_token()}"
    text = WorkRecord.dumps_fields({**vars(record), "seq": seq_mark, "entry_id": entry_mark})
    head, _, rest = text.partition(json.dumps(seq_mark))
    middle, _, tail = rest.partition(entry_mark)
    return head, middle, tail
