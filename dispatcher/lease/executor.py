"""Performs what the lease machine decides: registry writes, Work API calls, Celery calls.

Every task's middle step: the task reads, the machine decides, this applies. An effect that asks
something (an ack, a claim, a stop, a guarded change) turns its answer into the next event
(`replies`) and the machine decides again, until nothing is left to ask. Nothing here judges a
lease.

The executor is given what it acts through (the registry, the delivery records, the counters,
a Work API client per environment, a publish and a revoke of session tasks, the healthcheck) and
nothing else: it knows no runtime, no Celery app, no control module. Each caller has its own way
in, named for what it adds to a plain `run`: `offer` (the poller: the work item to record, its
start path), `write_back` (an attempt after Redis restarted empty), `attempt` (a session
attempt: its sandbox to signal, and whether it is over) and `heartbeat` (the heartbeat tick:
answered heartbeats, recorded together).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol, assert_never

from kombu.exceptions import KombuError
from redis.exceptions import RedisError

from dispatcher.lease import effects as fx
from dispatcher.lease import events as ev
from dispatcher.lease.causes import Outcome
from dispatcher.lease.deliveries import Deliveries
from dispatcher.lease.machine import Decision, Policy, decide, last_seen
from dispatcher.lease.model import Lease, StopKind
from dispatcher.lease.registry import LeaseRegistry
from dispatcher.lease.replies import ack_event, claim_event, no_answer, reply_of, stop_event
from dispatcher.logs import event as log_event
from dispatcher.startpath import StartPath
from dispatcher.workapi import NO_HEARTBEAT, WorkAPIError, WorkClient, sessions_token

__all__ = ["AnsweredHeartbeat", "AttemptStep", "Counters", "Executor", "Sandbox", "SessionTask"]

# An ack's retries, here and not in the client (see `Executor._ack`): three seconds in all, well
# inside any lease's TTL. Until one attempt is answered, nothing proves the item is ours: at 30 %
# of replies lost and 20 % refused (503), an ack that landed unseen is never answered usefully
# (no 409 to a retry) by ten attempts for one item in 3,700, by six for one in 150.
ACK_RETRY_PAUSES_SECONDS = (0.1, 0.2, 0.3, 0.3, 0.3, 0.4, 0.4, 0.5, 0.5)
# A record's write retries: a Redis restart refuses connections for a second or two. 1.5 s in
# all, so an acked item still gets its first heartbeat well inside the shortest TTL.
RECORD_RETRY_PAUSES_SECONDS = (0.1, 0.2, 0.4, 0.8)
# Decisions whose effects are performed beside their ack in flight, at once: one per claim the
# pollers of a process run side by side (`control.poller.CLAIMS_IN_FLIGHT` each); more only wait.
ACK_THREADS = 32
_ACKS_LOCK = threading.Lock()
# Answers fed back to the machine per run at most: a chain of ask-and-decide is a few steps
# long (offer, ack, claim, publish); anything longer is a bug, not a lease.
MAX_STEPS = 16

# An answered heartbeat to record: (work id, token, TTL, sent at, next due, and whose heartbeats
# the next one is for: "" whoever's).
AnsweredHeartbeat = tuple[str, str, int, float, float, str]


class Counters(Protocol):
    """Where the executor counts (`metrics.Metrics`): several counters in one round trip."""

    def inc_all(self, counts: list[tuple[str, float, dict[str, object]]], *,
                environment: str = "") -> None: ...


class Throttle(Protocol):
    """The server's pacing as the executor honours it (`control.pacing.Pacing`): an ack, a
    claim or a stop of a throttled environment is not sent; a 429 or 503 it meets throttles."""

    def remaining(self, environment: str) -> float:
        """Seconds until the environment's throttle lapses; 0.0 when none stands."""

    def note(self, environment: str, *, status: int | None, retry_after: float | None,
             source: str) -> float | None:
        """Throttle the environment if this answer asks for it; the seconds asked, or None."""


class _Unpaced:
    """No pacing: every request goes (an executor built without one)."""

    def remaining(self, environment: str) -> float:
        return 0.0

    def note(self, environment: str, *, status: int | None, retry_after: float | None,
             source: str) -> float | None:
        return None


class Sandbox(Protocol):
    """The sandbox of the attempt that asks, as the machine's effects act on it."""

    def signal(self, kind: StopKind) -> None:
        """The stop ladder: graceful, SIGTERM then SIGKILL after the grace; force, SIGKILL."""

    def fence(self) -> None:
        """SIGKILL its whole process group now."""


@dataclass(frozen=True)
class AttemptStep:
    """What a session attempt's run leaves: the lease as the machine last left it (None: no
    record), and whether the attempt is over, with its task's result."""

    lease: Lease | None
    over: Outcome | None


@dataclass(frozen=True)
class SessionTask:
    """A session task to publish. Only ids travel in the message (Flower shows task
    arguments): the work item and its secret stay in the registry."""

    work_id: str
    session_id: str
    attempt: int
    task_id: str
    queue: str


@dataclass
class _Run:
    """What one run carries between its steps, and what its caller added to it."""

    work_json: str | None = None
    sandbox: Sandbox | None = None
    over: Outcome | None = None
    heartbeats: list[AnsweredHeartbeat] | None = None
    # A heartbeat tick's leases whose heartbeat goes through the server's throttle.
    through: list[Lease] | None = None
    path: StartPath | None = None
    # Set once the run's ack has its answer (or was not sent): the poller holds its next long
    # poll until then (`control.poller`).
    acked: threading.Event | None = None
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
    registry: LeaseRegistry
    deliveries: Deliveries
    counters: Counters
    # The Work API client of an environment (None: the only one), with its key and never
    # another's, and no retries: an ack retries here, a claim or a stop in the heartbeat tick.
    client: Callable[[str | None], WorkClient]
    # Publish a session task; raises RedisError, KombuError or OSError if the broker refused it.
    publish: Callable[[SessionTask], None]
    revoke: Callable[[str], None]
    # Each check's name and `ok` or what is wrong (`control.healthcheck`).
    healthcheck: Callable[[], Mapping[str, str]]
    desired_ttl_seconds: int | None  # None: the server's default
    policy: Policy = field(default_factory=Policy)
    pacing: Throttle = field(default_factory=_Unpaced)
    _ack_pool: ThreadPoolExecutor | None = field(default=None, init=False, repr=False)

    # --- the ways in -----------------------------------------------------------------------
    def run(self, lease: Lease | None, event: ev.Event) -> Lease | None:
        """Decide and perform `event` and every answer it leads to; returns the lease as the
        machine last left it (None: no record)."""
        return self._run(lease, event, _Run())

    def offer(self, held: Lease | None, offered: ev.Offered, *, work_json: str,
              path: StartPath | None = None,
              acked: threading.Event | None = None) -> Lease | None:
        """A polled item: `work_json` is what its record keeps; `path` notes when a session's
        start passed each effect; `acked` is set once its ack has an answer."""
        return self._run(held, offered, _Run(work_json=work_json, path=path, acked=acked))

    def write_back(self, reset: ev.RegistryReset, *, work_json: str) -> Lease | None:
        """A running attempt's lease, after Redis restarted empty, with its work item."""
        return self._run(None, reset, _Run(work_json=work_json))

    def attempt(self, lease: Lease | None, event: ev.Event, *,
                sandbox: Sandbox | None = None) -> AttemptStep:
        """A session attempt's event: `sandbox` is its sandbox, once started, for the machine
        to signal; the step says whether the attempt is over."""
        state = _Run(sandbox=sandbox)
        after = self._run(lease, event, state)
        return AttemptStep(after, state.over)

    def heartbeat(self, lease: Lease, event: ev.Event, *,
                  answered: list[AnsweredHeartbeat],
                  through: list[Lease] | None = None) -> Lease | None:
        """A heartbeat's answer in a tick: a plain answered heartbeat joins `answered`, for
        `record_heartbeats` to record the whole tick's in one round trip. A due heartbeat the
        server's throttle holds back (`HeartbeatThrottled`) joins `through` if it must go all
        the same."""
        return self._run(lease, event, _Run(heartbeats=answered, through=through))

    def record_heartbeats(self, heartbeats: list[AnsweredHeartbeat]) -> None:
        """Record the answered heartbeats a heartbeat tick collected, in one round trip."""
        if heartbeats:
            self.registry.record_heartbeats(heartbeats)

    def unschedule_gone(self, work_ids: set[str]) -> None:
        """Drop due heartbeats whose record is gone (released between the pop and the read)."""
        for work_id in work_ids:
            self.registry.unschedule_heartbeat(work_id)

    # --- deciding and performing -----------------------------------------------------------
    def _run(self, lease: Lease | None, event: ev.Event, state: _Run) -> Lease | None:
        state.environment_id = _environment_of(lease, event)
        work_id = _work_id_of(lease, event)
        pending: list[ev.Event] = [event]
        current = lease
        try:
            while pending and state.steps < MAX_STEPS:
                state.steps += 1
                event = pending.pop(0)
                # The registry's clock: Redis's, the one every host of the fleet compares.
                decision = decide(current, event, now=self.registry.clock.now(),
                                  policy=self.policy)
                current = decision.lease
                counted = len(state.counts)
                answer = self._perform(work_id, decision, state)
                if isinstance(answer, _End):
                    return self.registry.get(work_id)
                if isinstance(answer, _Taken):
                    return answer.lease
                if isinstance(answer, _Again):
                    del state.counts[counted:]  # counted once, when decided again
                    if answer.waited:
                        # A wait is bounded by the rule (a TTL), not by the steps of a chain.
                        state.steps -= 1
                    current = answer.lease if answer.read else self.registry.get(work_id)
                    pending.insert(0, event)
                    continue
                if answer is not None:
                    pending.append(answer)
            return current
        finally:
            self.counters.inc_all(state.counts, environment=state.environment_id or "")

    def _perform(self, work_id: str, decision: Decision,
                 state: _Run) -> ev.Event | _End | _Again | _Taken | None:
        """Perform a decision's effects in order; returns the answer to feed back, if any,
        `_End` when an effect found the run cannot go on, or `_Again` when the event is to be
        decided again on the record as it now is.

        An ack followed by other effects is sent at once and answered after them (`fx.Ack`):
        its round trip overlaps theirs (`_ack_beside`)."""
        answer: ev.Event | None = None
        effects = decision.effects
        for i, effect in enumerate(effects):
            if isinstance(effect, fx.Ack) and i + 1 < len(effects):
                return self._ack_beside(work_id, effects[i + 1:], decision.lease, state, answer)
            result = self._perform_one(work_id, effect, decision.lease, state)
            if isinstance(result, _End | _Again | _Taken):
                return result
            if isinstance(result, _Abort):
                return result.event
            if result is not None:
                answer = result
        return answer

    def _ack_beside(self, work_id: str, rest: tuple[fx.Effect, ...], lease: Lease | None,
                    state: _Run,
                    answer: ev.Event | None) -> ev.Event | _End | _Again | _Taken | None:
        """The ack sent from this thread at once, the effects after it performed meanwhile in
        another: nothing stands between the decision and the ack's request (a hand-off to a
        thread would). Both are awaited before the run goes on, so nothing is decided while an
        ack of ours is still in flight (a stop sent before it lands would leave the item acked
        by nobody). The rest's early end (`_End`, `_Again`, an abort) wins over the ack's
        answer, which the machine otherwise decides on next."""
        others = self._acks().submit(self._perform_rest, work_id, rest, lease, state)
        try:
            acked = self._ack(work_id, state)
        finally:
            completed, result = others.result()
        if not completed:
            return result
        return acked if acked is not None else result or answer

    def _perform_rest(self, work_id: str, effects: tuple[fx.Effect, ...], lease: Lease | None,
                      state: _Run) -> tuple[bool, ev.Event | _End | _Again | _Taken | None]:
        """Effects in order: (True, the last answer) when all were performed, or (False, how
        the run ends) when one cut them short."""
        answer: ev.Event | None = None
        for effect in effects:
            result = self._perform_one(work_id, effect, lease, state)
            if isinstance(result, _End | _Again | _Taken):
                return False, result
            if isinstance(result, _Abort):
                return False, result.event
            if result is not None:
                answer = result
        return True, answer

    def _acks(self) -> ThreadPoolExecutor:
        """Threads that perform the rest of a decision while its ack is in flight."""
        with _ACKS_LOCK:
            if self._ack_pool is None:
                self._ack_pool = ThreadPoolExecutor(ACK_THREADS, thread_name_prefix="beside-ack")
            return self._ack_pool

    def _perform_one(self, work_id: str, effect: fx.Effect,  # noqa: C901 (one case per effect)
                     lease: Lease | None,
                     state: _Run) -> ev.Event | _End | _Again | _Taken | _Abort | None:
        """One effect: those that ask return the answer (or how the run ends); the rest are
        simply done."""
        match effect:
            case fx.Ack():
                return self._ack(work_id, state)
            case fx.Claim():
                return self._claim(work_id, effect, state)
            case fx.StopOnServer():
                return self._stop(work_id, effect, lease, state)
            case fx.HeartbeatNow():
                if state.through is not None and lease is not None:
                    state.through.append(lease)
                else:  # outside a tick: the next tick sends it
                    self.registry.schedule_heartbeat(work_id, self.registry.clock.now())
            case fx.CreateRecord():
                return self._create(work_id, effect, state)
            case fx.MarkProven():
                return self._prove(work_id, effect, state)
            case fx.AwaitProof():
                if effect.run is None or lease is None:
                    return _Again(waited=True, read=True,
                                  lease=self.registry.await_proof(work_id, effect.seconds))
                now, taken = self.registry.await_proof_then_set(
                    work_id, effect.seconds, expected=effect.expected, awaited=effect.awaited,
                    fields=effect.run.fields, seen=_seen(lease.but(**effect.run.fields)))
                return _Taken(now) if taken else _Again(waited=True, read=True, lease=now)
            case fx.MarkRunning():
                done = self.registry.update_if_attempt(work_id, effect.attempt, effect.fields,
                                                       seen=_seen(lease))
                if done == 1:
                    return None
                state.over = Outcome.SUPERSEDED  # as the effect says, should its guard fail
                return _End()
            case fx.NewAttempt():
                done = self.registry.update_if_attempt(work_id, effect.expected, effect.fields,
                                                       seen=_seen(lease))
                # Someone else moved the lease on, or released it: nothing of ours to publish.
                return None if done == 1 else _End()
            case fx.AnswerHealthcheck():
                results = self.healthcheck()
                healthy = all(value == "ok" for value in results.values())
                return ev.HealthcheckAnswered(healthy, tuple(results.items()))
            case fx.Update():
                self.registry.update(work_id, seen=_seen(lease), **effect.fields)
            case fx.FlagStop():
                moved_on = self.registry.set_stop(work_id, effect.kind, cause=effect.cause,
                                                  expected=effect.expected) == 0
                return _Again() if moved_on else None
            case fx.DeleteRecord():
                self.registry.delete(work_id)
            case fx.Schedule():
                self.registry.schedule_heartbeat(work_id, effect.due,
                                                 sooner_only=effect.sooner_only,
                                                 heartbeated_by=effect.heartbeated_by)
            case fx.Unschedule():
                self.registry.unschedule_heartbeat(work_id)
            case fx.RecordHeartbeat():
                self._record_heartbeat(work_id, effect, state)
            case fx.RecordHistory():
                self.registry.record_history(work_id, failures=effect.failures,
                                             ended=effect.ended)
            case fx.Publish():
                self._publish(work_id, effect, lease, state)
            case fx.Revoke():
                if effect.task_id:
                    self.revoke(effect.task_id)
            case fx.Signal():
                if state.sandbox is not None:
                    state.sandbox.signal(effect.kind)
            case fx.Fence():
                if state.sandbox is not None:
                    state.sandbox.fence()
            case fx.AttemptOver():
                state.over = effect.outcome
            case fx.Log():
                self._log(work_id, effect, state)
            case fx.Count():
                state.counts.append((effect.metric, 1, dict(effect.labels)))
            case _:
                assert_never(effect)
        return None

    # --- the Work API ----------------------------------------------------------------------
    def _ack(self, work_id: str, state: _Run) -> ev.Event:
        """The ack, then the run's `acked` set, whatever the answer."""
        try:
            return self._send_ack(work_id, state)
        finally:
            if state.acked is not None:
                state.acked.set()

    def _send_ack(self, work_id: str, state: _Run) -> ev.Event:
        """Ack, retrying here rather than in the client: a 409 to a retry says the item is
        acked, and whether that ack was ours depends on what the earlier attempt met."""
        client = self.client(state.environment_id)
        reply_lost = False
        if self._throttled(state):
            # Not sent: the server hands the item out again once it has idled unacked.
            return ev.AckRefused(429)
        state.mark("ack_sent")
        for pause in (*ACK_RETRY_PAUSES_SECONDS, None):
            try:
                client.ack(work_id)
                state.mark("acked")
                return ev.AckAnswered()
            except WorkAPIError as exc:
                answer = ack_event(exc, reply_lost=reply_lost)
                reply_lost = reply_lost or no_answer(exc)
                if answer is None and self._note(state, exc, "ack"):
                    # Retries would be the requests the server asked us not to send.
                    answer = ev.AckUncertain(exc.status) if reply_lost else \
                        ev.AckRefused(exc.status)
            if answer is not None or pause is None:
                break
            time.sleep(pause)
        return answer or ev.AckUncertain(None)

    def _claim(self, work_id: str, effect: fx.Claim, state: _Run) -> ev.Event:
        throttled = self._throttled(state)
        if throttled:
            return ev.HeartbeatThrottled(throttled)
        sent_at = self.registry.clock.now()
        try:
            reply = self.client(state.environment_id).heartbeat(
                work_id, expected_last_heartbeat=NO_HEARTBEAT,
                desired_ttl_seconds=self.desired_ttl_seconds)
        except WorkAPIError as exc:
            self._note(state, exc, "heartbeat")
            return claim_event(exc, ack_uncertain=effect.ack_uncertain)
        state.mark("claimed")
        return ev.ClaimAnswered(reply_of(reply), sent_at)

    def _stop(self, work_id: str, effect: fx.StopOnServer, lease: Lease | None,
              state: _Run) -> ev.Event:
        throttled = self._throttled(state)
        if throttled:
            # Not sent: a held lease's release waits the throttle out in the heartbeat tick;
            # an item we keep no record of is ended by the server's lease expiry.
            return ev.HeartbeatThrottled(throttled) if lease is not None else \
                ev.ReleaseFailed(429, f"throttled for {throttled:.0f} s more: not sent")
        token = None
        if effect.as_ != fx.StopAs.ENVIRONMENT_KEY:
            token = self._sessions_token(work_id, effect.as_, state)
            if token is None:
                return ev.ReleaseUnauthorized(None)
        try:
            # No client retries: a transient failure is retried by the heartbeat task, so one
            # release never holds a worker for seconds.
            self.client(state.environment_id).stop(work_id, force=effect.force,
                                                   sessions_token=token)
        except WorkAPIError as exc:
            self._note(state, exc, "stop")
            return stop_event(exc, with_token=token is not None)
        return ev.ReleaseAnswered(200)

    def _sessions_token(self, work_id: str, as_: fx.StopAs, state: _Run) -> str | None:
        """The sessions token of the delivery `as_` names: the polled item this run offers, or
        the one the lease's record keeps. Read here and passed to the client only: no effect,
        event or log line carries it."""
        work_json = state.work_json if as_ == fx.StopAs.POLLED_TOKEN else \
            self.registry.work_json(work_id)
        if work_json is None:
            return None
        try:
            secret = json.loads(work_json).get("secret")
        except (ValueError, AttributeError):
            return None
        return sessions_token(secret if isinstance(secret, str) else None)

    def _throttled(self, state: _Run) -> float:
        """Seconds the server's throttle of the run's environment stands (0.0: none). With
        Redis down the throttle cannot be read, and the request goes: a stop of an item Redis
        could not record must not wait for Redis."""
        if not state.environment_id:
            return 0.0
        try:
            return self.pacing.remaining(state.environment_id)
        except RedisError:
            return 0.0

    def _note(self, state: _Run, exc: WorkAPIError, source: str) -> bool:
        """Hand a failure to the pacing; True if it throttles the run's environment (False if
        Redis, where the throttle lives, cannot be reached)."""
        if not state.environment_id:
            return False
        try:
            return self.pacing.note(state.environment_id, status=exc.status,
                                    retry_after=exc.retry_after, source=source) is not None
        except RedisError:
            return False

    # --- the registry ----------------------------------------------------------------------
    def _create(self, work_id: str, effect: fx.CreateRecord, state: _Run) -> _Abort | None:
        """Write the record, riding out a Redis restart (a second or two); past that, the
        machine decides what an unrecorded lease becomes, and the decision's other effects
        (publishing it, claiming it) are not performed."""
        if state.work_json is None:
            raise ValueError(f"no work item to record for {work_id}")
        for pause in (*RECORD_RETRY_PAUSES_SECONDS, None):
            try:
                self.registry.create(effect.lease, work_json=state.work_json)
                state.mark("recorded")
                return None
            except RedisError as exc:
                if pause is None:
                    return _Abort(ev.RecordFailed(effect.lease, str(exc)))
            time.sleep(pause)
        raise AssertionError("unreachable")

    def _prove(self, work_id: str, effect: fx.MarkProven, state: _Run) -> _Abort | None:
        """Record the proof, riding out a Redis restart as `_create` does: a record lost with
        it is written again, proven (the item is ours, and its claim follows at once)."""
        lease = effect.lease
        for pause in (*RECORD_RETRY_PAUSES_SECONDS, None):
            try:
                if not self.registry.prove(work_id, lease.heartbeat_ok_at):
                    if state.work_json is None:
                        raise ValueError(f"no work item to record for {work_id}")
                    self.registry.create(lease, work_json=state.work_json)
                state.mark("proven")
                return None
            except RedisError as exc:
                if pause is None:
                    return _Abort(ev.RecordFailed(lease, str(exc)))
            time.sleep(pause)
        raise AssertionError("unreachable")

    def _record_heartbeat(self, work_id: str, effect: fx.RecordHeartbeat, state: _Run) -> None:
        answered = (work_id, effect.token, effect.ttl_seconds, effect.sent_at, effect.due,
                    effect.heartbeated_by or "")
        if state.heartbeats is not None:
            state.heartbeats.append(answered)
        else:
            self.registry.record_heartbeats([answered])

    # --- Celery, what an operator sees -----------------------------------------------------
    def _publish(self, work_id: str, effect: fx.Publish, lease: Lease | None,
                 state: _Run) -> None:
        session_id = lease.session_id if lease is not None else ""
        try:
            self.publish(SessionTask(work_id, session_id, effect.attempt, effect.task_id,
                                     effect.queue))
            # After the send: a mark without its message would read as queued for good.
            self.deliveries.published(effect.task_id)
        except (RedisError, KombuError, OSError) as exc:
            # The lease stays held and heartbeated; recovery publishes it again, since the
            # message is not marked published (`machine.message_lost`).
            log_event("dispatch failed", level=logging.ERROR, work_id=work_id,
                      attempt=effect.attempt, environment_id=state.environment_id,
                      error=str(exc), action_taken="recovery publishes it again")
            return
        state.mark("published")

    def _log(self, work_id: str, effect: fx.Log, state: _Run) -> None:
        fields = effect.fields if "work_id" in effect.fields else {"work_id": work_id,
                                                                   **effect.fields}
        if state.environment_id and "environment_id" not in fields:
            fields = {**fields, "environment_id": state.environment_id}
        log_event(effect.action, level=effect.level, **fields)


@dataclass(frozen=True)
class _Abort:
    """The effect failed: the decision's remaining effects are dropped and `event` is what the
    machine decides next."""

    event: ev.Event


@dataclass(frozen=True)
class _Again:
    """A guarded change found the record changed under the decision (a stop flag raised
    meanwhile), or the attempt waited for its lease's proof (`waited`): the event is decided
    again on the record as it now is."""

    waited: bool = False
    # The record as the wait ended (`read`): decided on without reading it again.
    read: bool = False
    lease: Lease | None = None


@dataclass(frozen=True)
class _Taken:
    """The attempt took the lease in its proof's wait (`AwaitProof.run`): the run ends with the
    record as then marked."""

    lease: Lease | None


@dataclass(frozen=True)
class _End:
    """The run cannot go on: a guarded change found the lease moved on; the record is read
    back as it now is."""


def _seen(lease: Lease | None) -> float | None:
    """The last sign of life to index a written lease by, as the decision leaves it."""
    return None if lease is None else last_seen(lease)


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
    if isinstance(event, ev.Unreadable):
        return event.environment_id or None
    return None
