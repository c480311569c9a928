"""The Work API misbehaves while a batch runs: slow, failing, rate limiting, dropping
connections, answering 412 to heartbeats. Faults are the emulator's switches."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from dispatcher.lease.causes import LossCause
from tests.support.chaos import ChaosFleet, Figures

pytestmark = pytest.mark.chaos


@dataclass(frozen=True)
class ApiFault:
    scenario: str
    switches: dict[str, Any]
    # Seconds on, seconds off, repeated for `window` seconds: bursts rather than a steady rate.
    on: float
    off: float
    window: float
    ttl: int = 6
    sessions: int = 12
    duration: float = 2.0
    # Switch the fault on only once every session runs (its lease is established).
    after_start: bool = False
    # Switch it off this long after the first injected fault is in the request log.
    off_after_first: float | None = None


FAULTS = {
    # Latency above the heartbeat interval (TTL 9 s: a beat every 3 s; each takes 3.5 s, under
    # the 5 s request timeout), on running sessions' leases.
    "slow": ApiFault("API slow (3.5 s > 3 s beat interval)",
                     {"latency_ms": 3500, "endpoints": ["heartbeat"]},
                     on=12, off=0, window=12, duration=12.0, sessions=10, ttl=9,
                     after_start=True),
    # Every endpoint, `stop` included: a release that fails is retried while its lease is
    # still heartbeated, so a finished session never lapses and runs again.
    "5xx": ApiFault("API 5xx bursts (50%, 2 s on / 2 s off, every endpoint)",
                    {"error_rate": 0.5, "error_status": 503}, on=2, off=2, window=14, ttl=9),
    "429": ApiFault("API 429 with retry-after 1 s (30%, every endpoint)",
                    {"rate_limit_rate": 0.3, "retry_after_seconds": 1},
                    on=14, off=0, window=14, ttl=9),
    "drop": ApiFault("API drops connections (20%, every endpoint)", {"drop_rate": 0.2},
                     on=14, off=0, window=14, ttl=9),
    # On established leases: the refused token is never presented again, the session is
    # killed, and the item (its lease lapsed) is claimed and run again. The switch goes off 2 s
    # after the first 412, before the lapsed lease is claimed again (about TTL - interval - a
    # tick = 5 s later), so the second attempt runs clean.
    "412": ApiFault("heartbeat answered 412 (40%, running sessions)",
                    {"heartbeat_412_rate": 0.4}, on=15, off=0, window=15, duration=10.0,
                    after_start=True, ttl=9, off_after_first=2.0),
    # On first heartbeats too: a refused claim of an item nobody holds is claimed again, never
    # left stranded in `starting` (anthropic-sdk-python#1746).
    "412-first": ApiFault("first heartbeat answered 412 (20%)", {"heartbeat_412_rate": 0.2},
                          on=12, off=0, window=12, duration=4.0),
}


# Two session workers of 4 slots each (the chaos fleet's default).
SLOTS = 8


def _injected(cf: ChaosFleet) -> bool:
    return any(e.get("fault") for e in cf.fleet.emulator.requests_log()
               if e.get("environment_id") == cf.fleet.environment_id)


def _bursts(cf: ChaosFleet, fault: ApiFault, done: threading.Event) -> None:
    emulator = cf.fleet.emulator
    end = time.monotonic() + fault.window
    if fault.off_after_first is not None:
        emulator.set_faults(**fault.switches)
        while time.monotonic() < end and not done.is_set() and not _injected(cf):
            done.wait(0.2)
        done.wait(fault.off_after_first)
        emulator.reset_faults()
        return
    while time.monotonic() < end and not done.is_set():
        emulator.set_faults(**fault.switches)
        done.wait(min(fault.on, max(0.0, end - time.monotonic())))
        emulator.reset_faults()
        if fault.off:
            done.wait(fault.off)
    emulator.reset_faults()


@pytest.mark.parametrize("kind", list(FAULTS))
def test_api_faults(kind: str, chaos: Callable[..., ChaosFleet],
                    report: Callable[[Figures], None]) -> None:
    run_api_fault(kind, FAULTS[kind], chaos, report)


def run_api_fault(kind: str, fault: ApiFault, chaos: Callable[..., ChaosFleet],
                  report: Callable[[Figures], None]) -> None:
    cf = chaos(fault.scenario, ttl=fault.ttl)
    cf.control()
    cf.sessions_worker("s1")
    cf.sessions_worker("s2")
    cf.fleet.wait_slots(SLOTS)
    done = threading.Event()
    bursts = threading.Thread(target=_bursts, args=(cf, fault, done), daemon=True)
    if not fault.after_start:
        bursts.start()
    work_ids = cf.create(fault.sessions, fake_duration=fault.duration)
    if fault.after_start:
        # Once the first sessions run (as many as the slots): waiting for all of them would
        # leave only the last few, near their end, to meet the fault (one run in CI met none).
        cf.wait_started(work_ids[:SLOTS])
        bursts.start()
    try:
        figures = cf.finish(timeout=150)
    finally:
        done.set()
        bursts.join(timeout=10)
    log = [e for e in cf.fleet.emulator.requests_log()
           if e.get("environment_id") == cf.fleet.environment_id]
    injected = [e for e in log if e.get("fault")]
    if kind == "slow":
        slow = [e for e in log if e.get("endpoint") == "heartbeat"]
        figures.faults, figures.fault_kinds = len(slow), f"slow heartbeats x{len(slow)}"
    else:
        figures.faults = len(injected)
        kinds = sorted({str(e["fault"]) for e in injected})
        figures.fault_kinds = ", ".join(
            f"{k} x{sum(1 for e in injected if e['fault'] == k)}" for k in kinds)
        assert injected, "the fault was injected"
    if kind.startswith("412"):
        report(figures, known=lambda v: _refused_as_it_completed(cf, v),
               why="the server refused the lease as its session completed, before the kill")
    else:
        report(figures)


def _refused_as_it_completed(cf: ChaosFleet, violation: str) -> bool:
    """A session that ran to completion twice because the kill its lease's refusal (412) caused
    landed after its program recorded its completion and before it exited: the fleet saw that
    run killed, not completed, rightly let the item go, and the server ran it again. No worker
    can prevent it. The evidence is read from events, not from clocks (the kill follows the
    412 by as long as the emulator, the worker and the supervisor wait for a CPU, on two busy
    cores far more than the program's last moments): the fleet lost the item's lease to a
    refused heartbeat, and the program recorded more completions than the fleet saw exits
    with 0. Any other second completion is a violation."""
    work_id, _, what = violation.partition(": ")
    if what != "ran to completion 2 times":
        return False
    completions = sum(1 for r in cf.fleet.records(work_id)
                      if r.get("event") == "exited" and r.get("reason") == "completed")
    logs = "\n".join(cf.fleet.log(name) for name in cf.specs)
    refused = re.search(rf"heartbeat lost work_id={work_id} .*"
                        rf"cause={LossCause.HEARTBEAT_REFUSED.value}\b", logs)
    seen_completed = len(re.findall(rf"\bexited work_id={work_id} .*exit_code=0\b", logs))
    return refused is not None and seen_completed < completions
