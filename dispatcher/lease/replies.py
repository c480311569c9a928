"""Server replies as lease events: what an answer (or a failure) of the Work API says, by its
kind alone, for the machine to judge. Pure: no I/O, no rule. The executor (acks, claims, stops),
the heartbeat tick and the stop bridge each turn what they got into an event here.
"""

from __future__ import annotations

from typing import Protocol

from dispatcher.lease import events as ev
from dispatcher.lease.causes import SeenBy, StopCause
from dispatcher.lease.model import StopKind
from dispatcher.workapi import (
    ConflictError,
    Heartbeat,
    LeasePreconditionFailed,
    MalformedResponseError,
    NotFoundError,
    TransientError,
    WorkAPIError,
    WorkState,
)

__all__ = ["Listed", "ack_event", "claim_event", "heartbeat_event", "listed_event", "no_answer",
           "reply_of", "stop_event"]


def reply_of(reply: Heartbeat) -> ev.Reply:
    return ev.Reply(token=reply.last_heartbeat, extended=reply.lease_extended,
                    state=reply.state, ttl_seconds=reply.ttl_seconds)


def _server_lease(exc: LeasePreconditionFailed) -> ev.ServerLease | None:
    state = exc.current_state
    if state is None:
        return None
    return ev.ServerLease(state=state.state, last_heartbeat=state.last_heartbeat)


def heartbeat_event(outcome: Heartbeat | WorkAPIError, sent_at: float,
                    due_at: float = 0.0) -> ev.Event:
    """A heartbeat's answer (or failure) as the event the machine judges; `due_at`: when the
    schedule had it due (0: unknown)."""
    if isinstance(outcome, Heartbeat):
        return ev.HeartbeatAnswered(reply_of(outcome), sent_at, due_at)
    if isinstance(outcome, LeasePreconditionFailed):
        return ev.HeartbeatRefused(_server_lease(outcome))
    if isinstance(outcome, NotFoundError):
        return ev.HeartbeatNotFound()
    if outcome.retryable or isinstance(outcome, ConflictError):
        return ev.HeartbeatFailed(outcome.status, str(outcome))
    return ev.HeartbeatRejected(outcome.status, str(outcome))


def no_answer(exc: WorkAPIError) -> bool:
    """The request may have reached the server and been applied: no status came back (a dropped
    connection, a timeout), or a 2xx came back unreadable."""
    return isinstance(exc, MalformedResponseError) or (
        isinstance(exc, TransientError) and exc.status is None)


def ack_event(exc: WorkAPIError, *, reply_lost: bool) -> ev.Event | None:
    """A failed ack attempt as the event the machine judges; None: try again. A 2xx that came
    back unreadable was applied: the item is ours. What a 409 means depends on whether an
    earlier attempt went unanswered (`reply_lost`): the machine says."""
    if isinstance(exc, MalformedResponseError):
        return ev.AckAnswered()
    if isinstance(exc, ConflictError):
        return ev.AckConflict(after_lost_reply=reply_lost)
    if exc.retryable:
        return None
    return ev.AckRefused(exc.status)


def claim_event(exc: WorkAPIError, *, ack_uncertain: bool) -> ev.Event:
    """A failed first claim as the event the machine judges."""
    if isinstance(exc, LeasePreconditionFailed):
        current = _server_lease(exc)
        return ev.ClaimRefused(current or ev.ServerLease(None, "unknown"))
    if isinstance(exc, NotFoundError | ConflictError):
        return ev.ClaimNotAcked(exc.status, ack_uncertain)
    if exc.retryable:
        return ev.ClaimFailed(exc.status)
    return ev.HeartbeatRejected(exc.status, str(exc))


class Listed(Protocol):
    """What the stop rule reads of a listed item: a whole `Work` or a `ListedWork`."""

    @property
    def state(self) -> str: ...

    @property
    def stop_requested_at(self) -> str | None: ...


def listed_event(work: Listed) -> ev.Event | None:
    """What the server's list says of an item we hold, if it asks for a stop."""
    if work.state == WorkState.STOPPED:
        return ev.ServerStopped(seen_by=SeenBy.BRIDGE)
    if work.state == WorkState.STOPPING or work.stop_requested_at:
        return ev.StopRequested(StopKind.GRACEFUL, StopCause.SERVER, SeenBy.BRIDGE)
    return None


def stop_event(exc: WorkAPIError, *, with_token: bool = False) -> ev.Event:
    """A failed stop as the event the machine judges: 409 and 404 mean nothing is left to stop;
    a 401 to a stop sent as a delivery's sessions token (`with_token`) says that token no longer
    opens the item (a 401 to the environment key is a refusal like any other)."""
    if isinstance(exc, ConflictError | NotFoundError):
        return ev.ReleaseAnswered(exc.status or 409)
    if with_token and exc.status == 401:
        return ev.ReleaseUnauthorized(401)
    if exc.retryable:
        return ev.ReleaseFailed(exc.status, str(exc))
    return ev.ReleaseRejected(exc.status, str(exc))
