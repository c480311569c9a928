"""A process sandbox under another user than its worker: a real celery worker (root here) with
DISPATCHER_PROCESS_USER, the emulator over HTTP, a session whose command tries to read its
worker's environment, where the Redis URL and the environment key are."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.fleet import Fleet

pytestmark = [pytest.mark.acceptance,
              pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")]

# A uid with no passwd entry: the kernel needs none, and no test host has one of its own.
SANDBOX_UID = 54321
# The session's command: who it runs as, and whether its parent's (the worker's) environment
# could be read. $PPID is the worker process that spawned it (threads pool).
SCRIPT = """#!/bin/sh
out="{shared}/$ANTHROPIC_WORK_ID"
if cat /proc/$PPID/environ > /dev/null 2>&1; then seen=read; else seen=denied; fi
echo "$(id -u) $PPID $seen" > "$out"
"""


@pytest.fixture
def shared() -> Iterator[Path]:
    """A directory the sandbox's user can reach (pytest's own tmp_path is root's, 0700)."""
    directory = Path(tempfile.mkdtemp(prefix="dispatcher-user-test-"))
    directory.chmod(0o777)
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_a_sandbox_under_another_user_cannot_read_its_workers_environment(
        fleet: Fleet, shared: Path) -> None:
    script = shared / "on-work.sh"
    script.write_text(SCRIPT.format(shared=shared))
    script.chmod(0o755)
    fleet.overrides.update({"DISPATCHER_ON_WORK": str(script),
                            "DISPATCHER_PROCESS_USER": str(SANDBOX_UID)})
    worker = fleet.worker("w1", concurrency=4, beat=True)
    work_id = fleet.create()
    fleet.wait_stopped([work_id], timeout=60)

    uid, parent, seen = (shared / work_id).read_text().split()
    assert uid == str(SANDBOX_UID), "switched before exec"
    assert int(parent) == worker.pid, "its parent is the worker itself"
    assert seen == "denied", "the worker's environment is out of the sandbox's reach"
    worker_environ = Path(f"/proc/{worker.pid}/environ").read_bytes()
    assert b"DISPATCHER_REDIS_URL=" in worker_environ, "what it would have read: the test can fail"
