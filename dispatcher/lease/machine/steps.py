"""What the lease rules are built from: the decision, and the few steps every rule reuses
(end a session, release a lease, lose it, flag a stop, publish, start a new attempt)."""

from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from dispatcher.lease import effects as fx
from dispatcher.lease.causes import Cause, LossCause, Release, RestartReason, SeenBy, StopCause
from dispatcher.lease.model import Ending, Heartbeater, Kind, Lease, Phase, StopKind

# The official workers heartbeat every ttl/2, at most every 30 s; we heartbeat every ttl/3 so one
# failed heartbeat still leaves a retry inside the TTL.
INTERVAL_SHARE_OF_TTL = 1 / 3
MAX_INTERVAL_SECONDS = 30.0
MIN_INTERVAL_SECONDS = 1.0
# After a failed heartbeat or a refused first claim, try again at the next heartbeat tick (every
# second): due half a tick later, it is due when that tick comes. Due a whole tick later, it
# waited two: a 6 s lease got three tries, not six, and four 503s in a row let it lapse.
RETRY_SECONDS = 0.5
# After a failed stop, try again this soon (never later than the next heartbeat).
RELEASE_RETRY_SECONDS = 2.0
# While the registry is unreachable nobody heartbeats, so the server may let the lease lapse one
# TTL after its last heartbeat, which was up to a third of a TTL before the outage began. Past this
# share of the TTL a running sandbox is killed: two runners of one session must never overlap.
REGISTRY_OUTAGE_SHARE_OF_TTL = 2 / 3
# A supervisor that has not pulsed for this long kills its sandbox (self-fencing), whatever the
# TTL: recovery may start the session on another worker once the pulse is
# `running.PULSE_STALE_SECONDS` old, and by then this sandbox must be gone. A Redis stall shorter
# than this costs nothing; a longer one restarts the sessions of the workers it cut off.
SELF_FENCE_SECONDS = 3.0


# Leases claimed together (a burst) would come due together every interval ever after: one tick
# heartbeats them all and the next ones none. Their first renewal comes instead after a share of
# the interval that each work id keeps (its hash, at least this), so their beats spread over the
# interval and each tick carries its share. It costs a lease one early heartbeat, once.
FIRST_RENEWAL_MIN_SHARE = 0.1
_SPREAD_BUCKETS = 1024
# A heartbeat leaves some time after it was due (the wait for the next tick, its place in the
# tick's pacing, the requests ahead of it). Counted from when it left, the next one would be due
# that much later each round: a lease's period becomes the interval plus the lag, so the fleet
# sends fewer heartbeats a second than it holds leases over the interval, and its gaps grow
# towards the TTL as load adds lag. Counted from when it was due instead, the period stays the
# interval. Up to this share of the interval only: a heartbeat that left much later (a stalled
# tick) is followed an interval less this share after it left, not at once, so a stall is
# caught up over a round rather than in a burst. Never later than counted from when it left.
CATCH_UP_SHARE = 0.25


def heartbeat_interval(ttl_seconds: int) -> float:
    return max(MIN_INTERVAL_SECONDS, min(ttl_seconds * INTERVAL_SHARE_OF_TTL,
                                         MAX_INTERVAL_SECONDS))


def renewal_due(sent_at: float, ttl_seconds: int, *, work_id: str, first: bool,
                due_at: float = 0.0) -> float:
    """When the heartbeat after one sent at `sent_at` (due at `due_at`; 0: unknown) is due: an
    interval after it was due (at most `CATCH_UP_SHARE` of the interval before it left), or for
    the first renewal after the claim, the work id's share of the interval after it left."""
    interval = heartbeat_interval(ttl_seconds)
    if not first:
        if not due_at:
            return sent_at + interval
        return min(sent_at, max(due_at, sent_at - CATCH_UP_SHARE * interval)) + interval
    bucket = zlib.crc32(work_id.encode()) % _SPREAD_BUCKETS / (_SPREAD_BUCKETS - 1)
    return sent_at + interval * (FIRST_RENEWAL_MIN_SHARE + (1 - FIRST_RENEWAL_MIN_SHARE) * bucket)


def may_still_send(claimed: float, now: float, *, request_seconds: float,
                   inflight_seconds: float) -> bool:
    """Whether a heartbeat whose turn came at `now` may still leave, its lease claimed for it
    at `claimed` (both monotonic seconds) with an in-flight mark `inflight_seconds` long: only
    while a whole request (`request_seconds`) fits inside the mark. Past that, another tick
    may claim the lease and send a beat with the same token, and of two beats racing on one
    token the server refuses one (412): a lease lost. A beat left unsent is in flight nowhere,
    so the tick gives its lease back due at once (the registry's `release_unsent`)."""
    return now + request_seconds <= claimed + inflight_seconds


def outage_is_too_long(lease: Lease, seconds: float) -> bool:
    """Whether an attempt that could not pulse for `seconds` must kill its sandbox."""
    return seconds >= min(SELF_FENCE_SECONDS, lease.ttl * REGISTRY_OUTAGE_SHARE_OF_TTL)


@dataclass(frozen=True)
class Policy:
    """What the rules take from settings."""

    max_attempts: int = 3


@dataclass(frozen=True)
class Decision:
    lease: Lease | None  # None: no record (never made, or deleted)
    effects: tuple[fx.Effect, ...] = ()


@dataclass(frozen=True)
class Ctx:
    now: float
    policy: Policy


class Plan:
    """A decision in the making: the lease as the rule has left it so far, and the effects in
    the order they are to be performed. A rule's steps add to it; the rule returns `decided()`.
    `change` records what it sets (an `Update`); `assume` only says what another effect (a stop
    flag, a guarded write, a record to create) will make true."""

    def __init__(self, lease: Lease | None) -> None:
        self.lease = lease
        self.effects: list[fx.Effect] = []

    @property
    def held(self) -> Lease:
        """The lease, which the step needs: a step after `forget` is a bug in the rule."""
        if self.lease is None:
            raise ValueError("the rule went on after it forgot the lease")
        return self.lease

    def add(self, *effects: fx.Effect) -> None:
        self.effects.extend(effects)

    def change(self, **changes: Any) -> None:
        self.lease = self.held.but(**changes)
        self.effects.append(fx.Update(changes))

    def assume(self, **changes: Any) -> None:
        self.lease = self.held.but(**changes)

    def decided(self) -> Decision:
        return Decision(self.lease, tuple(self.effects))


# --- building blocks ---------------------------------------------------------------------------

def log(action: str, lease: Lease | None, level: int = logging.INFO, **fields: object) -> fx.Log:
    if lease is not None:
        fields = {"work_id": lease.work_id, "session_id": lease.session_id,
                  "attempt": lease.attempt, **fields}
    return fx.Log(action, level, fields)


def count(metric: str, **labels: StrEnum | str) -> fx.Count:
    return fx.Count(metric, labels)


def is_over(lease: Lease) -> bool:
    """The session ended (a record in `releasing` has, whatever else it says)."""
    return lease.ended != Ending.NONE or lease.phase == Phase.RELEASING


def proven_ours(lease: Lease) -> bool:
    """The server answered our ack or a heartbeat of ours: the item is ours. Until it has (every
    ack attempt lost or refused), a rival may hold the item, and its session is not published:
    the first claim, or a later heartbeat, must answer first."""
    return lease.heartbeat_ok_at > 0


def since_ok(lease: Lease, now: float) -> float:
    """Seconds since the last heartbeat the server answered was sent (or since the ack)."""
    return now - (lease.heartbeat_ok_at or lease.claimed_at)


def schedule(p: Plan, due: float, *, sooner_only: bool = False) -> None:
    """The next heartbeat, or release retry, at `due`."""
    p.add(fx.Schedule(due, sooner_only, scheduled_for(p.held)))


def scheduled_for(lease: Lease) -> Heartbeater | None:
    """Whose heartbeats a scheduled one is for, so it is not applied once that changed: the
    dispatcher's (never after a hand-off to the sandbox), but a release is retried whoever
    heartbeated the lease."""
    return None if lease.phase == Phase.RELEASING else Heartbeater.DISPATCHER


def forget(p: Plan, *, outcome: Release) -> None:
    """Delete the record: the server confirmed the stop, or ended the lease itself."""
    lease = p.held
    p.add(fx.DeleteRecord(), count("work_released", outcome=outcome),
          log("released", lease, outcome=outcome, cause=lease.stop_cause or None,
              lost=lease.lost or None))
    p.lease = None


def release(p: Plan, *, outcome: Release) -> None:
    """Give the lease up. An item the server has not stopped is stopped first, if the session
    ended or the lease is still ours; a lost lease of a session that did not end is the new
    holder's business."""
    lease = p.held
    if lease.server_stopped or (lease.lost and not is_over(lease)):
        forget(p, outcome=outcome)
        return
    p.change(phase=Phase.RELEASING)
    p.add(fx.StopOnServer(force=True, as_=stop_as(lease)))


def stop_as(lease: Lease) -> fx.StopAs:
    """Whose credential stops a lease's item. A lease the fleet may no longer hold (lost, or
    heartbeated by its sandbox, which may have lost it unseen) may have been delivered again,
    to another worker: its item is stopped as the delivery it was claimed from, with that
    delivery's sessions token, as SDK 2.17's poller stops an item; a 401 to it (the token
    expired, or no longer opens the item) is answered by a graceful stop with the environment
    key (`running.on_release_unauthorized`). A lease the fleet holds is its own to force-stop."""
    if lease.lost or lease.heartbeats_by == Heartbeater.SANDBOX:
        return fx.StopAs.LEASE_TOKEN
    return fx.StopAs.ENVIRONMENT_KEY


def end(p: Plan, ending: Ending) -> None:
    """The session is over: never dispatched again, and its item stopped on the server."""
    lease = p.held
    p.change(ended=ending)
    p.add(fx.RecordHistory(lease.failures, ending))
    if lease.phase == Phase.DISPATCHED:
        p.add(fx.Revoke(lease.task_id))
    release(p, outcome=Release.ending(ending, otherwise=Release.STOPPED))


def lose(p: Plan, *, cause: LossCause, server_stopped: bool = False,
         action: str = "heartbeat lost", **details: object) -> None:
    """The server no longer gives us this lease: kill the sandbox, never heartbeat it again."""
    lease = p.held
    # The flag first: it is guarded, and a flag that lands behind another is decided again.
    raise_stop(p, StopKind.FORCE, cause)
    changes: dict[str, object] = {"lost": True}
    if server_stopped:
        changes["server_stopped"] = True
    p.change(**changes)
    p.add(fx.Unschedule(), count("leases_lost", cause=cause),
          log(action, lease, logging.WARNING, cause=cause, **details))
    if is_over(lease):
        # The session is over: its item is stopped whoever holds the lease now.
        release(p, outcome=Release.LOST)
        return
    if lease.phase == Phase.RUNNING:
        return  # its supervisor kills the sandbox, then releases
    forget(p, outcome=Release.LOST)
    if lease.phase == Phase.DISPATCHED:
        revoke_forgotten(p, lease.task_id)


def revoke_forgotten(p: Plan, task_id: str) -> None:
    """Revoke the task of a session let go, after its record is deleted. The worker holding the
    message reads the record as the revoke reaches it (`task_revoked`); a record still there,
    queued and live, reads as an operator's revoke, which ends the session (`stopped` in its
    history): the item the server delivers again would be refused and never run."""
    p.add(fx.Revoke(task_id))


def flag_stop(p: Plan, kind: StopKind, cause: Cause) -> bool:
    """Raise the stop flag (force wins); False if that changes nothing."""
    lease = p.held
    if lease.stop == StopKind.FORCE or lease.stop == kind:
        return False
    raise_stop(p, kind, cause)
    return True


def raise_stop(p: Plan, kind: StopKind, cause: Cause) -> None:
    """Set the stop flag to `kind` over the one the lease has; the first cause stays."""
    lease = p.held
    first = lease.stop == StopKind.NONE
    p.assume(stop=kind, stop_cause=cause if first else lease.stop_cause)
    p.add(fx.FlagStop(kind, cause if first else None, expected=lease.stop))


def publish(p: Plan, now: float, *, recorded: bool = True) -> None:
    """Mark the lease dispatched and publish its session task. `recorded=False`: the record is
    yet to be created, from the planned lease, so no update goes before the publish."""
    lease = p.held
    changes: dict[str, object] = {"phase": Phase.DISPATCHED, "dispatched_at": now}
    if recorded:
        p.change(**changes)
    else:
        p.assume(**changes)
    p.add(fx.Publish(lease.attempt, lease.task_id, lease.queue),
          log("dispatched", lease, task_id=lease.task_id, queue=lease.queue))


def restart(p: Plan, *, reason: RestartReason, failure: bool, task_id: str, c: Ctx) -> None:
    """Hand the session to a new attempt on any worker, or end it if it may not run again.
    `failure` counts the ending attempt against the limit (a dead worker does; a drain or a
    message that never reached a worker does not, so deploys never use attempts up)."""
    lease = p.held
    failures = lease.failures + (1 if failure else 0)
    if lease.lost:
        p.add(fx.RecordHistory(failures, lease.ended))
        forget(p, outcome=Release.LOST)
        return
    if lease.stop != StopKind.NONE or is_over(lease):
        end(p, lease.ended or Ending.STOPPED)
        return
    if failures >= c.policy.max_attempts:
        p.assume(failures=failures)
        p.add(log("attempts exhausted", lease, logging.WARNING, reason=reason))
        end(p, Ending.STOPPED)
        return
    changes: dict[str, object] = {"attempt": lease.attempt + 1, "task_id": task_id,
                                  "phase": Phase.DISPATCHED, "dispatched_at": c.now,
                                  "pulse_at": 0.0, "worker": "", "pid": 0}
    p.assume(**changes, failures=failures)
    restarted = p.held
    p.add(fx.NewAttempt(lease.attempt, changes))
    if failure:
        p.add(fx.Update({"failures": failures}), fx.RecordHistory(failures, Ending.NONE))
    p.add(count("attempts_restarted", reason=reason),
          log("attempt restarted", restarted, logging.WARNING, reason=reason),
          fx.Publish(restarted.attempt, task_id, lease.queue),
          log("dispatched", restarted, task_id=task_id, queue=lease.queue))


def advance_claimed(p: Plan, c: Ctx) -> None:
    """A claimed lease moves on: a healthcheck is answered, a session published, a lease
    stopped meanwhile released."""
    lease = p.held
    if lease.phase != Phase.CLAIMED or lease.lost or lease.ended != Ending.NONE:
        return
    if lease.stop != StopKind.NONE:
        end(p, Ending.STOPPED)
    elif lease.kind == Kind.HEALTHCHECK:
        p.add(fx.AnswerHealthcheck())
    else:
        publish(p, c.now)


def request_stop(p: Plan, kind: StopKind, cause: StopCause, seen_by: SeenBy) -> None:
    """A stop asked for: flagged for a running attempt's supervisor to signal its sandbox; a
    session not started yet is revoked and released now, rather than when some worker meets
    its message (the task then finds no lease and exits)."""
    lease = p.held
    if is_over(lease) or not flag_stop(p, kind, cause):
        return
    p.add(count("work_stop_requests", cause=cause),
          log("stop requested", lease, kind=kind, cause=cause, seen_by=seen_by))
    if lease.phase != Phase.RUNNING:
        end(p, Ending.STOPPED)
