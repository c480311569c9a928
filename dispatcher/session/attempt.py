"""Run one attempt of one session: start its sandbox, supervise it, and end its lease.

Once the sandbox runs, the attempt joins its process's supervision hub (`supervision.py`),
which pulses every attempt of the process in one round trip a tick and fences them from one
thread. The attempt's own thread sleeps until the hub wakes it: a pulse that asks something
of it (it is no longer the current attempt, a stop, an operator's terminate, a drain; or its
deadline to judge), its sandbox's exit, or the fence. Then it acts as the machine says: the
signal ladder, the lease written back after Redis lost it, the release. Signal handlers only
set flags the hub reads; nothing is killed from inside a handler (a handler that waits on the
process deadlocks on Popen's lock, which the interrupted wait may hold).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from redis.exceptions import RedisError

from dispatcher.lease import events as ev
from dispatcher.lease.causes import Outcome
from dispatcher.lease.model import Lease, StopKind
from dispatcher.lease.registry import StartReads
from dispatcher.logs import event
from dispatcher.runtime import Runtime
from dispatcher.session.runtimes import RunningSandbox, start_sandbox, warm_claim
from dispatcher.session.sandbox import (
    CommandError,
    SandboxInfraError,
    SandboxSpec,
    SandboxStartError,
    build_environment,
    resolve_command,
)
from dispatcher.session.supervision import (
    SUPERVISE_INTERVAL_SECONDS,
    News,
    Supervised,
    SupervisionHub,
    hub_for,
)
from dispatcher.settings import (
    LeaseMode,
    SandboxRuntimeKind,
    SecretDelivery,
    Settings,
    SettingsError,
)
from dispatcher.startpath import StartPath
from dispatcher.workapi import Work, epoch_seconds

__all__ = ["Outcome", "SessionAttempt", "run_attempt"]

# A hand-off waits at most this long for a heartbeat in flight before it reads the token.
HANDOFF_WAIT_SECONDS = 12.0
# After the sandbox exited, keep trying this long to reach the registry and release the lease.
RELEASE_WAIT_SECONDS = 60.0
# How often an ended attempt whose release is pending looks whether it went through.
RELEASE_POLL_SECONDS = 0.5
# An attempt whose start the infrastructure failed waits, pulsing, for its engine to answer
# again before the session gets a new attempt (a new attempt at once would meet the same outage,
# over and over); past this the new attempt goes to the queue anyway, for whichever worker
# can run it.
INFRA_WAIT_SECONDS = 60.0
# The least an attempt waits before a new one, whatever the engine's probe says: an engine that
# answers pings but still fails creates (the image lost) must not spin sessions through the
# broker; and the process runtime, with no engine to ask, tries a refused fork again after it.
INFRA_PAUSE_SECONDS = 2.0


@dataclass(frozen=True)
class SessionAttempt:
    work_id: str
    session_id: str
    attempt: int
    task_id: str
    worker: str
    # Says whether the operator revoked this task (the threads pool sees Celery's revoked set).
    revoked: Callable[[], bool] = lambda: False
    # Notes the steps of the sandbox's start (the `start path` line).
    path: StartPath | None = None

    def mark(self, step: str) -> None:
        if self.path is not None:
            self.path.mark(step)


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


def run_attempt(runtime: Runtime, attempt: SessionAttempt, *,
                reads: StartReads | None = None) -> Outcome:
    """`reads`: the start's reads, taken as the message arrived (`session/receipts.py`);
    None: read them now."""
    if reads is None:
        reads = runtime.registry.start_reads(attempt.work_id, worker=attempt.worker)
        attempt.mark("lease_read")
    before, work_json, epoch = reads.lease, reads.work_json, reads.epoch
    starting = ev.AttemptStarting(attempt.attempt, attempt.task_id, attempt.worker, os.getpid(),
                                  draining=reads.draining)
    early = _spec_ahead(runtime, before, work_json)
    if early is not None:
        attempt.mark("spec_built")
    step = runtime.executor.attempt(before, starting)
    attempt.mark("running")
    lease = step.lease
    if step.over is not None or lease is None:  # the machine says why it may not start
        return step.over or Outcome.GONE
    spec = early
    if spec is None or (spec.attempt, spec.environment_id) != (lease.attempt,
                                                                lease.environment_id):
        try:
            spec = _spec(runtime, lease, work_json)
        except (CommandError, ValueError, SettingsError) as exc:
            return _start_failed(runtime, attempt, exc)
        attempt.mark("spec_built")
    return _supervise(runtime, attempt, spec, _Memory(lease, epoch))


def _spec_ahead(runtime: Runtime, lease: Lease | None,
                work_json: str | None) -> SandboxSpec | None:
    """The sandbox's spec, built from the lease as read before the machine decides the start:
    an attempt that waits for its lease's proof (an ack still in flight) then has only the
    running mark and the spawn left once the proof comes. It is used only if the lease the
    machine starts is of the same attempt and environment. None when it must wait for the
    decision: a hand-off reads the lease's token once it runs; a spec that cannot be built
    fails the start once the machine let it start, as any start's failure."""
    if lease is None or lease.mode == LeaseMode.HANDOFF:
        return None
    try:
        return _spec(runtime, lease, work_json)
    except (CommandError, ValueError, SettingsError):
        return None


def _start_failed(runtime: Runtime, attempt: SessionAttempt, exc: Exception) -> Outcome:
    """Tell the machine, on the lease as it is now: a start that took long (a slow engine) may
    find another attempt holding it, and its failure must not end that attempt's session."""
    lease = runtime.registry.get(attempt.work_id)
    step = runtime.executor.attempt(lease, ev.SandboxStartFailed(attempt.attempt, str(exc)))
    return step.over or Outcome.FAILED  # a lease released meanwhile: still a failed start


def _infra_failed(runtime: Runtime, attempt: SessionAttempt, exc: SandboxInfraError) -> Outcome:
    """The infrastructure failed the start: wait (pulsing) until it answers again, so the next
    attempt does not meet the same outage at once, then hand the session to a new attempt."""
    event("sandbox not started", level=logging.WARNING, work_id=attempt.work_id,
          attempt=attempt.attempt, error=str(exc), cause="infrastructure",
          action_taken="waiting for the infrastructure, then a new attempt")
    _wait_for_infrastructure(runtime, attempt)
    lease = runtime.registry.get(attempt.work_id)
    failed = ev.SandboxInfraFailed(attempt.attempt, str(exc), next_task_id=uuid.uuid4().hex)
    step = runtime.executor.attempt(lease, failed)
    return step.over or Outcome.SUPERSEDED


def _wait_for_infrastructure(runtime: Runtime, attempt: SessionAttempt) -> None:
    """Pulse the lease for INFRA_PAUSE_SECONDS at least and until the engine answers with
    every image (the process runtime: the pause alone), at most INFRA_WAIT_SECONDS; sooner if
    the attempt lost its lease or was asked to stop."""
    probe = None
    if runtime.settings.sandbox_runtime == SandboxRuntimeKind.DOCKER:
        from dispatcher.control.capacity import ENGINE_UP
        from dispatcher.session.engine_health import EngineProbe

        probe = EngineProbe(runtime.settings)
    started = time.monotonic()
    try:
        with hub_for(runtime).waiting(attempt.work_id, attempt.attempt,
                                      attempt.worker) as member:
            while True:
                waited = time.monotonic() - started
                if waited >= INFRA_WAIT_SECONDS:
                    return
                if waited >= INFRA_PAUSE_SECONDS and (probe is None
                                                      or probe.state() == ENGINE_UP):
                    return
                if member.wait(SUPERVISE_INTERVAL_SECONDS):
                    return  # no longer the current attempt, or asked to stop
    finally:
        if probe is not None:
            probe.close()


def _spec(runtime: Runtime, lease: Lease, work_json: str | None) -> SandboxSpec:
    settings = runtime.settings
    # A container's command is the image's (or DISPATCHER_SANDBOX_COMMAND), not the on-work one.
    argv = (resolve_command(settings.on_work)
            if settings.sandbox_runtime == SandboxRuntimeKind.PROCESS else [])
    if work_json is None:
        raise ValueError("the work item is missing from the registry")
    work = Work.model_validate_json(work_json)
    # The lease's own environment, never another's: its id and key. One this worker does not
    # serve (a configuration that differs from the control worker's) fails the attempt.
    environment = settings.environment(lease.environment_id)
    contract: dict[str, str | None] = {
        "ANTHROPIC_SESSION_ID": work.session_id,
        "ANTHROPIC_WORK_ID": work.id,
        "ANTHROPIC_ENVIRONMENT_ID": environment.id,
        "ANTHROPIC_ENVIRONMENT_KEY": environment.key.get_secret_value(),
        "ANTHROPIC_BASE_URL": settings.base_url if "base_url" in settings.model_fields_set
        else None,
        "DISPATCHER_ATTEMPT": str(lease.attempt),
    }
    if lease.mode == LeaseMode.HANDOFF:
        runtime.executor.run(lease, ev.HandingOff())
        contract["ANTHROPIC_WORK_LAST_HEARTBEAT"] = runtime.registry.settled_token(
            lease.work_id, wait_seconds=HANDOFF_WAIT_SECONDS)
    secret_file = _deliver_secret(settings, lease, work.secret, contract)
    env = build_environment(
        worker_env=os.environ, allow=settings.sandbox_env_allow, contract=contract
    )
    return SandboxSpec(argv=argv, env=env, stdin=work_json.encode(), work_id=work.id,
                       session_id=work.session_id, attempt=lease.attempt, secret_file=secret_file,
                       environment_id=environment.id)


def _deliver_secret(settings: Settings, lease: Lease, secret: str | None,
                    contract: dict[str, str | None]) -> str | None:
    """A sandbox that holds its own lease may want the work secret outside stdin: the SDK's
    `handle_item` reads ANTHROPIC_WORK_SECRET. Returns the secret to write as a file, if any."""
    if lease.mode == LeaseMode.DISPATCHER or secret is None:
        return None
    if settings.secret_delivery == SecretDelivery.ENV:
        contract["ANTHROPIC_WORK_SECRET"] = secret
        return None
    return secret if settings.secret_delivery == SecretDelivery.FILE else None


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
            with _pulsing_while_a_container_starts(runtime, attempt):
                sandbox = start_sandbox(runtime.settings, spec, warm=warm_claim(
                    runtime.settings, runtime.redis, runtime.metrics, worker=attempt.worker))
        except SandboxInfraError as exc:
            return _infra_failed(runtime, attempt, exc)
        except SandboxStartError as exc:
            return _start_failed(runtime, attempt, exc)
        attempt.mark("spawned")
        if attempt.attempt == 1:
            _observe_dispatch_latency(runtime, spec.stdin)
        where: dict[str, object] = dict(sandbox.describe())
        event("started", logging.INFO, work_id=attempt.work_id, session_id=attempt.session_id,
              attempt=attempt.attempt, task_id=attempt.task_id, worker=attempt.worker,
              environment_id=spec.environment_id, **where)
        if attempt.path is not None:
            attempt.path.log(attempt.work_id)
        try:
            return _loop(runtime, attempt, sandbox, flags, memory, spec.stdin)
        finally:
            sandbox.kill_group()  # whatever happened, nothing of the sandbox outlives the task


def _loop(runtime: Runtime, attempt: SessionAttempt, sandbox: RunningSandbox, flags: _Flags,
          memory: _Memory, work_json: bytes) -> Outcome:
    max_seconds = _max_duration(runtime.settings, memory.lease.environment_id)
    sup = _Supervisor(runtime, attempt, sandbox, flags, memory, work_json,
                      max_seconds=max_seconds)
    member = Supervised(attempt.work_id, attempt.attempt, attempt.worker, sandbox,
                        lease=lambda: memory.lease, operator=sup.operator,
                        every_tick=bool(max_seconds))
    hub = hub_for(runtime)
    hub.join(member)
    try:
        return _supervise_until_over(sup, member, hub)
    finally:
        hub.leave(member)


def _supervise_until_over(sup: _Supervisor, member: Supervised, hub: SupervisionHub) -> Outcome:
    """The attempt's thread sleeps until the hub wakes it: a pulse that asks something of it,
    its sandbox's exit, the fence."""
    while True:
        news = member.wait()
        if member.fenced is not None:
            return member.fenced  # killed by the fence: its exit is not the session's
        code = sup.sandbox.wait(0)
        if code is not None:
            hub.leave(member)  # nothing left to fence; the release may ride out an outage
            return _finish_when_reachable(sup, code, draining=member.draining)
        if news is None:
            continue
        try:
            outcome = sup.step(news)
        except RedisError as exc:
            member.failed(exc)
            continue
        member.reachable()
        if outcome is not None:
            return outcome


@dataclass
class _Supervisor:
    """What an attempt's thread does with the news of a pulse (`supervision.News`): act on
    it as the machine says."""

    runtime: Runtime
    attempt: SessionAttempt
    sandbox: RunningSandbox
    flags: _Flags
    memory: _Memory
    work_json: bytes
    # The session's maximum duration (0: none). The supervisor keeps the timer: it runs in
    # every lease mode (the heartbeat task does not visit a lease its sandbox heartbeats), it
    # already ticks and holds the stop ladder, and it needs no control worker to be up.
    max_seconds: float = 0.0

    def __post_init__(self) -> None:
        self.ladder = _SignalLadder(self.runtime, self.sandbox, attempt=self.attempt,
                                    environment_id=self.memory.lease.environment_id)

    def operator(self, draining: bool) -> bool:
        """Whether an operator terminated this attempt's task (read by the hub each tick)."""
        return self.flags.operator_terminated(draining=draining) or self.attempt.revoked()

    def step(self, news: News) -> Outcome | None:
        runtime, pulse = self.runtime, news.pulse
        if not pulse.exists and _reregistered(runtime, self.attempt, self.memory, self.work_json):
            return None
        controls = _Controls(self.sandbox, self.ladder, cause=pulse.stop_cause or "worker draining",
                             seen_at=pulse.stop_seen_at)
        over = runtime.executor.attempt(self.memory.lease, news.pulsed, sandbox=controls).over
        if over is None and pulse.current and not pulse.stop and self.max_seconds:
            # The machine judges the deadline (`DeadlineChecked`); past it, it flags a graceful
            # stop, which the next pulse signals, and the flag ends these checks.
            self.runtime.executor.attempt(self.memory.lease,
                                          ev.DeadlineChecked(self.attempt.attempt,
                                                             self.max_seconds))
        return over


@dataclass
class _Controls:
    """The running sandbox as the machine's effects act on it (`executor.Sandbox`)."""

    sandbox: RunningSandbox
    ladder: _SignalLadder
    cause: str = ""
    seen_at: float = 0.0

    def signal(self, kind: StopKind) -> None:
        self.ladder.step(kind, cause=self.cause, seen_at=self.seen_at)

    def fence(self) -> None:
        self.sandbox.kill_group()


def _max_duration(settings: Settings, environment_id: str) -> float:
    """A session's maximum duration in seconds (0: none): its environment's own, or the
    fleet's."""
    own = settings.environment(environment_id).max_session_seconds
    return settings.max_session_seconds if own is None else own


def _observe_dispatch_latency(runtime: Runtime, work_json: bytes) -> None:
    work = Work.model_validate_json(work_json)
    created_at = epoch_seconds(work.created_at)
    if created_at is None:
        return
    runtime.metrics.observe("dispatch_latency_seconds", max(0.0, time.time() - created_at),
                            environment=work.environment_id)


def _reregistered(runtime: Runtime, attempt: SessionAttempt, memory: _Memory,
                  work_json: bytes) -> bool:
    """Our lease is gone. If Redis lost everything (a new registry epoch), the machine writes it
    back from what this attempt remembers; otherwise it was released and we are fenced. A
    write-back Redis refused is tried again at the next call (the epoch is not taken as seen)."""
    epoch = runtime.registry.epoch()
    if epoch == memory.epoch:
        return False
    remembered = memory.lease.but(worker=attempt.worker, pid=os.getpid())
    if runtime.executor.write_back(ev.RegistryReset(remembered),
                                   work_json=work_json.decode()) is not None:
        memory.epoch = epoch
    return True


class _SignalLadder:
    """Graceful: SIGTERM to the group, the grace period, then SIGKILL. Force: SIGKILL now."""

    def __init__(self, runtime: Runtime, sandbox: RunningSandbox, *,
                 attempt: SessionAttempt, environment_id: str = "") -> None:
        self.runtime = runtime
        self.environment_id = environment_id
        self.grace = runtime.settings.stop_grace_seconds
        self.sandbox = sandbox
        self.attempt = attempt
        self.term_sent_at: float | None = None
        self.killed = False

    def step(self, kind: StopKind, *, cause: str, seen_at: float) -> None:
        if self.killed:
            return
        if self.term_sent_at is None and seen_at:
            since = self.runtime.registry.clock.now() - seen_at  # seen_at: the fleet's clock
            self.runtime.metrics.observe("stop_latency_seconds", max(0.0, since),
                                         environment=self.environment_id)
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
              environment_id=self.environment_id, signal=signum.name, cause=cause)
        self.sandbox.signal_group(signum)


def _finish_when_reachable(sup: _Supervisor, code: int, *, draining: bool) -> Outcome:
    """Release the ended attempt's lease, riding out a registry outage for a while: giving up
    would leave the server's lease to lapse (and, in some lease modes, the item stranded).
    A registry that came back empty gets the lease written back first, so it is released."""
    runtime, attempt = sup.runtime, sup.attempt
    deadline = time.monotonic() + RELEASE_WAIT_SECONDS
    outcome: Outcome | None = None
    while True:
        try:
            if runtime.registry.get(attempt.work_id) is None:
                _reregistered(runtime, attempt, sup.memory, sup.work_json)
            if outcome is None:
                outcome = _finish(runtime, sup, code, draining=draining)
            if _released(runtime, sup, outcome):
                return outcome
        except RedisError as exc:
            if time.monotonic() >= deadline:
                event("release abandoned", level=logging.ERROR, work_id=attempt.work_id,
                      attempt=attempt.attempt, environment_id=sup.memory.lease.environment_id,
                      error=str(exc),
                      outcome="left to the server's lease expiry")
                return Outcome.LOST
        if time.monotonic() >= deadline:
            event("release still pending", level=logging.WARNING, work_id=attempt.work_id,
                  attempt=attempt.attempt, outcome="left to the heartbeat task")
            return outcome or Outcome.LOST
        time.sleep(RELEASE_POLL_SECONDS)


def _released(runtime: Runtime, sup: _Supervisor, outcome: Outcome) -> bool:
    """Whether the ended attempt can leave (the machine says: `ReleaseAwaited`). While it may
    not, it remembers the record, which it alone could write back if Redis restarted empty."""
    lease = runtime.registry.get(sup.attempt.work_id)
    reset = lease is None and runtime.registry.epoch() != sup.memory.epoch
    step = runtime.executor.attempt(lease, ev.ReleaseAwaited(sup.attempt.attempt, outcome,
                                                              registry_reset=reset))
    if step.over is None and step.lease is not None:
        sup.memory.lease = step.lease
    return step.over is not None


def _finish(runtime: Runtime, sup: _Supervisor, code: int, *, draining: bool) -> Outcome:
    """`draining`: whether the worker drains, as the hub's pulses last said (`Supervised`)."""
    attempt = sup.attempt
    lease = runtime.registry.get(attempt.work_id)
    exited = ev.SandboxExited(attempt.attempt, code, draining, next_task_id=uuid.uuid4().hex)
    step = runtime.executor.attempt(lease, exited)
    if step.lease is not None and step.over != Outcome.SUPERSEDED:
        sup.memory.lease = step.lease  # a superseded attempt has nothing new to remember
    return step.over or Outcome.SUPERSEDED


@contextmanager
def _pulsing_while_a_container_starts(runtime: Runtime,
                                      attempt: SessionAttempt) -> Iterator[None]:
    """Pulse the lease (with the process's other attempts, `SupervisionHub.waiting`) while the
    engine creates the container. Creating one copies its image's root on some storage drivers
    (seconds for an image with the SDK on vfs), and a lease with no pulse for the recovery's
    staleness limit is taken for one whose worker died: a second attempt starts, and this one
    is fenced once its container runs. A process starts in milliseconds: it needs no pulse.
    A stop the pulses find waits for the container: the supervisor acts on it once it runs."""
    if runtime.settings.sandbox_runtime != SandboxRuntimeKind.DOCKER:
        yield
        return
    with hub_for(runtime).waiting(attempt.work_id, attempt.attempt, attempt.worker):
        yield


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
