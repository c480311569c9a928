"""`dispatcher status --check`'s decision, as a table: what the fleet looks like -> problems."""

from __future__ import annotations

import pytest

from dispatcher.control.capacity import WorkerSlots
from dispatcher.lease.registry import Lease
from dispatcher.ops.status import FleetView, problems

NOW = 1_000_000.0


def worker(*, slots: int = 4, seen_ago: float = 1.0, draining: bool = False,
           engine: str = "", hostname: str = "w@h") -> WorkerSlots:
    return WorkerSlots(hostname=hostname, slots=slots, pool="threads",
                       queues="dispatcher.sessions", draining=draining, seen_at=NOW - seen_ago,
                       engine=engine)


def lease(*, beaten_ago: float | None = 5.0, ttl: int = 30, claimed_ago: float = 60.0,
          heartbeats_by: str = "dispatcher", lost: str = "") -> Lease:
    return Lease(work_id="work_1", session_id="sesn_1", environment_id="env_1",
                 mode="dispatcher", queue="dispatcher.sessions", ttl_seconds=ttl,
                 claimed_at=NOW - claimed_ago, heartbeats_by=heartbeats_by, lost=lost,
                 heartbeat_ok_at=0.0 if beaten_ago is None else NOW - beaten_ago)


HEALTHY = {"workers": [worker()], "leases": [lease()], "beat_lock_held": True}

CASES = [
    ("healthy", {}, []),
    ("a full fleet is healthy", {"workers": [worker(slots=1)], "leases": [lease(), lease()]}, []),
    ("no workers", {"workers": []}, ["no live session slots"]),
    ("only a control worker", {"workers": [worker(slots=0)]}, ["no live session slots"]),
    ("every worker draining", {"workers": [worker(draining=True)]}, ["no live session slots"]),
    ("worker silent 7 s", {"workers": [worker(seen_ago=7)]}, ["no live session slots"]),
    # A worker whose container engine does not answer withdrew its slots: said either way.
    ("engine down on the only worker", {"workers": [worker(engine="down")]},
     ["no live session slots", "1 worker(s) whose container engine does not answer"]),
    ("engine down on one worker of two",
     {"workers": [worker(engine="down"), worker(engine="up", hostname="w2@h")]},
     ["1 worker(s) whose container engine does not answer"]),
    ("engine answering", {"workers": [worker(engine="up")]}, []),
    # An engine that answers but lost a configured image cannot start a sandbox either.
    ("image lost on the only worker", {"workers": [worker(engine="no-image")]},
     ["no live session slots", "1 worker(s) whose container engine lacks a sandbox image"]),
    ("image lost on one worker of two",
     {"workers": [worker(engine="no-image"), worker(engine="up", hostname="w2@h")]},
     ["1 worker(s) whose container engine lacks a sandbox image"]),
    ("engine down on a silent worker", {"workers": [worker(engine="down", seen_ago=7)]},
     ["no live session slots"]),
    ("no beat", {"beat_lock_held": False}, ["beat's lock is not held"]),
    ("lease unbeaten for 2/3 of its TTL", {"leases": [lease(beaten_ago=21, ttl=30)]},
     ["1 lease(s) overdue"]),
    ("lease beaten 19 s ago of 30", {"leases": [lease(beaten_ago=19, ttl=30)]}, []),
    ("never beaten, claimed long ago", {"leases": [lease(beaten_ago=None, claimed_ago=25)]},
     ["1 lease(s) overdue"]),
    ("never beaten, just claimed", {"leases": [lease(beaten_ago=None, claimed_ago=2)]}, []),
    ("the sandbox beats it", {"leases": [lease(beaten_ago=100, heartbeats_by="sandbox")]}, []),
    ("lost: being let go", {"leases": [lease(beaten_ago=100, lost="1")]}, []),
    ("everything wrong", {"workers": [], "beat_lock_held": False,
                          "leases": [lease(beaten_ago=100)]},
     ["no live session slots", "beat's lock is not held", "1 lease(s) overdue"]),
]


@pytest.mark.parametrize(("changes", "expected"), [(c, e) for _, c, e in CASES],
                         ids=[name for name, _, _ in CASES])
def test_problems(changes: dict[str, object], expected: list[str]) -> None:
    view = FleetView(now=NOW, **{**HEALTHY, **changes})  # type: ignore[arg-type]
    found = problems(view)
    assert len(found) == len(expected), found
    for line, start in zip(found, expected, strict=True):
        assert line.startswith(start), line


def test_watch_refuses_a_non_positive_interval(capsys: pytest.CaptureFixture[str]) -> None:
    from dispatcher.ops.cli import main

    assert main(["status", "--watch", "--interval", "0"]) == 2
    assert "--interval must be above 0" in capsys.readouterr().err
