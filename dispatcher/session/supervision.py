"""Supervision of a worker process's running attempts: one hub, two threads, for all of them.

A session worker of the threads pool runs hundreds of attempts. Pulsing each lease from its own
thread, and watching each for self-fencing from another, cost 1,000 Redis round trips and 10,000
thread wake-ups a second for 1,000 sessions: more than two cores had, so pulses went stale and
recovery restarted sessions that were running. The hub does the same work in bulk:

* **the pulse thread**, every `SUPERVISE_INTERVAL_SECONDS`: one pipeline pulses every attempt
  of the process (`LeaseRegistry.pulse_many`), each answer becomes the attempt's `Pulsed`, and
  the attempt's own thread is woken only when the machine says the pulse asks something of it
  (`pulse_is_quiet`), when its sandbox exited, or when it judges its deadline each tick. A
  session at rest costs its share of the pipeline and one pure call.
* **the fence thread**, every `FENCE_CHECK_SECONDS`: asks the machine about each attempt whose
  last answered pulse is old (`RegistryUnreachable`), and kills the sandbox when it says so. A
  thread apart from the pulses, so that a call hanging on a cut network cannot delay the kill.

An attempt with no sandbox running (`Waiting`: its container being created, or its start failed
by the infrastructure and it waits for the engine) is pulsed by the same pipeline: a lease with
no pulse for recovery's staleness limit is taken for one whose worker died, and a second attempt
would start. It has nothing to fence and no exit to watch.

A stop flag is still acted on at the next tick: the pulse that finds it wakes the attempt. A
prefork pool child gets a hub of its own (`hub_for` keys on the process id): threads do not
survive a fork.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from redis.exceptions import RedisError

from dispatcher.lease import events as ev
from dispatcher.lease.causes import Outcome
from dispatcher.lease.machine import pulse_is_quiet
from dispatcher.lease.model import Lease, StopKind
from dispatcher.lease.registry import Pulse
from dispatcher.logs import event
from dispatcher.runtime import Runtime
from dispatcher.session.runtimes import RunningSandbox

__all__ = ["FENCE_CHECK_SECONDS", "SUPERVISE_INTERVAL_SECONDS", "News", "Supervised",
           "SupervisionHub", "Waiting", "hub_for"]

# How often the hub pulses every attempt and the attempts read their stop flags: the stop
# latency floor.
SUPERVISE_INTERVAL_SECONDS = 0.2
# How often the fence looks at the age of each attempt's last pulse: a share of the margin
# between the self-fencing bound and recovery's (`lease/machine`), so a fenced sandbox is dead
# well inside it.
FENCE_CHECK_SECONDS = 0.2
# An attempt's thread looks at its sandbox on its own at least this often: the hub tells it of
# an exit, but not while the hub's pipeline waits out Redis's socket timeout in an outage.
OWN_LOOK_SECONDS = 1.0


@dataclass(frozen=True)
class News:
    """What the hub hands an attempt's thread: the pulse's answer and the event it makes."""

    pulse: Pulse
    pulsed: ev.Pulsed


@dataclass(eq=False)
class Supervised:
    """One running attempt as the hub sees it. `lease` reads the attempt's memory of its lease
    (the token a pulse brings is kept there, for a write-back after Redis lost the record)."""

    work_id: str
    attempt: int
    worker: str
    sandbox: RunningSandbox
    lease: Callable[[], Lease]
    # Whether an operator terminated the attempt's task (a revoke, a SIGTERM on prefork).
    operator: Callable[[bool], bool]
    # Woken every tick, quiet or not: it judges its session's maximum duration.
    every_tick: bool = False
    # Whether the worker drains, as the pulses say: once it does, it stays so. The one place an
    # attempt keeps it (its exit is reported with it).
    draining: bool = False
    pulsed_at: float = field(default_factory=time.monotonic)
    unreachable: bool = False
    fenced: Outcome | None = None  # the machine fenced it: the attempt is over, with this
    fault: str | None = None  # the last fault of a hub step on it (`_guarded`), logged once
    _news: News | None = None
    _woken: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def wait(self) -> News | None:
        """Sleep until the hub has something (news, an exit, the fence), or `OWN_LOOK_SECONDS`;
        the news, if any, taken."""
        self._woken.wait(OWN_LOOK_SECONDS)
        self._woken.clear()
        with self._lock:
            news, self._news = self._news, None
        return news

    def answered(self, pulse: Pulse) -> None:
        """The hub's pulse answered: keep the token, and wake the thread if the machine says
        the pulse asks something of it (or it judges a deadline)."""
        lease = self.lease()
        if pulse.token:
            lease.token = pulse.token
        self.draining = self.draining or pulse.draining
        pulsed = ev.Pulsed(self.attempt, exists=pulse.exists, current=pulse.current,
                           stop=StopKind(pulse.stop or StopKind.NONE), draining=self.draining,
                           operator=self.operator(self.draining))
        quiet = pulse_is_quiet(lease, pulsed)
        if quiet:
            self.reachable()  # else once its thread has acted on it
        if not quiet or self.every_tick:
            with self._lock:
                self._news = News(pulse, pulsed)
            self._woken.set()

    def reachable(self) -> None:
        if self.unreachable:
            event("registry reachable again", work_id=self.work_id, attempt=self.attempt,
                  environment_id=self.lease().environment_id,
                  after_seconds=round(time.monotonic() - self.pulsed_at, 1))
            self.unreachable = False
        self.pulsed_at = time.monotonic()

    def failed(self, exc: RedisError) -> None:
        if not self.unreachable:
            self.unreachable = True
            event("registry unreachable", level=logging.WARNING, work_id=self.work_id,
                  attempt=self.attempt, environment_id=self.lease().environment_id,
                  error=str(exc), action_taken="sandbox kept while the fence allows")

    def wake(self) -> None:
        self._woken.set()

    # --- the machine's `Sandbox` while the registry is out of reach -----------------------
    def fence(self) -> None:
        """The machine's `Fence`: the pulse is too old for this sandbox to run on. The group is
        killed here and now; the attempt's thread frees the rest (`kill_group`). Marked fenced
        first: an attempt that saw the kill's exit before the mark would report it as the
        session's own (a failure that ends it)."""
        self.fenced = self.fenced or Outcome.LOST  # the machine's outcome replaces it
        self.sandbox.signal_group(signal.SIGKILL)

    def signal(self, kind: StopKind) -> None:
        self.fence()  # no stop ladder while the registry is out of reach: a kill


@dataclass(eq=False)
class Waiting:
    """An attempt the hub pulses while no sandbox of it runs. `wait` says when a pulse found it
    no longer the lease's current attempt, or asked to stop: its wait is over."""

    work_id: str
    attempt: int
    worker: str
    fault: str | None = None  # as `Supervised.fault`
    _over: threading.Event = field(default_factory=threading.Event)

    def answered(self, pulse: Pulse) -> None:
        if not pulse.current or pulse.stop:
            self._over.set()

    def failed(self, exc: RedisError) -> None:
        """Nothing to do in an outage: what the attempt does next meets whatever the registry
        holds once it answers."""

    def wait(self, seconds: float) -> bool:
        """Sleep `seconds`, or less if a pulse ended the wait; whether one did."""
        return self._over.wait(seconds)


Member = Supervised | Waiting

PULSE_THREAD, FENCE_THREAD = "supervise-pulse", "supervise-fence"


class SupervisionHub:
    """The process's hub: attempts `join` when their sandbox runs and `leave` when it exited;
    an attempt with no sandbox running is pulsed while it is `waiting`."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.pid = os.getpid()
        self._members: dict[int, Member] = {}
        self._lock = threading.Lock()
        # The hub's threads by name, while they serve: they end when the last attempt they
        # serve left (a process of short sessions, a test's runtime, must not keep threads
        # ticking for nobody) and the next `join` starts them again. The fence serves only
        # attempts with a sandbox: one that waits has nothing to kill.
        self._threads: dict[str, threading.Thread] = {}

    def join(self, member: Member) -> None:
        with self._lock:
            self._members[id(member)] = member
            self._serve(PULSE_THREAD, self._pulse_loop)
            if isinstance(member, Supervised):
                self._serve(FENCE_THREAD, self._fence_loop)

    def _serve(self, name: str, target: Callable[[], None]) -> None:
        if name not in self._threads:
            thread = threading.Thread(target=target, daemon=True, name=name)
            self._threads[name] = thread
            thread.start()

    def leave(self, member: Member) -> None:
        with self._lock:
            self._members.pop(id(member), None)

    @contextmanager
    def waiting(self, work_id: str, attempt: int, worker: str) -> Iterator[Waiting]:
        """Pulse an attempt with no sandbox running, until the block ends."""
        member = Waiting(work_id, attempt, worker)
        self.join(member)
        try:
            yield member
        finally:
            self.leave(member)

    def members(self) -> list[Member]:
        with self._lock:
            return list(self._members.values())

    def idle(self) -> bool:
        """No attempt to supervise, and no thread of the hub's left serving."""
        with self._lock:
            return not self._members and not self._threads

    def _serving(self, name: str) -> list[Member]:
        """The members the thread `name` serves, or none and it is struck off (under the lock
        that `join` takes, so an attempt that joins meanwhile starts a new one)."""
        with self._lock:
            members = [m for m in self._members.values()
                       if name == PULSE_THREAD or isinstance(m, Supervised)]
            if not members:
                self._threads.pop(name, None)
            return members

    # --- the pulse thread -----------------------------------------------------------------
    def _pulse_loop(self) -> None:
        next_tick = time.monotonic()
        while members := self._serving(PULSE_THREAD):
            self.tick(members)
            next_tick += SUPERVISE_INTERVAL_SECONDS
            pause = next_tick - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            else:
                next_tick = time.monotonic()  # late (a slow Redis): the next tick from now

    def tick(self, members: list[Member]) -> None:
        """Pulse `members` in one round trip, hand each its answer, and wake those whose
        sandbox exited."""
        try:
            pulses = self.runtime.registry.pulse_many(
                [(m.work_id, m.attempt, m.worker) for m in members])
        except RedisError as exc:
            for member in members:
                member.failed(exc)
        except Exception as exc:  # a fault here must not end the hub's thread
            for member in members:
                _fault(member, "pulse", exc)
        else:
            for member, pulse in zip(members, pulses, strict=True):
                if isinstance(pulse, Exception):
                    _fault(member, "pulse", pulse)
                else:
                    _guarded(member, "pulse", member.answered, pulse)
        for member in members:
            if isinstance(member, Supervised):
                _guarded(member, "exit check", _wake_if_exited, member)

    # --- the fence thread -----------------------------------------------------------------
    def _fence_loop(self) -> None:
        while members := self._serving(FENCE_THREAD):
            for member in members:
                if isinstance(member, Supervised):  # what `_serving` gave it, for the types
                    _guarded(member, "fence check", self.fence_check, member)
            time.sleep(FENCE_CHECK_SECONDS)

    def fence_check(self, member: Supervised) -> None:
        """Ask the machine about an attempt whose last answered pulse is old."""
        silent = time.monotonic() - member.pulsed_at
        if member.fenced is not None or silent < 2 * SUPERVISE_INTERVAL_SECONDS:
            return  # pulsing as usual, or fenced already: nothing to ask
        step = self.runtime.executor.attempt(member.lease(), ev.RegistryUnreachable(silent),
                                             sandbox=member)
        if step.over is not None:
            member.fenced = step.over
            member.wake()


def _wake_if_exited(member: Supervised) -> None:
    if member.sandbox.wait(0) is not None:
        member.wake()


def _guarded(member: Member, step: str, act: Callable[..., None], *args: object) -> None:
    """One member's step of a hub thread. A fault in it (a bug, a record Redis returns
    unreadable) is logged and leaves the other members served: the thread ending would leave
    every attempt of the process unpulsed, and the fence would kill them all. The faulty
    member's pulse goes stale, so the fence and recovery deal with it as with any silent one."""
    try:
        act(*args)
    except Exception as exc:  # see above
        _fault(member, step, exc)


def _fault(member: Member, step: str, exc: Exception) -> None:
    error = f"{type(exc).__name__}: {exc}"[:300]
    if member.fault != error:  # once per fault, not every tick
        member.fault = error
        event("supervision step failed", level=logging.ERROR, work_id=member.work_id,
              attempt=member.attempt, step=step, error=error,
              action_taken="the other attempts served; this one's pulse goes stale")


_HUBS: dict[int, SupervisionHub] = {}
_HUBS_LOCK = threading.Lock()


def hub_for(runtime: Runtime) -> SupervisionHub:
    """The hub of this process for `runtime`: one per process (a forked child makes its own)."""
    with _HUBS_LOCK:
        hub = _HUBS.get(id(runtime))
        if hub is None or hub.pid != os.getpid() or hub.runtime is not runtime:
            hub = _HUBS[id(runtime)] = SupervisionHub(runtime)
        return hub
