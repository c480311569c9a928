"""What the lease rules are built from: the decision, and the few steps every rule reuses
(end a session, release a lease, lose it, flag a stop, publish, start a new attempt)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from dispatcher.lease import effects as fx
from dispatcher.lease import events as ev
from dispatcher.lease.model import Ending, Lease, Phase, StopKind

# The official workers beat every ttl/2, at most every 30 s; we beat every ttl/3 so one failed
# beat still leaves a retry inside the TTL.
INTERVAL_SHARE_OF_TTL = 1 / 3
MAX_INTERVAL_SECONDS = 30.0
MIN_INTERVAL_SECONDS = 1.0
# After a failed beat or a refused first claim, try again at the next heartbeat tick (every
# second): due half a tick later, it is due when that tick comes. Due a whole tick later, it
# waited two: a 6 s lease got three tries, not six, and four 503s in a row let it lapse.
RETRY_SECONDS = 0.5
# After a failed stop, try again this soon (never later than the next beat).
RELEASE_RETRY_SECONDS = 2.0
# While the registry is unreachable nobody heartbeats, so the server may let the lease lapse one
# TTL after its last beat, which was up to a third of a TTL before the outage began. Past this
# share of the TTL a running sandbox is killed: two runners of one session must never overlap.
REGISTRY_OUTAGE_SHARE_OF_TTL = 2 / 3
# A supervisor that has not pulsed for this long kills its sandbox (self-fencing), whatever the
# TTL: recovery may start the session on another worker once the pulse is
# `running.PULSE_STALE_SECONDS` old, and by then this sandbox must be gone. A Redis stall shorter
# than this costs nothing; a longer one restarts the sessions of the workers it cut off.
SELF_FENCE_SECONDS = 3.0


def heartbeat_interval(ttl_seconds: int) -> float:
    return max(MIN_INTERVAL_SECONDS, min(ttl_seconds * INTERVAL_SHARE_OF_TTL,
                                         MAX_INTERVAL_SECONDS))


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

    def then(self, other: Decision) -> Decision:
        return Decision(other.lease, self.effects + other.effects)


@dataclass(frozen=True)
class Ctx:
    now: float
    policy: Policy


# --- building blocks ---------------------------------------------------------------------------

def set_fields(lease: Lease, **changes: Any) -> Decision:
    return Decision(lease.but(**changes), (fx.Update(changes),))


def log(action: str, lease: Lease | None, level: int = logging.INFO, **fields: object) -> fx.Log:
    if lease is not None:
        fields = {"work_id": lease.work_id, "session_id": lease.session_id,
                  "attempt": lease.attempt, **fields}
    return fx.Log(action, level, fields)


def count(metric: str, **labels: str) -> fx.Count:
    return fx.Count(metric, labels)


def is_over(lease: Lease) -> bool:
    """The session ended (a record in `releasing` has, whatever else it says)."""
    return lease.ended != Ending.NONE or lease.phase == Phase.RELEASING


def proven_ours(lease: Lease) -> bool:
    """The server answered our ack or a beat of ours: the item is ours. Until it has (every
    ack attempt lost or refused), a rival may hold the item, and its session is not published:
    the first claim, or a later beat, must answer first."""
    return lease.heartbeat_ok_at > 0


def since_ok(lease: Lease, now: float) -> float:
    """Seconds since the last beat the server answered was sent (or since the ack)."""
    return now - (lease.heartbeat_ok_at or lease.claimed_at)


def forget(lease: Lease, *, reason: str, outcome: str) -> Decision:
    """Delete the record: the server confirmed the stop, or ended the lease itself."""
    return Decision(None, (
        fx.DeleteRecord(), count("work_released", outcome=outcome),
        log("released", lease, reason=reason, lost=lease.lost or None),
    ))


def release(lease: Lease, *, reason: str, outcome: str) -> Decision:
    """Give the lease up. An item the server has not stopped is stopped first, if the session
    ended or the lease is still ours; a lost lease of a session that did not end is the new
    holder's business."""
    if lease.server_stopped or (lease.lost and not is_over(lease)):
        return forget(lease, reason=reason, outcome=outcome)
    changes: dict[str, object] = {"phase": Phase.RELEASING, "stop_cause":
                                  lease.stop_cause or reason}
    return Decision(lease.but(**changes), (fx.Update(changes), fx.StopOnServer(force=True)))


def end(lease: Lease, ending: Ending, *, reason: str) -> Decision:
    """The session is over: never dispatched again, and its item stopped on the server."""
    ended = set_fields(lease, ended=ending)
    history = Decision(ended.lease, (fx.RecordHistory(lease.failures, ending),))
    revoke = (Decision(ended.lease, (fx.Revoke(lease.task_id),))
              if lease.phase == Phase.DISPATCHED else Decision(ended.lease))
    assert ended.lease is not None
    return ended.then(history).then(revoke).then(
        release(ended.lease, reason=reason, outcome=ending.value))


def lose(lease: Lease, *, cause: str, server_stopped: bool = False,
          action: str = "heartbeat lost", **details: object) -> Decision:
    """The server no longer gives us this lease: kill the sandbox, never beat it again."""
    changes: dict[str, object] = {"lost": True}
    if server_stopped:
        changes["server_stopped"] = True
    lost = lease.but(**changes, stop=StopKind.FORCE, stop_cause=lease.stop_cause or cause)
    effects: tuple[fx.Effect, ...] = (
        fx.Update(changes), fx.FlagStop(StopKind.FORCE, cause), fx.Unschedule(),
        count("leases_lost", cause=cause),
        log(action, lease, logging.WARNING, cause=cause, **details),
    )
    decision = Decision(lost, effects)
    if is_over(lease):
        # The session is over: its item is stopped whoever holds the lease now.
        return decision.then(release(lost, reason=cause, outcome="lost"))
    if lease.phase == Phase.RUNNING:
        return decision  # its supervisor kills the sandbox, then releases
    if lease.phase == Phase.DISPATCHED:
        decision = decision.then(Decision(lost, (fx.Revoke(lease.task_id),)))
    return decision.then(forget(lost, reason=cause, outcome="lost"))


def flag_stop(lease: Lease, kind: StopKind, cause: str) -> Decision | None:
    """The stop flag raised (force wins); None if that changes nothing."""
    if lease.stop == StopKind.FORCE or lease.stop == kind:
        return None
    changes: dict[str, object] = {"stop": kind}
    if lease.stop == StopKind.NONE:
        changes["stop_cause"] = cause
    return Decision(lease.but(**changes), (fx.FlagStop(kind, cause),))


def publish(lease: Lease, now: float, *, recorded: bool = True) -> Decision:
    """Mark the lease dispatched and publish its session task. `recorded=False`: the record is
    yet to be created, from the returned lease, so no update goes before the publish."""
    changes: dict[str, object] = {"phase": Phase.DISPATCHED, "dispatched_at": now}
    update: tuple[fx.Effect, ...] = (fx.Update(changes),) if recorded else ()
    return Decision(lease.but(**changes), (
        *update, fx.Publish(lease.attempt, lease.task_id, lease.queue),
        log("dispatched", lease, task_id=lease.task_id, queue=lease.queue),
    ))


def restart(lease: Lease, *, reason: str, failure: bool, task_id: str, now: float,
             policy: Policy) -> Decision:
    """Hand the session to a new attempt on any worker, or end it if it may not run again.
    `failure` counts the ending attempt against the limit (a dead worker does; a drain or a
    message that never reached a worker does not, so deploys never use attempts up)."""
    failures = lease.failures + (1 if failure else 0)
    if lease.lost:
        return Decision(lease, (fx.RecordHistory(failures, lease.ended),)).then(
            forget(lease, reason=reason, outcome="lost"))
    if lease.stop != StopKind.NONE or is_over(lease):
        return end(lease, lease.ended or Ending.STOPPED, reason=f"{reason}; stop requested")
    if failures >= policy.max_attempts:
        exhausted = lease.but(failures=failures)
        return Decision(exhausted, (
            log("attempts exhausted", lease, logging.WARNING, reason=reason),
        )).then(end(exhausted, Ending.STOPPED, reason="attempts exhausted"))
    changes: dict[str, object] = {"attempt": lease.attempt + 1, "task_id": task_id,
                                  "phase": Phase.DISPATCHED, "dispatched_at": now,
                                  "pulse_at": 0.0, "worker": "", "pid": 0}
    restarted = lease.but(**changes, failures=failures)
    effects: list[fx.Effect] = [fx.NewAttempt(lease.attempt, task_id)]
    if failure:
        effects += [fx.Update({"failures": failures}), fx.RecordHistory(failures, Ending.NONE)]
    effects += [
        count("attempts_restarted", reason=reason.split(" (")[0]),
        log("attempt restarted", restarted, logging.WARNING, reason=reason),
        fx.Publish(restarted.attempt, task_id, lease.queue),
        log("dispatched", restarted, task_id=task_id, queue=lease.queue),
    ]
    return Decision(restarted, tuple(effects))


def advance_claimed(lease: Lease, c: Ctx) -> Decision:
    """A claimed lease moves on: a healthcheck is answered, a session published, a lease
    stopped meanwhile released."""
    if lease.phase != Phase.CLAIMED or lease.lost or lease.ended != Ending.NONE:
        return Decision(lease)
    if lease.stop != StopKind.NONE:
        return end(lease, Ending.STOPPED, reason="stopped before dispatch")
    if lease.kind == "healthcheck":
        return Decision(lease, (fx.AnswerHealthcheck(),))
    return publish(lease, c.now)


def stop_requested(lease: Lease | None, e: ev.StopRequested, c: Ctx) -> Decision:
    if lease is None or is_over(lease):
        return Decision(lease)
    flagged = flag_stop(lease, e.kind, e.cause)
    if flagged is None or flagged.lease is None:
        return Decision(lease)
    decision = flagged.then(Decision(flagged.lease, (
        count("work_stop_requests", cause=e.cause),
        log("stop requested", lease, kind=e.kind.value, cause=e.cause, seen_by=e.seen_by))))
    if lease.phase == Phase.RUNNING:
        return decision  # its supervisor signals the sandbox
    # Not started yet: revoke the queued task so it never starts, and release now rather than
    # when some worker meets the message (the task then finds no lease and exits).
    return decision.then(end(flagged.lease, Ending.STOPPED,
                              reason=f"stopped while queued ({e.cause})"))


