"""A rolling upgrade from the previous release keeps every held lease.

The previous release's code (`PREVIOUS_RELEASE`, taken from git into a directory of its own
and put first on the processes' `PYTHONPATH`) runs a fleet that holds sessions; its processes
are then replaced by this release's one at a time, as docs/operations.md tells operators to:
the control worker, then beat, then each session worker (drained by SIGTERM). Every session
must end completed exactly once, no two attempts of one session may overlap, and no heartbeat
may be refused (a refused one means the lease was lost).

One window matters for the task renames of this release: an old beat still publishing the old
task names while only a new control worker consumes them. The leases must get heartbeats in
that window, which only the new worker's aliases (`dispatcher.celery.names.RENAMED`) can send.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.fleet import Fleet, assert_no_overlap
from tests.support.waiting import wait_for

pytestmark = pytest.mark.acceptance

ROOT = Path(__file__).resolve().parents[2]
# The release this one upgrades from: main before this release changed task names. Move it on
# at each release, to the commit the fleets in production run.
PREVIOUS_RELEASE = "3cb8687bc1306e9dc506e7bd278278e1b40720ee"
SESSIONS = 4
# Long enough that every session is still running when its worker is replaced, short enough
# that the test ends in about two minutes.
SESSION_SECONDS = 40
# The old beat alone publishes while only the new control worker consumes. Each lease is due
# every third of its 30 s TTL, so every lease is due at least once in this window.
ALIAS_WINDOW_SECONDS = 14


@pytest.fixture
def previous_release(tmp_path: Path) -> Path:
    """The previous release's source tree (its `dispatcher` and `tasks` packages)."""
    tree = tmp_path / "previous-release"
    tree.mkdir()
    known = subprocess.run(["git", "-C", str(ROOT), "cat-file", "-e",
                            f"{PREVIOUS_RELEASE}^{{commit}}"], capture_output=True)
    assert known.returncode == 0, (
        f"the previous release {PREVIOUS_RELEASE} is not in this clone's history "
        "(a shallow clone?): fetch it, e.g. git fetch --unshallow")
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", PREVIOUS_RELEASE, "dispatcher",
                              "tasks"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
    return tree


def _release(fleet: Fleet, old: Path | None) -> None:
    """The processes started next run the old release (`old`: its tree) or this one (None)."""
    if old is None:
        fleet.overrides.pop("PYTHONPATH", None)
    else:
        fleet.overrides["PYTHONPATH"] = str(old)


def _start(fleet: Fleet, name: str, *, old: Path | None, queues: str, concurrency: int) -> None:
    _release(fleet, old)
    fleet.worker(name, concurrency=concurrency, queues=queues)
    process = fleet.stack.processes[name]
    wait_for(lambda: "worker ready" in fleet.log(name) or process.poll() is not None,
             timeout=60, what=f"{name} ready")
    assert process.poll() is None, fleet.log(name)


def _beat(fleet: Fleet, name: str, *, old: Path | None) -> None:
    _release(fleet, old)
    fleet.beat(name)


def _stop(fleet: Fleet, name: str) -> None:
    """SIGTERM, as an orchestrator replacing the process sends it; a session worker drains."""
    fleet.kill(name, signal.SIGTERM)
    assert fleet.stack.processes[name].wait(timeout=60) == 0, fleet.log(name)


def _heartbeats(fleet: Fleet, work_ids: list[str]) -> list[dict[str, Any]]:
    return [r for r in fleet.emulator.requests_log()
            if r.get("work_id") in work_ids and r.get("endpoint") == "heartbeat"]


def test_a_rolling_upgrade_from_the_previous_release_keeps_every_lease(
        fleet: Fleet, previous_release: Path) -> None:
    old = previous_release
    _beat(fleet, "old-beat", old=old)
    _start(fleet, "old-control", old=old, queues="dispatcher.control", concurrency=4)
    _start(fleet, "old-s1", old=old, queues="dispatcher.sessions", concurrency=2)
    _start(fleet, "old-s2", old=old, queues="dispatcher.sessions", concurrency=2)
    assert "tasks.heartbeat.beat_leases" in fleet.log("old-control"), "not the old release"
    assert "tasks.heartbeat.send_heartbeats" not in fleet.log("old-control")
    fleet.wait_slots(2 * 2)
    work_ids = [fleet.create(fake_duration=SESSION_SECONDS) for _ in range(SESSIONS)]
    for work_id in work_ids:
        fleet.wait_event(work_id, "started", timeout=30)

    # The control plane: a new worker beside the old, then the old one goes. The old beat,
    # still the only one, publishes the old names: only the aliases can run them now.
    _start(fleet, "new-control", old=None, queues="dispatcher.control", concurrency=4)
    _stop(fleet, "old-control")
    window_start = time.time()
    time.sleep(ALIAS_WINDOW_SECONDS)
    window_end = time.time()
    _stop(fleet, "old-beat")
    _beat(fleet, "new-beat", old=None)

    # The session workers, one at a time: each drained worker hands its sessions over.
    _start(fleet, "new-s1", old=None, queues="dispatcher.sessions", concurrency=2)
    _stop(fleet, "old-s1")
    _start(fleet, "new-s2", old=None, queues="dispatcher.sessions", concurrency=2)
    _stop(fleet, "old-s2")

    fleet.wait_stopped(work_ids, timeout=3 * SESSION_SECONDS)
    for work_id in work_ids:
        completed = [e for e in fleet.events(work_id, "exited") if e["reason"] == "completed"]
        assert len(completed) == 1, f"{work_id} completed {len(completed)} times"
        assert_no_overlap(fleet, work_id, death_times={})
    handed_over = [w for w in work_ids if len(fleet.events(w, "started")) > 1]
    assert handed_over, "no session was handed over: the session workers were not replaced"

    beats = _heartbeats(fleet, work_ids)
    refused = [(r["work_id"], r["status"]) for r in beats if r["status"] != 200]
    assert not refused, f"heartbeats refused, leases lost: {refused}"
    in_window = {r["work_id"] for r in beats if window_start <= r["time"] <= window_end}
    assert in_window == set(work_ids), (
        "leases went without a heartbeat while the old beat published the old task names: "
        f"only {sorted(in_window)} of {work_ids}")
