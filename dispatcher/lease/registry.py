"""The lease registry: what the fleet holds, and in what state, in Redis.

One hash per held lease is the record every other part reads: the poller writes it at ack, the
heartbeat task keeps its token, the session task marks its attempt running and pulses it, the
bridge and operators set its stop flag, and release deletes it. Every change that must not race
(a new attempt, a pulse from a stale attempt, claiming a due heartbeat) is one Lua script, so two
tasks can never both believe they own the same attempt.

Phases of a lease::

    claimed ──dispatch──> dispatched ──task starts──> running ──sandbox exits──> (deleted)
                              ^                          │
                              └──── new attempt ─────────┘   (worker lost or drained)
    any phase ──release fails transiently──> releasing ──stop succeeds──> (deleted)
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from redis import Redis

from dispatcher.lease.keys import Keys

__all__ = ["Lease", "LeaseRegistry", "Phase", "Pulse", "StopKind", "epoch_of"]


class Phase(StrEnum):
    CLAIMED = "claimed"
    DISPATCHED = "dispatched"
    RUNNING = "running"
    RELEASING = "releasing"


class StopKind(StrEnum):
    NONE = ""
    # SIGTERM to the sandbox's process group, the grace period, then SIGKILL.
    GRACEFUL = "graceful"
    # SIGKILL now: a forced stop, or a lease that is no longer ours.
    FORCE = "force"


@dataclass
class Lease:
    work_id: str
    session_id: str
    environment_id: str
    mode: str
    queue: str
    phase: str = Phase.CLAIMED
    attempt: int = 1
    # Attempts that ended because their worker was lost; drains and lost messages do not count.
    failures: int = 0
    task_id: str = ""
    worker: str = ""
    pid: int = 0
    claimed_at: float = 0.0
    dispatched_at: float = 0.0
    pulse_at: float = 0.0
    created_at: str = ""
    # The server's lease token: echoed exactly as `expected_last_heartbeat`.
    token: str = ""
    ttl_seconds: int = 0
    heartbeat_ok_at: float = 0.0
    stop: str = StopKind.NONE
    stop_cause: str = ""
    stop_seen_at: float = 0.0
    # "1" once the server no longer gives us this lease: release must not post a stop.
    lost: str = ""
    # Who heartbeats: "dispatcher", or "sandbox" (runner mode, or handoff once started).
    heartbeats_by: str = "dispatcher"
    # Epoch second until which a heartbeat request for this lease may still be in flight.
    inflight_until: float = 0.0

    @classmethod
    def from_hash(cls, raw: dict[str, str]) -> Lease:
        kwargs: dict[str, Any] = {}
        for name, coerce in _COERCE.items():
            if name in raw:
                kwargs[name] = coerce(raw[name])
        return cls(**kwargs)

    def to_hash(self) -> dict[str | bytes | bytearray | memoryview | int | float, str]:
        return {f.name: str(getattr(self, f.name)) for f in fields(self)}

    @property
    def is_lost(self) -> bool:
        return self.lost == "1"


def _int(value: str) -> int:
    return int(float(value or 0))


def _float(value: str) -> float:
    return float(value or 0)


def _str(value: str) -> str:
    return value


def _coercer(type_name: Any) -> Any:
    if type_name in ("int", int):
        return _int
    if type_name in ("float", float):
        return _float
    return _str


# Each field's parser, worked out once: the heartbeat tick reads hundreds of leases a second.
_COERCE = {f.name: _coercer(f.type) for f in fields(Lease)}


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


# KEYS[1]=lease hash, KEYS[2]=last-seen zset; ARGV: attempt, now, work id, [field, value]*.
# Sets the fields only while the lease exists and `attempt` is still its current attempt, so a
# stale attempt can change nothing. A pulse or dispatch time set is also its last sign of life.
_SET_IF_ATTEMPT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
if redis.call('HGET', KEYS[1], 'attempt') ~= ARGV[1] then return 0 end
for i = 4, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  if ARGV[i] == 'pulse_at' or ARGV[i] == 'dispatched_at' then
    redis.call('ZADD', KEYS[2], ARGV[i + 1], ARGV[3])
  end
end
return 1
"""

# KEYS[1]=lease hash, KEYS[2]=the worker's hash, KEYS[3]=last-seen zset; ARGV: attempt, now,
# work id. Returns {exists, current, stop, cause, seen at, token, draining}: all a running
# attempt needs to act each tick, and to rebuild its lease if Redis lost it, in one round trip.
_PULSE = """
local draining = redis.call('HGET', KEYS[2], 'draining') == '1' and 1 or 0
if redis.call('EXISTS', KEYS[1]) == 0 then return {0, 0, '', '', '0', '', draining} end
local current = redis.call('HGET', KEYS[1], 'attempt') == ARGV[1]
if current then
  redis.call('HSET', KEYS[1], 'pulse_at', ARGV[2])
  redis.call('ZADD', KEYS[3], ARGV[2], ARGV[3])
end
return {1, current and 1 or 0, redis.call('HGET', KEYS[1], 'stop') or '',
        redis.call('HGET', KEYS[1], 'stop_cause') or '',
        redis.call('HGET', KEYS[1], 'stop_seen_at') or '0',
        redis.call('HGET', KEYS[1], 'token') or '', draining}
"""

# KEYS[1]=lease hash, KEYS[2]=last-seen zset; ARGV: expected attempt, task id, now, work id.
# Starts the next attempt.
_NEW_ATTEMPT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
if redis.call('HGET', KEYS[1], 'attempt') ~= ARGV[1] then return 0 end
local next = tonumber(ARGV[1]) + 1
redis.call('HSET', KEYS[1], 'attempt', next, 'task_id', ARGV[2], 'phase', 'dispatched',
           'dispatched_at', ARGV[3], 'pulse_at', 0, 'worker', '', 'pid', 0)
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[4])
return next
"""

# KEYS[1]=lease hash; ARGV: kind, cause, now. FORCE wins over GRACEFUL; the first cause stays.
_REQUEST_STOP = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local kind = redis.call('HGET', KEYS[1], 'stop') or ''
if kind == 'force' or kind == ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'stop', ARGV[1])
if kind == '' then redis.call('HSET', KEYS[1], 'stop_cause', ARGV[2], 'stop_seen_at', ARGV[3]) end
return 1
"""

# KEYS[1]=due zset; ARGV: now, limit, in-flight deadline, lease key prefix. Pops due ids by
# pushing their score to the in-flight deadline, so concurrent heartbeat tasks take disjoint sets
# and a crashed one's leases come due again once the deadline passes. The deadline is also noted
# on the lease, so a hand-off can wait for a beat in flight before it reads the token.
_CLAIM_DUE = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, id in ipairs(ids) do
  redis.call('ZADD', KEYS[1], 'XX', ARGV[3], id)
  if redis.call('EXISTS', ARGV[4] .. id) == 1 then
    redis.call('HSET', ARGV[4] .. id, 'inflight_until', ARGV[3])
  end
end
return ids
"""

# KEYS[1]=lease hash, KEYS[2]=due zset; ARGV: due, work id, sooner only ('1' or '0'), now.
# Schedules the next beat only while the dispatcher still owns the heartbeat (not after a
# hand-off, not after release); a release to retry is scheduled whoever beat the lease. "Sooner
# only" never postpones a due beat, and leaves a beat in flight alone (its reply reschedules).
_SCHEDULE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if redis.call('HGET', KEYS[1], 'heartbeats_by') == 'sandbox'
   and redis.call('HGET', KEYS[1], 'phase') ~= 'releasing' then return 0 end
if ARGV[3] == '1' then
  local inflight = tonumber(redis.call('HGET', KEYS[1], 'inflight_until') or '0') or 0
  if inflight > tonumber(ARGV[4]) then return 1 end
  local current = redis.call('ZSCORE', KEYS[2], ARGV[2])
  if current and tonumber(current) <= tonumber(ARGV[1]) then return 1 end
end
redis.call('HSET', KEYS[1], 'inflight_until', 0)
redis.call('ZADD', KEYS[2], ARGV[1], ARGV[2])
return 1
"""

# KEYS[1]=due zset; ARGV: lease key prefix, ok at, then per beat: work id, token, ttl, next due.
# A tick's plain successful beats in one round trip: for each lease still held, what `update`
# then `schedule_heartbeat` do (token, TTL and time of the beat; the next beat, unless the
# sandbox beats the lease now). Returns the ids whose lease was released meanwhile.
_RECORD_BEATS = """
local gone = {}
for i = 3, #ARGV, 4 do
  local id = ARGV[i]
  local key = ARGV[1] .. id
  if redis.call('EXISTS', key) == 0 then
    gone[#gone + 1] = id
  else
    redis.call('HSET', key, 'token', ARGV[i + 1], 'ttl_seconds', ARGV[i + 2],
               'heartbeat_ok_at', ARGV[2])
    if redis.call('HGET', key, 'heartbeats_by') ~= 'sandbox'
       or redis.call('HGET', key, 'phase') == 'releasing' then
      redis.call('HSET', key, 'inflight_until', 0)
      redis.call('ZADD', KEYS[1], ARGV[i + 3], id)
    end
  end
end
return gone
"""
# KEYS[1]=an index zset; ARGV: lease key prefix, then per lease: work id, score. Indexes each
# lease still held, so an index repaired from a read of the lease never keeps one released
# meanwhile. (A pulse landing in between may be indexed a little old: that only makes its
# lease a candidate sooner, which the read of its hash then clears.)
_INDEX_IF_HELD = """
for i = 2, #ARGV, 2 do
  if redis.call('EXISTS', ARGV[1] .. ARGV[i]) == 1 then
    redis.call('ZADD', KEYS[1], ARGV[i + 1], ARGV[i])
  end
end
return 1
"""

# KEYS[1]=created zset, KEYS[2]=held leases zset, KEYS[3]=the stop scan's cursor. What a stop
# scan needs to start, in one round trip: {the oldest `created_at` among held leases ('' if
# none; entries of leases no longer held are dropped on the way), held leases the index lacks,
# the cursor to continue from ('' if none)}. With nothing held, the cursor goes too.
_STOP_SCAN_START = """
if redis.call('ZCARD', KEYS[2]) == 0 then
  redis.call('DEL', KEYS[1], KEYS[3])
  return {'', {}, ''}
end
local missing = redis.call('ZDIFF', 2, KEYS[2], KEYS[1])
while true do
  local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  if #first == 0 then return {'', missing, redis.call('GET', KEYS[3]) or ''} end
  if redis.call('ZSCORE', KEYS[2], first[1]) then
    return {first[2], missing, redis.call('GET', KEYS[3]) or ''}
  end
  redis.call('ZREM', KEYS[1], first[1])
end
"""

# Beats recorded per script call: a few ms of Redis time at most, so other clients never wait
# long behind a big tick.
RECORD_BEATS_CHUNK = 500


def _last_seen(lease: Lease) -> float:
    """A lease's last sign of progress, as recovery judges it in its phase: its attempt's last
    pulse while running, its dispatch while queued, its claim before that."""
    if lease.phase == Phase.RUNNING:
        return lease.pulse_at
    if lease.phase == Phase.DISPATCHED:
        return lease.dispatched_at
    if lease.phase == Phase.CLAIMED:
        return lease.claimed_at
    return max(lease.claimed_at, lease.dispatched_at, lease.pulse_at)


def epoch_of(timestamp: str) -> float:
    """An RFC 3339 time as an epoch second; an unreadable one as 0, the oldest of all."""
    try:
        parsed = datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
    except ValueError:
        return 0.0
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).timestamp()


class LeaseRegistry:
    def __init__(self, redis: Redis, *, prefix: str) -> None:
        self.redis = redis
        self.keys = Keys(prefix)
        self._set_if_attempt = redis.register_script(_SET_IF_ATTEMPT)
        self._pulse = redis.register_script(_PULSE)
        self._new_attempt = redis.register_script(_NEW_ATTEMPT)
        self._request_stop = redis.register_script(_REQUEST_STOP)
        self._claim_due = redis.register_script(_CLAIM_DUE)
        self._schedule = redis.register_script(_SCHEDULE)
        self._record_beats = redis.register_script(_RECORD_BEATS)
        self._index_if_held = redis.register_script(_INDEX_IF_HELD)
        self._stop_scan_start = redis.register_script(_STOP_SCAN_START)

    # --- epoch: tells a Redis that restarted empty from one that did not -------------------
    def epoch(self) -> str:
        """The registry's epoch id, created on first use."""
        fresh = uuid.uuid4().hex
        self.redis.set(self.keys.epoch, fresh, nx=True)
        return str(self.redis.get(self.keys.epoch) or fresh)

    # --- create, read, delete -----------------------------------------------------------------
    def create(self, lease: Lease, *, work_json: str) -> None:
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(self.keys.lease(lease.work_id), mapping=lease.to_hash())
        pipe.set(self.keys.work(lease.work_id), work_json)
        pipe.zadd(self.keys.leases, {lease.work_id: lease.claimed_at})
        pipe.zadd(self.keys.last_seen, {lease.work_id: _last_seen(lease)})
        pipe.zadd(self.keys.created, {lease.work_id: epoch_of(lease.created_at)})
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

    def all(self) -> list[Lease]:
        return self.get_many(self.held_ids())

    def held_among(self, work_ids: list[str]) -> set[str]:
        """Which of these items we hold (one round trip, however many we hold)."""
        if not work_ids:
            return set()
        scores = self.redis.zmscore(self.keys.leases, work_ids)
        return {w for w, score in zip(work_ids, scores, strict=True) if score is not None}

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
        self._index(self.keys.last_seen, [(lease.work_id, _last_seen(lease)) for lease in leases])
        return [lease for lease in leases if _last_seen(lease) <= cutoff]

    def stop_scan_start(self) -> tuple[float | None, str | None]:
        """Where the stop bridge's scan starts: the server's `created_at` (epoch second) of the
        oldest item we hold (None: we hold none), and the page its sweep left off at (None: the
        newest). A held lease the index lacks (written before it existed) is added first."""
        keys = [self.keys.created, self.keys.leases, self.keys.stop_scan_cursor]
        oldest, missing, cursor = self._stop_scan_start(keys=keys)
        if missing:
            self._index(self.keys.created, [(lease.work_id, epoch_of(lease.created_at))
                                            for lease in self.get_many(missing)])
            oldest, _, cursor = self._stop_scan_start(keys=keys)
        return (float(oldest) if oldest else None), (str(cursor) if cursor else None)

    def _index(self, key: str, entries: list[tuple[str, float]]) -> None:
        if not entries:
            return
        args: list[str | float] = [self.keys.lease("")]
        for work_id, score in entries:
            args += [work_id, score]
        self._index_if_held(keys=[key], args=args)

    def set_stop_scan_cursor(self, cursor: str | None, *, ttl_seconds: int) -> None:
        """Where the stop bridge's next tick continues its sweep (None: from the newest)."""
        if cursor is None:
            self.redis.delete(self.keys.stop_scan_cursor)
        else:
            self.redis.set(self.keys.stop_scan_cursor, cursor, ex=ttl_seconds)

    def delete(self, work_id: str) -> None:
        pipe = self.redis.pipeline(transaction=True)
        pipe.delete(self.keys.lease(work_id), self.keys.work(work_id))
        pipe.zrem(self.keys.leases, work_id)
        pipe.zrem(self.keys.heartbeat_due, work_id)
        pipe.zrem(self.keys.last_seen, work_id)
        pipe.zrem(self.keys.created, work_id)
        pipe.execute()

    # --- changes ------------------------------------------------------------------------------
    def update(self, work_id: str, **values: object) -> bool:
        """Set fields of an existing lease, whatever its attempt. False if it is gone."""
        key = self.keys.lease(work_id)
        seen = [float(v) for k, v in values.items()  # type: ignore[arg-type]
                if k in ("pulse_at", "dispatched_at")]
        pipe = self.redis.pipeline(transaction=True)
        pipe.exists(key)
        pipe.hset(key, mapping={k: str(v) for k, v in values.items()})
        if seen:
            pipe.zadd(self.keys.last_seen, {work_id: max(seen)})
        exists = pipe.execute()[0]
        if not exists:
            # The HSET just created a stub (and the ZADD an entry): a released lease stays gone.
            cleanup = self.redis.pipeline(transaction=True)
            cleanup.delete(key)
            cleanup.zrem(self.keys.last_seen, work_id)
            cleanup.execute()
        return bool(exists)

    def update_if_attempt(self, work_id: str, attempt: int, **values: object) -> int:
        """Set fields only while `attempt` is current: 1 done, 0 superseded, -1 lease gone."""
        argv: list[str | int | float] = [attempt, time.time(), work_id]
        for name, value in values.items():
            argv += [name, str(value)]
        keys = [self.keys.lease(work_id), self.keys.last_seen]
        return int(self._set_if_attempt(keys=keys, args=argv))

    def pulse(self, work_id: str, attempt: int, *, worker: str = "") -> Pulse:
        exists, current, stop, cause, seen_at, token, draining = self._pulse(
            keys=[self.keys.lease(work_id), self.keys.worker(worker), self.keys.last_seen],
            args=[attempt, time.time(), work_id])
        return Pulse(bool(exists), bool(current), str(stop), str(cause), float(seen_at or 0),
                     str(token), bool(draining))

    def new_attempt(self, work_id: str, *, expected_attempt: int, task_id: str) -> int:
        """Start attempt `expected_attempt + 1`: its number, 0 if superseded, -1 if gone."""
        return int(self._new_attempt(keys=[self.keys.lease(work_id), self.keys.last_seen],
                                     args=[expected_attempt, task_id, time.time(), work_id]))

    def request_stop(self, work_id: str, kind: StopKind, cause: str) -> bool:
        """Raise the stop flag; True if it changed (a new or a harder stop)."""
        changed = self._request_stop(
            keys=[self.keys.lease(work_id)], args=[kind.value, cause, time.time()]
        )
        return bool(changed)

    def mark_lost(self, work_id: str, cause: str) -> None:
        """The server no longer gives us this lease: kill now, never heartbeat or stop it again."""
        self.update(work_id, lost="1")
        self.request_stop(work_id, StopKind.FORCE, cause)
        self.redis.zrem(self.keys.heartbeat_due, work_id)

    # --- heartbeat schedule -------------------------------------------------------------------
    def schedule_heartbeat(self, work_id: str, due: float, *, sooner_only: bool = False) -> bool:
        """Schedule the next beat (or release retry); False if the lease is gone or the sandbox
        beats it. `sooner_only` never moves a beat that is already due sooner, or in flight."""
        keys = [self.keys.lease(work_id), self.keys.heartbeat_due]
        args: list[str | float] = [due, work_id, "1" if sooner_only else "0", time.time()]
        return bool(self._schedule(keys=keys, args=args))

    def record_beats(self, beats: list[tuple[str, str, int, float]], *, ok_at: float) -> list[str]:
        """Record successful beats, each (work id, token, TTL, next due), and schedule the next
        ones, in one round trip per chunk. Returns the ids whose lease is gone."""
        gone: list[str] = []
        for start in range(0, len(beats), RECORD_BEATS_CHUNK):
            args: list[str | int | float] = [self.keys.lease(""), ok_at]
            for work_id, token, ttl, due in beats[start:start + RECORD_BEATS_CHUNK]:
                args += [work_id, token, ttl, due]
            gone += [str(w) for w in self._record_beats(keys=[self.keys.heartbeat_due],
                                                        args=args)]
        return gone

    def hand_heartbeat_to_sandbox(self, work_id: str, *, wait_seconds: float) -> str | None:
        """Stop beating the lease and return its token for the sandbox to continue with.

        Waits for a beat still in flight, whose reply would otherwise change the token after we
        read it: the sandbox would then present a stale token and lose the lease (412).
        """
        self.update(work_id, heartbeats_by="sandbox")
        self.unschedule_heartbeat(work_id)
        deadline = time.time() + wait_seconds
        while True:
            lease = self.get(work_id)
            if lease is None:
                return None
            if lease.inflight_until <= time.time() or time.time() >= deadline:
                return lease.token or None
            time.sleep(0.05)

    def unschedule_heartbeat(self, work_id: str) -> None:
        self.redis.zrem(self.keys.heartbeat_due, work_id)

    def claim_due_heartbeats(self, *, now: float, limit: int, inflight_seconds: float) -> list[str]:
        ids = self._claim_due(
            keys=[self.keys.heartbeat_due],
            args=[now, limit, now + inflight_seconds, self.keys.lease("")],
        )
        return [str(i) for i in ids]

    def next_due(self, work_id: str) -> float | None:
        score = self.redis.zscore(self.keys.heartbeat_due, work_id)
        return None if score is None else float(score)
