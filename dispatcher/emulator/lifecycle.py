"""The work item state machine, as pure functions over a `WorkRecord` (no Redis, no I/O).

    queued --ack--> starting --first heartbeat--> active --stop--> stopping --stop(force)--> stopped
      |                |                            |                  |
      +--stop---------------stop(force)--------------------------------+-----> stopped
    lapsed lease: re-queued, left stranded, or stopped, by `LeaseExpiry` (see `lapse`)

The store calls these inside one WATCH/MULTI per item and carries out what they return (stream
entries to drop, items to put back on the stream).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

from ..workapi.models import NO_HEARTBEAT, WorkState
from . import clock
from .config import EmulatorConfig, LeaseExpiry
from .errors import Conflict, InvalidRequest, PreconditionFailed
from .records import WorkRecord

__all__ = [
    "Lapse",
    "Transition",
    "ack",
    "apply_lapse",
    "current_state",
    "heartbeat",
    "lapse",
    "precondition_failed",
    "stop",
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
    STRANDED = "stranded"  # lapsed but left as it is (acked, never heartbeated, `realistic`)
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
    if mode is LeaseExpiry.STOP:
        return Lapse.STOP
    never_heartbeated = record.latest_heartbeat_at is None
    if mode is LeaseExpiry.REALISTIC and never_heartbeated:
        return Lapse.STRANDED  # SDK issue #1746: "unreachable by reclaim or the TTL"
    return Lapse.REQUEUE


def apply_lapse(record: WorkRecord, outcome: Lapse) -> Transition:
    if outcome is Lapse.REQUEUE:
        # "the lease was cleared (re-queued)": no heartbeat, no holder, back on the stream.
        record.state = WorkState.QUEUED
        record.acknowledged_at = record.started_at = None
        record.latest_heartbeat_at = record.lease_updated_at = None
        record.lease_expires_at = record.ttl_seconds = None
        record.entry_id = None
        return Transition(enqueue=True)
    if outcome is Lapse.STOP:
        _finish(record)
    elif outcome is Lapse.STRANDED:
        record.lease_expires_at = None  # nothing will ever change it: stop looking at it
    return Transition()


def ack(record: WorkRecord, config: EmulatorConfig) -> Transition:
    if record.state != WorkState.QUEUED:
        raise Conflict(f"work {record.id} is {record.state}, not queued: it was already acked"
                       " or stopped")
    moment = clock.now()
    record.state = WorkState.STARTING
    record.acknowledged_at = clock.from_epoch(moment)
    # The clock `requeue` and `stop` expiry use for an item that is never heartbeated.
    record.ttl_seconds = config.default_ttl_seconds
    record.lease_expires_at = moment + config.default_ttl_seconds
    entry, record.entry_id = record.entry_id, None
    return Transition(drop_entry=entry, body=record.public())


def heartbeat(record: WorkRecord, *, expected: str | None, desired_ttl: int | None,
              config: EmulatorConfig) -> Transition:
    if desired_ttl is not None and desired_ttl <= 0:
        raise InvalidRequest("desired_ttl_seconds must be a positive integer")
    if record.state == WorkState.STOPPED:
        # The newest Go fixture: a lapsed or stopped lease answers 200 stopped/false.
        return Transition(body=_beat_body(record, extended=False, config=config))
    if record.state == WorkState.QUEUED:
        _refuse_queued(record, expected, config)
    # "The server does not compare the value when the work item is 'stopping' or 'stopped'."
    if record.state != WorkState.STOPPING and expected is not None:
        _compare(record, expected, config)
    _extend(record, config.clamp_ttl(desired_ttl))
    return Transition(body=_beat_body(record, extended=True, config=config))


def stop(record: WorkRecord, *, force: bool) -> Transition:
    if record.state == WorkState.STOPPED:
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


def _refuse_queued(record: WorkRecord, expected: str | None, config: EmulatorConfig) -> None:
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
