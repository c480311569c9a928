"""Rules for events of a lease in its running life: stops both ways, the session plane (an
attempt starting, pulsing, exiting), recovery of stuck leases, and release."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from enum import StrEnum

from dispatcher.lease import effects as fx
from dispatcher.lease import events as ev
from dispatcher.lease.causes import LossCause, Outcome, Release, RestartReason, SeenBy, StopCause
from dispatcher.lease.machine.examples import RELEASING, RUNNING, Scenario
from dispatcher.lease.machine.steps import (
    RELEASE_RETRY_SECONDS,
    Ctx,
    Decision,
    Plan,
    advance_claimed,
    count,
    end,
    flag_stop,
    forget,
    is_over,
    log,
    lose,
    outage_is_too_long,
    proven_ours,
    release,
    request_stop,
    restart,
    schedule,
)
from dispatcher.lease.model import Ending, Heartbeater, Lease, Phase, StopKind

# --- stops -------------------------------------------------------------------------------------

def on_stop_requested(lease: Lease, e: ev.StopRequested, c: Ctx) -> Decision:
    p = Plan(lease)
    request_stop(p, e.kind, e.cause, e.seen_by)
    return p.decided()


def on_server_stopped(lease: Lease, e: ev.ServerStopped, c: Ctx) -> Decision:
    p = Plan(lease)
    if not (lease.lost and lease.server_stopped):
        lose(p, cause=LossCause.SERVER_STOPPED, server_stopped=True, action="lease lost",
             seen_by=e.seen_by)
    return p.decided()


def on_operator_revoked(lease: Lease, e: ev.OperatorRevoked, c: Ctx) -> Decision:
    """An operator revoked a session task: stop its work item on the server too."""
    p = Plan(lease)
    if lease.task_id != e.task_id or is_over(lease):
        pass  # a stale attempt, or a session already over
    elif lease.phase == Phase.RUNNING:
        if e.terminated:  # a running task does not see a plain revoke
            kind = StopKind.FORCE if e.force else StopKind.GRACEFUL
            request_stop(p, kind, StopCause.OPERATOR, SeenBy.REVOKE)
    else:
        flag_stop(p, StopKind.FORCE, StopCause.OPERATOR)
        end(p, lease.ended or Ending.STOPPED)
    return p.decided()


# --- the session plane -------------------------------------------------------------------------

# An attempt whose lease is not yet proven ours waits this long for the proof's mark, then reads
# its record again: the ack's answer wakes it at once; a lease proven by a later claim or
# heartbeat (an ack never answered) leaves no mark, and is seen at the next read.
PROOF_WAIT_SECONDS = 0.25

def on_attempt_starting(lease: Lease | None, e: ev.AttemptStarting, c: Ctx) -> Decision:
    """An attempt about to start its sandbox takes the lease, or learns why it may not (its
    task's result)."""
    if lease is None:
        return Decision(None, (fx.AttemptOver(Outcome.GONE), fx.Log(
            "attempt skipped", logging.INFO, {"attempt": e.attempt, "reason": "lease released"})))
    p = Plan(lease)
    if lease.attempt != e.attempt or lease.task_id != e.task_id:
        p.add(fx.AttemptOver(Outcome.SUPERSEDED),
              log("attempt skipped", lease, attempt_skipped=e.attempt,
                  reason=f"superseded by attempt {lease.attempt}"))
    elif is_over(lease):
        p.add(fx.AttemptOver(Outcome.GONE),
              log("attempt skipped", lease, reason="session already ended"))
    elif lease.lost:
        p.add(fx.AttemptOver(Outcome.LOST))
        forget(p, outcome=Release.LOST)
    elif lease.stop != StopKind.NONE:
        p.add(fx.AttemptOver(Outcome.STOPPED))
        end(p, Ending.STOPPED)
    elif e.draining:
        # Celery delivered this just before the drain stopped its consumer: pass it on as is.
        p.add(fx.AttemptOver(Outcome.HANDED_OVER),
              log("attempt passed on", lease, reason="worker draining"),
              fx.Publish(lease.attempt, lease.task_id, lease.queue))
    elif lease.heartbeats_by == Heartbeater.DISPATCHER and not proven_ours(lease):
        _await_proof(p, c, fx.MarkRunning(e.attempt, _running(lease, e, c)))
    else:
        changes = _running(lease, e, c)
        p.assume(**changes)
        p.add(fx.MarkRunning(e.attempt, changes))
    return p.decided()


def _running(lease: Lease, e: ev.AttemptStarting, c: Ctx) -> dict[str, object]:
    """The fields an attempt that takes the lease sets."""
    return {"phase": Phase.RUNNING, "worker": e.worker, "pid": e.pid, "pulse_at": c.now,
            "task_id": e.task_id, "started_at": lease.started_at or c.now}


# What an attempt's start reads of its lease (`on_attempt_starting`), besides the proof: an
# attempt that waits for the proof takes the lease in the wait's round trip only while these
# are as it read them.
START_READS = ("attempt", "task_id", "phase", "stop", "lost", "ended", "heartbeats_by")


def _await_proof(p: Plan, c: Ctx, run: fx.MarkRunning) -> None:
    """A session published while its ack was in flight: it starts once the server answered the
    ack or a claim, never before (a rival may hold the item). The wait's round trip takes the
    lease (`run`) once the record is proven (`heartbeat_ok_at` no longer the unproven one read)
    and otherwise as read; anything else is decided again on the record. Unproven for a whole
    TTL, the lease may have lapsed to another holder: it is lost, and the attempt never
    starts."""
    lease = p.held
    if c.now - lease.claimed_at <= lease.ttl:
        p.add(fx.AwaitProof(PROOF_WAIT_SECONDS, run=run,
                            expected={name: getattr(lease, name) for name in START_READS},
                            awaited={"heartbeat_ok_at": lease.heartbeat_ok_at}))
        return
    p.add(fx.AttemptOver(Outcome.LOST))
    lose(p, cause=LossCause.ASSUMED_LOST, action="never proven ours",
         action_taken="the attempt never started")


def on_handing_off(lease: Lease, e: ev.HandingOff, c: Ctx) -> Decision:
    """The sandbox continues the lease with our token: stop heartbeating it (a heartbeat still in
    flight is waited for before the token is read, or the sandbox would present a stale one)."""
    p = Plan(lease)
    p.change(heartbeats_by=Heartbeater.SANDBOX)
    p.add(fx.Unschedule())
    return p.decided()


def on_pulsed(lease: Lease, e: ev.Pulsed, c: Ctx) -> Decision:
    """A running attempt acts on its pulse: a stale attempt kills its own sandbox (fencing);
    an operator's terminate becomes a stop; a stop flag or a drain signals the sandbox."""
    if pulse_is_quiet(lease, e):
        return Decision(lease)
    p = Plan(lease)
    if not e.exists or not e.current or lease.attempt != e.attempt:
        p.add(fx.Fence(), fx.AttemptOver(Outcome.SUPERSEDED), log(
            "fenced", lease, logging.WARNING, attempt=e.attempt,
            reason="a newer attempt owns the lease" if e.exists else "lease released"))
    elif e.operator and e.stop == StopKind.NONE:
        p.assume(phase=Phase.RUNNING)
        request_stop(p, StopKind.GRACEFUL, StopCause.OPERATOR, SeenBy.REVOKE)
    elif e.stop != StopKind.NONE:
        p.add(fx.Signal(e.stop))
    elif e.draining:
        p.add(fx.Signal(StopKind.GRACEFUL))
    return p.decided()


def pulse_is_quiet(lease: Lease, e: ev.Pulsed) -> bool:
    """A pulse that asks nothing of its attempt: the lease is still its own, with no stop, no
    operator's terminate and no drain. `on_pulsed` decides nothing on it, so the supervision
    hub (`session/supervision.py`) need not wake the attempt for it: the cost of a session
    at rest."""
    return (e.exists and e.current and lease.attempt == e.attempt and not e.operator
            and e.stop == StopKind.NONE and not e.draining)


def stale(lease: Lease, attempt: int) -> bool:
    """Whether an event of the session plane comes from an attempt that no longer holds the
    lease: superseded by a newer attempt. Such an event decides nothing."""
    return lease.attempt != attempt


def ignored(lease: Lease | None, e: ev.Event, attempt: int) -> Decision:
    """A superseded attempt's event: its attempt is over, and the lease is left as it is for
    the attempt that owns it (a stale start failure once ended a running session)."""
    current = lease.attempt if lease is not None else None
    return Decision(lease, (fx.AttemptOver(Outcome.SUPERSEDED), fx.Log(
        "stale event ignored", logging.WARNING,
        {"work_id": lease.work_id if lease is not None else "", "event": type(e).__name__,
         "attempt": attempt, "current_attempt": current})))


def on_sandbox_start_failed(lease: Lease, e: ev.SandboxStartFailed, c: Ctx) -> Decision:
    if stale(lease, e.attempt):
        return ignored(lease, e, e.attempt)
    p = Plan(lease)
    p.add(fx.AttemptOver(Outcome.FAILED),
          log("sandbox not started", lease, logging.ERROR, error=e.error))
    end(p, Ending.FAILED)
    return p.decided()


def on_deadline_checked(lease: Lease, e: ev.DeadlineChecked, c: Ctx) -> Decision:
    """Asked each supervisor tick: a session past its maximum duration is stopped gracefully
    (SIGTERM, the grace, SIGKILL), as a server's stop would be: its sandbox's exit then ends it
    `stopped` and its item is stopped on the server. Judged on the record's `started_at`, the
    first attempt's start, not on the supervisor's memory, so a restarted session gets no fresh
    allowance."""
    if stale(lease, e.attempt):
        return ignored(lease, e, e.attempt)
    p = Plan(lease)
    ran = c.now - (lease.started_at or lease.claimed_at)
    if lease.phase == Phase.RUNNING and lease.stop == StopKind.NONE and not is_over(lease) \
            and ran >= e.limit_seconds:
        p.add(log("deadline reached", lease, logging.WARNING, limit_seconds=e.limit_seconds,
                  ran_seconds=round(ran, 1)))
        request_stop(p, StopKind.GRACEFUL, StopCause.DEADLINE, SeenBy.SUPERVISOR)
    return p.decided()


def on_sandbox_infra_failed(lease: Lease, e: ev.SandboxInfraFailed, c: Ctx) -> Decision:
    """The infrastructure, not the session, kept the sandbox from starting: a new attempt, not
    counted against the limit, on whichever worker is free (the failed one withdrew its slots
    if its engine is down); a stop or a lost lease wins as for any restart."""
    if stale(lease, e.attempt):
        return ignored(lease, e, e.attempt)
    p = Plan(lease)
    p.add(fx.AttemptOver(Outcome.HANDED_OVER),
          log("sandbox not started", lease, logging.WARNING, error=e.error,
              cause="infrastructure", action_taken="attempt restarted, not counted"))
    restart(p, reason=RestartReason.INFRASTRUCTURE, failure=False, task_id=e.next_task_id,
            c=c)
    return p.decided()


def on_sandbox_exited(lease: Lease | None, e: ev.SandboxExited, c: Ctx) -> Decision:
    if lease is None or stale(lease, e.attempt):
        # Released, or superseded: the newer attempt owns the lease.
        return ignored(lease, e, e.attempt)
    p = Plan(lease)
    p.add(log("exited", lease, exit_code=e.code))
    _exited(p, lease, e, c)
    # First: the result stands even if a guarded write of the rest finds the lease moved on.
    p.effects.insert(0, fx.AttemptOver(_exit_outcome(lease, p.lease, e.code)))
    return p.decided()


def _exit_outcome(before: Lease, after: Lease | None, code: int) -> Outcome:
    """How an attempt whose sandbox exited ended, for its task's result."""
    if before.lost:
        return Outcome.LOST
    if before.stop != StopKind.NONE:
        return Outcome.STOPPED
    if after is not None and after.attempt != before.attempt:
        return Outcome.HANDED_OVER
    if after is not None and after.ended == Ending.STOPPED:
        return Outcome.STOPPED
    return Outcome.COMPLETED if code == 0 else Outcome.FAILED


def _exited(p: Plan, lease: Lease, e: ev.SandboxExited, c: Ctx) -> None:
    """What becomes of the lease of an attempt whose sandbox exited."""
    if is_over(lease):
        release(p, outcome=Release.ending(lease.ended, otherwise=Release.STOPPED))
    elif lease.lost and e.code == 0 and not e.draining:
        # It finished before the kill landed: the session is done, and its item is stopped
        # whoever holds the lease now, or it would run again.
        end(p, Ending.COMPLETED)
    elif lease.lost:
        # Killed because the lease is someone else's now: an attempt that did not finish.
        p.add(fx.RecordHistory(lease.failures + 1, Ending.NONE))
        forget(p, outcome=Release.LOST)
    elif lease.stop != StopKind.NONE:
        end(p, Ending.STOPPED)
    elif e.draining and lease.heartbeats_by == Heartbeater.DISPATCHER:
        restart(p, reason=RestartReason.WORKER_DRAINED, failure=False, task_id=e.next_task_id,
                c=c)
    elif e.draining:
        # The sandbox held the lease (runner, handoff): its last token died with it, so a new
        # attempt could only be refused (412). End the session instead of stranding it.
        end(p, Ending.STOPPED)
    else:
        end(p, Ending.COMPLETED if e.code == 0 else Ending.FAILED)


def on_release_awaited(lease: Lease | None, e: ev.ReleaseAwaited, c: Ctx) -> Decision:
    """An attempt whose sandbox exited leaves once its lease is released, or no longer its own.
    While its release is still failing it stays: it alone could write the record back if Redis
    restarted empty, and without it the release's retries and the item's ending would be lost,
    and the finished session run again. A record gone with Redis is written back first."""
    if (lease is None and not e.registry_reset) or (lease is not None
                                                    and lease.attempt != e.attempt):
        return Decision(lease, (fx.AttemptOver(e.outcome),))
    return Decision(lease)


def on_registry_unreachable(lease: Lease, e: ev.RegistryUnreachable, c: Ctx) -> Decision:
    if not outage_is_too_long(lease, e.seconds):
        return Decision(lease)
    return Decision(lease, (
        fx.Fence(), fx.AttemptOver(Outcome.LOST),
        log("fenced", lease, logging.WARNING,
            reason=f"registry unreachable for {e.seconds:.0f}s: the lease may lapse")))


def on_registry_reset(lease: Lease | None, e: ev.RegistryReset, c: Ctx) -> Decision:
    """Redis lost everything while this attempt ran or released: the lease is still ours on the
    server and this supervisor its only keeper. Write it back, with the last token we saw,
    marked uncertain: a heartbeat answered after the attempt's last pulse (0.2 s before) changed the
    token unseen, and its 412 is then adopted like a lost reply's. The supervisor kills its
    sandbox if the outage outlasts two thirds of the TTL, so a lease it writes back is still
    ours. A session that already ended is written back ending, its history with it, so that its
    release is tried again and a re-delivery of its item is stopped, not run."""
    if lease is not None:
        return Decision(lease)
    if is_over(e.lease):
        back = e.lease.but(phase=Phase.RELEASING, heartbeat_ok_at=c.now, uncertain=True)
    else:
        back = e.lease.but(phase=Phase.RUNNING, pulse_at=c.now, heartbeat_ok_at=c.now,
                           uncertain=True)
    p = Plan(back)
    p.add(fx.CreateRecord(back))
    if is_over(back):
        p.add(fx.RecordHistory(back.failures, back.ended))
    if back.heartbeats_by == Heartbeater.DISPATCHER or is_over(back):
        schedule(p, c.now)
    p.add(log("lease re-registered", back, logging.WARNING, reason="registry was reset"))
    return p.decided()


# --- recovery ----------------------------------------------------------------------------------

# Supervisors pulse every 0.2 s; this much silence is a dead or cut-off worker, not a slow Redis
# call. It must exceed `steps.SELF_FENCE_SECONDS` by enough for a cut-off supervisor to have
# killed its sandbox (a tick of its fence, the kill, a loaded host) before another attempt of
# the session starts: 5 s of margin. It also outlasts Redis's socket timeout (5 s), so one
# slow call cannot make a healthy attempt look silent.
PULSE_STALE_SECONDS = 8.0
# A published session task waits in its queue only while the fleet is full or draining.
DISPATCH_STALE_SECONDS = 30.0
# A session message gone from its Redis queue and never received: a worker takes it (BRPOP)
# and notes it (`task_received`) a few ms apart. Seen gone this long and still not received, the
# worker died in between. A starved worker is slow here, never by seconds.
MISSING_CONFIRM_SECONDS = 5.0
# A lease the poller recorded but never published (the poller died in between).
CLAIM_STALE_SECONDS = 30.0
# No lease silent for less than this can be stuck.
QUIET_SECONDS = min(PULSE_STALE_SECONDS, DISPATCH_STALE_SECONDS, CLAIM_STALE_SECONDS)


class Stuck(StrEnum):
    SILENT_ATTEMPT = "silent_attempt"  # running, but its supervisor stopped pulsing
    STRANDED_CLAIM = "stranded_claim"  # recorded, never published
    # Published long ago and never started: lost, if `message_lost` says so.
    QUEUED_TOO_LONG = "queued_too_long"


@dataclass(frozen=True)
class Delivery:
    """Where a session task's message went, as recorded in Redis on either broker
    (`lease/deliveries.py`): published once the broker took it, received by a worker; and on a
    Redis broker, since when recovery has not found it in its queue (None: found there, or the
    broker cannot be looked into)."""

    published: bool
    received_at: float | None = None
    received_by: str = ""
    missing_since: float | None = None


def message_lost(delivery: Delivery, now: float) -> bool:
    """Whether a session message dispatched long ago (`Stuck.QUEUED_TOO_LONG`) is lost.

    Never received: it waits in its queue while the fleet is full; lost if the broker never
    took it (the publish failed), or if it has been missing from its Redis queue for
    `MISSING_CONFIRM_SECONDS`: a worker took it and died before noting it (kombu's Redis
    transport pops a message, then records it unacknowledged, then Celery announces it; an
    unacknowledged one comes back only after kombu's visibility timeout, an hour). RabbitMQ
    gives a dead consumer's message back to its queue by itself. Received but still not started
    `DISPATCH_STALE_SECONDS` later: its worker died after taking it (an early-acked message is
    gone with it), or holds it behind a full pool (RabbitMQ delivers ahead, `celery/amqp.py`).
    Either way a new attempt goes to whichever worker is free, and the old message, if it ever
    starts, finds its attempt superseded and never starts the sandbox.
    """
    if delivery.received_at is not None:
        return now - delivery.received_at > DISPATCH_STALE_SECONDS
    if not delivery.published:
        return True
    return (delivery.missing_since is not None
            and now - delivery.missing_since > MISSING_CONFIRM_SECONDS)


def last_seen(lease: Lease) -> float:
    """A lease's last sign of progress in its phase: its attempt's last pulse while running, its
    dispatch while queued, its claim before that. The registry indexes every lease by it, so
    recovery reads only the leases silent long enough to be `stuck`."""
    if lease.phase == Phase.RUNNING:
        return lease.pulse_at
    if lease.phase == Phase.DISPATCHED:
        return lease.dispatched_at
    if lease.phase == Phase.CLAIMED:
        return lease.claimed_at
    return max(lease.claimed_at, lease.dispatched_at, lease.pulse_at)


def stuck(lease: Lease, now: float) -> Stuck | None:
    """How a lease is stuck, if it is, judged on its own record."""
    silent = now - last_seen(lease)
    if lease.phase == Phase.RUNNING and silent > PULSE_STALE_SECONDS:
        return Stuck.SILENT_ATTEMPT
    if lease.phase == Phase.CLAIMED and silent > CLAIM_STALE_SECONDS:
        return Stuck.STRANDED_CLAIM
    if lease.phase == Phase.DISPATCHED and silent > DISPATCH_STALE_SECONDS:
        return Stuck.QUEUED_TOO_LONG
    return None


class Claim(StrEnum):
    """Whether a sandbox found running (a container) belongs to its lease's current attempt."""

    OWNED = "owned"  # the lease's current attempt, running
    SUPERSEDED = "superseded"  # a newer attempt took the lease: kill it now
    # No lease, or its attempt is not running (yet, or any more): kill it if that lasts.
    UNCLAIMED = "unclaimed"


def claim_of(lease: Lease | None, attempt: int) -> Claim:
    """Whose a sandbox of attempt `attempt` is, by its lease's record (None: no record)."""
    if lease is not None and lease.attempt > attempt:
        return Claim.SUPERSEDED
    if lease is None or lease.attempt != attempt or lease.phase != Phase.RUNNING:
        return Claim.UNCLAIMED
    return Claim.OWNED


def on_attempt_silent(lease: Lease, e: ev.AttemptSilent, c: Ctx) -> Decision:
    p = Plan(lease)
    if lease.phase != Phase.RUNNING:
        pass
    elif _left_to_lapse(lease, c):
        # The dead sandbox held the lease (runner, handoff): its token died with it, and a new
        # attempt's runner would claim with NO_HEARTBEAT, which the server refuses on a lease
        # somebody heartbeated (412): it would exit at once, and its exit would end the session
        # unfinished. Instead the item is left to the server, as it is when an official worker
        # dies: the lease lapses one TTL after the dead runner's last heartbeat, and the item is
        # delivered again, then claimed afresh (the failure counted), or ended, where a lapse
        # ends an item (SDK 2.17's model).
        failures = lease.failures + 1
        p.add(fx.RecordHistory(failures, Ending.NONE),
              count("leases_lost", cause=LossCause.SANDBOX_GONE),
              log("attempt lost with its lease", lease, logging.WARNING,
                  reason=RestartReason.WORKER_LOST,
                  action_taken="left to lapse on the server; claimed afresh if delivered again"))
        forget(p, outcome=Release.LOST)
    else:
        restart(p, reason=RestartReason.WORKER_LOST, failure=True, task_id=e.next_task_id,
                c=c)
    return p.decided()


def _left_to_lapse(lease: Lease, c: Ctx) -> bool:
    """A silent attempt whose sandbox held the lease, of a session that may still run: not
    stopped, not over, its attempts not used up (each of which `restart` ends instead)."""
    return (lease.heartbeats_by == Heartbeater.SANDBOX and not lease.lost
            and lease.stop == StopKind.NONE and not is_over(lease)
            and lease.failures + 1 < c.policy.max_attempts)


def on_message_lost(lease: Lease, e: ev.MessageLost, c: Ctx) -> Decision:
    p = Plan(lease)
    if lease.phase == Phase.DISPATCHED:
        restart(p, reason=RestartReason.TASK_NEVER_STARTED, failure=False,
                task_id=e.next_task_id, c=c)
    return p.decided()


def on_claim_stranded(lease: Lease, e: ev.ClaimStranded, c: Ctx) -> Decision:
    p = Plan(lease)
    if lease.phase != Phase.CLAIMED:
        pass
    elif lease.lost:
        forget(p, outcome=Release.LOST)
    elif lease.heartbeats_by == Heartbeater.DISPATCHER and not proven_ours(lease):
        # Never answered as ours: not published, but claimed again by the heartbeat task.
        schedule(p, c.now)
    else:
        advance_claimed(p, c)
    return p.decided()


# --- release and healthchecks ------------------------------------------------------------------

def on_release_answered(lease: Lease, e: ev.ReleaseAnswered, c: Ctx) -> Decision:
    p = Plan(lease.but(server_stopped=True))
    forget(p, outcome=Release.ending(
        lease.ended, otherwise=Release.LOST if lease.lost else Release.STOPPED))
    return p.decided()


def on_release_due(lease: Lease, e: ev.ReleaseDue, c: Ctx) -> Decision:
    p = Plan(lease)
    if lease.phase == Phase.RELEASING:
        release(p, outcome=Release.ending(lease.ended, otherwise=Release.STOPPED))
    return p.decided()


def on_release_failed(lease: Lease, e: ev.ReleaseFailed, c: Ctx) -> Decision:
    """Keep the lease (and keep heartbeating it: a lapsed lease would hand the finished session out
    again) and try the stop again soon."""
    p = Plan(lease)
    flag_stop(p, StopKind.FORCE, StopCause.RELEASING)
    p.change(phase=Phase.RELEASING, release_attempts=lease.release_attempts + 1)
    # Sooner only while we heartbeat it: postponing a due heartbeat of a lease we hold would let it
    # lapse. A lost lease gets no heartbeat, so nothing else would ever bring it due again.
    schedule(p, c.now + RELEASE_RETRY_SECONDS, sooner_only=not lease.lost)
    p.add(log("release deferred", lease, logging.WARNING, status=e.status, error=e.error,
              release_attempts=lease.release_attempts + 1))
    return p.decided()


def on_release_rejected(lease: Lease, e: ev.ReleaseRejected, c: Ctx) -> Decision:
    p = Plan(lease)
    p.add(log("release refused", lease, logging.ERROR, status=e.status, error=e.error))
    forget(p, outcome=Release.ending(lease.ended, otherwise=Release.STOPPED))
    return p.decided()


def on_release_unauthorized(lease: Lease | None, e: ev.ReleaseUnauthorized,
                            c: Ctx) -> Decision:
    """A stop sent as a delivery's sessions token was refused (401), or had no token to send:
    the item may be another worker's by now, so it is stopped gracefully with the environment
    key, as SDK 2.17's poller does. A holder, if there is one, is told to stop and winds down
    (its heartbeats answer `lease_extended: false`) instead of being killed mid-session; an item
    nobody holds stops at once. The lease, if recorded, is released once this is answered."""
    p = Plan(lease)
    p.add(log("stop token refused", lease, logging.WARNING, status=e.status,
              action_taken="stopped gracefully with the environment key"),
          fx.StopOnServer(force=False, as_=fx.StopAs.ENVIRONMENT_KEY))
    return p.decided()


def on_stop_failed_unrecorded(e: ev.ReleaseFailed | ev.ReleaseRejected) -> Decision:
    """A stop of an item we keep no record of (one refused at the poll) failed: the server's
    lease expiry ends it."""
    return Decision(None, (fx.Log("stop failed", logging.ERROR, {"error": e.error}),))


def on_healthcheck_answered(lease: Lease, e: ev.HealthcheckAnswered, c: Ctx) -> Decision:
    p = Plan(lease)
    p.add(log("healthcheck answered", lease, logging.INFO if e.healthy else logging.WARNING,
              healthy=e.healthy, **dict(e.results)),
          count("healthchecks", healthy=str(e.healthy).lower()))
    end(p, Ending.HEALTHCHECK)
    return p.decided()


# --- the rule table's examples of these events -------------------------------------------------

SCENARIOS = [
    Scenario("claim stranded, ack unanswered",
             ev.ClaimStranded(),
             phases=("claimed",), unproven=True),
    Scenario("stop requested (server)",
             ev.StopRequested(StopKind.GRACEFUL, StopCause.SERVER, SeenBy.BRIDGE)),
    Scenario("stop requested (force)",
             ev.StopRequested(StopKind.FORCE, StopCause.OPERATOR, SeenBy.REVOKE)),
    Scenario("server lists it stopped", ev.ServerStopped(SeenBy.BRIDGE)),
    Scenario("operator terminated the task",
             ev.OperatorRevoked("task-1", terminated=True, force=False)),
    Scenario("operator revoked the task",
             ev.OperatorRevoked("task-1", terminated=False, force=False)),
    Scenario("attempt starting", ev.AttemptStarting(1, "task-1", "w1", 42, draining=False)),
    Scenario("attempt starting, ack in flight",
             ev.AttemptStarting(1, "task-1", "w1", 42, draining=False),
             phases=("dispatched",), unproven=True),
    Scenario("attempt starting, worker draining",
             ev.AttemptStarting(1, "task-1", "w1", 42, draining=True)),
    Scenario("handing off to the sandbox", ev.HandingOff()),
    *(Scenario(name, ev.Pulsed(attempt, exists=True, current=current, stop=stop,
                               draining=draining, operator=False))
      for name, attempt, current, stop, draining in (
          ("pulsed", 1, True, StopKind.NONE, False),
          ("pulsed, superseded", 1, False, StopKind.NONE, False),
          ("pulsed, stale attempt", 0, True, StopKind.NONE, False),
          ("pulsed, stop flagged", 1, True, StopKind.GRACEFUL, False),
          ("pulsed, worker draining", 1, True, StopKind.NONE, True))),
    Scenario("sandbox could not start", ev.SandboxStartFailed(1, "not found")),
    Scenario("a stale attempt's sandbox could not start", ev.SandboxStartFailed(0, "not found")),
    Scenario("session past its deadline", ev.DeadlineChecked(1, 5.0)),
    Scenario("a superseded attempt's deadline", ev.DeadlineChecked(0, 5.0), phases=("running",)),
    Scenario("sandbox not started (infrastructure)",
             ev.SandboxInfraFailed(1, "engine down", next_task_id="task-2")),
    Scenario("a stale attempt's sandbox not started (infrastructure)",
             ev.SandboxInfraFailed(0, "engine down", next_task_id="task-2")),
    Scenario("a stale attempt's sandbox exited 1",
             ev.SandboxExited(0, 1, draining=False, next_task_id="task-2")),
    Scenario("sandbox exited 0", ev.SandboxExited(1, 0, draining=False, next_task_id="task-2")),
    Scenario("sandbox exited 1", ev.SandboxExited(1, 1, draining=False, next_task_id="task-2")),
    Scenario("sandbox exited, worker draining",
             ev.SandboxExited(1, 143, draining=True, next_task_id="task-2")),
    Scenario("registry unreachable past 2/3 TTL", ev.RegistryUnreachable(25.0)),
    Scenario("an exited attempt awaits its release",
             ev.ReleaseAwaited(1, Outcome.COMPLETED, False)),
    Scenario("an exited attempt awaits its release, Redis reset",
             ev.ReleaseAwaited(1, Outcome.COMPLETED, registry_reset=True)),
    Scenario("a superseded exited attempt awaits its release",
             ev.ReleaseAwaited(0, Outcome.COMPLETED, False)),
    Scenario("attempt went silent", ev.AttemptSilent("task-2")),
    Scenario("attempt went silent, the sandbox held the lease", ev.AttemptSilent("task-2"),
             phases=("running",), sandbox_held=True),
    Scenario("message lost", ev.MessageLost("task-2")),
    Scenario("claim stranded", ev.ClaimStranded(), phases=("claimed", "dispatched")),
    Scenario("release answered (2xx, 404, 409)", ev.ReleaseAnswered(200)),
    Scenario("release due again", ev.ReleaseDue()),
    Scenario("release failed (transient)", ev.ReleaseFailed(503, "unavailable")),
    Scenario("release refused (4xx)", ev.ReleaseRejected(403, "forbidden")),
    # Only a lease's release or a polled item is stopped as a delivery's token.
    Scenario("stop token refused (401, or no token)", ev.ReleaseUnauthorized(401),
             phases=("none", "releasing")),
    Scenario("sandbox exited 0, lease lost",
             ev.SandboxExited(1, 0, draining=False, next_task_id="task-2"),
             phases=("running",), lost=True),
    Scenario("sandbox exited 0, the sandbox held the lease",
             ev.SandboxExited(1, 0, draining=False, next_task_id="task-2"),
             phases=("running",), sandbox_held=True),
    Scenario("release due again, lease lost", ev.ReleaseDue(), phases=("releasing",), lost=True),
    Scenario("healthcheck answered", ev.HealthcheckAnswered(True, (("redis", "ok"),))),
    Scenario("registry reset", ev.RegistryReset(RUNNING), phases=("none",)),
    Scenario("registry reset, session ended", ev.RegistryReset(RELEASING), phases=("none",)),
]
