"""What the machine asks for: the outputs of `machine.decide`, performed by `executor`.

Effects that ask the server or Redis something (an ack, a claim, a stop, a guarded change)
answer with an event, which the executor feeds back to the machine. A guarded effect (`guard`)
is a compare-and-set of what the machine decided from; one that finds the record moved on ends
the list (a newer attempt, a release), or, a stop flag, has the event decided again on the
record as it now is. Rules put a guarded effect before what depends on it.

`Fence` and `AttemptOver` speak to the session attempt that asked (its sandbox, its result).

Effects that carry nothing (`Ack`, `DeleteRecord`, `Unschedule`, `AnswerHealthcheck`) stay
classes rather than members of an enum: the executor's `match` then names every effect the same
way (`case fx.Ack():`), and one that later needs a field gets it without a change of kind.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from enum import StrEnum

from dispatcher.lease.causes import Cause, Outcome
from dispatcher.lease.model import Ending, Heartbeater, Lease, StopKind

__all__ = [
    "Ack", "AnswerHealthcheck", "AttemptOver", "AwaitProof", "Claim", "Count", "CreateRecord",
    "DeleteRecord", "Effect", "Fence", "FlagStop", "HeartbeatNow", "Log", "MarkProven",
    "MarkRunning", "NewAttempt", "Publish", "RecordHeartbeat", "RecordHistory", "Revoke",
    "Schedule", "Signal", "StopAs", "StopOnServer", "Unschedule", "Update",
]


# --- the Work API --------------------------------------------------------------------------

@dataclass(frozen=True)
class Ack:
    """Ack the polled item. Sent at once, and answered once the decision's other effects are
    done: an item recorded and published at its offer travels to its worker while the ack is
    in flight (its attempt waits for the proof, `MarkProven`, before it starts)."""


@dataclass(frozen=True)
class Claim:
    """The first heartbeat (`NO_HEARTBEAT`), sent at once. `ack_uncertain`: the ack was never
    answered as ours, so a 404 or 409 to this claim may mean it never landed."""

    ack_uncertain: bool = False


class StopAs(StrEnum):
    """Whose credential a stop is sent with."""

    # The environment's key: an item whose lease the fleet holds, or one it cannot tie to a
    # delivery (an unreadable item, an ack whose record Redis refused).
    ENVIRONMENT_KEY = "environment key"
    # The sessions token in the secret of the delivery the poll just returned (the run's item).
    POLLED_TOKEN = "polled token"
    # The sessions token in the secret of the delivery the lease was claimed from (its record's
    # work item).
    LEASE_TOKEN = "lease token"


@dataclass(frozen=True)
class StopOnServer:
    """Stop the item. Sent as a delivery's sessions token (`as_`), it answers a 401, or a secret
    with no token, with `ReleaseUnauthorized`; the token never leaves the executor."""

    force: bool = True
    as_: StopAs = StopAs.ENVIRONMENT_KEY


@dataclass(frozen=True)
class HeartbeatNow:
    """Send the lease's heartbeat now, through the server's throttle: the heartbeat tick sends
    it with the tick's others; outside a tick it is made due at once."""


# --- the registry --------------------------------------------------------------------------

@dataclass(frozen=True)
class CreateRecord:
    lease: Lease


@dataclass(frozen=True)
class Update:
    """Set fields of the record, if it still exists."""

    fields: dict[str, object]


@dataclass(frozen=True)
class MarkProven:
    """The server answered our ack: the item is ours (`lease`, proven). Recorded, and told to
    an attempt waiting for it (`AwaitProof`) at once. A record Redis lost meanwhile (a restart
    while the ack was in flight) is written again, as a record's creation rides out a restart;
    one released meanwhile comes back only until the claim that follows is answered."""

    lease: Lease


@dataclass(frozen=True)
class MarkRunning:
    """The attempt takes the lease: only while it is still the current attempt. If it is not
    (a newer attempt took the lease meanwhile), the asking attempt is over, superseded."""

    attempt: int
    fields: dict[str, object]
    guard = True


@dataclass(frozen=True)
class AwaitProof:
    """The asking attempt waits up to `seconds` for its lease to be proven ours (`MarkProven`,
    or any answered heartbeat), then decides its start again on the record as it then is.

    With `run`, the wait's own round trip takes the lease as `run` says if the record then
    still holds the values `expected` of what the decision read and no longer holds those it
    `awaited` (its unproven mark): a proof that comes leaves only the spawn, and the attempt
    goes on with the record as marked. Otherwise nothing is written and the start is decided
    again on the record, as without `run`."""

    seconds: float
    run: MarkRunning | None = None
    expected: dict[str, object] = field(default_factory=dict)
    awaited: dict[str, object] = field(default_factory=dict)
    guard = True


@dataclass(frozen=True)
class NewAttempt:
    """The next attempt takes the lease (`fields`: its number, task, phase, and the previous
    attempt's traces cleared): only while `expected` is still the current attempt."""

    expected: int
    fields: dict[str, object]
    guard = True


@dataclass(frozen=True)
class FlagStop:
    """Set the stop flag to `kind`, only while it is still `expected`: the machine decided from
    that, and decides again on the record a concurrent flag left. `cause` comes with the first
    flag only (None keeps the cause recorded)."""

    kind: StopKind
    cause: Cause | None
    expected: StopKind = StopKind.NONE
    guard = True


@dataclass(frozen=True)
class DeleteRecord:
    pass


@dataclass(frozen=True)
class Schedule:
    """The next heartbeat (or release retry) at `due`; `sooner_only` never postpones one. Only
    while the lease is still heartbeated by `heartbeated_by` (None: whoever heartbeats it)."""

    due: float
    sooner_only: bool = False
    heartbeated_by: Heartbeater | None = Heartbeater.DISPATCHER


@dataclass(frozen=True)
class Unschedule:
    pass


@dataclass(frozen=True)
class RecordHeartbeat:
    """An answered heartbeat that changes nothing else: its token, and the next heartbeat. The
    heartbeat task records a tick's worth in one round trip."""

    token: str
    ttl_seconds: int
    sent_at: float
    due: float
    # The next heartbeat is scheduled only while the lease is heartbeated by this (None: whoever).
    heartbeated_by: Heartbeater | None = Heartbeater.DISPATCHER


@dataclass(frozen=True)
class RecordHistory:
    """What outlives the record: failures so far, and whether the session ended."""

    failures: int
    ended: Ending


# --- Celery, the sandbox, the healthcheck ----------------------------------------------------

@dataclass(frozen=True)
class Publish:
    """Publish the current attempt's session task on the lease's queue."""

    attempt: int
    task_id: str
    queue: str


@dataclass(frozen=True)
class Revoke:
    task_id: str


@dataclass(frozen=True)
class Signal:
    """Signal the sandbox of the attempt that asked (graceful: TERM then KILL; force: KILL)."""

    kind: StopKind


@dataclass(frozen=True)
class Fence:
    """Kill the asking attempt's sandbox now, without the stop ladder: the attempt no longer
    owns the lease, or can no longer be sure it does."""


@dataclass(frozen=True)
class AttemptOver:
    """The asking attempt is over: its supervisor leaves, with `outcome` as its task's result."""

    outcome: Outcome


@dataclass(frozen=True)
class AnswerHealthcheck:
    pass


# --- what an operator sees -------------------------------------------------------------------

@dataclass(frozen=True)
class Log:
    action: str
    level: int = logging.INFO
    fields: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class Count:
    metric: str
    labels: dict[str, str] = field(default_factory=dict)


Effect = (
    Ack | Claim | StopOnServer | HeartbeatNow | CreateRecord | Update | MarkProven | AwaitProof
    | MarkRunning | NewAttempt | FlagStop | DeleteRecord | Schedule | Unschedule
    | RecordHeartbeat | RecordHistory | Publish | Revoke | Signal | Fence | AttemptOver
    | AnswerHealthcheck | Log | Count
)
