"""Claim work from the server for the fleet's free session slots.

One poller runs at a time per environment (a Redis lock), with that environment's key; a fleet
that serves several runs one for each, and each claims only its fair share of the fleet's slots
while others want theirs (`capacity.claim_allowance`). While the fleet has a free slot a long
poll is always outstanding: a run polls for a minute, then hands its lock to its successor (a new
poll task it publishes) without releasing it, so no gap opens between runs and no second poller
can slip in. Beat only watches: its tick finds the lock held and returns; a crashed run's lock
lapses and the next tick starts a fresh poller. Each item is offered to the lease machine, which
acks it, records the lease, claims it (the first heartbeat) and publishes its session task, or
refuses it (an ended session, an attempt limit reached, an unknown type, an item we still hold).
Claims run in threads beside the poll loop, several at once (`CLAIMS_IN_FLIGHT`), never more
than the free slots: the loop polls on while they ack, record and publish. A poll answers one
item; once two in a row did, the second at once (or a wake-up says work waits), the queue holds
more, and the run polls side by side without blocking (`POLLS_IN_FLIGHT`, never more than the
room) until one comes back empty: a burst is polled several items a round trip, then one long
poll waits again. After a lone item, that long poll waits for the item's ack to be answered.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Callable
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor

from redis.exceptions import LockError
from redis.lock import Lock

from dispatcher.control.poll_keys import PollKeys
from dispatcher.control.routing import choose_queue
from dispatcher.lease import events as ev
from dispatcher.lease.model import Heartbeater, Kind, Lease, LeaseMode, Phase
from dispatcher.logs import event
from dispatcher.runtime import Runtime
from dispatcher.startpath import StartPath
from dispatcher.workapi import (
    Backoff,
    InvalidWorkItem,
    Work,
    WorkAPIError,
    delay_for,
    epoch_seconds,
)

__all__ = ["POLL_BLOCK_MS", "claim", "drain", "run_poller"]

POLL_BLOCK_MS = 999  # the API caps block_ms at 999
# Claims one poller run has in flight at once (each acks, records and publishes in a thread of
# its own while the run polls on): a burst is claimed at the rate polls are answered. Never
# more than the free slots either (`_room`); 16 covers a poll's round trip over a claim's
# several at the Work API's latency, and bounds the threads and connections one run holds.
CLAIMS_IN_FLIGHT = 16
# Non-blocking polls a run sends side by side after a poll answered an item (a burst's first):
# one item a round trip made a burst of 100 arrive over 100 polls' time (p99 twice the p50);
# eight cut that ramp eightfold and keep within the claims a run may have in flight.
POLLS_IN_FLIGHT = 8
# A lone item's next long poll waits for the item's ack to be answered, at most this long. The
# session waits on that answer (it starts once its lease is proven), and a poll that reaches the
# server beside the ack delays it: a single-process server (the emulator) answered our acks
# 3-4 ms later with a poll arriving beside them, and the claim thread's parsing of the answer
# shares the interpreter with the poll loop. An item arriving meanwhile waits on the server at
# most this long; a burst (`queue_busy`) never waits. Bounded so a slow ack (its retries take
# seconds) does not leave the fleet without a poll outstanding for long.
LONE_ACK_WAIT_SECONDS = 0.1
# A poll's item was waiting on the server, not created while the poll waited, if the poll was
# answered within this long past the Work API's round trip (`round_trip_of`: a few ms to the
# emulator, tens to a remote service), or the item was created within this long
# of the item before it (the server's times: a loaded server answers a waiting item's poll
# later than this). Below the gap between sessions arriving one at a time at up to 10 a
# second: those are answered by polls that waited, not a burst, and 8 polls beside each one's
# ack delayed the ack's answer on the emulator from a few ms to 30.
AT_ONCE_SECONDS = 0.1
# One poller task long-polls this long, then hands over to its successor: Flower shows one poll
# task a minute, and a worker's memory or a changed setting is picked up by the next run.
POLL_RUN_SECONDS = 60.0
# Each poll renews the lock for this long; a killed poller's lock lapses on its own, and the
# next beat tick starts another. Longer than the slowest claim (ack, claim and publish, each
# bounded by the client's timeout), so a live poller never loses it mid-claim.
POLL_LOCK_SECONDS = 30.0
# While the fleet is full, look for a freed slot this often (one Redis round trip each).
FULL_FLEET_RECHECK_SECONDS = 0.05
# A wake-up left for the poller that held the lock; outlives any run (POLL_RUN_SECONDS) so the
# holder sees it, and lapses if that holder died (the sweep then claims what it would have).
WAKE_FLAG_SECONDS = 60
# A failure streak is forgotten after this long without news (the backoff cap is 8 s).
POLL_FAILURES_TTL_SECONDS = 60
# An environment whose poll found nothing reserves no slots of the fleet's for this long: the
# others may use them meanwhile. Long enough to span the few polls an idle poller makes (one a
# second), short enough that an environment whose work arrives while the fleet is full (its
# poller then waits, polling nothing) gets its share back within seconds.
POLL_IDLE_SECONDS = 5

# A run sleeping through a throttle asks this often (seconds; one Redis read each) whether its
# worker is stopping: the worker's warm shutdown waits for the run, and a supervisor's grace
# period (Kubernetes: 30 s by default) is shorter than a long Retry-After.
PAUSE_CHECK_SECONDS = 0.5


def run_poller(runtime: Runtime, *, environment_id: str | None = None,
               run_seconds: float = POLL_RUN_SECONDS,
               handover: str | None = None, hand_over: Callable[[str], None] | None = None,
               stopping: Callable[[], bool] = lambda: False) -> int:
    """Claim work of one environment (None: the only one) for the run's budget; returns how
    many claimed. `handover` is the lock token a predecessor handed over; at the end,
    `hand_over` publishes the successor with ours. `stopping` ends the run early (its worker
    drains): the successor then runs elsewhere."""
    environment = runtime.environment(environment_id).id
    lock = _take_lock(runtime, environment, handover)
    if lock is None:
        return 0
    handed = False
    try:
        claimed = _poll_loop(runtime, environment, lock=lock, stopping=stopping,
                             deadline=time.monotonic() + run_seconds)
        if hand_over is not None and lock.owned():
            hand_over(_token(lock))
            handed = True
        return claimed
    finally:
        if not handed:
            _release(lock)


def drain(runtime: Runtime, *, reclaim_older_than_ms: int, wake: bool,
          environment_id: str | None = None, run_seconds: float = POLL_RUN_SECONDS) -> int:
    """Claim until the first empty poll, if a wake-up stands (`wake` makes one); returns how
    many were claimed. The webhook mode's poller: beat's sweep and each delivery call it.

    The wake-up is a flag in Redis. A drainer that finds another holding the lock does not wait
    for it (that would hold a control slot, and a burst of deliveries would hold them all): the
    holder finds the flag when it lets go of the lock and drains again, so an item created after
    its last poll never waits for the sweep. A run that ends with the fleet full or out of time
    leaves the flag standing, and the next tick with a free slot drains on.
    """
    environment = runtime.environment(environment_id).id
    wanted = PollKeys(runtime.settings.key_prefix).wanted(environment)
    if wake:
        runtime.redis.set(wanted, 1, ex=WAKE_FLAG_SECONDS)
    claimed = 0
    while runtime.redis.exists(wanted) and _allowance(runtime, environment) > 0:
        lock = _take_lock(runtime, environment, None)
        if lock is None:
            break
        try:
            runtime.redis.delete(wanted)  # every poll from here on sees what the flag announced
            deadline = time.monotonic() + run_seconds
            claimed += _poll_loop(runtime, environment, lock=lock, stopping=lambda: False,
                                  deadline=deadline, drain=True,
                                  reclaim_older_than_ms=reclaim_older_than_ms)
            if _drain_cut_short(runtime, environment, deadline):
                runtime.redis.set(wanted, 1, ex=WAKE_FLAG_SECONDS)
                break
        finally:
            _release(lock)
    return claimed


def _drain_cut_short(runtime: Runtime, environment: str, deadline: float) -> bool:
    """Did the run end before an empty poll: out of time, of slots, or paused by a failure or
    the server's pacing?"""
    return (time.monotonic() >= deadline or _allowance(runtime, environment) <= 0
            or _paused_for(runtime, environment) > 0)


def _allowance(runtime: Runtime, environment: str) -> int:
    """Items this environment's poller may claim now: the fleet's free slots, shared fairly."""
    return runtime.capacity.allowance(environment, runtime.maxima,
                                      demand_seconds=runtime.settings.idle_headroom_seconds)


def _take_lock(runtime: Runtime, environment: str, handover: str | None) -> Lock | None:
    """The environment's poll lock: taken over from a predecessor that handed us its token, or
    taken fresh if nobody holds it. None: another poller holds it."""
    lock = Lock(runtime.redis, PollKeys(runtime.settings.key_prefix).lock(environment),
                timeout=POLL_LOCK_SECONDS, thread_local=False)
    if handover is not None:
        lock.local.token = handover.encode()
        try:
            lock.reacquire()
            return lock
        except LockError:
            pass  # the hand-over came too late: the lock lapsed, take it like anyone else
    return lock if lock.acquire(blocking=False, token=uuid.uuid4().hex) else None


def _token(lock: Lock) -> str:
    token = lock.local.token
    return token.decode() if isinstance(token, bytes) else str(token)


def _release(lock: Lock) -> None:
    with contextlib.suppress(LockError):  # lapsed meanwhile: nothing of ours to release
        lock.release()


class _InFlight:
    """The claims one poller run has handed to its threads and not yet seen end: the poll loop
    goes on polling while they ack, record and publish, so a burst is claimed at the rate the
    server answers polls, not one item per round trip of the whole claim."""

    def __init__(self, pool: ThreadPoolExecutor, polls: ThreadPoolExecutor) -> None:
        self.pool = pool
        self.polls = polls  # the side-by-side polls of a burst (`_poll_side_by_side`)
        self.claims: dict[Future[bool], str] = {}  # each claim's work id
        self.claimed = 0

    def __len__(self) -> int:
        return len(self.claims)

    def holds(self, work_id: str) -> bool:
        return work_id in self.claims.values()

    def start(self, runtime: Runtime, item: Work, path: StartPath) -> threading.Event:
        """The item's claim, in a thread; the event is set once its ack has an answer (or the
        claim ended without one)."""
        acked = threading.Event()
        self.claims[self.pool.submit(claim, runtime, item, path=path, acked=acked)] = item.id
        return acked

    def reap(self, *, wait: float | None = 0.0) -> None:
        """Count the claims that ended, waiting up to `wait` s for one (None: for all). A claim
        that raised raises here, and ends the run as it did when claims ran inline."""
        if not self.claims:
            return
        if wait is None:
            done = set(self.claims)
            futures.wait(done)
        else:
            done, _ = futures.wait(self.claims, timeout=wait,
                                   return_when=futures.FIRST_COMPLETED)
        for future in done:
            del self.claims[future]
            self.claimed += int(future.result())


def _poll_loop(runtime: Runtime, environment: str, *, lock: Lock, stopping: Callable[[], bool],
               deadline: float, drain: bool = False,
               reclaim_older_than_ms: int | None = None) -> int:
    with ThreadPoolExecutor(CLAIMS_IN_FLIGHT, thread_name_prefix="claim") as pool, \
            ThreadPoolExecutor(POLLS_IN_FLIGHT, thread_name_prefix="poll") as polls:
        inflight = _InFlight(pool, polls)
        try:
            _poll_items(runtime, environment, inflight, lock=lock, stopping=stopping,
                        deadline=deadline, drain=drain,
                        reclaim_older_than_ms=reclaim_older_than_ms)
        finally:
            # Every claim ends before the run does: the lock (and its successor) never outlives
            # a claim of this run, and its count is complete.
            inflight.reap(wait=None)
    return inflight.claimed


def _room(runtime: Runtime, environment: str, inflight: _InFlight) -> int:
    """Items this run may poll for now: the allowance, less the claims in flight (a claim
    already recorded counts twice until it ends: fewer, never more, than the free slots)."""
    return min(CLAIMS_IN_FLIGHT, _allowance(runtime, environment)) - len(inflight)


def _wait_for_room(inflight: _InFlight, *, drain: bool) -> bool:
    """No room to poll for: wait a moment for some. False if the run ends instead."""
    if inflight:
        # A claim in flight frees room (or fills its slot) within a round trip or two.
        inflight.reap(wait=FULL_FLEET_RECHECK_SECONDS)
        return True
    if drain:
        return False  # the wake-up stands (see `drain`); no control slot is held waiting
    # Work waits on the server, where `depth` shows it and other fleets see it; this run
    # waits for a slot to free up, so a backlog drains as fast as sessions end.
    time.sleep(FULL_FLEET_RECHECK_SECONDS)
    return True


def _poll_items(runtime: Runtime, environment: str, inflight: _InFlight, *, lock: Lock,
                stopping: Callable[[], bool], deadline: float, drain: bool,
                reclaim_older_than_ms: int | None) -> None:
    # The failure count outlives one poller run (each lasts seconds), so a long outage backs
    # off to the cap instead of starting over at half a second every run.
    failures_key = PollKeys(runtime.settings.key_prefix).failures(environment)
    backoff = Backoff(attempt=int(runtime.redis.get(failures_key) or 0))
    client = runtime.client(environment_id=environment, max_retries=0)
    answered_before = False
    created_before: float | None = None  # the last item's creation (the server's clock)
    round_trip: float | None = None  # the quickest round trip of this run's polls
    while time.monotonic() < deadline and not stopping():
        inflight.reap()
        if not _still_ours(lock, environment):
            break
        if not _wait_out_pause(runtime, environment, deadline, drain=drain, stopping=stopping):
            break
        if _room(runtime, environment, inflight) <= 0:
            if not _wait_for_room(inflight, drain=drain):
                break
            continue
        sent = time.monotonic()
        try:
            # Draining asks once, without blocking: the queue is empty or it is not.
            item = client.poll(block_ms=None if drain else POLL_BLOCK_MS,
                               reclaim_older_than_ms=reclaim_older_than_ms)
            path = StartPath("claim", first="polled")
        except InvalidWorkItem as exc:
            runtime.executor.run(None, ev.Unreadable(exc.work_id, str(exc), environment))
            continue
        except WorkAPIError as exc:
            delay = delay_for(exc, backoff)
            # A throttle pauses every member's polls (and list scans) of this environment, not
            # only this run's: `_wait_out_pause` reads it.
            runtime.pacing.note(environment, status=exc.status, retry_after=exc.retry_after,
                                source="poll")
            event("poll failed", level=logging.WARNING, environment_id=environment,
                  status=exc.status, retryable=exc.retryable, delay_seconds=round(delay, 2),
                  error=str(exc))
            _pause(runtime, environment, failures=backoff.attempt, seconds=delay)
            if not exc.retryable:
                break
            continue
        if backoff.attempt:
            backoff.reset()
            runtime.redis.delete(failures_key)
        answered_in = time.monotonic() - sent
        _note_polled(runtime, environment, item)
        emptied = _take(runtime, environment, inflight, item, path,
                        side_by_side=item is not None and queue_busy(
                            answered_before, waiting=was_waiting(
                                item, answered_in=answered_in, round_trip=round_trip,
                                created_before=created_before),
                            drain=drain),
                        reclaim_older_than_ms=reclaim_older_than_ms)
        sample = round_trip_of(answered_in, blocked=not drain, empty=item is None)
        if sample is not None:
            round_trip = sample if round_trip is None else min(round_trip, sample)
        answered_before = item is not None
        created_before = epoch_seconds(item.created_at) if item is not None else None
        if emptied and drain:
            break


def _take(runtime: Runtime, environment: str, inflight: _InFlight, item: Work | None,
          path: StartPath, *, side_by_side: bool, reclaim_older_than_ms: int | None) -> bool:
    """A poll's answer: its item claimed, and polls side by side if the queue is busy. True if
    the queue showed itself empty."""
    if item is None:
        return True
    if inflight.holds(item.id):
        # (An item offered again while its claim is in flight is that claim's: the server
        # hands an unacked item out again only after it idled, far longer.)
        return False
    acked = inflight.start(runtime, item, path)
    if not side_by_side:
        acked.wait(LONE_ACK_WAIT_SECONDS)
        return False
    return _poll_side_by_side(runtime, environment, inflight,
                              reclaim_older_than_ms=reclaim_older_than_ms)


def queue_busy(answered_before: bool, *, waiting: bool, drain: bool) -> bool:
    """Whether a poll that answered an item found a queue holding more (and polls side by side
    pay): the poll before answered one too and this one's item was waiting (`was_waiting`), or
    a wake-up says work waits. A lone session's item answers a long poll that then waits again:
    polling beside it would only add empty polls to every session's start, and load the server
    as its ack goes. So would sessions arriving one at a time less than a poll's wait apart,
    were a long poll that waited for its item counted."""
    return (answered_before and waiting) or drain


def round_trip_of(answered_in: float, *, blocked: bool, empty: bool) -> float | None:
    """The Work API's round trip, as a poll answered in `answered_in` seconds shows it: all of a
    non-blocking poll's time; a long poll's past its block, if it ended empty (the server held
    it that long); none from a long poll that answered an item (it may have waited for it)."""
    if not blocked:
        return answered_in
    return max(0.0, answered_in - POLL_BLOCK_MS / 1000) if empty else None


def was_waiting(item: Work | None, *, answered_in: float, round_trip: float | None,
                created_before: float | None) -> bool:
    """Was the polled item on the server before the poll asked: answered within a round trip
    (`round_trip_of`: none known before the run's first empty long poll), or created with the
    item before it (`AT_ONCE_SECONDS` either way)?"""
    if answered_in < AT_ONCE_SECONDS + (round_trip or 0.0):
        return True
    created = epoch_seconds(item.created_at) if item is not None else None
    return (created is not None and created_before is not None
            and abs(created - created_before) < AT_ONCE_SECONDS)


def _poll_side_by_side(runtime: Runtime, environment: str, inflight: _InFlight, *,
                       reclaim_older_than_ms: int | None) -> bool:
    """A poll answered an item, so more may wait: poll without blocking, as many side by side as
    the room allows; each item answered becomes a claim. One round: the loop then renews its
    lock, heeds a pause or a stop, and polls again, which answers at once while the queue holds
    work (and this round follows), or waits as a long poll once it is empty. A failure is left
    to the loop's next poll, which meets it with its backoff. True if an answer was empty: the
    queue held no more (a drain ends there)."""
    client = runtime.client(environment_id=environment, max_retries=0)

    def one(_: int) -> Work | Exception | None:
        try:
            return client.poll(block_ms=None, reclaim_older_than_ms=reclaim_older_than_ms)
        except (InvalidWorkItem, WorkAPIError) as exc:
            return exc

    emptied = False
    for answer in inflight.polls.map(one, range(min(POLLS_IN_FLIGHT,
                                                    _room(runtime, environment, inflight)))):
        emptied = emptied or answer is None
        if isinstance(answer, Work) and not inflight.holds(answer.id):
            inflight.start(runtime, answer, StartPath("claim", first="polled"))
        elif isinstance(answer, InvalidWorkItem):
            runtime.executor.run(None, ev.Unreadable(answer.work_id, str(answer), environment))
        elif isinstance(answer, WorkAPIError):
            runtime.pacing.note(environment, status=answer.status,
                                retry_after=answer.retry_after, source="poll")
    return emptied


def _still_ours(lock: Lock, environment: str) -> bool:
    """Renew the lock; False if it lapsed and may be another poller's now."""
    try:
        lock.reacquire()
        return True
    except LockError:
        event("poll lock lost", level=logging.WARNING, environment_id=environment,
              action_taken="this poller stops")
        return False


def _note_polled(runtime: Runtime, environment: str, item: Work | None) -> None:
    """An empty poll frees the environment's unused share for the others (POLL_IDLE_SECONDS);
    an item takes it back, and keeps a slot of it free for a while once the environment is idle
    again (`capacity.idle_headroom`). Only a fleet of several environments reads it."""
    if len(runtime.environments) < 2:
        return
    runtime.capacity.note_polled(environment, item.id if item is not None else None,
                                 idle_seconds=POLL_IDLE_SECONDS,
                                 demand_seconds=runtime.settings.idle_headroom_seconds)


def _pause(runtime: Runtime, environment: str, *, failures: int, seconds: float) -> None:
    """Record the failure streak and the pause before the next poll, for this run and the
    next. The pause is the key's life, counted by Redis: no host's clock is read."""
    keys = PollKeys(runtime.settings.key_prefix)
    pipe = runtime.redis.pipeline(transaction=False)
    pipe.set(keys.failures(environment), failures,
             ex=POLL_FAILURES_TTL_SECONDS)
    pipe.set(keys.paused_until(environment), 1,
             px=max(1, int(seconds * 1000)))
    pipe.execute()


def _paused_for(runtime: Runtime, environment: str) -> float:
    """Seconds before this environment may be polled: its backoff, or the server's pacing."""
    paused = PollKeys(runtime.settings.key_prefix).paused_until(environment)
    backoff_ms = max(0, int(runtime.redis.pttl(paused)))
    return max(backoff_ms / 1000, runtime.pacing.remaining(environment))


def _wait_out_pause(runtime: Runtime, environment: str, deadline: float, *,
                    drain: bool, stopping: Callable[[], bool]) -> bool:
    """Sleep through a pause, at most to the run's end; False if the run must end first.

    A drain never waits (it holds a control slot; its wake-up stands and a later tick drains
    on). A poller run sleeps, up to its deadline: were it to end at once, its successor would
    find the same pause and hand over again, a task a moment for the length of the pause. It
    asks `stopping` between naps: its worker's warm shutdown waits for this task, and would
    otherwise wait out the pause (up to the run's end) before the worker can exit."""
    wait = _paused_for(runtime, environment)
    if wait <= 0:
        return True
    if drain:
        return False
    until = min(time.monotonic() + wait, deadline)
    while (left := until - time.monotonic()) > 0:
        if stopping():
            return False
        time.sleep(min(left, PAUSE_CHECK_SECONDS))
    return time.monotonic() < deadline and not stopping()


def claim(runtime: Runtime, item: Work, *, path: StartPath | None = None,
          acked: threading.Event | None = None) -> bool:
    """Take one polled item into the fleet. True if a session of it is now on its way.
    `path` notes the steps of a session's start (its `start path` line); `acked` is set once
    its ack has an answer, or once the claim ends (a refused item is never acked)."""
    try:
        return _claim(runtime, item, path=path, acked=acked)
    finally:
        if acked is not None:
            acked.set()


def _claim(runtime: Runtime, item: Work, *, path: StartPath | None,
           acked: threading.Event | None) -> bool:
    proposal = _new_lease(runtime, item)
    held, history = runtime.registry.get_with_history(item.id)
    if path is not None:
        path.mark("read")
    offered = ev.Offered(
        proposal, known_type=item.data.type in set(Kind),
        failures=history.failures, ended=history.ended)
    lease = runtime.executor.offer(held, offered, work_json=item.to_json(), path=path,
                                   acked=acked)
    started = (held is None and lease is not None and lease.kind == Kind.SESSION
               and lease.phase == Phase.DISPATCHED)
    if started and path is not None:
        path.log(item.id)
    return started


def _new_lease(runtime: Runtime, item: Work) -> Lease:
    # The item's environment is the one polled: its id is in the URL, and its key answered.
    home = runtime.environment(item.environment_id).queue
    queue = choose_queue(item.metadata, runtime.settings.session_queues, work_id=item.id,
                         default=home)
    now = runtime.registry.clock.now()
    runner = runtime.settings.lease_mode == LeaseMode.RUNNER
    return Lease(
        work_id=item.id,
        session_id=item.session_id,
        environment_id=item.environment_id,
        mode=runtime.settings.lease_mode,
        # An unknown type is refused, never recorded: its proposal's kind is never read.
        kind=Kind(item.data.type) if item.data.type in set(Kind) else Kind.SESSION,
        heartbeats_by=Heartbeater.SANDBOX if runner else Heartbeater.DISPATCHER,
        queue=queue,
        task_id=uuid.uuid4().hex,
        claimed_at=now,
        dispatched_at=now,
        created_at=item.created_at,
    )
