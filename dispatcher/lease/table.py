"""The lease machine's rules as a table: every event of `events` in every phase, run through
`machine.decide`. docs/architecture.md shows this table, generated (`dispatcher docs`), so the
doc says what the code does; tests/unit/test_lease_machine.py holds it to what it must do.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from dispatcher.lease import effects as fx
from dispatcher.lease import events as ev
from dispatcher.lease.causes import Outcome, SeenBy, StopCause
from dispatcher.lease.machine import Decision, Policy, decide
from dispatcher.lease.model import Ending, Heartbeater, Lease, LeaseMode, Phase, StopKind

__all__ = ["NOW", "PHASES", "SCENARIOS", "Row", "describe", "lease_in", "render", "rows"]

NOW = 1_000_000.0
# "none": no record (an item just polled, or a lease already released).
PHASES = ("none", *(p.value for p in Phase))

def lease_in(phase: str, *, uncertain: bool = False, unproven: bool = False) -> Lease | None:
    """A canonical lease in `phase` (None for "none"): attempt 1 of task-1, heartbeated by the
    dispatcher, token tok-1, last answered heartbeat 5 s ago; a releasing one's session completed.
    `unproven`: no ack or heartbeat of it was ever answered (no token, no answered heartbeat), as
    the lease an ack meets: the proposal of a poll."""
    if phase == "none":
        return None
    ended = Ending.COMPLETED if phase == Phase.RELEASING else Ending.NONE
    return Lease("w", "s", "e", LeaseMode.DISPATCHER, "q", phase=Phase(phase), attempt=1,
                 ended=ended, task_id="task-1", token="" if unproven else "tok-1", ttl_seconds=30,
                 claimed_at=NOW - 10, heartbeat_ok_at=0 if unproven else NOW - 5,
                 pulse_at=NOW - 1, uncertain=uncertain, heartbeats_by=Heartbeater.DISPATCHER)


_claimed, _running, _releasing = (lease_in(p) for p in ("claimed", "running", "releasing"))
assert _claimed is not None and _running is not None and _releasing is not None
_ITEM = Lease("w", "s", "e", LeaseMode.DISPATCHER, "q")  # as a poll proposes it
_REPLY = ev.Reply(token="tok-2", extended=True, state="active", ttl_seconds=30)

# Each event the machine knows, in the variants that lead to different rules.
SCENARIOS: dict[str, ev.Event] = {
    "offered": ev.Offered(_ITEM, known_type=True),
    "offered, unknown type": ev.Offered(_ITEM, known_type=False),
    "offered, ended before": ev.Offered(_ITEM,
                                        known_type=True, ended=Ending.COMPLETED),
    "unreadable item": ev.Unreadable("w", "data: field required"),
    "offered, attempts used up": ev.Offered(_ITEM,
                                            known_type=True, failures=3),
    "ack answered": ev.AckAnswered(),
    "ack never answered": ev.AckUncertain(None),
    "ack 409 after an unanswered attempt": ev.AckConflict(after_lost_reply=True),
    "ack 409 at once": ev.AckConflict(after_lost_reply=False),
    "ack refused (4xx)": ev.AckRefused(400),
    "record refused, fresh claim": ev.RecordFailed(_claimed, "connection refused"),
    "record refused, write-back": ev.RecordFailed(_running, "connection refused"),
    "claim answered": ev.ClaimAnswered(_REPLY, NOW),
    "claim 412, nobody heartbeated it": ev.ClaimRefused(ev.ServerLease("starting", None)),
    "claim 412, another holder": ev.ClaimRefused(ev.ServerLease("active", "tok-x")),
    "claim 404/409 after an uncertain ack": ev.ClaimNotAcked(409, ack_uncertain=True),
    "claim failed (transient)": ev.ClaimFailed(503),
    "claim failed (transient), ack unanswered": ev.ClaimFailed(503),
    "claim 412, nobody heartbeated it, ack unanswered": ev.ClaimRefused(
        ev.ServerLease("starting", None)),
    "heartbeat answered, ack unanswered": ev.HeartbeatAnswered(_REPLY, NOW),
    "claim stranded, ack unanswered": ev.ClaimStranded(),
    "heartbeat answered": ev.HeartbeatAnswered(_REPLY, NOW),
    "heartbeat answered, not extended": ev.HeartbeatAnswered(
        ev.Reply("tok-2", extended=False, state="active", ttl_seconds=30), NOW),
    "heartbeat answered, stopping": ev.HeartbeatAnswered(
        ev.Reply("tok-2", extended=True, state="stopping", ttl_seconds=30), NOW),
    "heartbeat answered, stopped": ev.HeartbeatAnswered(
        ev.Reply("tok-2", extended=False, state="stopped", ttl_seconds=30), NOW),
    "heartbeat 412 after a lost reply, inside the TTL": ev.HeartbeatRefused(
        ev.ServerLease("active", "tok-2")),
    "heartbeat 412": ev.HeartbeatRefused(ev.ServerLease("active", "tok-x")),
    "heartbeat 404": ev.HeartbeatNotFound(),
    "heartbeat rejected (other 4xx)": ev.HeartbeatRejected(401, "unauthorized"),
    "heartbeat failed (transient)": ev.HeartbeatFailed(503, "unavailable"),
    "stop requested (server)": ev.StopRequested(StopKind.GRACEFUL, StopCause.SERVER, SeenBy.BRIDGE),
    "stop requested (force)": ev.StopRequested(StopKind.FORCE, StopCause.OPERATOR, SeenBy.REVOKE),
    "server lists it stopped": ev.ServerStopped(SeenBy.BRIDGE),
    "operator terminated the task": ev.OperatorRevoked("task-1", terminated=True, force=False),
    "operator revoked the task": ev.OperatorRevoked("task-1", terminated=False, force=False),
    "attempt starting": ev.AttemptStarting(1, "task-1", "w1", 42, draining=False),
    "attempt starting, worker draining": ev.AttemptStarting(1, "task-1", "w1", 42,
                                                            draining=True),
    "handing off to the sandbox": ev.HandingOff(),
    "pulsed": ev.Pulsed(exists=True, current=True, stop=StopKind.NONE, draining=False,
                        operator=False),
    "pulsed, superseded": ev.Pulsed(exists=True, current=False, stop=StopKind.NONE,
                                    draining=False, operator=False),
    "pulsed, stop flagged": ev.Pulsed(exists=True, current=True, stop=StopKind.GRACEFUL,
                                      draining=False, operator=False),
    "pulsed, worker draining": ev.Pulsed(exists=True, current=True, stop=StopKind.NONE,
                                         draining=True, operator=False),
    "sandbox could not start": ev.SandboxStartFailed("not found"),
    "sandbox exited 0": ev.SandboxExited(1, 0, draining=False, next_task_id="task-2"),
    "sandbox exited 1": ev.SandboxExited(1, 1, draining=False, next_task_id="task-2"),
    "sandbox exited, worker draining": ev.SandboxExited(1, 143, draining=True,
                                                        next_task_id="task-2"),
    "registry unreachable past 2/3 TTL": ev.RegistryUnreachable(25.0),
    "an exited attempt awaits its release": ev.ReleaseAwaited(1, Outcome.COMPLETED, False),
    "an exited attempt awaits its release, Redis reset": ev.ReleaseAwaited(
        1, Outcome.COMPLETED, registry_reset=True),
    "a superseded exited attempt awaits its release": ev.ReleaseAwaited(
        0, Outcome.COMPLETED, False),
    "attempt went silent": ev.AttemptSilent("task-2"),
    "message lost": ev.MessageLost("task-2"),
    "claim stranded": ev.ClaimStranded(),
    "release answered (2xx, 404, 409)": ev.ReleaseAnswered(200),
    "release due again": ev.ReleaseDue(),
    "release failed (transient)": ev.ReleaseFailed(503, "unavailable"),
    "release refused (4xx)": ev.ReleaseRejected(403, "forbidden"),
    "healthcheck answered": ev.HealthcheckAnswered(True, (("redis", "ok"),)),
    "registry reset": ev.RegistryReset(_running),
    "registry reset, session ended": ev.RegistryReset(_releasing),
}

# Where an event can happen at all: acks meet the lease just proposed (claimed, not yet
# recorded); first claims meet it published (a session) or not (a healthcheck); an item offered
# afresh, and a registry rebuilt, meet no record.
_ONLY_IN: dict[str, tuple[str, ...]] = {
    **{name: ("claimed",) for name in SCENARIOS if name.startswith("ack ")},
    **{name: ("claimed", "dispatched") for name in SCENARIOS if name.startswith("claim ")},
    "heartbeat answered, ack unanswered": ("claimed",),
    "claim stranded, ack unanswered": ("claimed",),
    # A record refused meets the lease the failed write was part of deciding.
    "record refused, fresh claim": ("dispatched",),
    "record refused, write-back": ("running",),
    **{name: ("none",) for name in ("offered, unknown type", "offered, ended before",
                                     "unreadable item", "offered, attempts used up",
                                     "registry reset", "registry reset, session ended")},
}


def _decide(name: str, phase: str) -> Decision:
    event = SCENARIOS[name]
    lease = lease_in(phase, uncertain=name.startswith("heartbeat 412 after a lost reply"),
                     unproven=name.startswith("ack ") or name.endswith("ack unanswered"))
    return decide(lease, event, now=NOW, policy=Policy(max_attempts=3))


def describe(effect: fx.Effect) -> str | None:
    """An effect as the table shows it (log lines by action; counters left out)."""
    if isinstance(effect, fx.Log):
        return f"log `{effect.action}`" if effect.level >= logging.INFO else None
    if isinstance(effect, fx.Count):
        return None
    if isinstance(effect, fx.FlagStop | fx.Signal):
        return f"{type(effect).__name__}({effect.kind.value})"
    if isinstance(effect, fx.AttemptOver):
        return f"AttemptOver({effect.outcome.value})"
    if isinstance(effect, fx.Update):
        return None  # the new phase column says what matters
    return type(effect).__name__


@dataclass(frozen=True)
class Row:
    event: str
    phases: tuple[str, ...]
    outcome: str  # the phase after, or "none"
    effects: tuple[str, ...]


def _outcome(decision: Decision) -> str:
    return "none" if decision.lease is None else decision.lease.phase.value


def rows() -> list[Row]:
    """One row per event and distinct result, with the phases that give that result; a phase
    in which the event changes nothing and does nothing is left out."""
    table: list[Row] = []
    for name in SCENARIOS:
        groups: dict[tuple[str, tuple[str, ...]], list[str]] = {}
        for phase in _ONLY_IN.get(name, PHASES):
            decision = _decide(name, phase)
            effects = tuple(d for d in map(describe, decision.effects) if d)
            if not effects and _outcome(decision) == phase:
                continue
            groups.setdefault((_outcome(decision), effects), []).append(phase)
        for (outcome, effects), phases in groups.items():
            table.append(Row(name, tuple(phases), outcome, effects))
    return table


def render() -> str:
    """The table as Markdown."""
    lines = ["| event | in phase | then | effects |", "|---|---|---|---|"]
    for row in rows():
        lines.append(f"| {row.event} | {', '.join(row.phases)} | {row.outcome} | "
                     f"{', '.join(row.effects) or '-'} |")
    return "\n".join(lines) + "\n"
