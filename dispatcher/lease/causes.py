"""Why a lease moved: every cause and reason a log line, a metric label or a record names.

One enum per question, one line per member with what it means. The values are the label values
of the fleet's counters (`dispatcher.metrics` takes each counter's label set from its enum), the
`cause`/`reason`/`outcome` fields of log lines, and the `stop_cause` of a record, so a cause is
named once, here, and nothing downstream parses text to learn it.
"""

from __future__ import annotations

from enum import StrEnum

from dispatcher.lease.model import Ending

__all__ = ["Cause", "LossCause", "Outcome", "Refusal", "Release", "RestartReason", "SeenBy",
           "StopCause"]


class LossCause(StrEnum):
    """Why the server no longer gives us a lease (`leases_lost`)."""

    RE_DELIVERED = "re_delivered"  # a poll offered an item we hold: our lease on it lapsed
    SERVER_STOPPED = "server_stopped"  # the server stopped the item, or no longer knows it
    NOT_EXTENDED = "lease_not_extended"  # a heartbeat answered without extending the lease
    HEARTBEAT_REFUSED = "heartbeat_rejected"  # a heartbeat's 412 or 404: our token is not current
    ASSUMED_LOST = "assumed_lost"  # no heartbeat succeeded within the TTL
    TAKEN = "taken_by_another_worker"  # the first claim's 412: another worker heartbeats it
    ACK_NOT_LANDED = "ack_not_landed"  # the first claim says our unanswered ack never landed
    SANDBOX_GONE = "sandbox_gone"  # its sandbox held it (runner) and died, its token with it


class StopCause(StrEnum):
    """Why a lease's stop flag was raised (`work_stop_requests` counts those of
    `request_stop`: server, operator, deadline)."""

    SERVER = "server"  # the server asks to stop the item (`stopping`, in a reply or its list)
    OPERATOR = "operator"  # an operator revoked or terminated the session task
    CLAIM_REFUSED = "claim_refused"  # the first claim was refused for a whole TTL
    REJECTED = "heartbeats_rejected"  # the server refuses our heartbeats (auth, a bad request)
    RELEASING = "releasing"  # a release failed: no sandbox may run while it is tried again
    DEADLINE = "deadline"  # the session ran past its maximum duration


# What a stop flag names (the record's `stop_cause`): who asked, or why the lease was lost.
Cause = StopCause | LossCause


class SeenBy(StrEnum):
    """Which part of the fleet saw a stop (a log field)."""

    HEARTBEAT = "heartbeat"  # a heartbeat's reply
    BRIDGE = "bridge"  # the stop bridge's sweep of the server's list
    REVOKE = "revoke"  # Celery's revoke of the session task
    SUPERVISOR = "supervisor"  # the running attempt's supervisor (a session past its deadline)


class Refusal(StrEnum):
    """Why a polled item was not run (`work_refused`)."""

    UNKNOWN_TYPE = "unknown_type"  # a `data.type` this fleet does not know
    ACK_FAILED = "ack_failed"  # the ack was refused, or the first claim says it never landed
    ABANDONED = "abandoned"  # acked, but Redis refused the record: stopped, not stranded
    ALREADY_ENDED = "already_ended"  # re-delivered after its session ended
    ATTEMPTS_EXHAUSTED = "attempts_exhausted"  # re-delivered with every attempt used up
    INVALID = "invalid"  # the item fails validation


class RestartReason(StrEnum):
    """Why a session got a new attempt (`attempts_restarted`)."""

    WORKER_LOST = "worker_lost"  # the running attempt stopped pulsing: its worker died
    TASK_NEVER_STARTED = "task_never_started"  # its published task never started on a worker
    WORKER_DRAINED = "worker_drained"  # its worker shut down and handed the session on
    # Its sandbox could not start for the infrastructure's reasons (`session/infra.py`).
    INFRASTRUCTURE = "infrastructure"


class Release(StrEnum):
    """How a lease was given up (`work_released`): how its session ended, or lost."""

    COMPLETED = Ending.COMPLETED.value  # the sandbox exited 0
    FAILED = Ending.FAILED.value  # non-zero exit, or the sandbox could not start
    STOPPED = Ending.STOPPED.value  # a stop, the attempt limit, or a refused release ended it
    HEALTHCHECK = Ending.HEALTHCHECK.value  # a healthcheck item, answered
    LOST = "lost"  # the server took the lease back before the session ended

    @classmethod
    def ending(cls, ending: Ending, *, otherwise: Release) -> Release:
        """The release of a session that ended so, or `otherwise` if it has not ended."""
        return cls(ending.value) if ending != Ending.NONE else otherwise


class Outcome(StrEnum):
    """How one attempt of a session ended: its task's result (Flower shows it)."""

    COMPLETED = Ending.COMPLETED.value  # the sandbox exited 0
    FAILED = Ending.FAILED.value  # non-zero exit, or the sandbox could not start
    STOPPED = Ending.STOPPED.value  # a stop request or the attempt limit ended it
    HANDED_OVER = "handed_over"  # the worker drained: a new attempt runs elsewhere
    SUPERSEDED = "superseded"  # a newer attempt owns the lease (fencing)
    LOST = "lost"  # the server no longer gives us the lease
    GONE = "gone"  # nothing to run: released, or never ours
