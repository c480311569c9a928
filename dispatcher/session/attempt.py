"""Run one attempt of one session: start its sandbox, supervise it, and end its lease.

The supervisor loop wakes a few times a second and does four things, in order: reap the
sandbox if it exited, pulse the lease (which also tells it whether it is still the current
attempt and whether a stop was asked for), apply the signal ladder, and notice a drain. Signal
handlers only set flags the loop reads; nothing is killed from inside a handler (a handler that
waits on the process deadlocks on Popen's lock, see the Celery brief).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from redis.exceptions import RedisError

from dispatcher.events import event
from dispatcher.lease.executor import dispatch, release, restart_attempt
from dispatcher.lease.registry import Lease, Phase, StopKind
from dispatcher.runtime import Runtime
from dispatcher.session.runtimes import RunningSandbox, start_sandbox
from dispatcher.session.sandbox import (
    CommandError,
    SandboxSpec,
    SandboxStartError,
    build_environment,
    resolve_command,
)
from dispatcher.settings import LeaseMode, SandboxRuntimeKind, SecretDelivery, Settings
from dispatcher.workapi import Work

__all__ = ["Outcome", "SessionAttempt", "run_attempt"]

# How often the supervisor pulses and reads its stop flag: the stop latency floor.
SUPERVISE_INTERVAL_SECONDS = 0.2
# A hand-off waits at most this long for a heartbeat in flight before it reads the token.
HANDOFF_WAIT_SECONDS = 12.0
# While the registry is unreachable nobody heartbeats (beat and the heartbeat task need it too),
# so the server's lease may lapse one TTL after its last beat, which was up to a third of a TTL
# (the beat interval) before the outage began. Past this share of the TTL the sandbox is killed:
# the server may give the session to someone else, and two runners must never overlap.
REGISTRY_OUTAGE_SHARE_OF_TTL = 2 / 3
# A lease's TTL before the server first answered (as the heartbeat task assumes).
ASSUMED_TTL_SECONDS = 30
# After the sandbox exited, keep trying this long to reach the registry and release the lease.
RELEASE_WAIT_SECONDS = 60.0


class Outcome(StrEnum):
    COMPLETED = "completed"  # exit code 0
    FAILED = "failed"  # non-zero exit, or the command could not start
    STOPPED = "stopped"  # a stop request ended it
    HANDED_OVER = "handed_over"  # the worker drained: a new attempt runs elsewhere
    SUPERSEDED = "superseded"  # a newer attempt owns the lease (fencing)
    LOST = "lost"  # the server no longer gives us the lease
    GONE = "gone"  # nothing to run: released, or never ours


@dataclass(frozen=True)
class SessionAttempt:
    work_id: str
    session_id: str
    attempt: int
    task_id: str
    worker: str
    # Says whether the operator revoked this task (the threads pool sees Celery's revoked set).
    revoked: Callable[[], bool] = lambda: False


# A SIGTERM that reaches the pool child is an operator's terminate only if the worker is not
# draining; when a whole process group is signalled, the drain flag lands a moment later.
TERMINATE_SETTLE_SECONDS = 0.5


@dataclass
class _Flags:
    """Set by signal handlers, read by the loop."""

    terminate: bool = False
    terminate_seen_at: float | None = None

    def operator_terminated(self, *, draining: bool) -> bool:
        if not self.terminate or draining:
            return False
        if self.terminate_seen_at is None:
            self.terminate_seen_at = time.monotonic()
        return time.monotonic() - self.terminate_seen_at >= TERMINATE_SETTLE_SECONDS


def run_attempt(runtime: Runtime, attempt: SessionAttempt) -> Outcome:
    lease = runtime.registry.get(attempt.work_id)
    refusal = _refuse(lease, attempt)
    if refusal is not None or lease is None:
        return refusal or Outcome.GONE
    if lease.stop:
        release(runtime, lease, reason=f"stopped before start ({lease.stop_cause})",
                outcome="stopped")
        return Outcome.STOPPED
    if runtime.capacity.is_draining(attempt.worker):
        # Celery delivered this just before the drain stopped its consumer: pass it on as is.
        event("attempt passed on", work_id=attempt.work_id, attempt=attempt.attempt,
              reason="worker draining")
        dispatch(runtime, lease)
        return Outcome.HANDED_OVER
    if not _mark_running(runtime, attempt):
        return Outcome.SUPERSEDED
    try:
        spec = _spec(runtime, lease)
    except (CommandError, ValueError) as exc:
        event("sandbox not started", level=logging.ERROR, work_id=attempt.work_id,
              session_id=attempt.session_id, attempt=attempt.attempt, error=str(exc))
        release(runtime, lease, reason="sandbox could not start", outcome="failed")
        return Outcome.FAILED
    return _supervise(runtime, attempt, spec, _Memory(lease, runtime.registry.epoch()))


def _refuse(lease: Lease | None, attempt: SessionAttempt) -> Outcome | None:
    if lease is None:
        event("attempt skipped", work_id=attempt.work_id, attempt=attempt.attempt,
              reason="lease released")
        return Outcome.GONE
    if lease.attempt != attempt.attempt or lease.task_id != attempt.task_id:
        event("attempt skipped", work_id=attempt.work_id, attempt=attempt.attempt,
              reason=f"superseded by attempt {lease.attempt}")
        return Outcome.SUPERSEDED
    return None


def _mark_running(runtime: Runtime, attempt: SessionAttempt) -> bool:
    done = runtime.registry.update_if_attempt(
        attempt.work_id, attempt.attempt, phase=Phase.RUNNING, worker=attempt.worker,
        pid=os.getpid(), pulse_at=time.time(), task_id=attempt.task_id,
    )
    return done == 1


def _spec(runtime: Runtime, lease: Lease) -> SandboxSpec:
    settings = runtime.settings
    # A container's command is the image's (or DISPATCHER_SANDBOX_COMMAND), not the on-work one.
    argv = (resolve_command(settings.on_work)
            if settings.sandbox_runtime == SandboxRuntimeKind.PROCESS else [])
    work_json = runtime.registry.work_json(lease.work_id)
    if work_json is None:
        raise ValueError("the work item is missing from the registry")
    work = Work.model_validate_json(work_json)
    environment_id, environment_key = settings.require_worker()
    contract: dict[str, str | None] = {
        "ANTHROPIC_SESSION_ID": work.session_id,
        "ANTHROPIC_WORK_ID": work.id,
        "ANTHROPIC_ENVIRONMENT_ID": environment_id,
        "ANTHROPIC_ENVIRONMENT_KEY": environment_key.get_secret_value(),
        "ANTHROPIC_BASE_URL": settings.base_url if "base_url" in settings.model_fields_set
        else None,
        "DISPATCHER_ATTEMPT": str(lease.attempt),
    }
    if lease.mode == LeaseMode.HANDOFF:
        contract["ANTHROPIC_WORK_LAST_HEARTBEAT"] = runtime.registry.hand_heartbeat_to_sandbox(
            lease.work_id, wait_seconds=HANDOFF_WAIT_SECONDS
        )
    secret_file = _deliver_secret(settings, lease, work.secret, contract)
    env = build_environment(
        worker_env=os.environ, allow=settings.sandbox_env_allow, contract=contract
    )
    return SandboxSpec(argv=argv, env=env, stdin=work_json.encode(), work_id=work.id,
                       session_id=work.session_id, attempt=lease.attempt, secret_file=secret_file)


def _deliver_secret(settings: Settings, lease: Lease, secret: str | None,
                    contract: dict[str, str | None]) -> str | None:
    """A sandbox that holds its own lease may want the work secret outside stdin: SDK 2.10.0's
    `handle_item` reads ANTHROPIC_WORK_SECRET. Returns the secret to write as a file, if any."""
    if lease.mode == LeaseMode.DISPATCHER or secret is None:
        return None
    if settings.work_secret_delivery == SecretDelivery.ENV:
        contract["ANTHROPIC_WORK_SECRET"] = secret
        return None
    return secret if settings.work_secret_delivery == SecretDelivery.FILE else None


@dataclass
class _Memory:
    """What a running attempt remembers of its lease, to rebuild it if Redis loses it."""

    lease: Lease
    epoch: str


def _supervise(runtime: Runtime, attempt: SessionAttempt, spec: SandboxSpec,
               memory: _Memory) -> Outcome:
    flags = _Flags()
    with _terminate_sets_flag(flags):
        try:
            sandbox = start_sandbox(runtime.settings, spec)
        except SandboxStartError as exc:
            event("sandbox not started", level=logging.ERROR, work_id=attempt.work_id,
                  session_id=attempt.session_id, attempt=attempt.attempt, error=str(exc))
            release(runtime, memory.lease, reason="sandbox could not start", outcome="failed")
            return Outcome.FAILED
        if attempt.attempt == 1:
            _observe_dispatch_latency(runtime, spec.stdin)
        where: dict[str, object] = dict(sandbox.describe())
        event("started", logging.INFO, work_id=attempt.work_id, session_id=attempt.session_id,
              attempt=attempt.attempt, task_id=attempt.task_id, worker=attempt.worker, **where)
        try:
            return _loop(runtime, attempt, sandbox, flags, memory, spec.stdin)
        finally:
            sandbox.kill_group()  # whatever happened, nothing of the sandbox outlives the task


def _loop(runtime: Runtime, attempt: SessionAttempt, sandbox: RunningSandbox, flags: _Flags,
          memory: _Memory, work_json: bytes) -> Outcome:
    sup = _Supervisor(runtime, attempt, sandbox, flags, memory, work_json)
    outage = _Outage(attempt, ttl=memory.lease.ttl_seconds or ASSUMED_TTL_SECONDS)
    while True:
        code = sandbox.wait(SUPERVISE_INTERVAL_SECONDS)
        try:
            if code is not None:
                return _finish_when_reachable(sup, code)
            outcome = sup.step()
        except RedisError as exc:
            if outage.too_long(exc):
                sandbox.kill_group()
                return Outcome.LOST
            continue
        outage.over()
        if outcome is not None:
            return outcome


@dataclass
class _Supervisor:
    """One tick of supervision: pulse the lease, then act on what it says."""

    runtime: Runtime
    attempt: SessionAttempt
    sandbox: RunningSandbox
    flags: _Flags
    memory: _Memory
    work_json: bytes
    draining: bool = False

    def __post_init__(self) -> None:
        self.ladder = _SignalLadder(self.runtime, self.sandbox, attempt=self.attempt)

    def step(self) -> Outcome | None:
        runtime, attempt = self.runtime, self.attempt
        pulse = runtime.registry.pulse(attempt.work_id, attempt.attempt, worker=attempt.worker)
        if not pulse.exists and _reregistered(runtime, attempt, self.memory, self.work_json):
            return None
        if pulse.token:
            self.memory.lease.token = pulse.token
        if not pulse.exists or not pulse.current:
            event("fenced", level=logging.WARNING, work_id=attempt.work_id,
                  attempt=attempt.attempt, reason="a newer attempt owns the lease"
                  if pulse.exists else "lease released")
            self.sandbox.kill_group()
            return Outcome.SUPERSEDED
        self.draining = self.draining or pulse.draining
        operator = self.flags.operator_terminated(draining=self.draining) or attempt.revoked()
        if operator and not pulse.stop:
            runtime.registry.request_stop(attempt.work_id, StopKind.GRACEFUL, "operator")
            return None
        kind = StopKind(pulse.stop) if pulse.stop else (
            StopKind.GRACEFUL if self.draining else None)
        if kind is not None:
            self.ladder.step(kind, cause=pulse.stop_cause or "worker draining",
                             seen_at=pulse.stop_seen_at)
        return None


class _Outage:
    """The registry cannot be reached: keep the sandbox running (Redis restarts take seconds),
    unless the outage lasts long enough for the server's lease to lapse."""

    def __init__(self, attempt: SessionAttempt, *, ttl: int) -> None:
        self.attempt = attempt
        self.bound = ttl * REGISTRY_OUTAGE_SHARE_OF_TTL
        self.since: float | None = None

    def too_long(self, exc: RedisError) -> bool:
        now = time.monotonic()
        if self.since is None:
            self.since = now
            event("registry unreachable", level=logging.WARNING, work_id=self.attempt.work_id,
                  attempt=self.attempt.attempt, error=str(exc),
                  action_taken=f"sandbox kept, fenced after {self.bound:.0f}s")
        if now - self.since < self.bound:
            return False
        event("fenced", level=logging.WARNING, work_id=self.attempt.work_id,
              attempt=self.attempt.attempt,
              reason=f"registry unreachable for {now - self.since:.0f}s: the lease may lapse")
        return True

    def over(self) -> None:
        if self.since is not None:
            event("registry reachable again", work_id=self.attempt.work_id,
                  attempt=self.attempt.attempt,
                  after_seconds=round(time.monotonic() - self.since, 1))
            self.since = None


def _observe_dispatch_latency(runtime: Runtime, work_json: bytes) -> None:
    created = Work.model_validate_json(work_json).created_at
    try:
        created_at = datetime.fromisoformat(created.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return
    runtime.metrics.observe("dispatch_latency_seconds", max(0.0, time.time() - created_at))


def _reregistered(runtime: Runtime, attempt: SessionAttempt, memory: _Memory,
                  work_json: bytes) -> bool:
    """Our lease is gone. If Redis lost everything (a new registry epoch), the lease is still
    ours on the server and this sandbox is its only runner: write it back, with the last token
    we saw, and let the heartbeat task carry on. Otherwise it was released: we are fenced."""
    epoch = runtime.registry.epoch()
    if epoch == memory.epoch:
        return False
    memory.epoch = epoch
    lease = memory.lease
    lease.phase, lease.worker, lease.pid = Phase.RUNNING, attempt.worker, os.getpid()
    lease.pulse_at = lease.heartbeat_ok_at = time.time()
    runtime.registry.create(lease, work_json=work_json.decode())
    if lease.heartbeats_by == "dispatcher":
        runtime.registry.schedule_heartbeat(lease.work_id, time.time())
    event("lease re-registered", level=logging.WARNING, work_id=lease.work_id,
          session_id=lease.session_id, attempt=lease.attempt, reason="registry was reset")
    return True


class _SignalLadder:
    """Graceful: SIGTERM to the group, the grace period, then SIGKILL. Force: SIGKILL now."""

    def __init__(self, runtime: Runtime, sandbox: RunningSandbox, *,
                 attempt: SessionAttempt) -> None:
        self.runtime = runtime
        self.grace = runtime.settings.stop_grace_seconds
        self.sandbox = sandbox
        self.attempt = attempt
        self.term_sent_at: float | None = None
        self.killed = False

    def step(self, kind: StopKind, *, cause: str, seen_at: float) -> None:
        if self.killed:
            return
        if self.term_sent_at is None and seen_at:
            self.runtime.metrics.observe("stop_latency_seconds", max(0.0, time.time() - seen_at))
        now = time.monotonic()
        if kind == StopKind.FORCE or (
            self.term_sent_at is not None and now - self.term_sent_at >= self.grace
        ):
            self._signal(signal.SIGKILL, cause)
            self.killed = True
        elif self.term_sent_at is None:
            self._signal(signal.SIGTERM, cause)
            self.term_sent_at = now

    def _signal(self, signum: signal.Signals, cause: str) -> None:
        event("killed" if signum == signal.SIGKILL else "terminated", work_id=self.attempt.work_id,
              session_id=self.attempt.session_id, attempt=self.attempt.attempt,
              signal=signum.name, cause=cause)
        self.sandbox.signal_group(signum)


def _finish_when_reachable(sup: _Supervisor, code: int) -> Outcome:
    """Release the ended attempt's lease, riding out a registry outage for a while: giving up
    would leave the server's lease to lapse (and, in some lease modes, the item stranded).
    A registry that came back empty gets the lease written back first, so it is released."""
    runtime, attempt = sup.runtime, sup.attempt
    deadline = time.monotonic() + RELEASE_WAIT_SECONDS
    while True:
        try:
            if runtime.registry.get(attempt.work_id) is None:
                _reregistered(runtime, attempt, sup.memory, sup.work_json)
            return _finish(runtime, attempt, code, draining=sup.draining)
        except RedisError as exc:
            if time.monotonic() >= deadline:
                event("release abandoned", level=logging.ERROR, work_id=attempt.work_id,
                      attempt=attempt.attempt, error=str(exc),
                      outcome="left to the server's lease expiry")
                return Outcome.LOST
            time.sleep(1.0)


def _finish(runtime: Runtime, attempt: SessionAttempt, code: int, *, draining: bool) -> Outcome:
    lease = runtime.registry.get(attempt.work_id)
    if lease is None or lease.attempt != attempt.attempt:
        return Outcome.SUPERSEDED
    event("exited", work_id=attempt.work_id, session_id=attempt.session_id,
          attempt=attempt.attempt, exit_code=code)
    if lease.is_lost:
        release(runtime, lease, reason=lease.stop_cause or "lease lost", outcome="lost")
        return Outcome.LOST
    if lease.stop:
        release(runtime, lease, reason=f"stopped ({lease.stop_cause})", outcome="stopped")
        return Outcome.STOPPED
    if draining and lease.heartbeats_by == "dispatcher":
        restart_attempt(runtime, lease, reason="worker drained", failure=False)
        return Outcome.HANDED_OVER
    if draining:
        # The sandbox held the lease (runner, handoff): its last token died with it, so a new
        # attempt could only be refused (412). End the session instead of stranding it.
        release(runtime, lease, reason="worker drained; the sandbox held the lease",
                outcome="stopped")
        return Outcome.STOPPED
    outcome = Outcome.COMPLETED if code == 0 else Outcome.FAILED
    release(runtime, lease, reason="exited" if code == 0 else f"exited with {code}",
            outcome=outcome.value)
    return outcome


@contextmanager
def _terminate_sets_flag(flags: _Flags) -> Iterator[None]:
    """On prefork, `revoke --terminate` signals the pool child running us: turn that signal
    into a flag (billiard's own handler would raise SystemExit mid-step). Only the main thread
    can install handlers; on the threads pool Celery cannot terminate tasks at all."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        flags.terminate = True

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
