"""The soak run: 1,000 sessions through every fault at once, kept out of CI.

    ./dev soak                                   # or: pytest tests/chaos/test_soak.py -m soak -s

Deselected by default (`-m "not soak"` in pyproject's addopts): it takes about a quarter of an
hour on 2 cores. The fleet is the chaos one (one control worker with beat, two session workers)
on a private redis-server. While the sessions run, the API's faults go round in phases (lost
replies with 503s on ack, heartbeat and stop; 429s, dropped connections and malformed bodies on
every endpoint; 412s on heartbeats; a quiet spell), a session worker is SIGKILLed and started
again every `KILL_EVERY_SECONDS`, and the redis-server is killed and started empty once, between
two kills.
A few long sessions are stopped through the API, for the stop latency.

It prints the figures of docs/reliability.md ("The soak run") and fails on any broken invariant
(tests/chaos/invariants.py). Completing twice is counted, not failed, and apart when the first
run completed as its worker was SIGKILLed: the worker died before it could record the exit, and
the session runs again (at-least-once, docs/reliability.md).
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support.chaos import ChaosFleet, Figures, RedisServer
from tests.support.isolation import free_port

pytestmark = pytest.mark.soak

SESSIONS = 1000
# Every `STOPPED_EVERY`-th session is a long one, stopped through the API once it runs.
STOPPED_EVERY = 100
LONG_SESSION_SECONDS = 60
DURATION_RANGE_SECONDS = (0.5, 3.0)
TTL_SECONDS = 6
SLOTS_PER_WORKER = 6
PHASE_SECONDS = 15.0
KILL_EVERY_SECONDS = 40.0
# The Redis restart comes after this many kills, this far from the kills on either side: more
# than the 5 s recovery waits for pulses plus a TTL.
REDIS_RESTART_AFTER_KILLS = 4
APART_SECONDS = 15.0
# A SIGKILLed worker is started again after this long: its sandboxes' items wait for recovery.
RESTART_AFTER_SECONDS = 1.0
# 1,000 sessions of 1.75 s on average through 12 slots is about 150 s of sandbox time; faults,
# kills and lapsed leases (each a TTL of waiting) stretch it several times over.
FINISH_TIMEOUT_SECONDS = 1800

LOST_AND_503 = {"lost_reply_rate": 0.3, "error_rate": 0.2, "error_status": 503,
                "endpoints": ["ack", "heartbeat", "stop"]}
PHASES: list[tuple[str, dict[str, Any]]] = [
    ("lost replies 30% + 503 20% (ack, heartbeat, stop)", LOST_AND_503),
    ("429 20% + drops 10% + malformed 10% + 503 10% (every endpoint)",
     {"rate_limit_rate": 0.2, "retry_after_seconds": 1, "drop_rate": 0.1,
      "malformed_rate": 0.1, "error_rate": 0.1, "error_status": 503}),
    ("lost replies 30% + 503 20% (ack, heartbeat, stop)", LOST_AND_503),
    ("412 on 10% of heartbeats", {"heartbeat_412_rate": 0.1, "endpoints": ["heartbeat"]}),
    ("quiet", {}),
]


class Chaos:
    """The fault phases, the worker kills and the Redis restart, on a thread of their own until
    `done`. The Redis restart comes between two kills, `APART_SECONDS` from each: a worker
    SIGKILLed just before Redis loses everything leaves leases that neither its supervisors
    (dead) nor recovery (the records are gone) know of; they lapse and the server re-queues
    them. That compound case is a documented gap (docs/reliability.md), not what this run
    measures."""

    def __init__(self, cf: ChaosFleet, server: RedisServer) -> None:
        self.cf = cf
        self.server = server
        self.done = threading.Event()
        self.restarts = 0
        self.redis_restarts = 0
        self.phases: dict[str, int] = {}
        self.thread = threading.Thread(target=self._run, name="soak-chaos", daemon=True)

    def _run(self) -> None:
        emulator = self.cf.fleet.emulator
        next_kill = time.monotonic() + KILL_EVERY_SECONDS
        phase = 0
        while not self.done.is_set():
            name, switches = PHASES[phase % len(PHASES)]
            emulator.reset_faults()
            if switches:
                emulator.set_faults(**switches)
            self.phases[name] = self.phases.get(name, 0) + 1
            phase_end = time.monotonic() + PHASE_SECONDS
            while not self.done.is_set() and time.monotonic() < phase_end:
                if time.monotonic() >= next_kill:
                    self._kill_a_session_worker()
                    next_kill = time.monotonic() + KILL_EVERY_SECONDS
                    if self.restarts == REDIS_RESTART_AFTER_KILLS:
                        self.done.wait(APART_SECONDS)
                        self._restart_redis()
                        next_kill = time.monotonic() + APART_SECONDS
                self.done.wait(0.5)
            phase += 1
        emulator.reset_faults()

    def _restart_redis(self) -> None:
        self.cf.restart_redis(self.server)
        self.redis_restarts += 1

    def _kill_a_session_worker(self) -> None:
        victim = self.cf.rng.choice(["s1", "s2"])
        self.cf.kill(victim, signal.SIGKILL)
        time.sleep(RESTART_AFTER_SECONDS)
        self.cf.start(victim)
        self.restarts += 1


def _completions(cf: ChaosFleet) -> dict[str, int]:
    return {w: sum(1 for r in cf.fleet.records(w)
                   if r["event"] == "exited" and r.get("reason") == "completed")
            for w in cf.work_ids}


def _twice_at_a_kill(cf: ChaosFleet, work_id: str) -> bool:
    """A session run again because a sandbox of it completed while its worker was SIGKILLed:
    the worker died before it could record the exit, and nothing else saw it (at-least-once,
    by design). Any other second completion is a bug."""
    runs = [r for r in cf.fleet.records(work_id)
            if r["event"] == "exited" and r.get("reason") == "completed"]
    return any(int(r["pid"]) in cf.killed_at for r in runs[:-1])


def _summary(cf: ChaosFleet, figures: Figures, chaos: Chaos,
             states: dict[str, str]) -> dict[str, Any]:
    completed = _completions(cf)
    run = [w for w in cf.work_ids if w not in cf.expect_stopped]
    twice = [w for w in run if completed[w] > 1]
    at_a_kill = [w for w in twice if _twice_at_a_kill(cf, w)]
    return {
        "sessions": len(cf.work_ids),
        "stopped by the test": len(cf.expect_stopped),
        "completed once": sum(1 for w in run if completed[w] == 1),
        "completed twice or more": len(twice) - len(at_a_kill),
        "completed twice, the first as its worker was SIGKILLed": len(at_a_kill),
        "never completed": sum(1 for w in run if completed[w] == 0),
        "left unstopped (stranded)": sum(1 for s in states.values() if s != "stopped"),
        "attempts": figures.attempts,
        "worker restarts (SIGKILL)": chaos.restarts,
        "Redis restarts": chaos.redis_restarts,
        "faults injected": figures.faults,
        "stop latency max (s)": figures.stop_latency_max_s,
        "seconds": figures.seconds,
        "violations": len(figures.violations),
    }


@pytest.mark.timeout(FINISH_TIMEOUT_SECONDS + 900)
def test_soak(chaos: Callable[..., ChaosFleet], report: Callable[[Figures], None],
              tmp_path: Path) -> None:
    server = RedisServer(tmp_path, free_port())
    try:
        cf = chaos("soak: 1,000 sessions, mixed faults", ttl=TTL_SECONDS, redis=server)
        report(run_soak(cf, server))
    finally:
        server.stop()


def run_soak(cf: ChaosFleet, server: RedisServer) -> Figures:
    """Run the batch through the chaos; print the figures and return them."""
    cf.control()
    cf.sessions_worker("s1", concurrency=SLOTS_PER_WORKER)
    cf.sessions_worker("s2", concurrency=SLOTS_PER_WORKER)
    cf.fleet.wait_slots(2 * SLOTS_PER_WORKER)
    long_ones = []
    for i in range(SESSIONS):
        if i % STOPPED_EVERY == STOPPED_EVERY // 2:
            long_ones += cf.create(1, fake_duration=LONG_SESSION_SECONDS)
        else:
            cf.create(1, fake_duration=round(cf.rng.uniform(*DURATION_RANGE_SECONDS), 2))
    chaos = Chaos(cf, server)
    chaos.thread.start()
    try:
        for work_id in long_ones:
            # Stopped a few seconds into its run, wherever the batch has got to.
            cf.fleet.wait_event(work_id, "started", timeout=FINISH_TIMEOUT_SECONDS)
            time.sleep(cf.rng.uniform(1.0, 4.0))
            cf.stop(work_id)
        figures = cf.finish(timeout=FINISH_TIMEOUT_SECONDS, check_duplicates=False)
    finally:
        chaos.done.set()
        chaos.thread.join(timeout=30)
    log = [e for e in cf.fleet.emulator.requests_log()
           if e.get("environment_id") == cf.fleet.environment_id]
    injected = [e for e in log if e.get("fault")]
    for e in injected:
        cf.fault(str(e["fault"]))
    figures.faults = sum(cf.fault_kinds.values())
    figures.fault_kinds = ", ".join(f"{k} x{v}" for k, v in sorted(cf.fault_kinds.items()))
    summary = _summary(cf, figures, chaos, cf.states())
    print("\nsoak figures:\n" + json.dumps(summary, indent=2))
    print(f"faults: {figures.fault_kinds}")
    print(f"phases: {chaos.phases}")
    return figures
