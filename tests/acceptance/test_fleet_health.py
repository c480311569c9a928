"""`dispatcher status --check` against a real fleet: healthy while it works, failing once its
only session worker is gone."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.bounds import STATUS_CHECK_SECONDS
from tests.support.fleet import Fleet
from tests.support.waiting import wait_for

pytestmark = pytest.mark.acceptance

DISPATCHER = Path(sys.executable).with_name("dispatcher")


def check(fleet: Fleet) -> tuple[int, str, float]:
    started = time.monotonic()
    done = subprocess.run([str(DISPATCHER), "status", "--check"], env=fleet.env(),
                          capture_output=True, text=True, timeout=30)
    return done.returncode, done.stdout + done.stderr, time.monotonic() - started


def test_check_follows_a_real_fleet(fleet: Fleet) -> None:
    # Beat on its own: SIGKILL of a `worker -B` would leave its embedded beat running.
    fleet.worker("w1")
    fleet.beat()
    fleet.wait_slots(4)
    wait_for(lambda: check(fleet)[0] == 0, timeout=30, what="a healthy fleet (beat's lock)")
    work_id = fleet.create(fake_duration=3)
    fleet.wait_event(work_id, "started")
    code, output, took = check(fleet)
    assert code == 0, output
    assert took < STATUS_CHECK_SECONDS
    fleet.wait_stopped([work_id], timeout=30)

    fleet.kill("w1")
    code, output = wait_for(lambda: (r := check(fleet))[0] != 0 and r[:2], timeout=30,
                            what="the check to fail without a worker")
    assert code == 5 and "no live session slots" in output, output
    assert "beat's lock" not in output, "the beat still runs: only the slots are missing"
