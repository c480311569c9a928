"""A process sandbox's cgroup as the kernel enforces it: a fork bomb stops at pids.max, a
memory hog is killed at memory.max, a process that left the group dies with the session.

Runs where /sys/fs/cgroup is cgroup v2 with memory, pids and cpu to delegate and the tests run
as root; it skips elsewhere, saying why. (A cgroup v1 or hybrid host, such as one whose
controllers Docker holds in v1, has none to give; the unit tests cover the rest there.)"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from dispatcher.session.cgroups import CGROUP_ROOT, Limits, Parent, SessionCgroup
from dispatcher.session.output import LiveOutput
from dispatcher.session.sandbox import Sandbox, SandboxSpec

NEEDED = {"cpu", "memory", "pids"}


def _why_not() -> str | None:
    controllers = CGROUP_ROOT / "cgroup.controllers"
    if not controllers.is_file():
        return f"{CGROUP_ROOT} is not a cgroup v2 hierarchy (v1 or hybrid host)"
    if not set(controllers.read_text().split()) >= NEEDED:
        return f"the v2 root lacks {sorted(NEEDED - set(controllers.read_text().split()))}"
    if os.geteuid() != 0:
        return "not root: cannot make a delegated cgroup for the test"
    return None


pytestmark = pytest.mark.skipif(_why_not() is not None, reason=_why_not() or "")


@pytest.fixture
def parent() -> Iterator[Parent]:
    """A delegated cgroup of the test's own under the root, which (alone) may hold processes
    and still hand controllers to its children."""
    (CGROUP_ROOT / "cgroup.subtree_control").write_text("+cpu +memory +pids")
    path = CGROUP_ROOT / f"dispatcher-test-{uuid.uuid4().hex[:8]}"
    path.mkdir()
    (path / "cgroup.subtree_control").write_text("+cpu +memory +pids")
    try:
        yield Parent(path)
    finally:
        for child in path.iterdir():
            if child.is_dir():
                child.rmdir()
        path.rmdir()


def _run(parent: Parent, tmp_path: Path, script: str, limits: Limits) -> tuple[int | None, str]:
    cgroup = SessionCgroup(parent, "w", 1, limits)
    live = LiveOutput(tmp_path, "w", 1, max_bytes=65536, keep=10)
    spec = SandboxSpec(argv=["/bin/sh", "-c", script], env={"PATH": os.environ["PATH"]},
                       stdin=b"", work_id="w", attempt=1)
    sandbox = Sandbox.start(spec, output=live, cgroup=cgroup)
    code = sandbox.wait(30)
    sandbox.kill_group()
    assert not cgroup.path.exists(), "removed once empty"
    return code, live.path.read_text()


def test_a_fork_bomb_stops_at_the_pids_limit(parent: Parent, tmp_path: Path) -> None:
    script = "n=0; while [ $n -lt 40 ]; do sleep 5 & n=$((n+1)); done; echo done"
    _, output = _run(parent, tmp_path, script, Limits(256 * 1024**2, 10, 1.0))
    assert "fork" in output.lower() or "resource" in output.lower(), output


def test_a_memory_hog_is_killed_at_the_memory_limit(parent: Parent, tmp_path: Path) -> None:
    script = f"{sys.executable} -c 'x = bytearray(400 * 1024 * 1024); print(len(x))'"
    code, output = _run(parent, tmp_path, script, Limits(64 * 1024**2, 64, 1.0))
    assert code != 0 and str(400 * 1024 * 1024) not in output


def test_a_process_that_left_the_group_dies_with_the_session(parent: Parent,
                                                             tmp_path: Path) -> None:
    marker = tmp_path / "escaped.pid"
    script = f"setsid sh -c 'echo $$ > {marker}; sleep 300' & sleep 0.5"
    _run(parent, tmp_path, script, Limits(256 * 1024**2, 64, 1.0))
    pid = int(marker.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
