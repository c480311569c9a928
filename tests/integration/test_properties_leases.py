"""Property-based test of the lease registry
(dispatcher.lease.registry.LeaseRegistry) on real Redis:
random sequences of create / a new attempt / pulse / set_stop / schedule / claim_due / delete
against a plain-Python model of what each Lua script promises."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import pytest
import redis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from dispatcher.lease.model import Lease, StopKind
from dispatcher.lease.registry import LeaseRegistry
from tests.support.isolation import integration_db, redis_url

REDIS_URL = redis_url(integration_db())
WORK_IDS = st.sampled_from(["work_a", "work_b", "work_c"])
KINDS = st.sampled_from([StopKind.GRACEFUL, StopKind.FORCE])
CAUSES = st.sampled_from(["server", "operator", "drain"])
INFLIGHT = 10.0


@dataclass
class Model:
    attempt: int = 1
    stop: str = ""
    cause: str = ""
    due: float | None = None


def _redis_or_fail() -> redis.Redis:
    r = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    try:
        r.ping()
    except redis.RedisError:  # pragma: no cover - the suite needs Redis anyway
        pytest.fail("no Redis at DISPATCHER_TEST_REDIS (./dev test starts one)")
    return r


class RegistryMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.redis = _redis_or_fail()
        self.prefix = f"proptest{uuid.uuid4().hex[:10]}"
        self.registry = LeaseRegistry(self.redis, prefix=self.prefix)
        self.model: dict[str, Model] = {}
        self.now = 1_000.0

    def teardown(self) -> None:
        for key in self.redis.scan_iter(f"{self.prefix}:*", count=1000):
            self.redis.delete(key)
        self.redis.close()

    @rule(work_id=WORK_IDS)
    def create(self, work_id: str) -> None:
        if work_id in self.model:
            return  # the poller never records a lease it already holds
        lease = Lease(work_id=work_id, session_id=f"s_{work_id}", environment_id="env",
                      mode="dispatcher", queue="q", claimed_at=self.now)
        self.registry.create(lease, work_json="{}")
        self.model[work_id] = Model()

    @rule(work_id=WORK_IDS, offset=st.integers(-1, 1))
    def new_attempt(self, work_id: str, offset: int) -> None:
        model = self.model.get(work_id)
        expected = (model.attempt if model else 1) + offset
        got = self.registry.update_if_attempt(
            work_id, expected, {"attempt": expected + 1, "task_id": "t"}, seen=self.now)
        if model is None:
            assert got == -1
        elif expected != model.attempt:
            assert got == 0, "a stale attempt never moves the lease on"
        else:
            model.attempt += 1
            assert got == 1

    @rule(work_id=WORK_IDS, offset=st.integers(-1, 1))
    def pulse(self, work_id: str, offset: int) -> None:
        model = self.model.get(work_id)
        attempt = (model.attempt if model else 1) + offset
        pulse = self.registry.pulse(work_id, attempt)
        assert pulse.exists == (model is not None)
        if model is not None:
            assert pulse.current == (attempt == model.attempt), "fencing"
            assert (pulse.stop, pulse.stop_cause) == (model.stop, model.cause)

    @rule(work_id=WORK_IDS, offset=st.integers(-1, 1))
    def set_if_attempt(self, work_id: str, offset: int) -> None:
        model = self.model.get(work_id)
        attempt = (model.attempt if model else 1) + offset
        got = self.registry.update_if_attempt(work_id, attempt, {"worker": "w"})
        assert got == (-1 if model is None else 1 if attempt == model.attempt else 0)

    @rule(work_id=WORK_IDS, kind=KINDS, cause=CAUSES, expected=KINDS | st.just(StopKind.NONE))
    def set_stop(self, work_id: str, kind: StopKind, cause: str, expected: StopKind) -> None:
        model = self.model.get(work_id)
        first = expected == StopKind.NONE
        got = self.registry.set_stop(work_id, kind, expected=expected,
                                     cause=cause if first else None)
        if model is None:
            assert got == -1
            return
        expect = model.stop == expected.value
        assert got == (1 if expect else 0), "set only over the flag it was decided from"
        if expect:
            if first:
                model.cause = cause  # given with the first flag only
            model.stop = kind.value

    @rule(work_id=WORK_IDS, delay=st.floats(-5, 5))
    def schedule(self, work_id: str, delay: float) -> None:
        model = self.model.get(work_id)
        done = self.registry.schedule_heartbeat(work_id, self.now + delay)
        assert done == (model is not None)
        if model is not None:
            model.due = self.now + delay

    @rule(advance=st.floats(0, 6))
    def claim_due(self, advance: float) -> None:
        self.now += advance
        ids = self.registry.claim_due_heartbeats(now=self.now, limit=100,
                                                 inflight_seconds=INFLIGHT)
        expect = {w for w, m in self.model.items() if m.due is not None and m.due <= self.now}
        assert set(ids) == expect, "exactly the due leases, each once"
        for work_id in ids:
            self.model[work_id].due = self.now + INFLIGHT  # in flight: not due again yet
            assert self.registry.get(work_id).inflight_until == self.now + INFLIGHT  # type: ignore[union-attr]

    @rule(work_id=WORK_IDS)
    def mark_lost(self, work_id: str) -> None:
        model = self.model.get(work_id)
        # What the machine's `lose` asks of the registry.
        current = self.registry.get(work_id)
        expected = StopKind(current.stop) if current is not None else StopKind.NONE
        first = expected == StopKind.NONE
        self.registry.set_stop(work_id, StopKind.FORCE, expected=expected,
                               cause="heartbeat_rejected" if first else None)
        self.registry.update(work_id, lost=True)
        self.registry.unschedule_heartbeat(work_id)
        if model is not None:
            if first:
                model.cause = "heartbeat_rejected"
            model.stop = StopKind.FORCE.value
            model.due = None
            assert self.registry.get(work_id).lost  # type: ignore[union-attr]

    @rule(work_id=WORK_IDS)
    def delete(self, work_id: str) -> None:
        self.registry.delete(work_id)
        self.model.pop(work_id, None)
        assert self.registry.get(work_id) is None
        assert self.registry.work_json(work_id) is None

    @rule(work_id=WORK_IDS)
    def update_after_release(self, work_id: str) -> None:
        done = self.registry.update(work_id, phase="running")
        assert done == (work_id in self.model), "an update never resurrects a released lease"

    @invariant()
    def held_is_the_model(self) -> None:
        assert set(self.registry.held_ids()) == set(self.model)
        for work_id, model in self.model.items():
            lease = self.registry.get(work_id)
            assert lease is not None
            assert (lease.attempt, lease.stop, lease.stop_cause) == (
                model.attempt, model.stop, model.cause)
            due = self.registry.next_due(work_id)
            assert due == model.due


RegistryMachine.TestCase.settings = settings(
    max_examples=60, stateful_step_count=30, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
TestLeaseRegistry = RegistryMachine.TestCase
