"""Rules for events of a lease in its running life: stops both ways, the session plane (an
attempt starting, pulsing, exiting), recovery of stuck leases, and release."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from dispatcher.lease import effects as fx
from dispatcher.lease import events as ev
from dispatcher.lease.machine.steps import (
    RELEASE_RETRY_SECONDS,
    Ctx,
    Decision,
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
    restart,
    stop_requested,
)
from dispatcher.lease.model import Beater, Ending, Lease, Phase, StopKind

# --- stops -------------------------------------------------------------------------------------

def _server_stopped(lease: Lease | None, e: ev.ServerStopped, c: Ctx) -> Decision:
    if lease is None or (lease.lost and lease.server_stopped):
        return Decision(lease)
    return lose(lease, cause="server stopped", server_stopped=True, action="lease lost",
                 seen_by=e.seen_by)


def _operator_revoked(lease: Lease | None, e: ev.OperatorRevoked, c: Ctx) -> Decision:
    """An operator revoked a session task: stop its work item on the server too."""
    if lease is None or lease.task_id != e.task_id or is_over(lease):
        return Decision(lease)  # a stale attempt, or a session already over
    if lease.phase == Phase.RUNNING:
        if not e.terminated:
            return Decision(lease)  # a running task does not see a plain revoke
        kind = StopKind.FORCE if e.force else StopKind.GRACEFUL
        return stop_requested(lease, ev.StopRequested(kind, "operator", "revoke"), c)
    flagged = flag_stop(lease, StopKind.FORCE, "operator") or Decision(lease)
    assert flagged.lease is not None
    return flagged.then(end(flagged.lease, lease.ended or Ending.STOPPED,
                             reason=f"revoked before start ({lease.stop_cause or 'operator'})"))


# --- the session plane -------------------------------------------------------------------------

def _attempt_starting(lease: Lease | None, e: ev.AttemptStarting, c: Ctx) -> Decision:
    if lease is None:
        return Decision(None, (fx.Log("attempt skipped", logging.INFO, {
            "attempt": e.attempt, "reason": "lease released"}),))
    if lease.attempt != e.attempt or lease.task_id != e.task_id:
        return Decision(lease, (log("attempt skipped", lease, attempt_skipped=e.attempt,
                                     reason=f"superseded by attempt {lease.attempt}"),))
    if is_over(lease):
        return Decision(lease, (log("attempt skipped", lease, reason="session already ended"),))
    if lease.lost:
        return forget(lease, reason="lost before start", outcome="lost")
    if lease.stop != StopKind.NONE:
        return end(lease, Ending.STOPPED, reason=f"stopped before start ({lease.stop_cause})")
    if e.draining:
        # Celery delivered this just before the drain stopped its consumer: pass it on as is.
        return Decision(lease, (
            log("attempt passed on", lease, reason="worker draining"),
            fx.Publish(lease.attempt, lease.task_id, lease.queue)))
    changes: dict[str, object] = {"phase": Phase.RUNNING, "worker": e.worker, "pid": e.pid,
                                  "pulse_at": c.now, "task_id": e.task_id}
    return Decision(lease.but(**changes), (fx.MarkRunning(e.attempt, changes),))


def _handing_off(lease: Lease | None, e: ev.HandingOff, c: Ctx) -> Decision:
    """The sandbox continues the lease with our token: stop beating it (a beat still in flight
    is waited for before the token is read, or the sandbox would present a stale one)."""
    if lease is None:
        return Decision(None)
    changes: dict[str, object] = {"heartbeats_by": Beater.SANDBOX}
    return Decision(lease.but(**changes), (fx.Update(changes), fx.Unschedule()))


def _pulsed(lease: Lease | None, e: ev.Pulsed, c: Ctx) -> Decision:
    """A running attempt acts on its pulse: a stale attempt kills its own sandbox (fencing);
    an operator's terminate becomes a stop; a stop flag or a drain signals the sandbox."""
    if lease is None:
        return Decision(None)
    if not e.exists or not e.current:
        return Decision(lease, (fx.Signal(StopKind.FORCE), log(
            "fenced", lease, logging.WARNING,
            reason="a newer attempt owns the lease" if e.exists else "lease released")))
    if e.operator and e.stop == StopKind.NONE:
        return stop_requested(lease.but(phase=Phase.RUNNING),
                               ev.StopRequested(StopKind.GRACEFUL, "operator", "revoke"), c)
    if e.stop != StopKind.NONE:
        return Decision(lease, (fx.Signal(e.stop),))
    if e.draining:
        return Decision(lease, (fx.Signal(StopKind.GRACEFUL),))
    return Decision(lease)


def _sandbox_start_failed(lease: Lease | None, e: ev.SandboxStartFailed, c: Ctx) -> Decision:
    if lease is None:
        return Decision(None)
    return Decision(lease, (log("sandbox not started", lease, logging.ERROR, error=e.error),)
                    ).then(end(lease, Ending.FAILED, reason="sandbox could not start"))


def _sandbox_exited(lease: Lease | None, e: ev.SandboxExited, c: Ctx) -> Decision:
    if lease is None or lease.attempt != e.attempt:
        return Decision(lease)  # superseded: the newer attempt owns the lease
    exited = Decision(lease, (log("exited", lease, exit_code=e.code),))
    if is_over(lease):
        return exited.then(release(lease, reason=lease.stop_cause or "ended",
                                    outcome=lease.ended.value))
    if lease.lost and e.code == 0 and not e.draining:
        # It finished before the kill landed: the session is done, and its item is stopped
        # whoever holds the lease now, or it would run again.
        return exited.then(end(lease, Ending.COMPLETED, reason="exited after its lease was lost"))
    if lease.lost:
        # Killed because the lease is someone else's now: an attempt that did not finish.
        failures = lease.failures + 1
        return exited.then(Decision(lease, (fx.RecordHistory(failures, Ending.NONE),))).then(
            forget(lease, reason=lease.stop_cause or "lease lost", outcome="lost"))
    if lease.stop != StopKind.NONE:
        return exited.then(end(lease, Ending.STOPPED, reason=f"stopped ({lease.stop_cause})"))
    if e.draining and lease.heartbeats_by == Beater.DISPATCHER:
        return exited.then(restart(lease, reason="worker drained", failure=False,
                                    task_id=e.next_task_id, now=c.now, policy=c.policy))
    if e.draining:
        # The sandbox held the lease (runner, handoff): its last token died with it, so a new
        # attempt could only be refused (412). End the session instead of stranding it.
        return exited.then(end(lease, Ending.STOPPED,
                                reason="worker drained; the sandbox held the lease"))
    ending = Ending.COMPLETED if e.code == 0 else Ending.FAILED
    return exited.then(end(lease, ending,
                            reason="exited" if e.code == 0 else f"exited with {e.code}"))


def _registry_unreachable(lease: Lease | None, e: ev.RegistryUnreachable, c: Ctx) -> Decision:
    if lease is None or not outage_is_too_long(lease, e.seconds):
        return Decision(lease)
    return Decision(lease, (
        fx.Signal(StopKind.FORCE),
        log("fenced", lease, logging.WARNING,
             reason=f"registry unreachable for {e.seconds:.0f}s: the lease may lapse")))


def _registry_reset(lease: Lease | None, e: ev.RegistryReset, c: Ctx) -> Decision:
    """Redis lost everything while this attempt ran or released: the lease is still ours on the
    server and this supervisor its only keeper. Write it back, with the last token we saw,
    marked uncertain: a beat answered after the attempt's last pulse (0.2 s before) changed the
    token unseen, and its 412 is then adopted like a lost reply's. The supervisor kills its
    sandbox if the outage outlasts two thirds of the TTL, so a lease it writes back is still
    ours. A session that already ended is written back ending, its history with it, so that its
    release is tried again and a re-delivery of its item is stopped, not run."""
    if lease is not None:
        return Decision(lease)
    if is_over(e.lease):
        back = e.lease.but(phase=Phase.RELEASING, heartbeat_ok_at=c.now, uncertain=True)
        effects: list[fx.Effect] = [fx.CreateRecord(back),
                                    fx.RecordHistory(back.failures, back.ended)]
    else:
        back = e.lease.but(phase=Phase.RUNNING, pulse_at=c.now, heartbeat_ok_at=c.now,
                           uncertain=True)
        effects = [fx.CreateRecord(back)]
    if back.heartbeats_by == Beater.DISPATCHER or is_over(back):
        effects.append(fx.Schedule(c.now))
    effects.append(log("lease re-registered", back, logging.WARNING,
                        reason="registry was reset"))
    return Decision(back, tuple(effects))


# --- recovery ----------------------------------------------------------------------------------

# Supervisors pulse every 0.2 s; this much silence is a dead or cut-off worker, not a slow Redis
# call. It must exceed `steps.SELF_FENCE_SECONDS` by enough for a cut-off supervisor to have
# killed its sandbox (a tick of its fence, the kill, a loaded host) before another attempt of
# the session starts: 5 s of margin. It also outlasts Redis's socket timeout (5 s), so one
# slow call cannot make a healthy attempt look silent.
PULSE_STALE_SECONDS = 8.0
# A published session task waits in its queue only while the fleet is full or draining.
DISPATCH_STALE_SECONDS = 30.0
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
    (`lease/deliveries.py`): published once the broker took it, received by a worker."""

    published: bool
    received_at: float | None = None
    received_by: str = ""


def message_lost(delivery: Delivery, now: float) -> bool:
    """Whether a session message dispatched long ago (`Stuck.QUEUED_TOO_LONG`) is lost.

    Never received: it waits in its queue while the fleet is full; lost only if the broker
    never took it (the publish failed). Received but still not started `DISPATCH_STALE_SECONDS`
    later: its worker died after taking it (an early-acked message is gone with it), or holds
    it behind a full pool (RabbitMQ delivers ahead, `celery/amqp.py`); either way a new attempt
    goes to whichever worker is free, and the old message, if it ever starts, finds its attempt
    superseded and never starts the sandbox.
    """
    if delivery.received_at is not None:
        return now - delivery.received_at > DISPATCH_STALE_SECONDS
    return not delivery.published


def stuck(lease: Lease, now: float) -> Stuck | None:
    """How a lease is stuck, if it is, judged on its own record."""
    if lease.phase == Phase.RUNNING and now - lease.pulse_at > PULSE_STALE_SECONDS:
        return Stuck.SILENT_ATTEMPT
    if lease.phase == Phase.CLAIMED and now - lease.claimed_at > CLAIM_STALE_SECONDS:
        return Stuck.STRANDED_CLAIM
    if lease.phase == Phase.DISPATCHED and now - lease.dispatched_at > DISPATCH_STALE_SECONDS:
        return Stuck.QUEUED_TOO_LONG
    return None


def _attempt_silent(lease: Lease | None, e: ev.AttemptSilent, c: Ctx) -> Decision:
    if lease is None or lease.phase != Phase.RUNNING:
        return Decision(lease)
    return restart(lease, reason="worker lost (no pulse)", failure=True,
                    task_id=e.next_task_id, now=c.now, policy=c.policy)


def _message_lost(lease: Lease | None, e: ev.MessageLost, c: Ctx) -> Decision:
    if lease is None or lease.phase != Phase.DISPATCHED:
        return Decision(lease)
    return restart(lease, reason="session task never started", failure=False,
                    task_id=e.next_task_id, now=c.now, policy=c.policy)


def _claim_stranded(lease: Lease | None, e: ev.ClaimStranded, c: Ctx) -> Decision:
    if lease is None or lease.phase != Phase.CLAIMED:
        return Decision(lease)
    if lease.lost:
        return forget(lease, reason="claimed, then lost before dispatch", outcome="lost")
    if lease.heartbeats_by == Beater.DISPATCHER and not proven_ours(lease):
        # Never answered as ours: not published, but claimed again by the heartbeat task.
        return Decision(lease, (fx.Schedule(c.now),))
    return advance_claimed(lease, c)


# --- release and healthchecks ------------------------------------------------------------------

def _release_answered(lease: Lease | None, e: ev.ReleaseAnswered, c: Ctx) -> Decision:
    if lease is None:
        return Decision(None)
    stopped = lease.but(server_stopped=True)
    return forget(stopped, reason=stopped.stop_cause or "released",
                   outcome=lease.ended.value or ("lost" if lease.lost else "stopped"))


def _release_due(lease: Lease | None, e: ev.ReleaseDue, c: Ctx) -> Decision:
    if lease is None or lease.phase != Phase.RELEASING:
        return Decision(lease)
    return release(lease, reason=lease.stop_cause or "release retried",
                    outcome=lease.ended.value or "stopped")


def _release_failed(lease: Lease | None, e: ev.ReleaseFailed, c: Ctx) -> Decision:
    """Keep the lease (and keep beating it: a lapsed lease would hand the finished session out
    again) and try the stop again soon."""
    if lease is None:
        return Decision(None, (fx.Log("stop failed", logging.ERROR, {"error": e.error}),))
    changes: dict[str, object] = {"phase": Phase.RELEASING,
                                  "release_attempts": lease.release_attempts + 1}
    retrying = lease.but(**changes)
    flagged = flag_stop(retrying, StopKind.FORCE, "releasing") or Decision(retrying)
    return Decision(retrying, (fx.Update(changes),)).then(flagged).then(Decision(
        flagged.lease, (
            # Sooner only while we beat it: postponing a due beat of a lease we hold would let it
            # lapse. A lost lease gets no beat, so nothing else would ever bring it due again.
            fx.Schedule(c.now + RELEASE_RETRY_SECONDS, sooner_only=not lease.lost),
            log("release deferred", lease, logging.WARNING, status=e.status, error=e.error,
                 release_attempts=retrying.release_attempts))))


def _release_rejected(lease: Lease | None, e: ev.ReleaseRejected, c: Ctx) -> Decision:
    if lease is None:
        return Decision(None, (fx.Log("stop failed", logging.ERROR, {"error": e.error}),))
    return Decision(lease, (
        log("release refused", lease, logging.ERROR, status=e.status, error=e.error),
    )).then(forget(lease, reason="release refused", outcome=lease.ended.value or "stopped"))


def _healthcheck_answered(lease: Lease | None, e: ev.HealthcheckAnswered,
                          c: Ctx) -> Decision:
    if lease is None:
        return Decision(None)
    return Decision(lease, (
        log("healthcheck answered", lease, logging.INFO if e.healthy else logging.WARNING,
             healthy=e.healthy, **dict(e.results)),
        count("healthchecks", healthy=str(e.healthy).lower()),
    )).then(end(lease, Ending.HEALTHCHECK, reason="healthcheck answered"))


HANDLERS: dict[type, Callable[[Any, Any, Ctx], Decision]] = {
    ev.StopRequested: stop_requested,
    ev.ServerStopped: _server_stopped,
    ev.OperatorRevoked: _operator_revoked,
    ev.AttemptStarting: _attempt_starting,
    ev.HandingOff: _handing_off,
    ev.Pulsed: _pulsed,
    ev.SandboxStartFailed: _sandbox_start_failed,
    ev.SandboxExited: _sandbox_exited,
    ev.RegistryUnreachable: _registry_unreachable,
    ev.RegistryReset: _registry_reset,
    ev.AttemptSilent: _attempt_silent,
    ev.MessageLost: _message_lost,
    ev.ClaimStranded: _claim_stranded,
    ev.ReleaseAnswered: _release_answered,
    ev.ReleaseDue: _release_due,
    ev.ReleaseFailed: _release_failed,
    ev.ReleaseRejected: _release_rejected,
    ev.HealthcheckAnswered: _healthcheck_answered,
}
