"""A fleet's teardown: nothing a test's fleet started outlives it."""

from __future__ import annotations

import pytest

from tests.support.fleet import Fleet, processes_marked
from tests.support.waiting import wait_for

pytestmark = pytest.mark.acceptance


def test_a_killed_worker_leaves_nothing_running_after_the_fleet_stops(fleet: Fleet) -> None:
    """A child does not die with its parent: a `worker -B` SIGKILLed (by a test, or by the stop
    past its timeout) leaves its embedded beat running, publishing ticks. The stop kills the
    worker's process group too; were it not to, `stop_all` would fail naming the beat."""
    worker = fleet.worker("control", queues="dispatcher.control", beat=True)
    # The beat's own line, not a count of processes alone: at its start the worker forks
    # short-lived children too (`platform.platform()` in its banner runs `uname -p`), and two
    # processes counted then may be the worker and one of those, the beat not yet started.
    wait_for(lambda: "beat: Starting..." in fleet.log("control")
             and len(processes_marked(fleet.mark)) == 2, timeout=60,
             what="the worker and its embedded beat")
    fleet.kill("control")
    worker.wait(timeout=10)
    assert processes_marked(fleet.mark), "its beat runs on, the worker gone"
    fleet.stop_all()
    assert processes_marked(fleet.mark) == []
