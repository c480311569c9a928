"""Performs what the lease machine decides: registry writes, Work API calls, Celery calls.

`Executor.run(lease, event)` is every task's middle step: the task reads, the machine decides,
this applies. An effect that asks something (an ack, a claim, a stop, a guarded change) turns
its answer into the next event and the machine decides again, until nothing is left to ask.
Nothing here judges a lease: a reply becomes an event by its kind alone (`heartbeat_event`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, assert_never

from kombu.exceptions import KombuError
from redis.exceptions import RedisError

from dispatcher.celery.names import SESSION_RUN
from dispatcher.lease import effects as fx
from dispatcher.lease import events as ev
from dispatcher.lease.causes import SeenBy, StopCause
from dispatcher.lease.machine import Decision, Policy, decide
from dispatcher.lease.model import Lease, StopKind
from dispatcher.logs import event as log_event
from dispatcher.startpath import StartPath
from dispatcher.workapi import (
    NO_HEARTBEAT,
    ConflictError,
    Heartbeat,
    LeasePreconditionFailed,
    MalformedResponseError,
    NotFoundError,
    TransientError,
    Work,
    WorkAPIError,
    WorkClient,
    WorkState,
)

if TYPE_CHECKING:
    from dispatcher.runtime import Runtime

__all__ = ["Executor", "claim_event", "heartbeat_event", "listed_event", "reply_of", "stop_event"]

# An ack's retries, here and not in the client (see `Executor._ack`): three seconds in all, well
# inside any lease's TTL. Until one attempt is answered, nothing proves the item is ours: at 30 %
# of replies lost and 20 % refused (503), an ack that landed unseen is never answered usefully
# (no 409 to a retry) by ten attempts for one item in 3,700, by six for one in 150.
ACK_RETRY_PAUSES_SECONDS = (0.1, 0.2, 0.3, 0.3, 0.3, 0.4, 0.4, 0.5, 0.5)
# A record's write retries: a Redis restart refuses connections for a second or two. 1.5 s in
# all, so an acked item still gets its first heartbeat well inside the shortest TTL.
RECORD_RETRY_PAUSES_SECONDS = (0.1, 0.2, 0.4, 0.8)
# Answers fed back to the machine per run at most: a chain of ask-and-decide is a few steps
# long (offer, ack, claim, publish); anything longer is a bug, not a lease.
MAX_STEPS = 16

AnsweredHeartbeat = tuple[str, str, int, float, float]


@dataclass
class _Run:
    """What one run carries between its steps."""

    work_json: str | None
    signal: Callable[[StopKind], None] | None
    heartbeats: list[AnsweredHeartbeat] | None
    path: StartPath | None = None
    # Whose key every Work API call of the run is made with: the lease's environment.
    environment_id: str | None = None
    steps: int = 0
    # Counted at the end of the run in one round trip, not one each on a session's start path.
    counts: list[tuple[str, float, dict[str, object]]] = field(default_factory=list)

    def mark(self, step: str) -> None:
        if self.path is not None:
            self.path.mark(step)


@dataclass
class Executor:
    runtime: Runtime
    policy: Policy = field(default_factory=Policy)

    def run(self, lease: Lease | None, event: ev.Event, *, work_json: str | None = None,
            signal: Callable[[StopKind], None] | None = None,
            heartbeats: list[AnsweredHeartbeat] | None = None, path: StartPath | None = None,
            environment_id: str | None = None) -> Lease | None:
        """Decide and perform `event` and every answer it leads to; returns the lease as the
        machine last left it (None: no record). `work_json` is needed to create a record,
        `signal` lets the machine signal the caller's sandbox, `heartbeats` collects answered
        heartbeats for the heartbeat tick to record in one round trip, and `path` notes when a
        session's start passed each effect. `environment_id` names the environment when
        neither the lease nor the event does (an unreadable item)."""
        state = _Run(work_json=work_json, signal=signal, heartbeats=heartbeats, path=path,
                     environment_id=_environment_of(lease, event) or environment_id)
        work_id = _work_id_of(lease, event)
        pending: list[ev.Event] = [event]
        current = lease
        try:
            while pending and state.steps < MAX_STEPS:
                state.steps += 1
                decision = decide(current, pending.pop(0), now=time.time(), policy=self.policy)
                current = decision.lease
                answer = self._perform(work_id, decision, state)
                if isinstance(answer, _End):
                    return self.runtime.registry.get(work_id)
                if answer is not None:
                    pending.append(answer)
            return current
        finally:
            self.runtime.metrics.inc_all(state.counts, environment=state.environment_id or "")

    def record_heartbeats(self, heartbeats: list[AnsweredHeartbeat]) -> None:
        """Record the answered heartbeats a heartbeat tick collected, in one round trip."""
        if heartbeats:
            self.runtime.registry.record_heartbeats(heartbeats)

    def unschedule_gone(self, work_ids: set[str]) -> None:
        """Drop due heartbeats whose record is gone (released between the pop and the read)."""
        for work_id in work_ids:
            self.runtime.registry.unschedule_heartbeat(work_id)

    def _perform(self, work_id: str, decision: Decision, state: _Run) -> ev.Event | _End | None:
        """Perform a decision's effects in order; returns the answer to feed back, if any, or
        `_End` when an effect found the run cannot go on."""
        answer: ev.Event | None = None
        for effect in decision.effects:
            result = self._perform_one(work_id, effect, decision.lease, state)
            if isinstance(result, _End):
                return result
            if isinstance(result, _Abort):
                return result.event
            if result is not None:
                answer = result
        return answer

    def _perform_one(self, work_id: str, effect: fx.Effect,  # noqa: C901 (one flat case per effect)
                     lease: Lease | None, state: _Run) -> ev.Event | _End | _Abort | None:
        match effect:
            case fx.Ack():
                return self._ack(work_id, effect, lease, state)
            case fx.Claim():
                return self._claim(work_id, effect, lease, state)
            case fx.StopOnServer():
                return self._stop(work_id, effect, lease, state)
            case fx.CreateRecord():
                return self._create(work_id, effect, lease, state)
            case fx.Update():
                self._update(work_id, effect, lease, state)
            case fx.MarkRunning():
                return self._mark_running(work_id, effect, lease, state)
            case fx.NewAttempt():
                return self._new_attempt(work_id, effect, lease, state)
            case fx.FlagStop():
                self._flag_stop(work_id, effect, lease, state)
            case fx.DeleteRecord():
                self._delete(work_id, effect, lease, state)
            case fx.Schedule():
                self._schedule(work_id, effect, lease, state)
            case fx.Unschedule():
                self._unschedule(work_id, effect, lease, state)
            case fx.RecordHeartbeat():
                self._record_heartbeat(work_id, effect, lease, state)
            case fx.RecordHistory():
                self._history(work_id, effect, lease, state)
            case fx.Publish():
                self._publish(work_id, effect, lease, state)
            case fx.Revoke():
                self._revoke(work_id, effect, lease, state)
            case fx.Signal():
                self._signal(work_id, effect, lease, state)
            case fx.AnswerHealthcheck():
                return self._healthcheck(work_id, effect, lease, state)
            case fx.Log():
                self._log(work_id, effect, lease, state)
            case fx.Count():
                self._count(work_id, effect, lease, state)
            case _:
                assert_never(effect)
        return None  # performed; nothing to answer

    # --- the Work API ----------------------------------------------------------------------
    def _client(self, state: _Run) -> WorkClient:
        """The lease's environment's client, with its key and never another's. No client
        retries: an ack retries here, a claim or a stop is retried by the heartbeat tick."""
        return self.runtime.client(environment_id=state.environment_id, max_retries=0)

    def _ack(self, work_id: str, effect: fx.Ack, lease: Lease | None,
             state: _Run) -> ev.Event:
        """Ack, retrying here rather than in the client: a 409 to a retry says the item is
        acked, and whether that ack was ours depends on what the earlier attempt met."""
        client = self._client(state)
        reply_lost = False
        state.mark("ack_sent")
        for pause in (*ACK_RETRY_PAUSES_SECONDS, None):
            try:
                client.ack(work_id)
                state.mark("acked")
                return ev.AckAnswered()
            except WorkAPIError as exc:
                answer = ack_event(exc, reply_lost=reply_lost)
                reply_lost = reply_lost or _no_answer(exc)
            if answer is not None or pause is None:
                break
            time.sleep(pause)
        return answer or ev.AckUncertain(None)

    def _claim(self, work_id: str, effect: fx.Claim, lease: Lease | None,
               state: _Run) -> ev.Event:
        sent_at = time.time()
        try:
            reply = self._client(state).heartbeat(
                work_id, expected_last_heartbeat=NO_HEARTBEAT,
                desired_ttl_seconds=self.runtime.settings.desired_ttl_seconds)
        except WorkAPIError as exc:
            return claim_event(exc, ack_uncertain=effect.ack_uncertain)
        state.mark("claimed")
        return ev.ClaimAnswered(reply_of(reply), sent_at)

    def _stop(self, work_id: str, effect: fx.StopOnServer, lease: Lease | None,
              state: _Run) -> ev.Event:
        try:
            # No client retries: a transient failure is retried by the heartbeat task, so one
            # release never holds a worker for seconds.
            self._client(state).stop(work_id, force=effect.force)
        except WorkAPIError as exc:
            return stop_event(exc)
        return ev.ReleaseAnswered(200)

    # --- the registry ----------------------------------------------------------------------
    def _create(self, work_id: str, effect: fx.CreateRecord, lease: Lease | None,
                state: _Run) -> _Abort | None:
        """Write the record, riding out a Redis restart (a second or two); past that, the
        machine decides what an unrecorded lease becomes, and the decision's other effects
        (publishing it, claiming it) are not performed."""
        if state.work_json is None:
            raise ValueError(f"no work item to record for {work_id}")
        for pause in (*RECORD_RETRY_PAUSES_SECONDS, None):
            try:
                self.runtime.registry.create(effect.lease, work_json=state.work_json)
                state.mark("recorded")
                return None
            except RedisError as exc:
                if pause is None:
                    return _Abort(ev.RecordFailed(effect.lease, str(exc)))
            time.sleep(pause)
        raise AssertionError("unreachable")

    def _update(self, work_id: str, effect: fx.Update, lease: Lease | None,
                state: _Run) -> None:
        self.runtime.registry.update(work_id, **effect.fields)

    def _mark_running(self, work_id: str, effect: fx.MarkRunning, lease: Lease | None,
                      state: _Run) -> _End | None:
        done = self.runtime.registry.update_if_attempt(work_id, effect.attempt, **effect.fields)
        return None if done == 1 else _End()

    def _new_attempt(self, work_id: str, effect: fx.NewAttempt, lease: Lease | None,
                     state: _Run) -> _End | None:
        attempt = self.runtime.registry.new_attempt(
            work_id, expected_attempt=effect.expected, task_id=effect.task_id)
        # Someone else already moved the lease on, or released it: nothing of ours to publish.
        return None if attempt > 0 else _End()

    def _flag_stop(self, work_id: str, effect: fx.FlagStop, lease: Lease | None,
                   state: _Run) -> None:
        self.runtime.registry.request_stop(work_id, effect.kind, effect.cause)

    def _delete(self, work_id: str, effect: fx.DeleteRecord, lease: Lease | None,
                state: _Run) -> None:
        self.runtime.registry.delete(work_id)

    def _schedule(self, work_id: str, effect: fx.Schedule, lease: Lease | None,
                  state: _Run) -> None:
        self.runtime.registry.schedule_heartbeat(work_id, effect.due,
                                                 sooner_only=effect.sooner_only)

    def _unschedule(self, work_id: str, effect: fx.Unschedule, lease: Lease | None,
                    state: _Run) -> None:
        self.runtime.registry.unschedule_heartbeat(work_id)

    def _record_heartbeat(self, work_id: str, effect: fx.RecordHeartbeat, lease: Lease | None,
                     state: _Run) -> None:
        heartbeat = (work_id, effect.token, effect.ttl_seconds, effect.sent_at, effect.due)
        if state.heartbeats is not None:
            state.heartbeats.append(heartbeat)
        else:
            self.runtime.registry.record_heartbeats([heartbeat])

    def _history(self, work_id: str, effect: fx.RecordHistory, lease: Lease | None,
                 state: _Run) -> None:
        self.runtime.registry.record_history(work_id, failures=effect.failures,
                                             ended=effect.ended)

    # --- Celery, the sandbox, the healthcheck --------------------------------------------------
    def _publish(self, work_id: str, effect: fx.Publish, lease: Lease | None,
                 state: _Run) -> None:
        """Only ids travel in the message (Flower shows task arguments): the work item and its
        secret stay in the registry."""
        session_id = lease.session_id if lease is not None else ""
        try:
            self.runtime.app.send_task(
                SESSION_RUN,
                kwargs={"work_id": work_id, "session_id": session_id, "attempt": effect.attempt},
                task_id=effect.task_id, queue=effect.queue,
                kwargsrepr=f"work_id={work_id} session_id={session_id} attempt={effect.attempt}")
            # After the send: a mark without its message would read as queued for good.
            self.runtime.deliveries.published(effect.task_id)
        except (RedisError, KombuError, OSError) as exc:
            # The lease stays held and heartbeated; recovery publishes it again, since the message
            # is not marked published (`machine.message_lost`).
            log_event("dispatch failed", level=logging.ERROR, work_id=work_id,
                      attempt=effect.attempt, environment_id=state.environment_id,
                      error=str(exc),
                      action_taken="recovery publishes it again")
            return
        state.mark("published")

    def _revoke(self, work_id: str, effect: fx.Revoke, lease: Lease | None,
                state: _Run) -> None:
        if effect.task_id:
            self.runtime.app.control.revoke(effect.task_id)

    def _signal(self, work_id: str, effect: fx.Signal, lease: Lease | None,
                state: _Run) -> None:
        if state.signal is not None:
            state.signal(effect.kind)

    def _healthcheck(self, work_id: str, effect: fx.AnswerHealthcheck, lease: Lease | None,
                     state: _Run) -> ev.Event:
        from dispatcher.control.healthcheck import check

        results = check(self.runtime)
        healthy = all(value == "ok" for value in results.values())
        return ev.HealthcheckAnswered(healthy, tuple(results.items()))

    def _log(self, work_id: str, effect: fx.Log, lease: Lease | None, state: _Run) -> None:
        fields = effect.fields if "work_id" in effect.fields else {"work_id": work_id,
                                                                   **effect.fields}
        if state.environment_id and "environment_id" not in fields:
            fields = {**fields, "environment_id": state.environment_id}
        log_event(effect.action, level=effect.level, **fields)

    def _count(self, work_id: str, effect: fx.Count, lease: Lease | None,
               state: _Run) -> None:
        state.counts.append((effect.metric, 1, dict(effect.labels)))


@dataclass(frozen=True)
class _Abort:
    """The effect failed: the decision's remaining effects are dropped and `event` is what the
    machine decides next."""

    event: ev.Event


@dataclass(frozen=True)
class _End:
    """The run cannot go on: a guarded change found the lease moved on; the record is read
    back as it now is."""


# --- replies as events -----------------------------------------------------------------------

def reply_of(reply: Heartbeat) -> ev.Reply:
    return ev.Reply(token=reply.last_heartbeat, extended=reply.lease_extended,
                    state=reply.state, ttl_seconds=reply.ttl_seconds)


def _server_lease(exc: LeasePreconditionFailed) -> ev.ServerLease | None:
    state = exc.current_state
    if state is None:
        return None
    return ev.ServerLease(state=state.state, last_heartbeat=state.last_heartbeat)


def heartbeat_event(outcome: Heartbeat | WorkAPIError, sent_at: float) -> ev.Event:
    """A heartbeat's answer (or failure) as the event the machine judges."""
    if isinstance(outcome, Heartbeat):
        return ev.HeartbeatAnswered(reply_of(outcome), sent_at)
    if isinstance(outcome, LeasePreconditionFailed):
        return ev.HeartbeatRefused(_server_lease(outcome))
    if isinstance(outcome, NotFoundError):
        return ev.HeartbeatNotFound()
    if outcome.retryable or isinstance(outcome, ConflictError):
        return ev.HeartbeatFailed(outcome.status, str(outcome))
    return ev.HeartbeatRejected(outcome.status, str(outcome))


def _work_id_of(lease: Lease | None, event: ev.Event) -> str:
    """The item a run is about: its record's, or, with none, the one the event names."""
    if lease is not None:
        return lease.work_id
    if isinstance(event, ev.Offered):
        return event.proposal.work_id
    if isinstance(event, ev.RegistryReset):
        return event.lease.work_id
    if isinstance(event, ev.Unreadable):
        return event.work_id or ""
    return ""


def _environment_of(lease: Lease | None, event: ev.Event) -> str | None:
    """The environment a run acts for: its record's, or the one the event's lease names."""
    if lease is not None and lease.environment_id:
        return lease.environment_id
    if isinstance(event, ev.Offered):
        return event.proposal.environment_id or None
    if isinstance(event, ev.RegistryReset):
        return event.lease.environment_id or None
    return None


def _no_answer(exc: WorkAPIError) -> bool:
    """The request may have reached the server and been applied: no status came back (a dropped
    connection, a timeout), or a 2xx came back unreadable."""
    return isinstance(exc, MalformedResponseError) or (
        isinstance(exc, TransientError) and exc.status is None)


def ack_event(exc: WorkAPIError, *, reply_lost: bool) -> ev.Event | None:
    """A failed ack attempt as the event the machine judges; None: try again. A 2xx that came
    back unreadable was applied: the item is ours. What a 409 means depends on whether an
    earlier attempt went unanswered (`reply_lost`): the machine says."""
    if isinstance(exc, MalformedResponseError):
        return ev.AckAnswered()
    if isinstance(exc, ConflictError):
        return ev.AckConflict(after_lost_reply=reply_lost)
    if exc.retryable:
        return None
    return ev.AckRefused(exc.status)


def claim_event(exc: WorkAPIError, *, ack_uncertain: bool) -> ev.Event:
    """A failed first claim as the event the machine judges."""
    if isinstance(exc, LeasePreconditionFailed):
        current = _server_lease(exc)
        return ev.ClaimRefused(current or ev.ServerLease(None, "unknown"))
    if isinstance(exc, NotFoundError | ConflictError):
        return ev.ClaimNotAcked(exc.status, ack_uncertain)
    if exc.retryable:
        return ev.ClaimFailed(exc.status)
    return ev.HeartbeatRejected(exc.status, str(exc))


def listed_event(work: Work) -> ev.Event | None:
    """What the server's list says of an item we hold, if it asks for a stop."""
    if work.state == WorkState.STOPPED:
        return ev.ServerStopped(seen_by=SeenBy.BRIDGE)
    if work.state == WorkState.STOPPING or work.stop_requested_at:
        return ev.StopRequested(StopKind.GRACEFUL, StopCause.SERVER, SeenBy.BRIDGE)
    return None


def stop_event(exc: WorkAPIError) -> ev.Event:
    """A failed stop as the event the machine judges: 409 and 404 mean nothing is left to stop."""
    if isinstance(exc, ConflictError | NotFoundError):
        return ev.ReleaseAnswered(exc.status or 409)
    if exc.retryable:
        return ev.ReleaseFailed(exc.status, str(exc))
    return ev.ReleaseRejected(exc.status, str(exc))
