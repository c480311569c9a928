"""Hosts whose clocks disagree: a fleet member 30 s ahead of the others (Debian's libfaketime
preloaded into that process alone; its sandboxes get a clean environment and the true time).

The promise (docs/reliability.md, "Clocks"): every time compared across hosts is Redis's
(`dispatcher/clock.py`), and Celery's own per-message expiry is longer than any skew we
tolerate, so a skewed host neither restarts healthy sessions nor keeps dead ones, and its
heartbeats keep their schedule.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from dispatcher.lease.machine.running import PULSE_STALE_SECONDS
from tests.support.chaos import ChaosFleet, Figures

pytestmark = pytest.mark.chaos
MakeChaos = Callable[..., ChaosFleet]
Report = Callable[[Figures], None]

# The multi-threaded build: workers run threads.
# Debian's libfaketime, where its package puts it on either architecture `./dev` installs it on.
FAKETIME_LIBRARIES = [Path(f"/usr/lib/{arch}-linux-gnu/faketime/libfaketimeMT.so.1")
                      for arch in ("x86_64", "aarch64")]
SKEW = "+30s"
SESSION_SECONDS = 20
TTL_SECONDS = 30
# A dead worker's sessions run again elsewhere within recovery's threshold plus a recovery tick,
# the new attempt's start, and a loaded two-core machine; 30 s late is what a skew would cost.
MOVE_BOUND_SECONDS = PULSE_STALE_SECONDS + 6


@pytest.fixture
def skewed() -> dict[str, str]:
    """The variables that put one process 30 s ahead."""
    found = [path for path in FAKETIME_LIBRARIES if path.exists()]
    if not found:
        # A failure, not a skip: `./dev test` installs it, and a skipped scenario would pass
        # for a tested one.
        pytest.fail("clock scenarios need Debian's libfaketime: `apt-get install libfaketime` "
                    "(./dev does)")
    # Only the wall clock, as on a host whose clock is off: a faked monotonic clock would also
    # stretch every timed wait by the skew (the kernel waits on the real one).
    return {"LD_PRELOAD": str(found[0]), "FAKETIME": SKEW,
            "FAKETIME_DONT_FAKE_MONOTONIC": "1"}


def _worker(cf: ChaosFleet, name: str, queues: str, extra: dict[str, str]) -> None:
    cf.fleet.stack.worker(name, {**cf.fleet.env(), **extra}, pool="threads", concurrency=4,
                          queues=queues)
    cf.specs[name] = {"kind": "worker", "concurrency": 4, "queues": queues, "beat": False}


def test_a_control_worker_ahead_keeps_every_lease(skewed: dict[str, str], chaos: MakeChaos,
                                                  report: Report) -> None:
    """Beat on the true clock stamps each tick; the control worker 30 s ahead runs them all,
    heartbeats on schedule, and recovers nothing that is alive."""
    cf = chaos("Control worker's clock 30 s ahead of beat's", ttl=TTL_SECONDS)
    cf.beat()
    _worker(cf, "c1", "dispatcher.control", skewed)
    cf.sessions_worker("s1")
    cf.fleet.wait_slots(4)
    work_ids = cf.create(4, fake_duration=SESSION_SECONDS)
    cf.wait_started(work_ids)
    figures = cf.finish(timeout=120)
    report(figures)
    assert figures.attempts == figures.sessions, "a healthy session was started again"


def test_a_dead_session_worker_ahead_is_recovered_in_time(skewed: dict[str, str],
                                                          chaos: MakeChaos,
                                                          report: Report) -> None:
    """A session worker 30 s ahead wrote its pulses; SIGKILLed, its sessions move within
    recovery's threshold, not 30 s later."""
    cf = chaos("Session worker's clock 30 s ahead, SIGKILLed", ttl=TTL_SECONDS)
    cf.control()
    _worker(cf, "s1", "dispatcher.sessions", skewed)
    cf.fleet.wait_slots(4)
    work_ids = cf.create(3, fake_duration=SESSION_SECONDS)
    cf.wait_started(work_ids)
    cf.sessions_worker("s2")
    cf.fleet.wait_slots(8)
    killed_at = cf.kill("s1")
    cf.watch_cut(work_ids, cut_at=killed_at)
    assert cf.moved_after_s is not None and cf.moved_after_s < MOVE_BOUND_SECONDS, (
        f"sessions of the dead worker moved {cf.moved_after_s} s after its death")
    report(cf.finish(timeout=120, check_duplicates=False))
