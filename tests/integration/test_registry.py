"""The lease registry and capacity on real Redis."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator

import pytest
import redis

from dispatcher.control.capacity import Capacity
from dispatcher.lease.model import Heartbeater, Lease, Phase, StopKind
from dispatcher.lease.registry import LeaseRegistry
from tests.support.isolation import integration_db, redis_url

pytestmark = pytest.mark.integration


@pytest.fixture
def registry() -> Iterator[LeaseRegistry]:
    r = redis.Redis.from_url(redis_url(integration_db()), decode_responses=True)
    prefix = f"reg{uuid.uuid4().hex[:6]}"
    yield LeaseRegistry(r, prefix=prefix)
    for key in r.scan_iter(f"{prefix}:*"):
        r.delete(key)


def _lease(work_id: str = "work_1", **kw: object) -> Lease:
    return Lease(work_id=work_id, session_id="session_1", environment_id="env_1",
                 mode="dispatcher", queue="dispatcher.sessions", task_id="t1",
                 claimed_at=time.time(), **kw)  # type: ignore[arg-type]


def test_a_lease_round_trips_and_is_forgotten_on_delete(registry: LeaseRegistry) -> None:
    registry.create(_lease(token="2026-01-01T00:00:00.123456Z", ttl_seconds=120),
                    work_json='{"secret": "s"}')
    lease = registry.get("work_1")
    assert lease is not None
    assert lease.token == "2026-01-01T00:00:00.123456Z"
    assert (lease.ttl_seconds, lease.attempt) == (120, 1)
    assert registry.work_json("work_1") == '{"secret": "s"}'
    assert registry.held_count() == 1
    registry.delete("work_1")
    assert registry.get("work_1") is None and registry.work_json("work_1") is None
    assert registry.held_count() == 0


def test_update_never_resurrects_a_released_lease(registry: LeaseRegistry) -> None:
    assert registry.update("work_gone", token="x") is False
    assert registry.get("work_gone") is None


def test_only_the_current_attempt_may_pulse_or_change_the_lease(registry: LeaseRegistry) -> None:
    registry.create(_lease(), work_json="{}")
    assert registry.update_if_attempt("work_1", 1, {"attempt": 2, "task_id": "t2"}) == 1
    assert registry.update_if_attempt("work_1", 1, {"attempt": 2, "task_id": "t3"}) == 0, "fenced"
    stale = registry.pulse("work_1", 1)
    assert stale.exists and not stale.current
    assert registry.update_if_attempt("work_1", 1, {"phase": Phase.RUNNING}) == 0
    assert registry.update_if_attempt("work_1", 2, {"phase": Phase.RUNNING}) == 1
    assert registry.pulse("work_1", 2).current
    assert registry.update_if_attempt("nope", 1, {"phase": "x"}) == -1


def test_a_processs_attempts_are_pulsed_in_one_round_trip_as_one_by_one(
        registry: LeaseRegistry) -> None:
    """The supervision hub's pipeline answers each attempt as its own pulse would: current,
    superseded, gone, stopped; and it marks only the current attempts' pulse."""
    registry.create(_lease("work_a"), work_json="{}")
    registry.create(_lease("work_b"), work_json="{}")
    registry.update_if_attempt("work_b", 1, {"attempt": 2})
    registry.set_stop("work_a", StopKind.GRACEFUL, expected=StopKind.NONE, cause="server")
    many = registry.pulse_many([("work_a", 1, "w"), ("work_b", 1, "w"), ("work_gone", 1, "w")])
    assert [(p.exists, p.current) for p in many] == [(True, True), (True, False), (False, False)]
    assert (many[0].stop, many[0].stop_cause) == ("graceful", "server")
    assert [registry.pulse(w, 1, worker="w") for w in ("work_a", "work_b", "work_gone")] == many
    pulsed = [registry.get(w) for w in ("work_a", "work_b")]
    assert pulsed[0] is not None and pulsed[0].pulse_at > 0
    assert pulsed[1] is not None and not pulsed[1].pulse_at, "a superseded pulse marks nothing"
    assert registry.pulse_many([]) == []


def test_a_stop_flag_is_set_only_over_the_flag_it_was_decided_from(
    registry: LeaseRegistry,
) -> None:
    """Which stop wins and which cause stays is the machine's (tests/unit); the registry only
    refuses a flag decided from one that changed meanwhile, for the machine to decide again."""
    registry.create(_lease(), work_json="{}")
    none, graceful, force = StopKind.NONE, StopKind.GRACEFUL, StopKind.FORCE
    assert registry.set_stop("work_1", graceful, expected=none, cause="server") == 1
    assert registry.set_stop("work_1", force, expected=none, cause="operator") == 0, "stale"
    assert registry.set_stop("work_1", force, expected=graceful) == 1
    pulse = registry.pulse("work_1", 1)
    assert (pulse.stop, pulse.stop_cause) == ("force", "server")
    assert registry.set_stop("work_gone", force, expected=none, cause="server") == -1


def test_due_heartbeats_are_claimed_by_one_taker_only(registry: LeaseRegistry) -> None:
    for i in range(5):
        registry.create(_lease(f"work_{i}"), work_json="{}")
        registry.schedule_heartbeat(f"work_{i}", time.time() - 1)
    now = time.time()
    first = registry.claim_due_heartbeats(now=now, limit=100, inflight_seconds=10)
    second = registry.claim_due_heartbeats(now=now, limit=100, inflight_seconds=10)
    assert sorted(first) == [f"work_{i}" for i in range(5)] and not second
    # A claim that is never answered comes due again after its in-flight deadline.
    assert len(registry.claim_due_heartbeats(now=now + 11, limit=100, inflight_seconds=10)) == 5


def test_heartbeats_a_tick_did_not_send_are_due_again_at_once(registry: LeaseRegistry) -> None:
    for i in range(3):
        registry.create(_lease(f"work_{i}"), work_json="{}")
        registry.schedule_heartbeat(f"work_{i}", 1000.0 + i)
    now = time.time()
    taken = registry.claim_due_heartbeats(now=now, limit=100, inflight_seconds=10)
    assert registry.get("work_0").inflight_until == now + 10  # type: ignore[union-attr]
    released = registry.release_unsent({"work_0": taken["work_0"], "work_1": taken["work_1"]},
                                       mark=now + 10)
    assert released == 2
    assert registry.next_due("work_0") == 1000.0 and registry.next_due("work_1") == 1001.0
    assert registry.get("work_0").inflight_until == 0  # type: ignore[union-attr]
    assert registry.next_due("work_2") == now + 10, "the one sent keeps its mark"
    again = registry.claim_due_heartbeats(now=now, limit=100, inflight_seconds=10)
    assert sorted(again) == ["work_0", "work_1"]


def test_a_release_of_unsent_heartbeats_leaves_a_later_claim_alone(
        registry: LeaseRegistry) -> None:
    """Only the claim's own mark is given back: once another taker holds the lease (or it was
    rescheduled), its heartbeat may be in flight."""
    registry.create(_lease("work_0"), work_json="{}")
    registry.schedule_heartbeat("work_0", 1000.0)
    now = time.time()
    registry.claim_due_heartbeats(now=now, limit=100, inflight_seconds=10)
    registry.claim_due_heartbeats(now=now + 11, limit=100, inflight_seconds=10)  # the next taker
    assert registry.release_unsent({"work_0": 1000.0}, mark=now + 10) == 0
    assert registry.next_due("work_0") == now + 21
    assert registry.get("work_0").inflight_until == now + 21  # type: ignore[union-attr]


def test_no_heartbeat_is_scheduled_after_a_hand_off(registry: LeaseRegistry) -> None:
    registry.create(_lease(token="tok-1"), work_json="{}")
    dispatchers = Heartbeater.DISPATCHER  # as the machine schedules a lease the fleet heartbeats
    assert registry.schedule_heartbeat("work_1", time.time(), heartbeated_by=dispatchers)
    # What the machine's hand-off does: the sandbox beats it now, and nothing is scheduled.
    registry.update("work_1", heartbeats_by="sandbox")
    registry.unschedule_heartbeat("work_1")
    assert registry.settled_token("work_1", wait_seconds=1) == "tok-1"
    assert registry.next_due("work_1") is None
    assert not registry.schedule_heartbeat("work_1", time.time(), heartbeated_by=dispatchers)


def test_free_slots_count_live_workers_minus_held_leases(registry: LeaseRegistry) -> None:
    capacity = Capacity(registry.redis, prefix=registry.keys.prefix)
    capacity.advertise(hostname="a@h", slots=4, pool="threads", queues=["dispatcher.sessions"])
    capacity.advertise(hostname="b@h", slots=2, pool="threads", queues=["dispatcher.sessions"])
    registry.create(_lease(), work_json="{}")
    assert capacity.free_slots() == 5
    capacity.set_draining("b@h")
    assert capacity.free_slots() == 3
    assert capacity.is_draining("b@h")


def test_a_proof_wakes_its_waiting_attempt_with_the_record_as_proven(
        registry: LeaseRegistry) -> None:
    """The wait and the read in one round trip: the record is read only once the wait is over,
    so it shows the proof that ended it."""
    registry.create(_lease(), work_json="{}")
    proved_at = time.time()
    prover = threading.Timer(0.2, registry.prove, args=("work_1", proved_at))
    started = time.monotonic()
    prover.start()
    try:
        lease = registry.await_proof("work_1", 5.0)
    finally:
        prover.join()
    waited = time.monotonic() - started
    assert lease is not None and lease.heartbeat_ok_at == pytest.approx(proved_at)
    assert 0.15 < waited < 4.0, "woken by the proof, not by the end of the wait"


def test_a_wait_that_ends_unproven_reads_the_record_as_it_is(registry: LeaseRegistry) -> None:
    registry.create(_lease(), work_json="{}")
    lease = registry.await_proof("work_1", 0.1)
    assert lease is not None and lease.heartbeat_ok_at == 0, "read after the wait, unproven"
    assert registry.await_proof("work_gone", 0.1) is None, "a released lease reads as none"


def _take(registry: LeaseRegistry, seconds: float, **expected: object) -> tuple[Lease | None,
                                                                                bool]:
    return registry.await_proof_then_set(
        "work_1", seconds, expected={"attempt": 1, "task_id": "t1", "stop": StopKind.NONE,
                                     **expected},
        awaited={"heartbeat_ok_at": 0.0}, fields={"phase": Phase.RUNNING, "worker": "w1"},
        seen=time.time())


def test_a_proof_in_the_wait_lets_the_attempt_take_the_lease_in_the_same_round_trip(
        registry: LeaseRegistry) -> None:
    registry.create(_lease(phase=Phase.DISPATCHED), work_json="{}")
    prover = threading.Timer(0.2, registry.prove, args=("work_1", time.time()))
    prover.start()
    try:
        lease, taken = _take(registry, 5.0)
    finally:
        prover.join()
    assert taken and lease is not None
    assert (lease.phase, lease.worker) == (Phase.RUNNING, "w1") and lease.heartbeat_ok_at > 0


def test_a_wait_that_ends_unproven_or_changed_takes_nothing(registry: LeaseRegistry) -> None:
    registry.create(_lease(phase=Phase.DISPATCHED), work_json="{}")
    lease, taken = _take(registry, 0.1)
    assert not taken and lease is not None and lease.phase == Phase.DISPATCHED, "unproven"
    registry.prove("work_1", time.time())
    registry.set_stop("work_1", StopKind.GRACEFUL, expected=StopKind.NONE, cause="server")
    lease, taken = _take(registry, 0.1)
    assert not taken and lease is not None and lease.phase == Phase.DISPATCHED, "stopped"
    lease, taken = _take(registry, 0.1, stop=StopKind.GRACEFUL, attempt=2)
    assert not taken and lease is not None and lease.phase == Phase.DISPATCHED, "superseded"
    lease, taken = _take(registry, 0.1, stop=StopKind.GRACEFUL)
    assert taken and lease is not None and lease.phase == Phase.RUNNING, "proven, as read"
    registry.delete("work_1")
    assert _take(registry, 0.1) == (None, False), "a released lease stays gone"
    assert registry.get("work_1") is None
