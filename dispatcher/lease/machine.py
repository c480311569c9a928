"""The rules of a lease's life: `decide(lease, event) -> Decision(lease, effects)`, no I/O.

Every promise the fleet makes is a rule here, and only here:

* **No session stranded.** From the ack on, the item always has an owner: a lease is either
  held (and heartbeated), or released with a stop the server confirmed, or given up because the
  server itself ended it (stopped, gone, or handed to another holder). Nothing drops a lease
  silently.
* **No session run twice.** A session whose sandbox exited has `ended` set: it is never
  published again, and its item is stopped on the server *whatever happens to the lease
  afterwards* (a lost lease, a 412, a re-delivery). The fleet also remembers the ending past
  the record (`RecordHistory`), so a re-delivered item that already ended is stopped, not run.
* **No stale token presented twice.** A 412 either ends the lease or, when it follows a beat of
  ours whose reply was lost while the lease could not have lapsed, adopts the server's token.
* **Every stop honoured.** Force wins over graceful; a queued task is revoked and released at
  once; a running one is signalled by its supervisor.

The rule table in docs/architecture.md is generated from `RULES` below, and a test checks that
every row is what `decide` does.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from dispatcher.lease import effects as fx
from dispatcher.lease import events as ev
from dispatcher.lease.model import Beater, Ending, Lease, Phase, StopKind

__all__ = ["RULES", "Decision", "Policy", "decide", "heartbeat_interval", "outage_is_too_long"]

# The official workers beat every ttl/2, at most every 30 s; we beat every ttl/3 so one failed
# beat still leaves a retry inside the TTL.
INTERVAL_SHARE_OF_TTL = 1 / 3
MAX_INTERVAL_SECONDS = 30.0
MIN_INTERVAL_SECONDS = 1.0
# After a failed beat or a refused first claim, try again this soon.
RETRY_SECONDS = 1.0
# After a failed stop, try again this soon (never later than the next beat).
RELEASE_RETRY_SECONDS = 2.0
# While the registry is unreachable nobody heartbeats, so the server may let the lease lapse one
# TTL after its last beat, which was up to a third of a TTL before the outage began. Past this
# share of the TTL a running sandbox is killed: two runners of one session must never overlap.
REGISTRY_OUTAGE_SHARE_OF_TTL = 2 / 3


def heartbeat_interval(ttl_seconds: int) -> float:
    return max(MIN_INTERVAL_SECONDS, min(ttl_seconds * INTERVAL_SHARE_OF_TTL,
                                         MAX_INTERVAL_SECONDS))


def outage_is_too_long(lease: Lease, seconds: float) -> bool:
    return seconds >= lease.ttl * REGISTRY_OUTAGE_SHARE_OF_TTL


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
class _Ctx:
    now: float
    policy: Policy


def decide(lease: Lease | None, event: ev.Event, *, now: float,
           policy: Policy = Policy()) -> Decision:
    """What `event` means for `lease` (None: no record), as the new lease and its effects."""
    handler = _HANDLERS[type(event)]
    return handler(lease, event, _Ctx(now, policy))


# --- building blocks ---------------------------------------------------------------------------

def _set(lease: Lease, **changes: Any) -> Decision:
    return Decision(lease.but(**changes), (fx.Update(changes),))


def _log(action: str, lease: Lease | None, level: int = logging.INFO, **fields: object) -> fx.Log:
    if lease is not None:
        fields = {"work_id": lease.work_id, "session_id": lease.session_id,
                  "attempt": lease.attempt, **fields}
    return fx.Log(action, level, fields)


def _count(metric: str, **labels: str) -> fx.Count:
    return fx.Count(metric, labels)


def _since_ok(lease: Lease, now: float) -> float:
    """Seconds since the last beat the server answered was sent (or since the ack)."""
    return now - (lease.heartbeat_ok_at or lease.claimed_at)


def _forget(lease: Lease, *, reason: str, outcome: str) -> Decision:
    """Delete the record: the server confirmed the stop, or ended the lease itself."""
    return Decision(None, (
        fx.DeleteRecord(), _count("work_released", outcome=outcome),
        _log("released", lease, reason=reason, lost=lease.lost or None),
    ))


def _release(lease: Lease, *, reason: str, outcome: str) -> Decision:
    """Give the lease up. An item the server has not stopped is stopped first, if the session
    ended or the lease is still ours; a lost lease of a session that did not end is the new
    holder's business."""
    if lease.server_stopped or (lease.lost and lease.ended == Ending.NONE):
        return _forget(lease, reason=reason, outcome=outcome)
    changes: dict[str, object] = {"phase": Phase.RELEASING, "stop_cause":
                                  lease.stop_cause or reason}
    return Decision(lease.but(**changes), (fx.Update(changes), fx.StopOnServer(force=True)))


def _end(lease: Lease, ending: Ending, *, reason: str) -> Decision:
    """The session is over: never dispatched again, and its item stopped on the server."""
    ended = _set(lease, ended=ending)
    history = Decision(ended.lease, (fx.RecordHistory(lease.failures, ending),))
    revoke = (Decision(ended.lease, (fx.Revoke(lease.task_id),))
              if lease.phase == Phase.DISPATCHED else Decision(ended.lease))
    assert ended.lease is not None
    return ended.then(history).then(revoke).then(
        _release(ended.lease, reason=reason, outcome=ending.value))


def _lose(lease: Lease, *, cause: str, server_stopped: bool = False,
          **details: object) -> Decision:
    """The server no longer gives us this lease: kill the sandbox, never beat it again."""
    changes: dict[str, object] = {"lost": True}
    if server_stopped:
        changes["server_stopped"] = True
    lost = lease.but(**changes, stop=StopKind.FORCE, stop_cause=lease.stop_cause or cause)
    effects: tuple[fx.Effect, ...] = (
        fx.Update(changes), fx.FlagStop(StopKind.FORCE, cause), fx.Unschedule(),
        _count("leases_lost", cause=cause),
        _log("heartbeat lost", lease, logging.WARNING, cause=cause, **details),
    )
    decision = Decision(lost, effects)
    if lease.ended != Ending.NONE or lease.phase == Phase.RELEASING:
        # The session is over: its item is stopped whoever holds the lease now.
        return decision.then(_release(lost, reason=cause, outcome="lost"))
    if lease.phase == Phase.RUNNING:
        return decision  # its supervisor kills the sandbox, then releases
    if lease.phase == Phase.DISPATCHED:
        decision = decision.then(Decision(lost, (fx.Revoke(lease.task_id),)))
    return decision.then(_forget(lost, reason=cause, outcome="lost"))


def _flag_stop(lease: Lease, kind: StopKind, cause: str) -> Decision | None:
    """The stop flag raised (force wins); None if that changes nothing."""
    if lease.stop == StopKind.FORCE or lease.stop == kind:
        return None
    changes: dict[str, object] = {"stop": kind}
    if lease.stop == StopKind.NONE:
        changes["stop_cause"] = cause
    return Decision(lease.but(**changes), (fx.FlagStop(kind, cause),))


def _publish(lease: Lease, now: float) -> Decision:
    changes: dict[str, object] = {"phase": Phase.DISPATCHED, "dispatched_at": now}
    return Decision(lease.but(**changes), (
        fx.Update(changes), fx.Publish(lease.attempt, lease.task_id, lease.queue),
        _log("dispatched", lease, task_id=lease.task_id, queue=lease.queue),
    ))


def _restart(lease: Lease, *, reason: str, failure: bool, task_id: str, now: float,
             policy: Policy) -> Decision:
    """Hand the session to a new attempt on any worker, or end it if it may not run again.
    `failure` counts the ending attempt against the limit (a dead worker does; a drain or a
    message that never reached a worker does not, so deploys never use attempts up)."""
    failures = lease.failures + (1 if failure else 0)
    if lease.lost:
        return Decision(lease, (fx.RecordHistory(failures, lease.ended),)).then(
            _forget(lease, reason=reason, outcome="lost"))
    if lease.stop != StopKind.NONE or lease.ended != Ending.NONE:
        return _end(lease, lease.ended or Ending.STOPPED, reason=f"{reason}; stop requested")
    if failures >= policy.max_attempts:
        exhausted = lease.but(failures=failures)
        return Decision(exhausted, (
            _log("attempts exhausted", lease, logging.WARNING, reason=reason),
        )).then(_end(exhausted, Ending.STOPPED, reason="attempts exhausted"))
    changes: dict[str, object] = {"attempt": lease.attempt + 1, "task_id": task_id,
                                  "phase": Phase.DISPATCHED, "dispatched_at": now,
                                  "pulse_at": 0.0, "worker": "", "pid": 0}
    restarted = lease.but(**changes, failures=failures)
    effects: list[fx.Effect] = [fx.NewAttempt(lease.attempt, task_id)]
    if failure:
        effects += [fx.Update({"failures": failures}), fx.RecordHistory(failures, Ending.NONE)]
    effects += [
        _count("attempts_restarted", reason=reason.split(" (")[0]),
        _log("attempt restarted", restarted, logging.WARNING, reason=reason),
        fx.Publish(restarted.attempt, task_id, lease.queue),
        _log("dispatched", restarted, task_id=task_id, queue=lease.queue),
    ]
    return Decision(restarted, tuple(effects))


# --- the poller --------------------------------------------------------------------------------

def _offered(lease: Lease | None, e: ev.Offered, c: _Ctx) -> Decision:
    item = e.proposal
    if not e.known_type:
        return Decision(None, (
            _count("work_refused", reason="unknown_type"),
            _log("unknown work type", item, logging.WARNING, action_taken="stopped, not run"),
            fx.StopOnServer(force=True)))
    if lease is not None:
        return _offered_held(lease)
    if e.ended != Ending.NONE:
        return Decision(None, (
            _count("work_refused", reason="already_ended"),
            _log("re-delivered after it ended", item, logging.WARNING, ended=e.ended.value,
                 action_taken="stopped, not run"),
            fx.StopOnServer(force=True)))
    if e.failures >= c.policy.max_attempts:
        return Decision(None, (
            _count("work_refused", reason="attempts_exhausted"),
            _log("attempts exhausted", item, logging.WARNING, failures=e.failures,
                 action_taken="stopped, not run"),
            fx.StopOnServer(force=True)))
    return Decision(item.but(failures=e.failures), (fx.Ack(),))


def _offered_held(lease: Lease) -> Decision:
    """The server offers an item we still hold: our lease on it lapsed. Never ack it twice."""
    if lease.ended != Ending.NONE or lease.phase == Phase.RELEASING:
        # The session is over: stop the item (its release may have failed so far).
        return Decision(lease, (
            _log("polled a held lease", lease, logging.WARNING, phase=lease.phase.value,
                 action_taken="session already ended: stopped, not run"),
            fx.StopOnServer(force=True)))
    # A running attempt is fenced now and the item left unacked: the server delivers it again
    # once the record is gone, and only then is it claimed afresh (acking it now would start a
    # second attempt beside the first).
    failures = lease.failures + (1 if lease.phase == Phase.RUNNING else 0)
    fenced = Decision(lease.but(failures=failures),
                      (fx.RecordHistory(failures, Ending.NONE),))
    assert fenced.lease is not None
    return fenced.then(_lose(fenced.lease, cause="re-delivered by the server",
                             phase=lease.phase.value))


def _acked(lease: Lease | None, e: ev.AckAnswered | ev.AckUncertain, c: _Ctx) -> Decision:
    if lease is None:
        return Decision(None)
    effects: list[fx.Effect] = [
        fx.CreateRecord(lease), _count("work_claimed", type=lease.kind),
        _log("claimed", lease, type=lease.kind, queue=lease.queue),
    ]
    if isinstance(e, ev.AckUncertain):
        effects.append(_log("ack uncertain", lease, logging.WARNING, status=e.status,
                            action_taken="claimed; the first heartbeat tells"))
    decision = Decision(lease, tuple(effects))
    if lease.heartbeats_by == Beater.DISPATCHER:
        return decision.then(Decision(lease, (fx.Claim(),)))
    return decision.then(_advance_claimed(lease, c))


def _ack_refused(lease: Lease | None, e: ev.AckRefused, c: _Ctx) -> Decision:
    return Decision(None, (
        _count("work_refused", reason="ack_failed"),
        _log("ack failed", lease, logging.WARNING, status=e.status,
             outcome="left for the server to re-deliver")))


def _advance_claimed(lease: Lease, c: _Ctx) -> Decision:
    """A claimed lease moves on: a healthcheck is answered, a session published, a lease
    stopped meanwhile released."""
    if lease.phase != Phase.CLAIMED or lease.lost or lease.ended != Ending.NONE:
        return Decision(lease)
    if lease.stop != StopKind.NONE:
        return _end(lease, Ending.STOPPED, reason="stopped before dispatch")
    if lease.kind == "healthcheck":
        return Decision(lease, (fx.AnswerHealthcheck(),))
    return _publish(lease, c.now)


def _claim_answered(lease: Lease | None, e: ev.ClaimAnswered, c: _Ctx) -> Decision:
    if lease is None:
        return Decision(None)
    beat = _beat_answered(lease, ev.BeatAnswered(e.reply, e.sent_at), c)
    if beat.lease is None:
        return beat
    return beat.then(_advance_claimed(beat.lease, c))


def _claim_refused(lease: Lease | None, e: ev.ClaimRefused, c: _Ctx) -> Decision:
    if lease is None:
        return Decision(None)
    if _unclaimed(e.current):
        refused = _refused_unclaimed(lease, c)
        return refused if refused.lease is None else refused.then(
            _advance_claimed(refused.lease, c))
    return Decision(None, (
        fx.DeleteRecord(),
        _log("lease taken by another worker", lease, logging.WARNING,
             server_state=e.current.state)))


def _claim_not_acked(lease: Lease | None, e: ev.ClaimNotAcked, c: _Ctx) -> Decision:
    if lease is None:
        return Decision(None)
    if e.ack_uncertain:
        # The ack never landed: the item is still queued on the server, which delivers it again.
        return Decision(None, (
            fx.DeleteRecord(), _count("work_refused", reason="ack_failed"),
            _log("ack failed", lease, logging.WARNING, status=e.status,
                 outcome="left for the server to re-deliver")))
    if e.status == 404:
        return _lose(lease, cause="claim 404", server_stopped=True)
    return _claim_failed(lease, ev.ClaimFailed(e.status), c)


def _claim_failed(lease: Lease | None, e: ev.ClaimFailed, c: _Ctx) -> Decision:
    """Keep the lease: the heartbeat task claims again at once and judges the TTL. The claim
    may have landed, so its token may be the server's by now (`uncertain`)."""
    if lease is None:
        return Decision(None)
    failed = lease.but(uncertain=True)
    decision = Decision(failed, (
        fx.Update({"uncertain": True}), fx.Schedule(c.now),
        _log("first heartbeat failed", lease, logging.WARNING, status=e.status)))
    return decision.then(_advance_claimed(failed, c))


def _unclaimed(current: ev.ServerLease | None) -> bool:
    """A 412 to a NO_HEARTBEAT claim while the server's own state says nobody heartbeated
    the item: nobody else holds it, so the refusal is the server's hiccup, not a rival."""
    return (current is not None and current.last_heartbeat is None
            and current.state in (None, "starting"))


def _refused_unclaimed(lease: Lease, c: _Ctx) -> Decision:
    """Claim the unclaimed item again soon; past the TTL, stop it (it is ours to stop).
    Giving up at once would strand the acked item in `starting` for good."""
    since = round(c.now - lease.claimed_at, 1)
    if c.now - lease.claimed_at > lease.ttl:
        flagged = _flag_stop(lease, StopKind.FORCE, "claim refused") or Decision(lease)
        assert flagged.lease is not None
        return flagged.then(Decision(flagged.lease, (
            fx.Unschedule(),
            _log("claim refused", lease, logging.WARNING, seconds_since_ack=since,
                 action_taken="stopped on the server")))).then(
            Decision(flagged.lease) if lease.phase == Phase.RUNNING
            else _end(flagged.lease, Ending.STOPPED, reason="claim refused"))
    return Decision(lease, (
        fx.Schedule(c.now + RETRY_SECONDS),
        _log("claim refused", lease, logging.WARNING, seconds_since_ack=since,
             action_taken=f"retry in {RETRY_SECONDS:.0f}s")))


# --- the heartbeat task ------------------------------------------------------------------------

def _beat_answered(lease: Lease | None, e: ev.BeatAnswered, c: _Ctx) -> Decision:
    if lease is None:
        return Decision(None)
    reply = e.reply
    ttl = reply.ttl_seconds if reply.ttl_seconds > 0 else lease.ttl
    beaten = lease.but(token=reply.token, ttl_seconds=ttl, heartbeat_ok_at=e.sent_at,
                       uncertain=False)
    recorded = Decision(beaten, (fx.RecordBeat(reply.token, ttl, e.sent_at,
                                               e.sent_at + heartbeat_interval(ttl)),))
    if reply.state == "stopped":
        return recorded.then(_lose(beaten, cause="server stopped", server_stopped=True))
    if not reply.extended and reply.state != "stopping":
        return recorded.then(_lose(beaten, cause="lease not extended"))
    if reply.state == "stopping":
        return recorded.then(_stop_requested(beaten, ev.StopRequested(
            StopKind.GRACEFUL, "server", "heartbeat"), c))
    return recorded


def _beat_refused(lease: Lease | None, e: ev.BeatRefused, c: _Ctx) -> Decision:
    if lease is None:
        return Decision(None)
    current = e.current
    if not lease.token and _unclaimed(current):
        return _refused_unclaimed(lease, c)
    if current is not None and current.state == "stopped":
        return _lose(lease, cause="server stopped", server_stopped=True)
    if _lost_beat_was_ours(lease, current, c.now):
        assert current is not None and current.last_heartbeat is not None
        return Decision(lease.but(token=current.last_heartbeat, uncertain=False), (
            fx.Update({"token": current.last_heartbeat, "uncertain": False}),
            fx.Schedule(c.now),
            _log("heartbeat token adopted", lease, logging.WARNING,
                 reason="a beat of ours was applied but its reply was lost")))
    return _lose(lease, cause="heartbeat 412", server_state=current.state if current else None)


def _lost_beat_was_ours(lease: Lease, current: ev.ServerLease | None, now: float) -> bool:
    """After a beat whose reply was lost, a 412 whose server token we never saw is that beat's:
    the server hands an acked item to another holder only after its lease lapsed, and it cannot
    lapse before one TTL after the last beat it answered us was *sent*. Inside that window the
    only writer of the token is us, so adopting it cannot take another holder's lease."""
    return (lease.uncertain and current is not None and bool(current.last_heartbeat)
            and current.last_heartbeat != lease.token
            and current.state in ("starting", "active", "stopping")
            and _since_ok(lease, now) < lease.ttl)


def _beat_not_found(lease: Lease | None, e: ev.BeatNotFound, c: _Ctx) -> Decision:
    if lease is None:
        return Decision(None)
    return _lose(lease, cause="heartbeat 404", server_stopped=True)


def _beat_rejected(lease: Lease | None, e: ev.BeatRejected, c: _Ctx) -> Decision:
    """The server will not take our beats (auth, a bad request): kill and stop the item."""
    if lease is None:
        return Decision(None)
    flagged = _flag_stop(lease, StopKind.FORCE, "heartbeat rejected") or Decision(lease)
    assert flagged.lease is not None
    decision = flagged.then(Decision(flagged.lease, (
        fx.Unschedule(),
        _log("heartbeat rejected", lease, logging.ERROR, status=e.status, error=e.error))))
    if lease.phase == Phase.RUNNING:
        return decision  # its supervisor kills the sandbox, then releases
    return decision.then(_end(flagged.lease, lease.ended or Ending.STOPPED,
                              reason="heartbeat rejected"))


def _beat_failed(lease: Lease | None, e: ev.BeatFailed, c: _Ctx) -> Decision:
    if lease is None:
        return Decision(None)
    since = _since_ok(lease, c.now)
    if since > lease.ttl:
        return _lose(lease, cause="assumed lost: no heartbeat succeeded within the TTL")
    return Decision(lease.but(uncertain=True), (
        fx.Update({"uncertain": True}), fx.Schedule(c.now + RETRY_SECONDS),
        _log("heartbeat failed", lease, logging.WARNING, status=e.status, error=e.error,
             seconds_since_success=round(since, 1))))


# --- stops -------------------------------------------------------------------------------------

def _stop_requested(lease: Lease | None, e: ev.StopRequested, c: _Ctx) -> Decision:
    if lease is None or lease.ended != Ending.NONE or lease.phase == Phase.RELEASING:
        return Decision(lease)
    flagged = _flag_stop(lease, e.kind, e.cause)
    if flagged is None or flagged.lease is None:
        return Decision(lease)
    decision = flagged.then(Decision(flagged.lease, (
        _count("work_stop_requests", cause=e.cause),
        _log("stop requested", lease, kind=e.kind.value, cause=e.cause, seen_by=e.seen_by))))
    if lease.phase == Phase.RUNNING:
        return decision  # its supervisor signals the sandbox
    # Not started yet: revoke the queued task so it never starts, and release now rather than
    # when some worker meets the message (the task then finds no lease and exits).
    return decision.then(_end(flagged.lease, Ending.STOPPED,
                              reason=f"stopped while queued ({e.cause})"))


def _server_stopped(lease: Lease | None, e: ev.ServerStopped, c: _Ctx) -> Decision:
    if lease is None or (lease.lost and lease.server_stopped):
        return Decision(lease)
    return _lose(lease, cause="server stopped", server_stopped=True, seen_by=e.seen_by)


def _operator_revoked(lease: Lease | None, e: ev.OperatorRevoked, c: _Ctx) -> Decision:
    """An operator revoked a session task: stop its work item on the server too."""
    if lease is None or lease.task_id != e.task_id:
        return Decision(lease)  # a stale attempt, or a lease already released
    if lease.phase == Phase.RUNNING:
        if not e.terminated:
            return Decision(lease)  # a running task does not see a plain revoke
        kind = StopKind.FORCE if e.force else StopKind.GRACEFUL
        return _stop_requested(lease, ev.StopRequested(kind, "operator", "revoke"), c)
    flagged = _flag_stop(lease, StopKind.FORCE, "operator") or Decision(lease)
    assert flagged.lease is not None
    return flagged.then(_end(flagged.lease, lease.ended or Ending.STOPPED,
                             reason=f"revoked before start ({lease.stop_cause or 'operator'})"))


# --- the session plane -------------------------------------------------------------------------

def _attempt_starting(lease: Lease | None, e: ev.AttemptStarting, c: _Ctx) -> Decision:
    if lease is None:
        return Decision(None, (fx.Log("attempt skipped", logging.INFO, {
            "attempt": e.attempt, "reason": "lease released"}),))
    if lease.attempt != e.attempt or lease.task_id != e.task_id:
        return Decision(lease, (_log("attempt skipped", lease, attempt_skipped=e.attempt,
                                     reason=f"superseded by attempt {lease.attempt}"),))
    if lease.ended != Ending.NONE or lease.phase == Phase.RELEASING:
        return Decision(lease, (_log("attempt skipped", lease, reason="session already ended"),))
    if lease.lost:
        return _forget(lease, reason="lost before start", outcome="lost")
    if lease.stop != StopKind.NONE:
        return _end(lease, Ending.STOPPED, reason=f"stopped before start ({lease.stop_cause})")
    if e.draining:
        # Celery delivered this just before the drain stopped its consumer: pass it on as is.
        return Decision(lease, (
            _log("attempt passed on", lease, reason="worker draining"),
            fx.Publish(lease.attempt, lease.task_id, lease.queue)))
    changes: dict[str, object] = {"phase": Phase.RUNNING, "worker": e.worker, "pid": e.pid,
                                  "pulse_at": c.now, "task_id": e.task_id}
    return Decision(lease.but(**changes), (fx.MarkRunning(e.attempt, changes),))


def _handing_off(lease: Lease | None, e: ev.HandingOff, c: _Ctx) -> Decision:
    """The sandbox continues the lease with our token: stop beating it (a beat still in flight
    is waited for before the token is read, or the sandbox would present a stale one)."""
    if lease is None:
        return Decision(None)
    changes: dict[str, object] = {"heartbeats_by": Beater.SANDBOX}
    return Decision(lease.but(**changes), (fx.Update(changes), fx.Unschedule()))


def _pulsed(lease: Lease | None, e: ev.Pulsed, c: _Ctx) -> Decision:
    """A running attempt acts on its pulse: a stale attempt kills its own sandbox (fencing);
    an operator's terminate becomes a stop; a stop flag or a drain signals the sandbox."""
    if lease is None:
        return Decision(None)
    if not e.exists or not e.current:
        return Decision(lease, (fx.Signal(StopKind.FORCE), _log(
            "fenced", lease, logging.WARNING,
            reason="a newer attempt owns the lease" if e.exists else "lease released")))
    if e.operator and e.stop == StopKind.NONE:
        return _stop_requested(lease.but(phase=Phase.RUNNING),
                               ev.StopRequested(StopKind.GRACEFUL, "operator", "revoke"), c)
    if e.stop != StopKind.NONE:
        return Decision(lease, (fx.Signal(e.stop),))
    if e.draining:
        return Decision(lease, (fx.Signal(StopKind.GRACEFUL),))
    return Decision(lease)


def _sandbox_start_failed(lease: Lease | None, e: ev.SandboxStartFailed, c: _Ctx) -> Decision:
    if lease is None:
        return Decision(None)
    return Decision(lease, (_log("sandbox not started", lease, logging.ERROR, error=e.error),)
                    ).then(_end(lease, Ending.FAILED, reason="sandbox could not start"))


def _sandbox_exited(lease: Lease | None, e: ev.SandboxExited, c: _Ctx) -> Decision:
    if lease is None or lease.attempt != e.attempt:
        return Decision(lease)  # superseded: the newer attempt owns the lease
    exited = Decision(lease, (_log("exited", lease, exit_code=e.code),))
    if lease.ended != Ending.NONE:
        return exited.then(_release(lease, reason=lease.stop_cause or "ended",
                                    outcome=lease.ended.value))
    if lease.lost:
        # Killed because the lease is someone else's now: an attempt that did not finish.
        failures = lease.failures + 1
        return exited.then(Decision(lease, (fx.RecordHistory(failures, Ending.NONE),))).then(
            _forget(lease, reason=lease.stop_cause or "lease lost", outcome="lost"))
    if lease.stop != StopKind.NONE:
        return exited.then(_end(lease, Ending.STOPPED, reason=f"stopped ({lease.stop_cause})"))
    if e.draining and lease.heartbeats_by == Beater.DISPATCHER:
        return exited.then(_restart(lease, reason="worker drained", failure=False,
                                    task_id=e.next_task_id, now=c.now, policy=c.policy))
    if e.draining:
        # The sandbox held the lease (runner, handoff): its last token died with it, so a new
        # attempt could only be refused (412). End the session instead of stranding it.
        return exited.then(_end(lease, Ending.STOPPED,
                                reason="worker drained; the sandbox held the lease"))
    ending = Ending.COMPLETED if e.code == 0 else Ending.FAILED
    return exited.then(_end(lease, ending,
                            reason="exited" if e.code == 0 else f"exited with {e.code}"))


def _registry_unreachable(lease: Lease | None, e: ev.RegistryUnreachable, c: _Ctx) -> Decision:
    if lease is None or not outage_is_too_long(lease, e.seconds):
        return Decision(lease)
    return Decision(lease, (
        fx.Signal(StopKind.FORCE),
        _log("fenced", lease, logging.WARNING,
             reason=f"registry unreachable for {e.seconds:.0f}s: the lease may lapse")))


def _registry_reset(lease: Lease | None, e: ev.RegistryReset, c: _Ctx) -> Decision:
    """Redis lost everything while this attempt ran: the lease is still ours on the server and
    this sandbox is its only runner. Write it back, with the last token we saw."""
    if lease is not None:
        return Decision(lease)
    back = e.lease.but(phase=Phase.RUNNING, pulse_at=c.now, heartbeat_ok_at=c.now)
    effects: list[fx.Effect] = [fx.CreateRecord(back)]
    if back.heartbeats_by == Beater.DISPATCHER:
        effects.append(fx.Schedule(c.now))
    effects.append(_log("lease re-registered", back, logging.WARNING,
                        reason="registry was reset"))
    return Decision(back, tuple(effects))


# --- recovery ----------------------------------------------------------------------------------

# Supervisors pulse every 0.2 s; 5 s of silence is a dead worker, not a slow Redis call.
PULSE_STALE_SECONDS = 5.0
# A published session task waits in its queue only while the fleet is full or draining.
DISPATCH_STALE_SECONDS = 30.0
# A lease the poller recorded but never published (the poller died in between).
CLAIM_STALE_SECONDS = 30.0
# No lease silent for less than this can be stuck.
QUIET_SECONDS = min(PULSE_STALE_SECONDS, DISPATCH_STALE_SECONDS, CLAIM_STALE_SECONDS)


class Stuck(StrEnum):
    SILENT_ATTEMPT = "silent_attempt"  # running, but its supervisor stopped pulsing
    STRANDED_CLAIM = "stranded_claim"  # recorded, never published
    # Published long ago and never started: lost, if no queue still holds its message.
    QUEUED_TOO_LONG = "queued_too_long"


def stuck(lease: Lease, now: float) -> Stuck | None:
    """How a lease is stuck, if it is, judged on its own record."""
    if lease.phase == Phase.RUNNING and now - lease.pulse_at > PULSE_STALE_SECONDS:
        return Stuck.SILENT_ATTEMPT
    if lease.phase == Phase.CLAIMED and now - lease.claimed_at > CLAIM_STALE_SECONDS:
        return Stuck.STRANDED_CLAIM
    if lease.phase == Phase.DISPATCHED and now - lease.dispatched_at > DISPATCH_STALE_SECONDS:
        return Stuck.QUEUED_TOO_LONG
    return None


def _attempt_silent(lease: Lease | None, e: ev.AttemptSilent, c: _Ctx) -> Decision:
    if lease is None or lease.phase != Phase.RUNNING:
        return Decision(lease)
    return _restart(lease, reason="worker lost (no pulse)", failure=True,
                    task_id=e.next_task_id, now=c.now, policy=c.policy)


def _message_lost(lease: Lease | None, e: ev.MessageLost, c: _Ctx) -> Decision:
    if lease is None or lease.phase != Phase.DISPATCHED:
        return Decision(lease)
    return _restart(lease, reason="session task never started", failure=False,
                    task_id=e.next_task_id, now=c.now, policy=c.policy)


def _claim_stranded(lease: Lease | None, e: ev.ClaimStranded, c: _Ctx) -> Decision:
    if lease is None or lease.phase != Phase.CLAIMED:
        return Decision(lease)
    if lease.lost:
        return _forget(lease, reason="claimed, then lost before dispatch", outcome="lost")
    return _advance_claimed(lease, c)


# --- release and healthchecks ------------------------------------------------------------------

def _release_answered(lease: Lease | None, e: ev.ReleaseAnswered, c: _Ctx) -> Decision:
    if lease is None:
        return Decision(None)
    stopped = lease.but(server_stopped=True)
    return _forget(stopped, reason=stopped.stop_cause or "released",
                   outcome=lease.ended.value or ("lost" if lease.lost else "stopped"))


def _release_due(lease: Lease | None, e: ev.ReleaseDue, c: _Ctx) -> Decision:
    if lease is None or lease.phase != Phase.RELEASING:
        return Decision(lease)
    return _release(lease, reason=lease.stop_cause or "release retried",
                    outcome=lease.ended.value or "stopped")


def _release_failed(lease: Lease | None, e: ev.ReleaseFailed, c: _Ctx) -> Decision:
    """Keep the lease (and keep beating it: a lapsed lease would hand the finished session out
    again) and try the stop again soon."""
    if lease is None:
        return Decision(None, (fx.Log("stop failed", logging.ERROR, {"error": e.error}),))
    changes: dict[str, object] = {"phase": Phase.RELEASING,
                                  "release_attempts": lease.release_attempts + 1}
    retrying = lease.but(**changes)
    flagged = _flag_stop(retrying, StopKind.FORCE, "releasing") or Decision(retrying)
    return Decision(retrying, (fx.Update(changes),)).then(flagged).then(Decision(
        flagged.lease, (
            # Sooner only: postponing a due beat of a lease we still hold would let it lapse.
            fx.Schedule(c.now + RELEASE_RETRY_SECONDS, sooner_only=True),
            _log("release deferred", lease, logging.WARNING, status=e.status, error=e.error,
                 release_attempts=retrying.release_attempts))))


def _release_rejected(lease: Lease | None, e: ev.ReleaseRejected, c: _Ctx) -> Decision:
    if lease is None:
        return Decision(None, (fx.Log("stop failed", logging.ERROR, {"error": e.error}),))
    return Decision(lease, (
        _log("release refused", lease, logging.ERROR, status=e.status, error=e.error),
    )).then(_forget(lease, reason="release refused", outcome=lease.ended.value or "stopped"))


def _healthcheck_answered(lease: Lease | None, e: ev.HealthcheckAnswered,
                          c: _Ctx) -> Decision:
    if lease is None:
        return Decision(None)
    return Decision(lease, (
        _log("healthcheck answered", lease, logging.INFO if e.healthy else logging.WARNING,
             healthy=e.healthy, **dict(e.results)),
        _count("healthchecks", healthy=str(e.healthy).lower()),
    )).then(_end(lease, Ending.HEALTHCHECK, reason="healthcheck answered"))


_HANDLERS: dict[type, Callable[[Any, Any, _Ctx], Decision]] = {
    ev.Offered: _offered, ev.AckAnswered: _acked, ev.AckUncertain: _acked,
    ev.AckRefused: _ack_refused, ev.ClaimAnswered: _claim_answered,
    ev.ClaimRefused: _claim_refused, ev.ClaimNotAcked: _claim_not_acked,
    ev.ClaimFailed: _claim_failed, ev.BeatAnswered: _beat_answered,
    ev.BeatRefused: _beat_refused, ev.BeatNotFound: _beat_not_found,
    ev.BeatRejected: _beat_rejected, ev.BeatFailed: _beat_failed,
    ev.StopRequested: _stop_requested, ev.ServerStopped: _server_stopped,
    ev.OperatorRevoked: _operator_revoked, ev.AttemptStarting: _attempt_starting,
    ev.HandingOff: _handing_off, ev.Pulsed: _pulsed,
    ev.SandboxStartFailed: _sandbox_start_failed, ev.SandboxExited: _sandbox_exited,
    ev.RegistryUnreachable: _registry_unreachable, ev.RegistryReset: _registry_reset,
    ev.AttemptSilent: _attempt_silent,
    ev.MessageLost: _message_lost, ev.ClaimStranded: _claim_stranded,
    ev.ReleaseAnswered: _release_answered, ev.ReleaseDue: _release_due,
    ev.ReleaseFailed: _release_failed,
    ev.ReleaseRejected: _release_rejected, ev.HealthcheckAnswered: _healthcheck_answered,
}


@dataclass(frozen=True)
class Rule:
    """One row of the rule table: in `phases`, `event` leads to `outcome`."""

    event: str
    phases: str
    outcome: str
    effects: list[str] = field(default_factory=list)


# The table docs/architecture.md shows (generated by `dispatcher docs`); tests/unit/
# test_lease_machine.py checks each row against `decide`.
RULES: list[Rule] = []
