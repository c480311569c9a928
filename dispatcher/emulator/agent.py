"""The scripted agent: how a session's event log grows, as pure functions (no Redis, no I/O).

A session created with a script of tool calls of the agent toolset 20260401 (bash, read, write,
edit, glob, grep) asks for them one at a time, the way the Sessions API shows a turn that needs
the client's tools (the event sequences of SDK 2.17's fake Sessions API):

    session.status_running
    agent.tool_use {name, input, evaluated_permission: allow}      call 1
    session.status_idle {stop_reason: requires_action, event_ids: [call 1]}
        <- user.tool_result {tool_use_id: call 1}                 (sent by the runner)
    user.tool_result, session.status_running, agent.tool_use       call 2 ...
    session.status_idle {stop_reason: end_turn}                    after the last result

A session with no script goes idle (`end_turn`) at once. `terminate` ends any session. Event
ids come from the caller (`ids`) and times from `now`, so a table of cases can pin each step.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import InvalidRequest

__all__ = ["TOOLSET", "AgentState", "Status", "check_script", "current_call", "start",
           "take_result", "terminate"]

# The tools of `agent_toolset_20260401`: what the official runner executes by default.
TOOLSET = frozenset({"bash", "read", "write", "edit", "glob", "grep"})
Event = dict[str, Any]


class Status:
    """A session's `status` (`BetaManagedAgentsSession.status`). The scripted agent answers at
    once, so `running` shows only in the events between a result and the next call."""

    RUNNING = "running"
    IDLE = "idle"
    TERMINATED = "terminated"


@dataclass
class AgentState:
    """What the session remembers of its script; stored with the session."""

    script: list[dict[str, Any]] = field(default_factory=list)
    # The index of the call asked for last (or to ask for next, before the first).
    step: int = 0
    # The id of the `agent.tool_use` event whose result the session waits for.
    awaiting: str | None = None
    # The ids of the calls whose result was taken: a repeated send is accepted and ignored.
    answered: list[str] = field(default_factory=list)
    status: str = Status.IDLE

    @classmethod
    def of(cls, raw: dict[str, Any]) -> AgentState:
        return cls(**raw)

    def dump(self) -> dict[str, Any]:
        return asdict(self)


def check_script(script: list[dict[str, Any]]) -> None:
    for index, call in enumerate(script):
        if call.get("name") not in TOOLSET:
            raise InvalidRequest(f"emulator_script[{index}].name: one of {sorted(TOOLSET)}")
        if not isinstance(call.get("input"), dict):
            raise InvalidRequest(f"emulator_script[{index}].input: an object")


def start(state: AgentState, ids: Iterator[str], now: str) -> list[Event]:
    """The events of a new session: its first call, or idle at once."""
    state.status = Status.RUNNING
    return [_event(ids, now, "session.status_running"), *_next(state, ids, now)]


def take_result(state: AgentState, sent: Event, ids: Iterator[str],
                now: str) -> tuple[Event | None, list[Event]]:
    """A `user.tool_result` the runner sent: the event as logged (None: a repeat, ignored) and
    the events that follow it. Anything else is refused: the script drives the session."""
    if state.status == Status.TERMINATED:
        raise InvalidRequest("Cannot send events to a terminated session")
    if sent.get("type") != "user.tool_result":
        raise InvalidRequest("the emulator's scripted agent takes only user.tool_result events")
    tool_use_id = sent.get("tool_use_id")
    if tool_use_id in state.answered:
        return None, []
    if tool_use_id is None or tool_use_id != state.awaiting:
        raise InvalidRequest("The id does not match any tool use event")
    logged = {**sent, "id": next(ids), "processed_at": now}
    state.answered.append(tool_use_id)
    state.awaiting = None
    state.step += 1
    state.status = Status.RUNNING
    return logged, [_event(ids, now, "session.status_running"), *_next(state, ids, now)]


def terminate(state: AgentState, ids: Iterator[str], now: str) -> list[Event]:
    if state.status == Status.TERMINATED:
        return []
    state.status, state.awaiting = Status.TERMINATED, None
    return [_event(ids, now, "session.status_terminated")]


def current_call(state: AgentState) -> dict[str, Any] | None:
    """The script's entry for the call being waited on."""
    return state.script[state.step] if state.awaiting and state.step < len(state.script) else None


def _next(state: AgentState, ids: Iterator[str], now: str) -> list[Event]:
    state.status = Status.IDLE
    if state.step >= len(state.script):
        return [_event(ids, now, "session.status_idle", stop_reason={"type": "end_turn"})]
    call = state.script[state.step]
    use = _event(ids, now, "agent.tool_use", name=call["name"], input=call["input"],
                 # Allowed up front: the runner runs it without waiting for a confirmation.
                 evaluated_permission="allow")
    state.awaiting = use["id"]
    idle = _event(ids, now, "session.status_idle",
                  stop_reason={"type": "requires_action", "event_ids": [use["id"]]})
    return [use, idle]


def _event(ids: Iterator[str], now: str, kind: str, **fields: Any) -> Event:
    return {"id": next(ids), "type": kind, "processed_at": now, **fields}
