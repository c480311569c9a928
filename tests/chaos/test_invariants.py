"""The invariants read a lost reply (applied by the server, status 0 to the client) as what the
server did. Pure tables: no fleet, no marker, part of every run."""

from __future__ import annotations

import subprocess
import time
from typing import Any

import pytest

from tests.support import invariants

W = "work_1"
T0 = 1_800_000_000.0  # times in the tables are seconds after this epoch second


def _e(t: float, endpoint: str, status: int, **fields: Any) -> dict[str, Any]:
    return {"time": T0 + t, "endpoint": endpoint, "status": status, "work_id": W, **fields}


def _lost(t: float, endpoint: str, applied: int, **fields: Any) -> dict[str, Any]:
    return _e(t, endpoint, 0, fault="lost_reply", applied_status=applied, **fields)


@pytest.mark.parametrize(("log", "broken"), [
    # An ack that landed unseen, probed at once and beaten on: held and kept alive.
    ([_lost(0, "ack", 200), _e(0.2, "heartbeat", 200), _e(2, "heartbeat", 200),
      _e(3, "stop", 204)], False),
    # An ack that landed unseen and was never beaten: stranded in `starting`.
    ([_lost(0, "ack", 200)], True),
    # A stop that landed unseen ends the lease: the silence after it is no lapse.
    ([_e(0, "ack", 200), _e(0.1, "heartbeat", 200), _lost(1, "stop", 204),
      _e(20, "stop", 409)], False),
    # A heartbeat that landed unseen still kept the lease alive on the server.
    ([_e(0, "ack", 200), _e(0.1, "heartbeat", 200), _lost(5, "heartbeat", 200),
      _e(10, "heartbeat", 412), _e(10.1, "heartbeat", 200), _e(11, "stop", 204)], False),
    # A dropped request was never applied: nothing acked, nothing to keep alive.
    ([_e(0, "ack", 0, fault="drop")], False),
])
def test_leases_kept_alive_reads_lost_replies_as_applied(log: list[dict[str, Any]],
                                                          broken: bool) -> None:
    problems = invariants.leases_kept_alive(log, ttl=6, margin=0.5, end_time=T0 + 30)
    assert bool(problems) == broken, problems


def test_a_token_issued_by_a_lost_reply_may_be_adopted() -> None:
    log = [_e(0, "heartbeat", 200, expected_last_heartbeat="NO_HEARTBEAT", last_heartbeat="a"),
           _lost(2, "heartbeat", 200, expected_last_heartbeat="a", last_heartbeat="b"),
           _e(3, "heartbeat", 412, expected_last_heartbeat="a"),
           _e(3.1, "heartbeat", 200, expected_last_heartbeat="b", last_heartbeat="c")]
    assert invariants.no_stale_token_after_412(log) == []


def test_a_refused_token_presented_again_is_still_caught() -> None:
    log = [_e(0, "heartbeat", 200, expected_last_heartbeat="NO_HEARTBEAT", last_heartbeat="a"),
           _e(2, "heartbeat", 412, expected_last_heartbeat="a"),
           _e(3, "heartbeat", 412, expected_last_heartbeat="a")]
    assert len(invariants.no_stale_token_after_412(log)) == 1


def test_a_token_nobody_issued_is_caught() -> None:
    log = [_e(0, "heartbeat", 200, expected_last_heartbeat="NO_HEARTBEAT", last_heartbeat="a"),
           _e(2, "heartbeat", 0, fault="drop", expected_last_heartbeat="a", last_heartbeat="b"),
           _e(3, "heartbeat", 200, expected_last_heartbeat="b", last_heartbeat="c")]
    assert len(invariants.no_stale_token_after_412(log)) == 1


def test_a_reused_pid_is_not_the_sandbox_that_wrote_the_record() -> None:
    with subprocess.Popen(["sleep", "30"]) as process:
        try:
            assert invariants._alive(process.pid, wrote_at=time.time())
            # A record written before this process started was another process's: pid reuse.
            assert not invariants._alive(process.pid, wrote_at=time.time() - 60)
        finally:
            process.kill()
    assert not invariants._alive(process.pid, wrote_at=time.time())
