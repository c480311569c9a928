"""Sandboxes that misbehave: ignore SIGTERM, fork children, exit at once."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.support.chaos import ChaosFleet, Figures

pytestmark = pytest.mark.chaos


def test_stubborn_forking_and_instant_sandboxes(
        chaos: Callable[..., ChaosFleet], report: Callable[[Figures], None]) -> None:
    cf = chaos("sandboxes: ignore SIGTERM, fork, exit at once", ttl=6, grace=2)
    cf.control()
    cf.sessions_worker("s1", concurrency=6)
    cf.sessions_worker("s2", concurrency=6)
    cf.fleet.wait_slots(12)
    stubborn = cf.create(3, fake_duration=60, fake_ignore_sigterm=1)
    stubborn_forced = cf.create(1, fake_duration=60, fake_ignore_sigterm=1, fake_children=2)
    forking = cf.create(4, fake_duration=1, fake_children=3)
    instant = cf.create(2, fake_duration=0) + cf.create(2, fake_duration=0, fake_exit_code=3)
    cf.wait_started(stubborn + stubborn_forced)
    for work_id in stubborn:
        cf.stop(work_id)  # graceful: SIGTERM ignored, SIGKILL after the grace
    cf.stop(stubborn_forced[0], force=True)
    cf.fault("SIGTERM ignored", len(stubborn) + 1)
    cf.fault("forked children", len(forking) + 1)
    cf.fault("instant exit", len(instant))
    figures = cf.finish(timeout=90)
    for work_id in stubborn:
        assert cf.fleet.events(work_id, "sigterm"), f"{work_id} got SIGTERM first"
        assert not cf.fleet.events(work_id, "exited"), f"{work_id} was killed, not let finish"
    for work_id in forking:
        assert len(cf.fleet.events(work_id, "child_started")) == 3
    for work_id in instant:
        assert len(cf.fleet.events(work_id, "started")) == 1, "an instant exit is not retried"
    report(figures)
