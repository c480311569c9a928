"""Process sandboxes as an operator sees them: each attempt's output kept and shown by
`dispatcher output`; real workers, the emulator over HTTP."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys

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
