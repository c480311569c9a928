"""Fixtures of the chaos scenarios.

The fleet is the acceptance one (tests/support/fleet.py) but on a PRIVATE redis-server started
for each test worker's chaos scenarios, apart from the Redis every other test shares (a
scenario whose fault is Redis itself starts one of its own). Each scenario gets its own emulator
(`--min-ttl 1`, so short TTLs are honoured) and its own key prefix.

Every scenario's figures go to a JSON file: $DISPATCHER_CHAOS_FIGURES, else
`<pytest basetemp>/chaos-figures.json`; `python tests/support/report.py FILE` renders the table of
docs/reliability.md.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.chaos import ChaosFleet, Figures, RedisServer, env_path, figures_dict
from tests.support.fleet import Fleet
from tests.support.isolation import free_port

FIGURES_ENV = "DISPATCHER_CHAOS_FIGURES"
_figures_path: list[Path] = []


@pytest.fixture(scope="session")
def chaos_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("chaos-redis"), free_port())
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def figures_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # a worker's is `popen-gwN` in the run's: one file for the run
    path = Path(env_path(FIGURES_ENV) or base / "chaos-figures.json")
    if not _figures_path:
        _figures_path.append(path)
    return path


def record_figures(path: Path, figures: Figures) -> None:
    """Merge one scenario's figures into the JSON file (scenario name -> figures). Parallel
    workers may share the file ($DISPATCHER_CHAOS_FIGURES): the merge holds a lock on it, or
    two workers' read-modify-writes would drop a scenario."""
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
        data[figures.scenario] = figures_dict(figures)
        path.write_text(json.dumps(data, indent=2, sort_keys=True))


MakeChaos = Callable[..., ChaosFleet]
# The scenarios promise that every session runs to completion, and some of their faults end a
# lease without ending its session (a 412 the fault injects, a task message lost with Redis) or
# leave an item unacked through several deliveries (503s on ack): that promise needs a lapsed
# lease to come back to the queue, and an item to be delivered until acked. Under the
# emulator's default, SDK 2.17's model, a lapse ends the item and a third unacked delivery is
# its last, so the scenarios start it with the earlier model's expiry and deliveries (a
# scenario's own flags come later and win: the lost-replies one runs both lapse modes).
LAPSE_COMES_BACK = ("--lease-expiry", "requeue", "--unclaimed-limit", "0",
                    "--max-deliveries", "0")


@pytest.fixture
def chaos(emulator_factory: Callable[..., Any], tmp_path: Path, chaos_redis: RedisServer,
          figures_file: Path) -> Iterator[MakeChaos]:
    """`chaos(scenario, ttl=..., grace=..., redis=..., emulator_flags=())` -> a ChaosFleet;
    stopped at the end of the test."""
    made: list[ChaosFleet] = []

    def make(scenario: str, *, ttl: float = 6, grace: float = 2,
             redis: RedisServer | None = None, emulator_flags: tuple[str, ...] = ()) -> ChaosFleet:
        emulator = emulator_factory("--min-ttl", "1", *LAPSE_COMES_BACK, *emulator_flags)
        fleet = Fleet(emulator, tmp_path, (redis or chaos_redis).url)
        cf = ChaosFleet(fleet, scenario=scenario, ttl=ttl, grace=grace)
        made.append(cf)
        return cf

    try:
        yield make
    finally:
        with contextlib.ExitStack() as closing:  # every fleet closed, the first failure raised
            for cf in made:
                closing.callback(cf.close)


Report = Callable[..., None]


@pytest.fixture
def report(figures_file: Path) -> Report:
    """`report(figures, known=None, why="")`: record a scenario's figures, then fail on any
    violation it found; if `known` says every violation is a known dispatcher bug (reported,
    not yet fixed), the test is an expected failure (`why`) instead: no other one is excused."""

    def check(figures: Figures, *, known: Callable[[str], bool] | None = None,
              why: str = "") -> None:
        record_figures(figures_file, figures)
        if figures.violations and known is not None and all(map(known, figures.violations)):
            pytest.xfail(f"{why}: " + "; ".join(figures.violations))
        assert not figures.violations, "\n".join(figures.violations)

    return check


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _figures_path and _figures_path[0].exists():
        terminalreporter.write_line(f"chaos figures: {_figures_path[0]} "
                                    f"(render: python tests/support/report.py {_figures_path[0]})")
