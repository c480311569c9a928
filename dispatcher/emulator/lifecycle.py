"""The work item state machine, as pure functions over a `WorkRecord` (no Redis, no I/O).

    queued --ack--> starting --first heartbeat--> active --stop--> stopping --stop(force)--> stopped
      |                |                            |                  |
      +--stop---------------stop(force)--------------------------------+-----> stopped
      ^    (a claim heartbeat on a delivered, unacked item skips `starting`)
      +-- a lapsed lease (heartbeated: after its ttl; never heartbeated: the unclaimed limit
          after its ack): stopped, or re-queued, by `LeaseExpiry` (see `lapse`)

A poll delivers a queued item (`deliver`) at most `max_deliveries` times, each delivery with a
sessions token of its own. The store calls these inside one compare-and-set per item and
carries out what they return (stream entries to drop, items to put back on the stream).
Randomness (tokens) and the clock come in as arguments or through `clock`, so tables of cases can
pin each rule.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any, NoReturn

from ..workapi.models import NO_HEARTBEAT, WorkState
from . import clock
from .config import EmulatorConfig, LeaseExpiry, SessionsToken, StoppingHeartbeat
from .errors import Conflict, InvalidRequest, PreconditionFailed
from .records import WorkRecord, secret_for

__all__ = [
    "Lapse",
    "Transition",
    "ack",
    "apply_lapse",
    "current_state",
    "deliver",
    "heartbeat",
    "lapse",
    "precondition_failed",
    "stop",
    "valid_tokens",
]

_LEASED = frozenset({WorkState.STARTING, WorkState.ACTIVE, WorkState.STOPPING})


@dataclass
class Transition:
    """What the store must do besides saving the record."""

    # A stream entry to XACK and XDEL: the item left the queue.
    drop_entry: str | None = None
    # The item went (back) on the queue: add a stream entry for it.
    enqueue: bool = False
    # The response body, if the operation has one.
    body: dict[str, Any] | None = None


class Lapse(Enum):
    NONE = "none"  # the lease holds, or there is none
    REQUEUE = "requeue"
    STOP = "stop"


def lapse(record: WorkRecord, mode: LeaseExpiry, now: float) -> Lapse:
    if record.state not in _LEASED or record.lease_expires_at is None:
        return Lapse.NONE
    if now <= record.lease_expires_at:
        return Lapse.NONE
    if record.state == WorkState.STOPPING:
        # It was already told to stop; putting it back on the queue would run it again.
        return Lapse.STOP
    return Lapse.STOP if mode is LeaseExpiry.STOP else Lapse.REQUEUE


def apply_lapse(record: WorkRecord, outcome: Lapse) -> Transition:
    if outcome is Lapse.REQUEUE:
        # "the lease was cleared (re-queued)": no heartbeat, no holder, back on the stream.
        record.state = WorkState.QUEUED
        record.acknowledged_at = record.started_at = None
        record.latest_heartbeat_at = record.lease_updated_at = None
        record.lease_expires_at = record.ttl_seconds = None
        record.entry_id = None
        record.deliveries = 0
        return Transition(enqueue=True)
    if outcome is Lapse.STOP:
        _finish(record)
    return Transition()


def deliver(record: WorkRecord, entry_id: str, *, token: str, config: EmulatorConfig,
            now: float) -> Transition:
    """A poll met the item's stream entry: hand the item out (`body`, secret included), or drop
    the entry for good (no `body`): the item is not queued on it any more, or it was delivered
    `max_deliveries` times unacked (it then stays `queued`, never delivered again)."""
    if record.state != WorkState.QUEUED or record.entry_id not in (None, entry_id):
        return Transition(drop_entry=entry_id)
    if config.max_deliveries and record.deliveries >= config.max_deliveries:
        record.entry_id = None
        return Transition(drop_entry=entry_id)
    record.deliveries += 1
    record.tokens = {t: end for t, end in record.tokens.items() if end is None or end > now}
    if config.sessions_token is SessionsToken.PER_DELIVERY or not record.tokens:
        life = config.sessions_token_life_seconds
        record.tokens[token] = now + life if life else None
        record.secret = secret_for(token)
    return Transition(body=record.public(with_secret=True))


def valid_tokens(record: WorkRecord, now: float) -> frozenset[str]:
    """The sessions tokens that open this item's calls now: every unexpired one minted for it
    (a token of an earlier delivery too, as the SDK's fake Work API accepts it)."""
    return frozenset(t for t, end in record.tokens.items() if end is None or now < end)


def ack(record: WorkRecord, config: EmulatorConfig) -> Transition:
    if record.state != WorkState.QUEUED:
        raise Conflict(f"work {record.id} is {record.state}, not queued: it was already acked"
                       " or stopped")
    if _left_the_queue(record, config):
        raise Conflict(f"work {record.id} left the queue after {record.deliveries} deliveries "
                       "nobody acked")
    moment = clock.now()
    record.state = WorkState.STARTING
    record.acknowledged_at = clock.from_epoch(moment)
    record.ttl_seconds = config.default_ttl_seconds
    # The lapse clock of an item never heartbeated; none: stranded in `starting` for ever.
    limit = config.unclaimed_limit_seconds
    record.lease_expires_at = moment + limit if limit else None
    entry, record.entry_id = record.entry_id, None
    return Transition(drop_entry=entry, body=record.public())


def heartbeat(record: WorkRecord, *, expected: str | None, desired_ttl: int | None,
              config: EmulatorConfig) -> Transition:
    if desired_ttl is not None and desired_ttl <= 0:
        raise InvalidRequest("desired_ttl_seconds must be a positive integer")
    if record.state == WorkState.STOPPED:
        # The newest Go fixture: a lapsed or stopped lease answers 200 stopped/false.
        return Transition(body=_beat_body(record, extended=False, config=config))
    if (record.state == WorkState.STOPPING
            and config.stopping_heartbeat is StoppingHeartbeat.REFUSE):
        # The lease is not extended, so the holder shuts down; its token stays as it was.
        return Transition(body=_beat_body(record, extended=False, config=config))
    claimed = Transition()
    if record.state == WorkState.QUEUED:
        claimed = _claim_unacked(record, expected, config)
    # "The server does not compare the value when the work item is 'stopping' or 'stopped'."
    if record.state != WorkState.STOPPING and expected is not None:
        _compare(record, expected, config)
    _extend(record, config.clamp_ttl(desired_ttl))
    return Transition(drop_entry=claimed.drop_entry,
                      body=_beat_body(record, extended=True, config=config))


def stop(record: WorkRecord, *, force: bool, config: EmulatorConfig) -> Transition:
    if record.state == WorkState.STOPPED:
        if config.stop_stopped_noop:
            return Transition()
        raise Conflict(f"work {record.id} is already stopped")
    moment = clock.rfc3339()
    record.stop_requested_at = record.stop_requested_at or moment
    if record.state == WorkState.QUEUED:
        # Never delivered again: the entry leaves the stream with the state change.
        entry, record.entry_id = record.entry_id, None
        _finish(record)
        return Transition(drop_entry=entry)
    if force:
        _finish(record)
    elif record.state != WorkState.STOPPING:
        record.state = WorkState.STOPPING
    return Transition()


def current_state(record: WorkRecord, config: EmulatorConfig) -> dict[str, Any]:
    """`error.details.current_state` of a 412 (`BetaWorkLeaseState`)."""
    return {
        "state": record.state,
        "last_heartbeat": record.latest_heartbeat_at,
        "lease_updated_at": record.lease_updated_at,
        "lease_extended": False,
        "ttl_seconds": record.ttl_seconds or config.default_ttl_seconds,
    }


def precondition_failed(record: WorkRecord, expected: str,
                        config: EmulatorConfig) -> PreconditionFailed:
    actual = record.latest_heartbeat_at or "NULL"
    return PreconditionFailed(
        f"Heartbeat precondition failed: expected {expected}, actual was {actual}",
        details={
            "error_code": "heartbeat_precondition_failed",
            "error_visibility": "user_facing",
            "current_state": current_state(record, config),
        },
    )


def _claim_unacked(record: WorkRecord, expected: str | None,
                   config: EmulatorConfig) -> Transition:
    """A first heartbeat on a delivered, unacked item claims it as an ack would (the SDK's fake
    Work API); anything else on a queued item is refused."""
    first = expected in (None, NO_HEARTBEAT) and record.latest_heartbeat_at is None
    # An item that left the queue after its deliveries may still be claimed (the fake's model):
    # a holder whose acks all went unanswered takes it this way.
    if not (config.claim_unacked and record.deliveries > 0 and first):
        _refuse_queued(record, expected, config)
    record.state = WorkState.STARTING
    record.acknowledged_at = clock.rfc3339()
    entry, record.entry_id = record.entry_id, None
    return Transition(drop_entry=entry)


def _left_the_queue(record: WorkRecord, config: EmulatorConfig) -> bool:
    """Delivered `max_deliveries` times and its entry dropped: never delivered or acked again
    (while it still has an entry, its last delivery may still be acked)."""
    limit = config.max_deliveries
    return bool(limit) and record.deliveries >= limit and record.entry_id is None


def _refuse_queued(record: WorkRecord, expected: str | None,
                   config: EmulatorConfig) -> NoReturn:
    if expected is not None and expected != NO_HEARTBEAT:
        # A holder whose lease lapsed and was re-queued: the official TS fixture answers this
        # with 412 and current_state `queued`, so the holder knows the lease is gone.
        raise precondition_failed(record, expected, config)
    raise Conflict(f"work {record.id} is queued: ack it before heartbeating")


def _compare(record: WorkRecord, expected: str, config: EmulatorConfig) -> None:
    actual = record.latest_heartbeat_at
    matches = actual == expected if actual is not None else expected == NO_HEARTBEAT
    if not matches:
        raise precondition_failed(record, expected, config)


def _extend(record: WorkRecord, ttl: int) -> None:
    moment = clock.now()
    token = clock.from_epoch(moment)
    previous = record.latest_heartbeat_at
    if previous is not None and token <= previous:
        token = clock.after(previous)  # same microsecond: the token must still change
    if record.state == WorkState.STARTING:
        record.state = WorkState.ACTIVE
        record.started_at = token
    record.latest_heartbeat_at = record.lease_updated_at = token
    record.ttl_seconds = ttl
    record.lease_expires_at = moment + ttl


def _beat_body(record: WorkRecord, *, extended: bool, config: EmulatorConfig) -> dict[str, Any]:
    return {
        "type": "work_heartbeat",
        # "or an empty string if none has been recorded" (SDK 2.10.0).
        "last_heartbeat": record.latest_heartbeat_at or "",
        "lease_extended": extended,
        "state": record.state,
        "ttl_seconds": record.ttl_seconds or config.default_ttl_seconds,
    }


def _finish(record: WorkRecord) -> None:
    """Stopped for good; the last heartbeat stays visible, as history."""
    record.state = WorkState.STOPPED
    record.stopped_at = clock.rfc3339()
    record.lease_expires_at = None
