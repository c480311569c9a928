"""The lease machine's rules as a table: every event of `events` in every phase, run through
`machine.decide`; each rule module lists the scenarios of its events, `machine/examples.py` the
leases they meet. docs/architecture.md shows this table, generated (`dispatcher docs`), so the
doc says what the code does; tests/unit/test_lease_machine.py holds it to what it must do.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from dispatcher.lease import effects as fx
from dispatcher.lease import events as ev
from dispatcher.lease.machine import Decision, Policy, claiming, decide, running
from dispatcher.lease.machine.examples import NOW, PHASES, lease_in

__all__ = ["NOW", "PHASES", "SCENARIOS", "Row", "describe", "lease_in", "render", "rows"]

# Each event the machine knows, in the variants that lead to different rules: each rule module
# lists its own, beside its rules.
_SCENARIOS = {s.name: s for s in (*claiming.SCENARIOS, *running.SCENARIOS)}
SCENARIOS: dict[str, ev.Event] = {name: s.event for name, s in _SCENARIOS.items()}


def _decide(name: str, phase: str) -> Decision:
    scenario = _SCENARIOS[name]
    lease = lease_in(phase, uncertain=scenario.uncertain, unproven=scenario.unproven,
                     lost=scenario.lost, sandbox_held=scenario.sandbox_held,
                     quiet_seconds=scenario.quiet_seconds)
    return decide(lease, scenario.event, now=NOW, policy=Policy(max_attempts=3))


def describe(effect: fx.Effect) -> str | None:
    """An effect as the table shows it (log lines by action; counters left out)."""
    if isinstance(effect, fx.Log):
        return f"log `{effect.action}`" if effect.level >= logging.INFO else None
    if isinstance(effect, fx.Count):
        return None
    if isinstance(effect, fx.FlagStop | fx.Signal):
        return f"{type(effect).__name__}({effect.kind.value})"
    if isinstance(effect, fx.StopOnServer):
        # The usual stop, forced with the environment key, plainly; any other says how it goes.
        how = ([] if effect.force else ["graceful"]) + (
            [] if effect.as_ == fx.StopAs.ENVIRONMENT_KEY else [effect.as_.value])
        return f"StopOnServer({', '.join(how)})" if how else "StopOnServer"
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
        for phase in _SCENARIOS[name].phases or PHASES:
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
