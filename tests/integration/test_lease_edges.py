"""Lease edge cases the chaos suite first found, pinned one by one: a refused first claim, a
release that keeps failing, an item the server hands out again while we still hold it, a slow
API, and a sandbox whose registry goes away. Real Redis and the emulator over HTTP."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest

from dispatcher.control.heartbeat import heartbeat_due_leases
from dispatcher.control.poller import claim
from dispatcher.lease import events as ev
from dispatcher.lease.causes import SeenBy, StopCause
from dispatcher.lease.model import Lease, Phase, StopKind
from dispatcher.runtime import Runtime
from tests.support.emulator import under_both_models
from tests.support.inprocess import in_process_runtime, poll_until

pytestmark = pytest.mark.integration


def _claimed(emulator: Any, runtime: Runtime) -> str:
    _, work_id = emulator.create_session(runtime.environment_id, metadata={})
    assert claim(runtime, poll_until(runtime, work_id))
    return work_id


def _beats(emulator: Any, work_id: str) -> list[dict[str, Any]]:
    return [e for e in emulator.requests_log()
            if e.get("work_id") == work_id and e.get("endpoint") == "heartbeat"]


def _finish(runtime: Runtime, lease: Lease) -> Lease | None:
    """The session's sandbox exited 0: what the lease is after the machine released it."""
    exited = ev.SandboxExited(lease.attempt, 0, draining=False, next_task_id="unused")
    return runtime.executor.run(lease, exited)


def _due_now(runtime: Runtime, work_id: str) -> float:
    """The lease's heartbeat due a second ago; returns when."""
    due = time.time() - 1
    runtime.registry.schedule_heartbeat(work_id, due)
    return due


# --- a 412 to the first claim while nobody holds the item ----------------------------------
def test_a_refused_first_claim_of_an_unheld_item_is_claimed_again(
        emulator: Any, runtime: Runtime) -> None:
    emulator.set_faults(heartbeat_412_rate=1.0)
    work_id = _claimed(emulator, runtime)
    lease = runtime.registry.get(work_id)
    assert lease is not None and not lease.token and not lease.lost, "the lease is kept"
    assert runtime.app.sent, "and its session dispatched"
    emulator.reset_faults()
    _due_now(runtime, work_id)
    heartbeat_due_leases(runtime)
    lease = runtime.registry.get(work_id)
    assert lease is not None and lease.token, "the second claim took the lease"
    assert emulator.get(runtime.environment_id, work_id)["state"] == "active"


def test_a_claim_refused_for_a_whole_ttl_is_stopped_not_stranded(
        emulator: Any, runtime: Runtime) -> None:
    emulator.set_faults(heartbeat_412_rate=1.0)
    work_id = _claimed(emulator, runtime)
    runtime.registry.update(work_id, claimed_at=time.time() - 120)  # acked a while ago
    _due_now(runtime, work_id)
    heartbeat_due_leases(runtime)
    emulator.reset_faults()
    assert runtime.registry.get(work_id) is None
    assert emulator.get(runtime.environment_id, work_id)["state"] == "stopped"


# --- a release that keeps failing ----------------------------------------------------------
def test_a_lease_whose_release_fails_is_still_heartbeated_until_the_stop_lands(
        emulator: Any, runtime: Runtime) -> None:
    work_id = _claimed(emulator, runtime)
    lease = runtime.registry.get(work_id)
    assert lease is not None
    emulator.set_faults(error_rate=1.0, error_status=500, endpoints=["stop"])
    assert _finish(runtime, lease) is not None, "the failed release keeps the lease"
    releasing = runtime.registry.get(work_id)
    assert releasing is not None and releasing.phase == Phase.RELEASING
    before = len(_beats(emulator, work_id))
    _due_now(runtime, work_id)
    heartbeat_due_leases(runtime)
    beats = _beats(emulator, work_id)
    assert len(beats) == before + 1 and beats[-1]["status"] == 200, "beaten while releasing"
    emulator.reset_faults()
    _due_now(runtime, work_id)
    tally = heartbeat_due_leases(runtime)
    assert tally.released == 1 and runtime.registry.get(work_id) is None
    assert emulator.get(runtime.environment_id, work_id)["state"] == "stopped"


def test_a_failed_release_never_postpones_a_due_beat(emulator: Any, runtime: Runtime) -> None:
    work_id = _claimed(emulator, runtime)
    lease = runtime.registry.get(work_id)
    assert lease is not None
    soon = time.time() + 0.5
    runtime.registry.schedule_heartbeat(work_id, soon)
    emulator.set_faults(error_rate=1.0, error_status=500, endpoints=["stop"])
    try:
        assert _finish(runtime, lease) is not None, "the failed release keeps the lease"
    finally:
        emulator.reset_faults()
    assert runtime.registry.next_due(work_id) == pytest.approx(soon)


# --- the server hands out an item we still hold --------------------------------------------
LAPSING = ("--lease-expiry", "requeue", "--min-ttl", "1", "--default-ttl", "1")


def test_an_ended_session_handed_out_again_is_stopped_not_run_again(
        emulator_factory: Callable[..., Any]) -> None:
    emu = emulator_factory(*LAPSING)
    with in_process_runtime(emu, DISPATCHER_DESIRED_TTL_SECONDS=1) as runtime:
        work_id = _claimed(emu, runtime)
        lease = runtime.registry.get(work_id)
        assert lease is not None
        emu.set_faults(error_rate=1.0, error_status=500, endpoints=["stop"])
        assert _finish(runtime, lease) is not None, "the failed release keeps the lease"
        emu.reset_faults()
        runtime.registry.unschedule_heartbeat(work_id)  # no beat: let the lease lapse
        redelivered = poll_until(runtime, work_id)
        sent = len(runtime.app.sent)
        assert not claim(runtime, redelivered)
        assert len(runtime.app.sent) == sent, "not dispatched again"
        assert runtime.registry.get(work_id) is None
        assert emu.get(runtime.environment_id, work_id)["state"] == "stopped"


def test_a_running_session_handed_out_again_is_fenced_and_left_unacked(
        emulator_factory: Callable[..., Any]) -> None:
    emu = emulator_factory(*LAPSING)
    with in_process_runtime(emu, DISPATCHER_DESIRED_TTL_SECONDS=1) as runtime:
        work_id = _claimed(emu, runtime)
        runtime.registry.update(work_id, phase=Phase.RUNNING)
        runtime.registry.unschedule_heartbeat(work_id)
        redelivered = poll_until(runtime, work_id)
        assert not claim(runtime, redelivered)
        lease = runtime.registry.get(work_id)
        assert lease is not None and lease.lost and lease.stop == "force", "fenced"
        acks = [e for e in emu.requests_log()
                if e.get("work_id") == work_id and e.get("endpoint") == "ack"]
        assert len(acks) == 1, "not acked a second time"


# --- a slow API ------------------------------------------------------------------------------
def test_the_next_beat_is_scheduled_from_when_the_last_was_due_not_answered(
        emulator: Any, runtime: Runtime) -> None:
    """A slow API (1.5 s a heartbeat) does not stretch a lease's period: the next beat is due
    an interval after the last was due (`steps.renewal_due`), not after its answer."""
    work_id = _claimed(emulator, runtime)
    emulator.set_faults(latency_ms=1500, endpoints=["heartbeat"])
    try:
        was_due = _due_now(runtime, work_id)
        heartbeat_due_leases(runtime)
        answered_at = time.time()
    finally:
        emulator.reset_faults()
    lease = runtime.registry.get(work_id)
    due = runtime.registry.next_due(work_id)
    assert lease is not None and due is not None
    interval = lease.ttl_seconds / 3
    assert was_due + interval - 0.5 <= due <= was_due + interval + 0.5
    assert due < answered_at + interval - 1.5, "not counted from the answer"


# --- a finished session whose release keeps failing, then a lost reply and a 412 -------------
@under_both_models
@pytest.mark.parametrize("inside_ttl", [True, False], ids=["adopted", "lost"])
def test_a_finished_session_is_stopped_whatever_happens_to_its_lease(
        emulator: Any, runtime: Runtime, inside_ttl: bool) -> None:
    """The elements of a double run seen in CI: a beat applied on the server whose reply was
    lost; the sandbox exited 0 and the stop kept failing; the next beat presented the stale
    token and got 412. Inside the TTL the lost beat's token is adopted; past it the lease is
    lost. Either way the finished session's item is stopped, and never dispatched again."""
    work_id = _claimed(emulator, runtime)
    runtime.registry.update(work_id, phase=Phase.RUNNING)
    emulator.set_faults(lost_reply_rate=1.0, endpoints=["heartbeat"])
    _due_now(runtime, work_id)
    heartbeat_due_leases(runtime)  # applied on the server, the reply lost
    emulator.reset_faults()
    emulator.set_faults(error_rate=1.0, error_status=500, endpoints=["stop"])
    lease = runtime.registry.get(work_id)
    assert lease is not None and lease.uncertain
    assert _finish(runtime, lease) is not None, "the failed release keeps the lease"
    if not inside_ttl:
        runtime.registry.update(work_id, heartbeat_ok_at=time.time() - 120)
    _due_now(runtime, work_id)
    heartbeat_due_leases(runtime)  # the stale token: 412; the stop fails again
    assert _beats(emulator, work_id)[-1]["status"] == 412, "the stale token was refused"
    emulator.reset_faults()
    for _ in range(5):
        if runtime.registry.get(work_id) is None:
            break
        _due_now(runtime, work_id)
        heartbeat_due_leases(runtime)
    assert runtime.registry.get(work_id) is None, "released once the stop landed"
    assert emulator.get(runtime.environment_id, work_id)["state"] == "stopped"
    sent = [t for t in runtime.app.sent if t["kwargs"]["work_id"] == work_id]
    assert len(sent) == 1, "never dispatched again"


# --- Redis restarted empty under a running session ------------------------------------------
def test_a_lease_written_back_after_a_registry_reset_is_heartbeated_again(
        emulator: Any, runtime: Runtime) -> None:
    """Found by the chaos suite: the record a supervisor writes back after Redis lost its data
    was never scheduled for a heartbeat, so a session outliving the restart by a TTL lost its
    lease under the sandbox."""
    work_id = _claimed(emulator, runtime)
    runtime.registry.update(work_id, phase=Phase.RUNNING)
    remembered = runtime.registry.get(work_id)
    work_json = runtime.registry.work_json(work_id)
    assert remembered is not None and work_json is not None
    runtime.registry.delete(work_id)  # what a Redis restarted empty leaves
    runtime.executor.write_back(ev.RegistryReset(remembered), work_json=work_json)
    assert runtime.registry.get(work_id) is not None, "written back"
    due = runtime.registry.next_due(work_id)
    # Due times are the fleet's clock (Redis's), not this host's.
    assert due is not None and due <= runtime.registry.clock.now(), "and its heartbeat due at once"
    before = len(_beats(emulator, work_id))
    heartbeat_due_leases(runtime)
    beats = _beats(emulator, work_id)
    assert len(beats) == before + 1 and beats[-1]["status"] == 200, "beaten with its token"


# --- two stop flags at once -------------------------------------------------------------------
def test_a_stop_flag_raised_meanwhile_is_decided_with_not_overwritten(
        emulator: Any, runtime: Runtime) -> None:
    """The heartbeat tick read the lease, the stop bridge raised a graceful stop, then the
    tick's answer (the lease is not ours any more) raises a forced one: the registry refuses the
    flag decided from the stale read, and the machine decides again on the record. Force wins,
    and the bridge's cause, the first, stays."""
    work_id = _claimed(emulator, runtime)
    read_by_the_tick = runtime.registry.get(work_id)
    assert read_by_the_tick is not None
    runtime.registry.update(work_id, phase=Phase.RUNNING)
    bridge = runtime.registry.get(work_id)
    runtime.executor.run(bridge, ev.StopRequested(StopKind.GRACEFUL, StopCause.SERVER,
                                                  SeenBy.BRIDGE))
    after = runtime.executor.run(read_by_the_tick.but(phase=Phase.RUNNING),
                                 ev.HeartbeatRefused(ev.ServerLease("active", "tok-rival")))
    assert after is not None and after.lost
    recorded = runtime.registry.get(work_id)
    assert recorded is not None
    assert (recorded.stop, recorded.stop_cause) == (StopKind.FORCE, StopCause.SERVER)
