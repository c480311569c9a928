"""What can happen to a lease: the inputs of `machine.decide`.

Each is plain data: the effects layer turns a server reply, a Celery signal or a process exit
into one of these, and the machine alone says what it means. Grouped by where they come from.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from dispatcher.lease.causes import Outcome, SeenBy, StopCause
from dispatcher.lease.model import Ending, Lease, StopKind

__all__ = [
    "AckAnswered",
    "AckConflict",
    "AckRefused",
    "AckUncertain",
    "AttemptSilent",
    "AttemptStarting",
    "ClaimAnswered",
    "ClaimFailed",
    "ClaimNotAcked",
    "ClaimRefused",
    "ClaimStranded",
    "DeadlineChecked",
    "Event",
    "HandingOff",
    "HealthcheckAnswered",
    "HeartbeatAnswered",
    "HeartbeatFailed",
    "HeartbeatNotFound",
    "HeartbeatRefused",
    "HeartbeatRejected",
    "HeartbeatThrottled",
    "MessageLost",
    "Offered",
    "OperatorRevoked",
    "Pulsed",
    "RecordFailed",
    "RegistryReset",
    "RegistryUnreachable",
    "ReleaseAnswered",
    "ReleaseAwaited",
    "ReleaseDue",
    "ReleaseFailed",
    "ReleaseRejected",
    "ReleaseUnauthorized",
    "Reply",
    "SandboxExited",
    "SandboxInfraFailed",
    "SandboxStartFailed",
    "ServerLease",
    "ServerState",
    "ServerStopped",
    "StopRequested",
    "Unreadable",
]


class ServerState(StrEnum):
    """A work item's state as the server reports it: `workapi.WorkState`'s values, named here
    so that the machine imports nothing of the Work API client."""

    QUEUED = "queued"  # waiting for a worker to poll it
    STARTING = "starting"  # acked; nobody heartbeated it yet
    ACTIVE = "active"  # leased and heartbeated
    STOPPING = "stopping"  # a stop was asked for
    STOPPED = "stopped"  # over


@dataclass(frozen=True)
class Reply:
    """A heartbeat's 200 answer."""

    token: str
    extended: bool
    state: str
    ttl_seconds: int


@dataclass(frozen=True)
class ServerLease:
    """The server's view of a lease in a 412's `details.current_state`."""

    state: str | None
    last_heartbeat: str | None


# --- the poller: an item offered by a poll, its ack, the first claim of its lease -----------

@dataclass(frozen=True)
class Offered:
    """A poll returned this item. `proposal` is the lease we would hold; `failures` and
    `ended` are what the fleet remembers of the item from earlier deliveries."""

    proposal: Lease
    known_type: bool
    failures: int = 0
    ended: Ending = Ending.NONE


@dataclass(frozen=True)
class Unreadable:
    """A poll of `environment_id` returned an item that fails validation; `work_id` is its id as
    read from the raw reply (None: not even that is legible)."""

    work_id: str | None
    error: str
    environment_id: str = ""


@dataclass(frozen=True)
class AckAnswered:
    pass


@dataclass(frozen=True)
class AckUncertain:
    """No attempt of the ack was answered (each lost or refused), or a 409 said another may
    have acked it: it may well have landed, as ours or not."""

    status: int | None


@dataclass(frozen=True)
class AckConflict:
    """409 "cannot ack work in state starting": the item is acked, by us or by another.
    `after_lost_reply`: an earlier attempt of this ack went unanswered (it may have landed)."""

    after_lost_reply: bool


@dataclass(frozen=True)
class AckRefused:
    status: int | None


@dataclass(frozen=True)
class RecordFailed:
    """The registry could not record the lease (Redis down past the executor's retries): a
    fresh claim's, or the one a running attempt writes back after Redis restarted empty.
    `lease` is the record that was to be written."""

    lease: Lease
    error: str


@dataclass(frozen=True)
class ClaimAnswered:
    reply: Reply
    sent_at: float


@dataclass(frozen=True)
class ClaimRefused:
    """A 412 to the first claim (`NO_HEARTBEAT`)."""

    current: ServerLease


@dataclass(frozen=True)
class ClaimNotAcked:
    """404 or 409 to the first claim: the item is not ours to claim (an ack that never
    landed, or an item that is gone)."""

    status: int | None
    ack_uncertain: bool


@dataclass(frozen=True)
class ClaimFailed:
    """No usable answer to the first claim; it may have landed."""

    status: int | None


# --- the heartbeat task ------------------------------------------------------------------------

@dataclass(frozen=True)
class HeartbeatAnswered:
    reply: Reply
    sent_at: float
    due_at: float = 0.0  # when the heartbeat was due (the schedule's time); 0: unknown


@dataclass(frozen=True)
class HeartbeatRefused:
    """412: the token we presented is not the server's."""

    current: ServerLease | None


@dataclass(frozen=True)
class HeartbeatNotFound:
    pass


@dataclass(frozen=True)
class HeartbeatRejected:
    """Another 4xx the server will not change its mind on (auth, a malformed request)."""

    status: int | None
    error: str


@dataclass(frozen=True)
class HeartbeatFailed:
    """A transient failure: 5xx, 429, a dropped connection, a timeout, a malformed body. The
    server may have applied the heartbeat all the same."""

    status: int | None
    error: str


@dataclass(frozen=True)
class HeartbeatThrottled:
    """A heartbeat of the lease is due (or its first claim, or a retry of its release) while
    the server asks the fleet to send nothing to the lease's environment for `seconds` more
    (`control.pacing`): nothing was sent."""

    seconds: float


# --- stops, both ways --------------------------------------------------------------------------

@dataclass(frozen=True)
class StopRequested:
    kind: StopKind
    cause: StopCause
    seen_by: SeenBy


@dataclass(frozen=True)
class ServerStopped:
    """The server lists the item as stopped."""

    seen_by: SeenBy


@dataclass(frozen=True)
class OperatorRevoked:
    task_id: str
    terminated: bool
    force: bool  # terminated with SIGKILL


# --- the session plane -------------------------------------------------------------------------
# Every event of the session plane names the attempt it comes from: a supervisor outlives its
# attempt (an engine slow to create a container, a worker cut off long enough for recovery to
# start another attempt), and what a superseded attempt says must never decide the lease of the
# current one (`running.stale`).

@dataclass(frozen=True)
class AttemptStarting:
    attempt: int
    task_id: str
    worker: str
    pid: int
    draining: bool


@dataclass(frozen=True)
class HandingOff:
    """Handoff mode: the sandbox is about to start and will heartbeat the lease itself."""


@dataclass(frozen=True)
class Pulsed:
    """What attempt `attempt`'s pulse found (`exists`: the record; `current`: still its
    attempt), and whether an operator terminated its task meanwhile."""

    attempt: int
    exists: bool
    current: bool
    stop: StopKind
    draining: bool
    operator: bool


@dataclass(frozen=True)
class SandboxStartFailed:
    """Attempt `attempt`'s sandbox could not start for the session's own reasons (a command
    that cannot run, a container the engine refused as given): a failed attempt."""

    attempt: int
    error: str


@dataclass(frozen=True)
class SandboxInfraFailed:
    """Attempt `attempt`'s sandbox could not start because the infrastructure failed (an engine
    down, too slow, answering 5xx, without the image; a fork refused for lack of resources):
    the fleet's failure, not the session's (`session/infra.py` tells them apart)."""

    attempt: int
    error: str
    next_task_id: str


@dataclass(frozen=True)
class SandboxExited:
    attempt: int
    code: int
    # The worker is shutting down: the attempt was stopped to hand the session over.
    draining: bool
    next_task_id: str


@dataclass(frozen=True)
class DeadlineChecked:
    """A running attempt's supervisor, each tick, asks whether its session is past the maximum
    duration (`limit_seconds`, the environment's or the fleet's): the machine judges, by the
    fleet's clock, so the comparison lives in one rule."""

    attempt: int
    limit_seconds: float


@dataclass(frozen=True)
class ReleaseAwaited:
    """An attempt whose sandbox exited (its result `outcome`) waits for its lease's release;
    `registry_reset`: the record is gone because Redis restarted empty, not by a release."""

    attempt: int
    outcome: Outcome
    registry_reset: bool


@dataclass(frozen=True)
class RegistryUnreachable:
    """A running attempt has not reached the registry for `seconds`."""

    seconds: float


@dataclass(frozen=True)
class RegistryReset:
    """Redis came back empty while this attempt ran: `lease` is what the attempt remembers."""

    lease: Lease


# --- recovery ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class AttemptSilent:
    """The running attempt stopped pulsing: its worker is gone."""

    next_task_id: str


@dataclass(frozen=True)
class MessageLost:
    """The published task is in no queue and never started."""

    next_task_id: str


@dataclass(frozen=True)
class ClaimStranded:
    """Recorded, never published (the poller died in between)."""


# --- release and healthchecks ------------------------------------------------------------------

@dataclass(frozen=True)
class ReleaseAnswered:
    """The server confirmed the stop: 2xx, 409 (already stopped) or 404 (gone)."""

    status: int


@dataclass(frozen=True)
class ReleaseDue:
    """A release that failed earlier is due to be tried again."""


@dataclass(frozen=True)
class ReleaseFailed:
    status: int | None
    error: str


@dataclass(frozen=True)
class ReleaseRejected:
    status: int | None
    error: str


@dataclass(frozen=True)
class ReleaseUnauthorized:
    """A stop sent as a delivery's sessions token was refused as unauthenticated (401: the token
    expired, or is not this item's any more), or there was no token to send (`status` None: the
    secret, or the record's copy of it, carries none)."""

    status: int | None


@dataclass(frozen=True)
class HealthcheckAnswered:
    healthy: bool
    results: tuple[tuple[str, str], ...]


Event = (
    Offered | Unreadable | AckAnswered | AckUncertain | AckConflict | AckRefused | RecordFailed
    | ClaimAnswered | ClaimRefused | ClaimNotAcked | ClaimFailed | HeartbeatAnswered
    | HeartbeatRefused | HeartbeatNotFound | HeartbeatRejected | HeartbeatFailed
    | HeartbeatThrottled | StopRequested
    | ServerStopped | OperatorRevoked
    | AttemptStarting | HandingOff | Pulsed | SandboxStartFailed | SandboxInfraFailed
    | SandboxExited | ReleaseAwaited | DeadlineChecked
    | RegistryUnreachable | RegistryReset | AttemptSilent | MessageLost | ClaimStranded
    | ReleaseAnswered | ReleaseDue | ReleaseFailed | ReleaseRejected | ReleaseUnauthorized
    | HealthcheckAnswered
)
