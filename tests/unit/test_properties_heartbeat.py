"""Property-based test of the heartbeat's reply judgement
(dispatcher.control.heartbeat): any reply or
error, on a lease in any phase and stop state, leads to the outcome the module's table
promises. Real Redis (db 10, a unique prefix); no request is ever sent (the base URL is
unroutable, and no judgement may need one)."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dispatcher.control.heartbeat import ASSUMED_TTL_SECONDS, _apply, heartbeat_interval
from dispatcher.control.heartbeat import Tally as _Tally
from dispatcher.lease.registry import Lease, Phase, StopKind
from dispatcher.runtime import Runtime
from dispatcher.settings import load_settings
from dispatcher.workapi import (
    AuthenticationError,
    ConflictError,
    Heartbeat,
    InvalidRequestError,
    LeasePreconditionFailed,
    MalformedResponseError,
    NotFoundError,
    RateLimitedError,
    RequestTimeout,
    ServerError,
    WorkAPIError,
)

REDIS_URL = os.environ.get("DISPATCHER_TEST_REDIS", "redis://127.0.0.1:6379") + "/10"
STATES = ["queued", "starting", "active", "stopping", "stopped", "hibernating"]
LOST_ERRORS = [LeasePreconditionFailed, NotFoundError]
FATAL_ERRORS = [AuthenticationError, InvalidRequestError]
TRANSIENT_ERRORS = [ServerError, RateLimitedError, RequestTimeout, MalformedResponseError,
                    ConflictError]


@pytest.fixture(scope="module")
def runtime() -> Iterator[Runtime]:
    prefix = f"prophb{uuid.uuid4().hex[:10]}"
    settings_ = load_settings(
        ANTHROPIC_BASE_URL="http://127.0.0.1:9", ANTHROPIC_ENVIRONMENT_ID="env_x",
        ANTHROPIC_ENVIRONMENT_KEY="sk-ant-oat01-x", DISPATCHER_REDIS_URL=REDIS_URL,
        DISPATCHER_KEY_PREFIX=prefix)
    rt = Runtime(settings=settings_)
    try:
        rt.redis.ping()
    except redis.RedisError:  # pragma: no cover
        pytest.fail("no Redis at DISPATCHER_TEST_REDIS (./dev test starts one)")
    yield rt
    for key in rt.redis.scan_iter(f"{prefix}:*", count=1000):
        rt.redis.delete(key)
    rt.redis.close()


replies = st.builds(
    Heartbeat, last_heartbeat=st.text(min_size=1, max_size=30), lease_extended=st.booleans(),
    state=st.sampled_from(STATES), ttl_seconds=st.integers(-5, 700))


@st.composite
def errors(draw: st.DrawFn) -> WorkAPIError:
    cls = draw(st.sampled_from(LOST_ERRORS + FATAL_ERRORS + TRANSIENT_ERRORS))
    return cls("boom", status=draw(st.sampled_from([None, 400, 404, 409, 412, 429, 500])))


@settings(max_examples=300, deadline=None, suppress_health_check=[
    HealthCheck.function_scoped_fixture])
@given(outcome=st.one_of(replies, errors()), phase=st.sampled_from(list(Phase)),
       stop=st.sampled_from(["", "graceful", "force"]), ttl=st.integers(0, 120),
       since_ok=st.floats(0, 200))
def test_every_reply_is_judged_as_the_table_says(
        runtime: Runtime, outcome: Heartbeat | WorkAPIError, phase: Phase, stop: str, ttl: int,
        since_ok: float) -> None:
    work_id = f"work_{uuid.uuid4().hex[:12]}"
    now = time.time()
    lease = Lease(work_id=work_id, session_id="s", environment_id="env_x", mode="dispatcher",
                  queue="q", phase=phase.value, token="tok-old", ttl_seconds=ttl,
                  heartbeat_ok_at=now - since_ok, claimed_at=now - since_ok, stop=stop,
                  stop_cause="earlier" if stop else "")
    runtime.registry.create(lease, work_json="{}")
    before = time.time()
    _apply(runtime, lease, outcome, _Tally(), sent_at=before)
    after = runtime.registry.get(work_id)
    due = runtime.registry.next_due(work_id)
    lose = False
    if isinstance(outcome, Heartbeat):
        lose = outcome.state == "stopped" or (
            not outcome.lease_extended and outcome.state != "stopping")
    elif isinstance(outcome, LeasePreconditionFailed | NotFoundError):
        lose = True
    elif not outcome.retryable and not isinstance(outcome, ConflictError):
        # Other fatal 4xx: kill and force-stop (the release stops the item), not "lost".
        assert after is not None and after.stop == StopKind.FORCE and not after.is_lost
        assert due is None, "never beaten again"
        return
    else:
        lose = since_ok > (ttl or ASSUMED_TTL_SECONDS) + 0.5
        if not lose and since_ok < (ttl or ASSUMED_TTL_SECONDS) - 0.5:
            assert after is not None and not after.is_lost and after.stop == stop
            assert due is not None and before + 0.5 <= due <= time.time() + 1.5, "retry soon"
            return
        if not lose:
            return  # within rounding of the TTL: either verdict is right
    if lose:
        if phase != Phase.RUNNING:
            assert after is None, "no supervisor will act: the lease is forgotten at once"
        else:
            assert after is not None and after.is_lost and after.stop == StopKind.FORCE
            assert due is None, "a lost lease is never beaten again"
        return
    assert isinstance(outcome, Heartbeat)
    assert after is not None and not after.is_lost
    assert after.token == outcome.last_heartbeat, "the token is kept exactly"
    if outcome.state == "stopping":
        assert after.stop in (StopKind.GRACEFUL, StopKind.FORCE)
        assert after.stop == (stop or StopKind.GRACEFUL), "force is never softened"
    else:
        assert after.stop == stop
    expected_ttl = outcome.ttl_seconds if outcome.ttl_seconds > 0 else ASSUMED_TTL_SECONDS
    assert after.ttl_seconds == expected_ttl
    assert due is not None
    interval = heartbeat_interval(expected_ttl)
    assert due == pytest.approx(before + interval, abs=0.01), "counted from when it was sent"
    assert interval < expected_ttl or expected_ttl <= 1, "the next beat comes inside the TTL"
    runtime.registry.delete(work_id)
