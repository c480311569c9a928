"""What each Work API answer becomes for the lease machine: the executor's translation of
replies and errors into events, by table (no Redis, no network)."""

from __future__ import annotations

import pytest

from dispatcher.lease import events as ev
from dispatcher.lease.replies import ack_event, claim_event, heartbeat_event, stop_event
from dispatcher.workapi import (
    AuthenticationError,
    ConflictError,
    Heartbeat,
    LeasePreconditionFailed,
    LeaseState,
    MalformedResponseError,
    NotFoundError,
    RateLimitedError,
    RequestTimeout,
    ServerError,
    TransientError,
    WorkAPIError,
)

DROPPED = TransientError("connection reset")  # no status: the reply never came
TIMED_OUT = RequestTimeout("timed out")
UNREADABLE = MalformedResponseError("truncated", status=200)
UNAVAILABLE = ServerError("unavailable", status=503)
LIMITED = RateLimitedError("slow down", status=429)
CONFLICT = ConflictError("cannot ack work in state starting", status=409)
GONE = NotFoundError("no such item", status=404)
REFUSED = AuthenticationError("bad key", status=401)
STALE = LeasePreconditionFailed("stale", status=412,
                                current_state=LeaseState(state="active", last_heartbeat="t2"))


@pytest.mark.parametrize(("error", "reply_lost", "expected"), [
    (UNREADABLE, False, ev.AckAnswered()),  # a 2xx came back: applied
    (CONFLICT, True, ev.AckConflict(after_lost_reply=True)),  # the machine judges (table)
    (CONFLICT, False, ev.AckConflict(after_lost_reply=False)),
    (DROPPED, False, None),  # try again
    (UNAVAILABLE, False, None),
    (LIMITED, True, None),
    (REFUSED, False, ev.AckRefused(401)),
])
def test_an_ack_attempt(error: WorkAPIError, reply_lost: bool, expected: ev.Event | None) -> None:
    assert ack_event(error, reply_lost=reply_lost) == expected


@pytest.mark.parametrize(("outcome", "expected"), [
    (Heartbeat(last_heartbeat="t2", lease_extended=True, state="active", ttl_seconds=30),
     ev.HeartbeatAnswered(ev.Reply("t2", True, "active", 30), 5.0)),
    (STALE, ev.HeartbeatRefused(ev.ServerLease("active", "t2"))),
    (GONE, ev.HeartbeatNotFound()),
    (CONFLICT, ev.HeartbeatFailed(409, str(CONFLICT))),
    (DROPPED, ev.HeartbeatFailed(None, str(DROPPED))),
    (TIMED_OUT, ev.HeartbeatFailed(None, str(TIMED_OUT))),
    (UNREADABLE, ev.HeartbeatFailed(200, str(UNREADABLE))),
    (REFUSED, ev.HeartbeatRejected(401, str(REFUSED))),
])
def test_a_heartbeat_answer(outcome: Heartbeat | WorkAPIError, expected: ev.Event) -> None:
    assert heartbeat_event(outcome, 5.0) == expected


@pytest.mark.parametrize(("error", "ack_uncertain", "expected"), [
    (STALE, False, ev.ClaimRefused(ev.ServerLease("active", "t2"))),
    (CONFLICT, True, ev.ClaimNotAcked(409, True)),
    (GONE, False, ev.ClaimNotAcked(404, False)),
    (DROPPED, False, ev.ClaimFailed(None)),
    (REFUSED, False, ev.HeartbeatRejected(401, str(REFUSED))),
])
def test_a_first_claim_answer(error: WorkAPIError, ack_uncertain: bool,
                              expected: ev.Event) -> None:
    assert claim_event(error, ack_uncertain=ack_uncertain) == expected


@pytest.mark.parametrize(("error", "expected"), [
    (CONFLICT, ev.ReleaseAnswered(409)),  # already stopped
    (GONE, ev.ReleaseAnswered(404)),
    (UNAVAILABLE, ev.ReleaseFailed(503, str(UNAVAILABLE))),
    (DROPPED, ev.ReleaseFailed(None, str(DROPPED))),
    (REFUSED, ev.ReleaseRejected(401, str(REFUSED))),
])
def test_a_stop_answer(error: WorkAPIError, expected: ev.Event) -> None:
    assert stop_event(error) == expected
