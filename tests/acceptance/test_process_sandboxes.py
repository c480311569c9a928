"""Process sandboxes as an operator sees them: each attempt's output kept and shown by
`dispatcher output`; real workers, the emulator over HTTP."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from dispatcher.ops.stack import FAKE_SESSION
from tests.support.fleet import Fleet

pytestmark = pytest.mark.acceptance

# The fake session, after two lines of its own: one on stdout, one on stderr.
SPEAKING = ('sh -c \'echo "attempt $DISPATCHER_ATTEMPT of $ANTHROPIC_WORK_ID on stdout"; '
            'echo "attempt $DISPATCHER_ATTEMPT of $ANTHROPIC_WORK_ID on stderr" >&2; '
            f'exec {FAKE_SESSION}\'')


def _output(fleet: Fleet, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DISPATCHER_SANDBOX_OUTPUT_DIR": fleet.env()[
        "DISPATCHER_SANDBOX_OUTPUT_DIR"]}
    return subprocess.run([sys.executable, "-m", "dispatcher.ops.cli", "output", *args],
                          env=env, capture_output=True, text=True, timeout=60)


def test_each_attempts_output_is_kept_and_shown(fleet: Fleet) -> None:
    assert shlex.split(SPEAKING)[0] == "sh"
    fleet.overrides["DISPATCHER_ON_WORK"] = SPEAKING
    fleet.worker("w1", beat=True)
    work_id = fleet.create(fake_duration=0.5)
    fleet.wait_stopped([work_id], timeout=60)

    shown = _output(fleet, work_id)
    assert shown.returncode == 0, shown.stderr
    header, *lines = shown.stdout.splitlines()
    directory = fleet.env()["DISPATCHER_SANDBOX_OUTPUT_DIR"]
    assert header == f"== attempt 1 ({directory}/{work_id}/1.log) =="
    assert lines == [f"attempt 1 of {work_id} on stdout", f"attempt 1 of {work_id} on stderr"]
    assert f"of {work_id} on stdout" not in fleet.log("w1"), "not in the worker's own log"


def test_a_session_worker_says_at_start_whether_sandboxes_get_cgroups(fleet: Fleet) -> None:
    """One line either way; on a host with no cgroup v2 to delegate, why not."""
    fleet.worker("w1", beat=True)
    work_id = fleet.create(fake_duration=0.2)
    fleet.wait_stopped([work_id], timeout=60)
    lines = [x for x in fleet.log("w1").splitlines() if "sandbox cgroups" in x]
    assert len(lines) == 1, lines
    v2 = Path("/sys/fs/cgroup/cgroup.controllers").is_file()
    assert ("used=True" in lines[0]) if v2 else ("used=False reason=" in lines[0]), lines[0]


def test_a_named_cgroup_that_cannot_be_used_refuses_the_start_with_one_line(
        fleet: Fleet, tmp_path: Path) -> None:
    fleet.overrides["DISPATCHER_PROCESS_CGROUP"] = str(tmp_path / "not-a-cgroup")
    worker = fleet.worker("w1", queues="dispatcher.sessions")
    assert worker.wait(timeout=90) != 0
    lines = [x for x in fleet.log("w1").splitlines() if x.startswith("dispatcher: ")]
    assert len(lines) == 1 and "DISPATCHER_PROCESS_CGROUP=" in lines[0], lines
    assert "Traceback" not in fleet.log("w1")
