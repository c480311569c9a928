"""The lease registry: where the fleet keeps what it holds, in Redis.

One hash per held lease is the record (`model.Lease`); the work item's JSON, with its secret,
sits beside it. The executor is the only writer of records; everyone else reads. Every change
that must not race (a new attempt, a pulse from a stale attempt, claiming a due heartbeat, a
stop flag) is one Lua script, declared beside the method that runs it, so two tasks can never
both believe they own the same attempt.

The registry also remembers, past a record's release, what the machine must know when the
server delivers the same item again (`History`): how many attempts failed, and whether the
session ended.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from redis import Redis
from redis.client import Pipeline
from redis.commands.core import Script

from dispatcher.clock import Clock, RedisClock
from dispatcher.lease.keys import Keys
from dispatcher.lease.machine import last_seen
from dispatcher.lease.model import Ending, Lease, StopKind, encode

__all__ = ["History", "LeaseRegistry", "Pulse", "StartReads"]

# Heartbeats recorded per script call: a few ms of Redis time at most, so other clients never wait
# long behind a big tick.
RECORD_HEARTBEATS_CHUNK = 500
# Ids a sweep's seen-note passes to one ZMSCORE or SADD inside its script: Lua's unpack takes
# at most about 8,000 values, and a page the server made larger than asked must not fail.
NOTE_CHUNK = 1000
# The work item's JSON holds its secret: it expires unless a heartbeat or a pulse keeps it (each
# pushes the expiry on), so a record lost half-way never leaves a secret in Redis for good. An
# hour outlasts any gap between heartbeats (30 s at most) or pulses (0.2 s).
WORK_TTL_SECONDS = 3600
# What the registry remembers of an item after its release: long enough to refuse a
# re-delivery of a session that already ended (the server re-queues a lapsed lease after its
# TTL, at most minutes later).
HISTORY_TTL_SECONDS = 24 * 3600
# A proof mark waits this long for its attempt (`await_proof`): the attempt's message is
# already on its way when the ack is answered, so it takes the mark within a second or finds
# the record proven when its task starts, however late.
PROOF_MARK_SECONDS = 60


@dataclass(frozen=True)
class Pulse:
    """What a running attempt learns each time it pulses."""

    exists: bool
    current: bool  # still the lease's current attempt (fencing)
    stop: str
    stop_cause: str
    stop_seen_at: float = 0.0
    token: str = ""
    draining: bool = False  # the worker running the attempt is shutting down


@dataclass(frozen=True)
class StartReads:
    """What a session's start reads (`LeaseRegistry.start_reads`)."""

    lease: Lease | None
    work_json: str | None
    epoch: str
    draining: bool  # the worker that starts it is shutting down


@dataclass(frozen=True)
class History:
    """What outlives a record: attempts that failed, and how the session ended (if it did)."""

    failures: int = 0
    ended: Ending = Ending.NONE


class _Script:
    """A Lua script declared beside the method that runs it, registered once per registry."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, registry: Any, owner: type) -> Script:
        scripts: dict[str, Script] = registry.__dict__.setdefault("_scripts", {})
        if self.name not in scripts:
            scripts[self.name] = registry.redis.register_script(self.source)
        return scripts[self.name]


def _pulse_of(raw: list[Any]) -> Pulse:
    exists, current, stop, cause, seen_at, token, draining = raw
    return Pulse(bool(exists), bool(current), str(stop), str(cause), float(seen_at or 0),
                 str(token), bool(draining))


def _pulse_or_error(raw: Any) -> Pulse | Exception:
    """One answer of a pipeline of pulses: the pulse, or the error that stands in its place (a
    command Redis refused, a record whose fields do not read)."""
    if isinstance(raw, Exception):
        return raw
    try:
        return _pulse_of(raw)
    except (ValueError, TypeError) as exc:
        return exc


def _history(raw: dict[str, str]) -> History:
    if not raw:
        return History()
    try:
        ended = Ending(raw.get("ended", ""))
    except ValueError:
        ended = Ending.STOPPED  # a value a newer version wrote: it ended somehow
    return History(failures=int(raw.get("failures", 0) or 0), ended=ended)


class LeaseRegistry:
    def __init__(self, redis: Redis, *, prefix: str, clock: Clock | None = None) -> None:
        self.redis = redis
        # Every time written here and compared on another host: Redis's (`dispatcher/clock.py`).
        self.clock = clock or RedisClock(redis)
        self.keys = Keys(prefix)

    # --- epoch: tells a Redis that restarted empty from one that did not -------------------
    def epoch(self) -> str:
        """The registry's epoch id, created on first use."""
        fresh = uuid.uuid4().hex
        pipe = self.redis.pipeline(transaction=False)
        pipe.set(self.keys.epoch, fresh, nx=True)
        pipe.get(self.keys.epoch)
        return str(pipe.execute()[1] or fresh)

    def start_reads(self, work_id: str, *, worker: str,
                    before: Callable[[Pipeline], None] | None = None) -> StartReads:
        """What a session's start reads, in one round trip (the sandbox waits on it): the
        lease, its work item JSON, the registry's epoch (created on first use) and whether
        `worker` is draining. `before` queues other commands ahead of the reads, in the same
        round trip (the message's receipt, `Deliveries.received`)."""
        fresh = uuid.uuid4().hex
        pipe = self.redis.pipeline(transaction=False)
        if before is not None:
            before(pipe)
        ahead = len(pipe)
        pipe.hgetall(self.keys.lease(work_id))
        pipe.get(self.keys.work(work_id))
        pipe.set(self.keys.epoch, fresh, nx=True)
        pipe.get(self.keys.epoch)
        pipe.hget(self.keys.worker(worker), "draining")
        raw, work_json, _, epoch, draining = pipe.execute()[ahead:]
        return StartReads((Lease.from_hash(raw) if raw else None),
                          None if work_json is None else str(work_json), str(epoch or fresh),
                          draining == "1")

    # --- create, read, delete -----------------------------------------------------------------
    def create(self, lease: Lease, *, work_json: str) -> None:
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(self.keys.lease(lease.work_id), mapping=lease.to_hash())
        pipe.set(self.keys.work(lease.work_id), work_json, ex=WORK_TTL_SECONDS)
        pipe.zadd(self.keys.leases, {lease.work_id: lease.claimed_at})
        pipe.zadd(self.keys.environment_leases(lease.environment_id),
                  {lease.work_id: lease.claimed_at})
        pipe.zadd(self.keys.last_seen, {lease.work_id: last_seen(lease)})
        pipe.execute()

    def get(self, work_id: str) -> Lease | None:
        raw = self.redis.hgetall(self.keys.lease(work_id))
        return Lease.from_hash(raw) if raw else None  # type: ignore[arg-type]

    def get_many(self, work_ids: Iterable[str]) -> list[Lease]:
        pipe = self.redis.pipeline(transaction=False)
        for work_id in work_ids:
            pipe.hgetall(self.keys.lease(work_id))
        return [Lease.from_hash(raw) for raw in pipe.execute() if raw]

    def work_json(self, work_id: str) -> str | None:
        value = self.redis.get(self.keys.work(work_id))
        return None if value is None else str(value)

    def held_ids(self) -> list[str]:
        return [str(w) for w in self.redis.zrange(self.keys.leases, 0, -1)]

    def held_count(self) -> int:
        return int(self.redis.zcard(self.keys.leases))

    def held_by_environment(self, environment_ids: Iterable[str]) -> dict[str, int]:
        """Leases held for each of these environments (one round trip)."""
        ids = list(environment_ids)
        pipe = self.redis.pipeline(transaction=False)
        for environment_id in ids:
            pipe.zcard(self.keys.environment_leases(environment_id))
        return {e: int(n) for e, n in zip(ids, pipe.execute(), strict=True)}

    def all(self) -> list[Lease]:
        return self.get_many(self.held_ids())

    def held_among(self, work_ids: list[str]) -> set[str]:
        """Which of these items we hold (one round trip, however many we hold)."""
        if not work_ids:
            return set()
        scores = self.redis.zmscore(self.keys.leases, work_ids)
        return {w for w, score in zip(work_ids, scores, strict=True) if score is not None}

    # KEYS: lease hash, work item, leases, heartbeat-due, last-seen; ARGV: work id, the prefix
    # of an environment's leases. The environment's index is named by the record, read in the
    # same step that deletes it, so no release can leave a slot counted against it.
    _DELETE = _Script("""
local environment = redis.call('HGET', KEYS[1], 'environment_id')
if environment then redis.call('ZREM', ARGV[2] .. environment, ARGV[1]) end
redis.call('DEL', KEYS[1], KEYS[2])
for i = 3, 5 do redis.call('ZREM', KEYS[i], ARGV[1]) end
return 1
""")

    def delete(self, work_id: str) -> None:
        keys = [self.keys.lease(work_id), self.keys.work(work_id), self.keys.leases,
                self.keys.heartbeat_due, self.keys.last_seen]
        self._DELETE(keys=keys, args=[work_id, self.keys.environment_leases("")])

    # --- history: what outlives a record ------------------------------------------------------
    def get_with_history(self, work_id: str) -> tuple[Lease | None, History]:
        """The record and the history of one item, in one round trip: a polled item's claim
        reads both before it can ack."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(self.keys.lease(work_id))
        pipe.hgetall(self.keys.history(work_id))
        raw, history = pipe.execute()
        return (Lease.from_hash(raw) if raw else None), _history(history)

    def history(self, work_id: str) -> History:
        raw: dict[str, str] = self.redis.hgetall(self.keys.history(work_id))  # type: ignore[assignment]
        return _history(raw)

    def record_history(self, work_id: str, *, failures: int, ended: Ending) -> None:
        key = self.keys.history(work_id)
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(key, mapping={"failures": failures, **({"ended": ended.value} if ended else {})})
        pipe.expire(key, HISTORY_TTL_SECONDS)
        pipe.execute()

    # --- indexes: what the per-second upkeep reads instead of every lease ----------------------
    def silent_since(self, cutoff: float) -> list[Lease]:
        """Leases with no sign of life (claim, dispatch, pulse) since `cutoff`, as their hashes
        say: the index only picks candidates, so a lease pulsed by a worker that does not write
        the index (an older version, mid-deploy) is read, found alive, and its entry moved on.
        A held lease missing from the index (written before it existed) is read and added."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.zrangebyscore(self.keys.last_seen, "-inf", cutoff)
        pipe.zdiff([self.keys.leases, self.keys.last_seen])
        stale, missing = pipe.execute()
        if not stale and not missing:
            return []
        leases = self.get_many([*stale, *missing])
        found = {lease.work_id for lease in leases}
        gone = [w for w in stale if w not in found]
        if gone:
            self.redis.zrem(self.keys.last_seen, *gone)
        # Each lease read is indexed from its hash: found alive, it moves on; missing, it is added.
        self._index(self.keys.last_seen, [(lease.work_id, last_seen(lease)) for lease in leases])
        return [lease for lease in leases if last_seen(lease) <= cutoff]

    def stop_scan_cursor(self, environment_id: str) -> str | None:
        """The `list` page the stop bridge's sweep of an environment continues from (None: the
        first page)."""
        value = self.redis.get(self.keys.stop_scan_cursor(environment_id))
        return None if value is None else str(value)

    # KEYS[1]=the environment's leases (zset), KEYS[2]=the sweep's seen set; ARGV[1]=the seen
    # set's TTL in seconds, then the page's work ids. Only held items join the seen set, so its
    # size counts the held ones listed so far, and a page costs O(page), not O(leases held): an
    # intersection of the two sets each page cost 16 ms of Redis at 20,000 leases held, 3 s a
    # sweep. Which ids are held is one ZMSCORE and they join in one SADD per NOTE_CHUNK ids: a
    # ZSCORE and an SADD per id cost the script two calls an item (about 10 ms a page of 1,000).
    # A lease released after it was seen keeps counting, so held minus seen is a lower bound of
    # the unseen; only when it reaches 0 is the exact count taken, once or so a sweep.
    _NOTE_SCANNED = _Script("""
local chunk = tonumber(ARGV[2])
for first = 3, #ARGV, chunk do
  local last = math.min(first + chunk - 1, #ARGV)
  local scores = redis.call('ZMSCORE', KEYS[1], unpack(ARGV, first, last))
  local held = {}
  for i = 1, #scores do
    if scores[i] then held[#held + 1] = ARGV[first + i - 1] end
  end
  if #held > 0 then redis.call('SADD', KEYS[2], unpack(held)) end
end
redis.call('EXPIRE', KEYS[2], ARGV[1])
local unseen = redis.call('ZCARD', KEYS[1]) - redis.call('SCARD', KEYS[2])
if unseen > 0 then return unseen end
return redis.call('ZCARD', KEYS[1]) - redis.call('ZINTERCARD', 2, KEYS[1], KEYS[2])
""")

    def note_scanned(self, environment_id: str, work_ids: list[str], *, ttl_seconds: int) -> int:
        """Note the items a sweep's page listed; returns a lower bound of the leases held for
        the environment this sweep has not seen yet, exact when it is 0 (every one was listed,
        the sweep may end early)."""
        keys = [self.keys.environment_leases(environment_id),
                self.keys.stop_scan_seen(environment_id)]
        return int(self._NOTE_SCANNED(keys=keys, args=[ttl_seconds, NOTE_CHUNK, *work_ids]))

    def end_stop_scan(self, environment_id: str) -> None:
        """The sweep is over: the next one starts from the first page, having seen nothing."""
        self.redis.delete(self.keys.stop_scan_cursor(environment_id),
                          self.keys.stop_scan_seen(environment_id))

    # KEYS[1]=an index zset; ARGV: lease key prefix, then per lease: work id, score. Indexes each
    # lease still held, so an index repaired from a read of the lease never keeps one released
    # meanwhile. (A pulse landing in between may be indexed a little old: that only makes its
    # lease a candidate sooner, which the read of its hash then clears.)
    _INDEX_IF_HELD = _Script("""
for i = 2, #ARGV, 2 do
  if redis.call('EXISTS', ARGV[1] .. ARGV[i]) == 1 then
    redis.call('ZADD', KEYS[1], ARGV[i + 1], ARGV[i])
  end
end
return 1
""")

    def _index(self, key: str, entries: list[tuple[str, float]]) -> None:
        if not entries:
            return
        args: list[str | float] = [self.keys.lease("")]
        for work_id, score in entries:
            args += [work_id, score]
        self._INDEX_IF_HELD(keys=[key], args=args)

    def set_stop_scan_cursor(self, environment_id: str, cursor: str, *, ttl_seconds: int) -> None:
        """Where the stop bridge's next tick continues its sweep of the environment."""
        self.redis.set(self.keys.stop_scan_cursor(environment_id), cursor, ex=ttl_seconds)

    # --- changes ------------------------------------------------------------------------------
    def update(self, work_id: str, *, seen: float | None = None, **values: object) -> bool:
        """Set fields of an existing lease, whatever its attempt, and its last sign of life
        (`machine.last_seen`), if given. False if it is gone."""
        key = self.keys.lease(work_id)
        pipe = self.redis.pipeline(transaction=True)
        pipe.exists(key)
        pipe.hset(key, mapping={k: encode(v) for k, v in values.items()})
        if seen is not None:
            pipe.zadd(self.keys.last_seen, {work_id: seen})
        exists = pipe.execute()[0]
        if not exists:
            # The HSET just created a stub (and the ZADD an entry): a released lease stays gone.
            cleanup = self.redis.pipeline(transaction=True)
            cleanup.delete(key)
            cleanup.zrem(self.keys.last_seen, work_id)
            cleanup.execute()
        return bool(exists)

    # KEYS[1]=lease hash, KEYS[2]=the proof mark; ARGV: when the ack was answered, the mark's
    # life in seconds. Only while the record exists: a released lease stays gone, and nobody
    # waits on its mark.
    _PROVE = _Script("""
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'heartbeat_ok_at', ARGV[1])
redis.call('RPUSH', KEYS[2], '1')
redis.call('EXPIRE', KEYS[2], ARGV[2])
return 1
""")

    def prove(self, work_id: str, at: float) -> bool:
        """Record that the server answered our ack at `at`, and wake the attempt waiting for it
        (`await_proof`). False if the record is gone."""
        keys = [self.keys.lease(work_id), self.keys.proven(work_id)]
        return bool(self._PROVE(keys=keys, args=[at, PROOF_MARK_SECONDS]))

    def await_proof(self, work_id: str, seconds: float) -> Lease | None:
        """Wait up to `seconds` for the proof mark of `prove`, then read the record either way
        (a lease proven by a heartbeat leaves no mark). One round trip: Redis reads the record
        only once the wait is over, so the proof's news and the record come together."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.blpop([self.keys.proven(work_id)], timeout=seconds)
        pipe.hgetall(self.keys.lease(work_id))
        _, raw = pipe.execute()
        return Lease.from_hash(raw) if raw else None

    # KEYS[1]=lease hash, KEYS[2]=last-seen zset; ARGV: last sign of life ('' to leave it), work
    # id, how many fields are expected, how many awaited, then [field, value]* of each, then
    # [field, value]* to set. A guard, no rule: the fields are set only while the record holds
    # every expected value and none of the awaited ones (the machine chose them all).
    _SET_IF_STILL = _Script("""
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local i = 5
for _ = 1, tonumber(ARGV[3]) do
  if (redis.call('HGET', KEYS[1], ARGV[i]) or '') ~= ARGV[i + 1] then return 0 end
  i = i + 2
end
for _ = 1, tonumber(ARGV[4]) do
  if (redis.call('HGET', KEYS[1], ARGV[i]) or '') == ARGV[i + 1] then return 0 end
  i = i + 2
end
for j = i, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[j], ARGV[j + 1]) end
if ARGV[1] ~= '' then redis.call('ZADD', KEYS[2], ARGV[1], ARGV[2]) end
return 1
""")

    def await_proof_then_set(self, work_id: str, seconds: float, *,
                             expected: Mapping[str, object], awaited: Mapping[str, object],
                             fields: Mapping[str, object],
                             seen: float | None = None) -> tuple[Lease | None, bool]:
        """`await_proof`, and in the same round trip, once the wait is over, `fields` set (and
        the last sign of life, if given) only while the record holds every `expected` value and
        none of the `awaited` ones. Returns the record as it then is and whether it was set."""
        argv: list[str | int | float] = ["" if seen is None else seen, work_id, len(expected),
                                         len(awaited)]
        for values in (expected, awaited, fields):
            for name, value in values.items():
                argv += [name, encode(value)]
        pipe = self.redis.pipeline(transaction=False)
        pipe.blpop([self.keys.proven(work_id)], timeout=seconds)
        self._SET_IF_STILL(keys=[self.keys.lease(work_id), self.keys.last_seen], args=argv,
                           client=pipe)
        pipe.hgetall(self.keys.lease(work_id))
        _, done, raw = pipe.execute()
        return (Lease.from_hash(raw) if raw else None), bool(done)

    # KEYS[1]=lease hash, KEYS[2]=last-seen zset; ARGV: expected attempt, last sign of life (''
    # to leave it), work id, [field, value]*. A guard, no rule: the fields (a new attempt's, or a
    # running one's) are the machine's, set only while the lease exists and `attempt` is still
    # its current attempt, so a stale attempt can change nothing.
    _SET_IF_ATTEMPT = _Script("""
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
if redis.call('HGET', KEYS[1], 'attempt') ~= ARGV[1] then return 0 end
for i = 4, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
if ARGV[2] ~= '' then redis.call('ZADD', KEYS[2], ARGV[2], ARGV[3]) end
return 1
""")

    def update_if_attempt(self, work_id: str, attempt: int, fields: Mapping[str, object], *,
                          seen: float | None = None) -> int:
        """Set `fields`, and the last sign of life if given, only while `attempt` is current:
        1 done, 0 superseded, -1 lease gone."""
        argv: list[str | int | float] = [attempt, "" if seen is None else seen, work_id]
        for name, value in fields.items():
            argv += [name, encode(value)]
        keys = [self.keys.lease(work_id), self.keys.last_seen]
        return int(self._SET_IF_ATTEMPT(keys=keys, args=argv))

    # KEYS[1]=lease hash, KEYS[2]=the worker's hash, KEYS[3]=last-seen zset, KEYS[4]=work item;
    # ARGV: attempt, now, work id, work TTL. The current attempt's pulse also pushes the work item's
    # expiry on. Returns {exists, current, stop, cause, seen at, token, draining}: all a running
    # attempt needs to act each tick, and to rebuild its lease if Redis lost it, in one round trip.
    _PULSE = _Script("""
local draining = redis.call('HGET', KEYS[2], 'draining') == '1' and 1 or 0
if redis.call('EXISTS', KEYS[1]) == 0 then return {0, 0, '', '', '0', '', draining} end
local current = redis.call('HGET', KEYS[1], 'attempt') == ARGV[1]
if current then
  redis.call('HSET', KEYS[1], 'pulse_at', ARGV[2])
  redis.call('ZADD', KEYS[3], ARGV[2], ARGV[3])
  redis.call('EXPIRE', KEYS[4], ARGV[4])
end
return {1, current and 1 or 0, redis.call('HGET', KEYS[1], 'stop') or '',
        redis.call('HGET', KEYS[1], 'stop_cause') or '',
        redis.call('HGET', KEYS[1], 'stop_seen_at') or '0',
        redis.call('HGET', KEYS[1], 'token') or '', draining}
""")

    def pulse(self, work_id: str, attempt: int, *, worker: str = "") -> Pulse:
        return _pulse_of(self._PULSE(keys=self._pulse_keys(work_id, worker),
                                     args=[attempt, self.clock.now(), work_id, WORK_TTL_SECONDS]))

    def pulse_many(self, attempts: Sequence[tuple[str, int, str]]) -> list[Pulse | Exception]:
        """Pulse every (work id, attempt, worker) in one round trip: a worker process supervises
        all of its running attempts with one pipeline a tick, not one call each. An attempt
        whose answer cannot be had gets the error in its place, and the others their pulses; a
        connection that fails raises."""
        now = self.clock.now()
        pipe = self.redis.pipeline(transaction=False)
        for work_id, attempt, worker in attempts:
            self._PULSE(keys=self._pulse_keys(work_id, worker),
                        args=[attempt, now, work_id, WORK_TTL_SECONDS], client=pipe)
        return [_pulse_or_error(raw) for raw in pipe.execute(raise_on_error=False)]

    def _pulse_keys(self, work_id: str, worker: str) -> list[str]:
        return [self.keys.lease(work_id), self.keys.worker(worker), self.keys.last_seen,
                self.keys.work(work_id)]

    # KEYS[1]=lease hash; ARGV: expected stop, new stop, first cause ('' keeps the recorded one),
    # now. A guard, no rule: which stop wins and which cause stays is the machine's; this sets
    # the flag only while it is still what the machine decided from, and the time it was first
    # seen with the first cause.
    _SET_STOP = _Script("""
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
if (redis.call('HGET', KEYS[1], 'stop') or '') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'stop', ARGV[2])
if ARGV[3] ~= '' then
  redis.call('HSET', KEYS[1], 'stop_cause', ARGV[3], 'stop_seen_at', ARGV[4])
end
return 1
""")

    def set_stop(self, work_id: str, kind: StopKind, *, expected: StopKind,
                 cause: str | None = None) -> int:
        """Set the stop flag (and its first cause, if given) while it is still `expected`:
        1 done, 0 it changed meanwhile, -1 lease gone."""
        return int(self._SET_STOP(keys=[self.keys.lease(work_id)],
                                  args=[expected.value, kind.value, cause or "", self.clock.now()]))

    # --- heartbeat schedule -------------------------------------------------------------------
    # KEYS[1]=lease hash, KEYS[2]=due zset; ARGV: due, work id, sooner only ('1' or '0'), now,
    # whose heartbeats it is for ('' whoever's). Guards, no rule: the lease still exists and is
    # still heartbeated by whom the machine scheduled for (`steps.scheduled_for`); "sooner only"
    # never postpones a due heartbeat, and leaves a heartbeat in flight alone (its reply
    # reschedules).
    _SCHEDULE = _Script("""
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if ARGV[5] ~= '' and redis.call('HGET', KEYS[1], 'heartbeats_by') ~= ARGV[5] then return 0 end
if ARGV[3] == '1' then
  local inflight = tonumber(redis.call('HGET', KEYS[1], 'inflight_until') or '0') or 0
  if inflight > tonumber(ARGV[4]) then return 1 end
  local current = redis.call('ZSCORE', KEYS[2], ARGV[2])
  if current and tonumber(current) <= tonumber(ARGV[1]) then return 1 end
end
redis.call('HSET', KEYS[1], 'inflight_until', 0)
redis.call('ZADD', KEYS[2], ARGV[1], ARGV[2])
return 1
""")

    def schedule_heartbeat(self, work_id: str, due: float, *, sooner_only: bool = False,
                           heartbeated_by: str | None = None) -> bool:
        """Schedule the next heartbeat (or release retry); False if the lease is gone or no
        longer heartbeated by `heartbeated_by` (None: whoever). `sooner_only` never moves a
        heartbeat that is already due sooner, or in flight."""
        keys = [self.keys.lease(work_id), self.keys.heartbeat_due]
        args: list[str | float] = [due, work_id, "1" if sooner_only else "0", self.clock.now(),
                                   heartbeated_by or ""]
        return bool(self._SCHEDULE(keys=keys, args=args))

    # KEYS[1]=due zset; ARGV: lease key prefix, work key prefix, work TTL, then per heartbeat: work
    # id, token, ttl, sent at, next due, whose heartbeats the next is for ('' whoever's). A tick's
    # answered heartbeats in one round trip: for each lease still held, its token, TTL and when
    # the answered heartbeat was sent; the next heartbeat, while still heartbeated by whom the
    # machine scheduled it for (a hand-off during the tick leaves it to the sandbox); and the
    # work item's expiry pushed on. Returns the ids whose lease was released meanwhile.
    _RECORD_HEARTBEATS = _Script("""
local gone = {}
for i = 4, #ARGV, 6 do
  local id = ARGV[i]
  local key = ARGV[1] .. id
  if redis.call('EXISTS', key) == 0 then
    gone[#gone + 1] = id
  else
    redis.call('HSET', key, 'token', ARGV[i + 1], 'ttl_seconds', ARGV[i + 2],
               'heartbeat_ok_at', ARGV[i + 3], 'uncertain', '')
    redis.call('EXPIRE', ARGV[2] .. id, ARGV[3])
    if ARGV[i + 5] == '' or redis.call('HGET', key, 'heartbeats_by') == ARGV[i + 5] then
      redis.call('HSET', key, 'inflight_until', 0)
      redis.call('ZADD', KEYS[1], ARGV[i + 4], id)
    end
  end
end
return gone
""")

    def record_heartbeats(self, heartbeats: list[tuple[str, str, int, float, float, str]]
                          ) -> list[str]:
        """Record answered heartbeats, each (work id, token, TTL, sent at, next due, whose
        heartbeats the next is for), and schedule the next ones, in one round trip per chunk.
        Returns the ids whose lease is gone."""
        gone: list[str] = []
        for start in range(0, len(heartbeats), RECORD_HEARTBEATS_CHUNK):
            args: list[str | int | float] = [self.keys.lease(""), self.keys.work(""),
                                             WORK_TTL_SECONDS]
            chunk = heartbeats[start:start + RECORD_HEARTBEATS_CHUNK]
            for work_id, token, ttl, sent_at, due, heartbeated_by in chunk:
                args += [work_id, token, ttl, sent_at, due, heartbeated_by]
            gone += [str(w) for w in self._RECORD_HEARTBEATS(keys=[self.keys.heartbeat_due],
                                                        args=args)]
        return gone

    def settled_token(self, work_id: str, *, wait_seconds: float) -> str | None:
        """The lease's token once no heartbeat of ours is in flight (at most `wait_seconds`), for a
        sandbox to continue the lease with: a reply landing after the read would change the
        token, and the sandbox would present a stale one (412)."""
        deadline = time.monotonic() + wait_seconds
        while True:
            lease = self.get(work_id)
            if lease is None:
                return None
            if lease.inflight_until <= self.clock.now() or time.monotonic() >= deadline:
                return lease.token or None
            time.sleep(0.05)

    def unschedule_heartbeat(self, work_id: str) -> None:
        self.redis.zrem(self.keys.heartbeat_due, work_id)

    # KEYS[1]=due zset; ARGV: now, limit, in-flight deadline, lease key prefix. Pops due ids by
    # pushing their score to the in-flight deadline, so concurrent heartbeat tasks take disjoint
    # sets and a crashed one's leases come due again once the deadline passes. The deadline is
    # also noted on the lease, so a hand-off can wait for a heartbeat in flight before it reads
    # the token. Returns id, due, id, due...: the next heartbeat is counted from when this one
    # was due (`machine.renewal_due`).
    _CLAIM_DUE = _Script("""
local rows = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'WITHSCORES',
                        'LIMIT', 0, tonumber(ARGV[2]))
for i = 1, #rows, 2 do
  local id = rows[i]
  redis.call('ZADD', KEYS[1], 'XX', ARGV[3], id)
  if redis.call('EXISTS', ARGV[4] .. id) == 1 then
    redis.call('HSET', ARGV[4] .. id, 'inflight_until', ARGV[3])
  end
end
return rows
""")

    def claim_due_heartbeats(self, *, now: float, limit: int,
                             inflight_seconds: float) -> dict[str, float]:
        """The due heartbeats taken, each with when it was due, soonest first."""
        rows = self._CLAIM_DUE(
            keys=[self.keys.heartbeat_due],
            args=[now, limit, repr(now + inflight_seconds), self.keys.lease("")],
        )
        return {str(rows[i]): float(rows[i + 1]) for i in range(0, len(rows), 2)}

    # KEYS[1]=due zset; ARGV: the claim's in-flight deadline, lease key prefix, then id, due,
    # id, due... Gives back heartbeats a tick took and did not send: each is due again when it
    # was due, and its in-flight mark is cleared, but only while the mark is still the claim's
    # (no other taker, no reschedule since). Returns how many.
    _RELEASE_UNSENT = _Script("""
local mark = tonumber(ARGV[1])
local released = 0
for i = 3, #ARGV, 2 do
  local id = ARGV[i]
  local score = redis.call('ZSCORE', KEYS[1], id)
  if score and tonumber(score) == mark then
    redis.call('ZADD', KEYS[1], 'XX', ARGV[i + 1], id)
    local key = ARGV[2] .. id
    if tonumber(redis.call('HGET', key, 'inflight_until') or '') == mark then
      redis.call('HSET', key, 'inflight_until', 0)
    end
    released = released + 1
  end
end
return released
""")

    def release_unsent(self, due: Mapping[str, float], *, mark: float) -> int:
        """Heartbeats claimed with in-flight deadline `mark` and never sent, due again at once
        (`due`: when each was due): none of them is in flight, so no beat can race them."""
        if not due:
            return 0
        args: list[str | float] = [repr(mark), self.keys.lease("")]
        for work_id, when in due.items():
            args += [work_id, repr(when)]
        return int(self._RELEASE_UNSENT(keys=[self.keys.heartbeat_due], args=args))

    def next_due(self, work_id: str) -> float | None:
        score = self.redis.zscore(self.keys.heartbeat_due, work_id)
        return None if score is None else float(score)
