"""The examples the rule table is made of (`lease/table.py`, shown in docs/architecture.md):
canonical leases in each phase, and the `Scenario` each rule module lists beside its rules, one
per variant of an event that leads to a different rule. A new event gets its scenarios where its
rule is written."""

from __future__ import annotations

from dataclasses import dataclass

from dispatcher.lease import events as ev
from dispatcher.lease.model import Ending, Heartbeater, Lease, LeaseMode, Phase

__all__ = ["CLAIMED", "ITEM", "NOW", "PHASES", "RELEASING", "REPLY", "RUNNING", "Scenario",
           "lease_in"]

NOW = 1_000_000.0
# "none": no record (an item just polled, or a lease already released).
PHASES = ("none", *(p.value for p in Phase))


@dataclass(frozen=True)
class Scenario:
    name: str
    event: ev.Event
    # Where it can happen at all (every phase when empty): acks meet the lease just proposed
    # (claimed, not yet recorded); first claims meet it published (a session) or not (a
    # healthcheck); an item offered afresh, and a registry rebuilt, meet no record.
    phases: tuple[str, ...] = ()
    # The lease it meets: after a heartbeat whose reply was lost (`uncertain`), or before any ack
    # or heartbeat of it was answered (`unproven`).
    uncertain: bool = False
    unproven: bool = False
    # The lease is lost (the server no longer gives it to us); heartbeated by its sandbox
    # (runner mode) rather than the dispatcher.
    lost: bool = False
    sandbox_held: bool = False
    # Seconds since its last answered heartbeat was sent (of a TTL of 30 s).
    quiet_seconds: float = 5.0


def lease_in(phase: str, *, uncertain: bool = False, unproven: bool = False, lost: bool = False,
             sandbox_held: bool = False, quiet_seconds: float = 5.0) -> Lease | None:
    """A canonical lease in `phase` (None for "none"): attempt 1 of task-1, heartbeated by the
    dispatcher, token tok-1, last answered heartbeat `quiet_seconds` (5 s) ago, TTL 30 s; a
    releasing one's session completed.
    `unproven`: no ack or heartbeat of it was ever answered (no token, no answered heartbeat), as
    the lease an ack meets: the proposal of a poll. `lost`, `sandbox_held`: as `Scenario`'s."""
    if phase == "none":
        return None
    ended = Ending.COMPLETED if phase == Phase.RELEASING else Ending.NONE
    return Lease("w", "s", "e", LeaseMode.RUNNER if sandbox_held else LeaseMode.DISPATCHER, "q",
                 phase=Phase(phase), attempt=1,
                 ended=ended, task_id="task-1", token="" if unproven else "tok-1", ttl_seconds=30,
                 claimed_at=NOW - max(10, quiet_seconds),
                 heartbeat_ok_at=0 if unproven else NOW - quiet_seconds,
                 pulse_at=NOW - 1, uncertain=uncertain, lost=lost,
                 heartbeats_by=Heartbeater.SANDBOX if sandbox_held else Heartbeater.DISPATCHER)


def _held(phase: Phase) -> Lease:
    lease = lease_in(phase)
    assert lease is not None
    return lease


CLAIMED, RUNNING, RELEASING = (_held(p) for p in (Phase.CLAIMED, Phase.RUNNING, Phase.RELEASING))
ITEM = Lease("w", "s", "e", LeaseMode.DISPATCHER, "q")  # as a poll proposes it
REPLY = ev.Reply(token="tok-2", extended=True, state="active", ttl_seconds=30)
