"""The lease record: one work item the fleet holds, as every part reads it.

Phases of a lease::

    claimed ──publish──> dispatched ──attempt starts──> running ──session ends──> releasing
                             ^                              │                        │
                             └──────── new attempt ─────────┘       server stopped: released
                               (worker lost or drained)

A record is deleted when its lease is released; `machine.decide` is the only place that says
when and how any field changes.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from enum import StrEnum
from typing import Any

__all__ = [
    "ASSUMED_TTL_SECONDS",
    "Ending",
    "Heartbeater",
    "Kind",
    "Lease",
    "LeaseMode",
    "Phase",
    "StopKind",
]

# A lease's TTL before the server first answered. The SDKs assume 30-90 s; we assume the
# shortest, so an unanswered lease is judged lost no later than the server could let it lapse.
ASSUMED_TTL_SECONDS = 30


class LeaseMode(StrEnum):
    """Who heartbeats a lease while its session runs (`DISPATCHER_LEASE_MODE`)."""

    DISPATCHER = "dispatcher"  # the dispatcher, from ack to release; the sandbox never does
    RUNNER = "runner"  # the sandbox claims it itself (`ant beta:worker run`, SDK `handle_item`)
    HANDOFF = "handoff"  # the dispatcher until the sandbox starts, which then takes the token


class Kind(StrEnum):
    """What the fleet does with a work item, by its `data.type` (the Work API's values)."""

    SESSION = "session"  # a session: run in a sandbox
    HEALTHCHECK = "healthcheck"  # a probe of the worker: answered without a sandbox


class Phase(StrEnum):
    CLAIMED = "claimed"  # acked and recorded; its session task not yet published
    DISPATCHED = "dispatched"  # the current attempt's task waits in a session queue
    RUNNING = "running"  # the current attempt's sandbox runs
    RELEASING = "releasing"  # the session is over; the server has yet to confirm the stop


class StopKind(StrEnum):
    NONE = ""
    # SIGTERM to the sandbox, the grace period, then SIGKILL.
    GRACEFUL = "graceful"
    # SIGKILL now: a forced stop, or a lease that is no longer ours.
    FORCE = "force"


class Heartbeater(StrEnum):
    """Who heartbeats the lease."""

    DISPATCHER = "dispatcher"
    # The sandbox claimed the lease (runner mode) or was handed it (handoff mode, once started).
    SANDBOX = "sandbox"


class Ending(StrEnum):
    """How the session ended, once it has: it is never dispatched again, and its work item is
    stopped on the server whatever happens to the lease afterwards."""

    NONE = ""
    COMPLETED = "completed"  # the sandbox exited 0
    FAILED = "failed"  # non-zero exit, or the sandbox could not start
    STOPPED = "stopped"  # a stop request (server, operator) or the attempt limit ended it
    HEALTHCHECK = "healthcheck"  # a healthcheck item, answered without a session


@dataclass
class Lease:
    work_id: str
    session_id: str
    environment_id: str
    mode: LeaseMode
    queue: str
    kind: Kind = Kind.SESSION
    phase: Phase = Phase.CLAIMED
    attempt: int = 1
    # Attempts that ended because their worker or lease was lost, counted across re-deliveries
    # of the item; drains and lost messages do not count.
    failures: int = 0
    task_id: str = ""
    worker: str = ""
    pid: int = 0
    claimed_at: float = 0.0
    dispatched_at: float = 0.0
    pulse_at: float = 0.0
    # When the session's first attempt started running (the fleet's clock; 0: not yet). Kept
    # across attempts: the maximum session duration counts from it, so a session restarted on
    # another worker does not get a fresh allowance.
    started_at: float = 0.0
    created_at: str = ""
    # The server's lease token: echoed exactly as `expected_last_heartbeat`.
    token: str = ""
    ttl_seconds: int = 0
    # When the last heartbeat the server answered was sent (or the ack it answered; 0: neither yet):
    # the server's lease cannot lapse before this plus the TTL.
    heartbeat_ok_at: float = 0.0
    # A heartbeat whose reply never came may have been applied: the token may be stale.
    uncertain: bool = False
    stop: StopKind = StopKind.NONE
    # The first cause of the stop: a `causes.StopCause` or `causes.LossCause` value (free text
    # that an older release wrote is kept as it is).
    stop_cause: str = ""
    stop_seen_at: float = 0.0
    # The server no longer gives us this lease: kill now, never heartbeat it again.
    lost: bool = False
    # The server said the item is stopped (or gone): nothing is left to stop there.
    server_stopped: bool = False
    ended: Ending = Ending.NONE
    release_attempts: int = 0
    heartbeats_by: Heartbeater = Heartbeater.DISPATCHER
    # Epoch second until which a heartbeat request for this lease may still be in flight.
    inflight_until: float = 0.0

    @classmethod
    def from_hash(cls, raw: dict[str, str]) -> Lease:
        kwargs: dict[str, Any] = {}
        for name, coerce in _COERCE.items():
            if name in raw:
                kwargs[name] = coerce(raw[name])
        return cls(**kwargs)

    def to_hash(self) -> dict[str | bytes | bytearray | memoryview | int | float, str]:
        return {f.name: encode(getattr(self, f.name)) for f in fields(self)}

    def but(self, **changes: Any) -> Lease:
        """A copy with `changes` applied: the machine never mutates the lease it was given."""
        return replace(self, **changes)

    @property
    def ttl(self) -> int:
        """The TTL the server granted, or the one assumed before it answered."""
        return self.ttl_seconds or ASSUMED_TTL_SECONDS


def encode(value: object) -> str:
    """A field value as the registry stores it (booleans as "1" or "")."""
    if isinstance(value, bool):
        return "1" if value else ""
    return str(value)


def _int(value: str) -> int:
    return int(float(value or 0))


def _float(value: str) -> float:
    return float(value or 0)


def _bool(value: str) -> bool:
    return value == "1"


def _str(value: str) -> str:
    return value


_ENUMS: dict[str, type[StrEnum]] = {"Phase": Phase, "StopKind": StopKind,
                                    "Heartbeater": Heartbeater, "Ending": Ending,
                                    "LeaseMode": LeaseMode, "Kind": Kind}


def _coercer(type_name: Any) -> Any:
    simple = {"int": _int, "float": _float, "bool": _bool, "str": _str}
    if type_name in simple:
        return simple[type_name]
    enum = _ENUMS[type_name]

    def coerce(value: str) -> StrEnum:
        try:
            return enum(value)
        except ValueError:
            return enum(next(iter(enum)))  # an unknown value (a newer version's): the first

    return coerce


# Each field's parser, worked out once: the heartbeat tick reads hundreds of leases a second.
_COERCE = {f.name: _coercer(f.type) for f in fields(Lease)}
