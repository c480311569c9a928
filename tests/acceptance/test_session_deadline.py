"""The maximum session duration: a session past it is stopped gracefully and its item stopped,
by a real fleet against the emulator; the fleet's setting and an environment's own."""

from __future__ import annotations

import re

import pytest

from tests.support.fleet import Fleet
from tests.support.isolation import free_port
from tests.support.scrape import scrape, try_scrape, value
from tests.support.waiting import wait_for

pytestmark = pytest.mark.acceptance

LIMIT_SECONDS = 3.0
# The fleet's test grace (`Fleet.env`): SIGTERM to SIGKILL.
GRACE_SECONDS = 2.0
# The supervisor looks every 0.2 s; the stop is flagged at one tick and signalled at the next.
# A loaded test machine (4 workers on 2 cores) gets a generous margin on top.
SIGNAL_BOUND_SECONDS = 2.0
# The session's clock starts when its attempt takes the lease, a moment before the sandbox's
# first record (the spawn, the program's start); the fleet's clock is Redis's, read with an
# offset measured to half a round trip.
START_SLACK_SECONDS = 0.5


def _signalled_in_time(elapsed: float) -> None:
    assert LIMIT_SECONDS - START_SLACK_SECONDS <= elapsed <= LIMIT_SECONDS + SIGNAL_BOUND_SECONDS


def _deadline_line(log: str, work_id: str) -> str:
    found = [line for line in log.splitlines()
             if "deadline reached" in line and f"work_id={work_id}" in line]
    assert len(found) == 1, f"one deadline line for {work_id}: {found}"
    return found[0]


def test_a_session_past_the_fleets_limit_is_stopped_gracefully_and_its_item_stopped(
        fleet: Fleet) -> None:
    port = free_port()
    fleet.overrides.update({"DISPATCHER_MAX_SESSION_SECONDS": str(LIMIT_SECONDS),
                            "DISPATCHER_METRICS_PORT": str(port)})
    fleet.worker("w1", beat=True)
    wait_for(lambda: try_scrape(port), timeout=30, what="the metrics endpoint")
    long = fleet.create(fake_duration=60)
    short = fleet.create(fake_duration=0.5)
    fleet.wait_event(long, "started")
    started = fleet.events(long, "started")[0]["time"]
    fleet.wait_stopped([long, short], timeout=LIMIT_SECONDS + 30)

    (term,) = fleet.events(long, "sigterm")
    _signalled_in_time(term["time"] - started)
    (exited,) = fleet.events(long, "exited")
    assert exited["time"] - term["time"] < GRACE_SECONDS, "it ended within the grace, by itself"
    assert fleet.events(short, "exited"), "a session under the limit runs to its end"
    line = _deadline_line(fleet.log("w1"), long)
    assert re.search(r"limit_seconds=3\.0 ", line), line
    assert "deadline reached" not in "\n".join(
        x for x in fleet.log("w1").splitlines() if f"work_id={short}" in x)
    released = [x for x in fleet.log("w1").splitlines()
                if x.find("released") >= 0 and f"work_id={long}" in x]
    assert released and "outcome=stopped" in released[-1] and "cause=deadline" in released[-1]
    samples = scrape(port)
    assert value(samples, "dispatcher_work_stop_requests_total", cause="deadline") == 1.0
    assert value(samples, "dispatcher_work_released_total", outcome="stopped") == 1.0


def test_an_environments_own_limit_applies_where_the_fleet_has_none(fleet: Fleet) -> None:
    fleet.serve_environments(fleet.environment_entry(max_session_seconds=LIMIT_SECONDS))
    fleet.worker("w1", beat=True)
    work_id = fleet.create(fake_duration=60, fake_ignore_sigterm=1)
    fleet.wait_event(work_id, "started")
    started = fleet.events(work_id, "started")[0]["time"]
    fleet.wait_stopped([work_id], timeout=LIMIT_SECONDS + 30)

    (term,) = fleet.events(work_id, "sigterm")
    _signalled_in_time(term["time"] - started)
    assert not fleet.events(work_id, "exited"), "it ignored SIGTERM: killed after the grace"
    wait_for(lambda: fleet.sandbox_pids_alive() == [], timeout=10, what="no sandbox left")
    _deadline_line(fleet.log("w1"), work_id)
