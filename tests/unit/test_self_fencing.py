"""Self-fencing and recovery: a cut-off sandbox is dead before its session may run elsewhere."""

from __future__ import annotations

import signal

import pytest

from dispatcher.lease.causes import Outcome
from dispatcher.lease.machine import outage_is_too_long
from dispatcher.lease.machine.running import PULSE_STALE_SECONDS
from dispatcher.lease.machine.steps import SELF_FENCE_SECONDS
from dispatcher.lease.model import Lease
from dispatcher.session.supervision import (
    FENCE_CHECK_SECONDS,
    SUPERVISE_INTERVAL_SECONDS,
    Supervised,
)

# What a fenced sandbox may still take to die after the bound: the fence's tick, the kill of
# its group (or the engine's kill of a container), and a loaded two-core host's scheduling.
KILL_ALLOWANCE_SECONDS = 2.0


def test_the_fence_closes_well_before_recovery_opens() -> None:
    assert SELF_FENCE_SECONDS + FENCE_CHECK_SECONDS + KILL_ALLOWANCE_SECONDS < PULSE_STALE_SECONDS


def test_a_slow_pulse_is_not_silence() -> None:
    """Recovery outlasts one Redis call that takes the whole socket timeout (5 s)."""
    assert PULSE_STALE_SECONDS > 5.0 + SUPERVISE_INTERVAL_SECONDS


@pytest.mark.parametrize(("ttl", "seconds", "fenced"), [
    (300, 2.9, False),
    (300, 3.0, True),  # the self-fencing bound, whatever the TTL
    (60, 3.5, True),
    (3, 1.9, False),
    (3, 2.0, True),  # two thirds of a short TTL comes first: the lease may lapse by then
])
def test_outage_is_too_long(ttl: int, seconds: float, fenced: bool) -> None:
    lease = Lease(work_id="work_1", session_id="s", environment_id="env", mode="dispatcher",
                  queue="q", ttl_seconds=ttl)
    assert outage_is_too_long(lease, seconds) is fenced


class _Sandbox:
    """A sandbox that notes whether its attempt was marked fenced when it was killed."""

    def __init__(self) -> None:
        self.member: Supervised | None = None
        self.fenced_when_killed: Outcome | None = None
        self.started_at = 0.0

    def describe(self) -> dict[str, str | int]:
        return {}

    def wait(self, timeout: float) -> int | None:
        return None

    def signal_group(self, signum: int) -> None:
        assert signum == signal.SIGKILL and self.member is not None
        self.fenced_when_killed = self.member.fenced

    def kill_group(self) -> None:
        pass


def test_a_fenced_attempt_is_marked_before_its_sandbox_is_killed() -> None:
    """The kill's exit must never be read as the session's own (a failure that ends it): the
    attempt's thread, woken by the exit, finds the mark first."""
    sandbox = _Sandbox()
    lease = Lease(work_id="work_1", session_id="s", environment_id="env", mode="dispatcher",
                  queue="q")
    member = Supervised("work_1", 1, "w", sandbox, lease=lambda: lease,
                        operator=lambda draining: False)
    sandbox.member = member
    member.fence()
    assert sandbox.fenced_when_killed == Outcome.LOST
