"""The scripted agent (`emulator.agent`), pure: the events each step writes, checked against SDK
2.17's own event types."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import pydantic
import pytest
from anthropic.types.beta.sessions import BetaManagedAgentsSessionEvent

from dispatcher.emulator import agent
from dispatcher.emulator.errors import InvalidRequest

EVENT = pydantic.TypeAdapter(BetaManagedAgentsSessionEvent)
NOW = "2026-12-06T10:00:00.000000Z"
CALLS = [{"name": "bash", "input": {"command": "true"}},
         {"name": "read", "input": {"file_path": "a"}}]


def _ids() -> Iterator[str]:
    return (f"sevt_{n}" for n in itertools.count())


def _kinds(events: list[dict[str, Any]]) -> list[str]:
    return [e["type"] for e in events]


def _result(tool_use_id: str | None) -> dict[str, Any]:
    return {"type": "user.tool_result", "tool_use_id": tool_use_id, "is_error": False,
            "content": [{"type": "text", "text": "ok"}]}


def test_without_a_script_the_session_idles_at_once() -> None:
    state = agent.AgentState()
    events = agent.start(state, _ids(), NOW)
    assert _kinds(events) == ["session.status_running", "session.status_idle"]
    assert events[-1]["stop_reason"] == {"type": "end_turn"} and state.status == "idle"


def test_a_script_is_asked_one_call_at_a_time_then_idles() -> None:
    state, ids = agent.AgentState(script=list(CALLS)), _ids()
    events = agent.start(state, ids, NOW)
    assert _kinds(events) == ["session.status_running", "agent.tool_use", "session.status_idle"]
    use = events[1]
    assert (use["name"], use["input"], use["evaluated_permission"]) == ("bash", CALLS[0]["input"],
                                                                        "allow")
    assert events[2]["stop_reason"] == {"type": "requires_action", "event_ids": [use["id"]]}
    assert agent.current_call(state) == CALLS[0]

    logged, following = agent.take_result(state, _result(use["id"]), ids, NOW)
    assert logged is not None and logged["tool_use_id"] == use["id"] and logged["id"]
    assert _kinds(following) == ["session.status_running", "agent.tool_use",
                                 "session.status_idle"]
    assert following[1]["name"] == "read" and agent.current_call(state) == CALLS[1]

    _, last = agent.take_result(state, _result(following[1]["id"]), ids, NOW)
    assert _kinds(last) == ["session.status_running", "session.status_idle"]
    assert last[-1]["stop_reason"] == {"type": "end_turn"}
    assert state.awaiting is None and agent.current_call(state) is None
    for event in [*events, logged, *following, *last]:
        EVENT.validate_python(event)  # what the SDK's runner reads


def test_a_repeated_result_is_ignored_and_a_wrong_one_refused() -> None:
    state, ids = agent.AgentState(script=list(CALLS)), _ids()
    use = agent.start(state, ids, NOW)[1]
    agent.take_result(state, _result(use["id"]), ids, NOW)
    assert agent.take_result(state, _result(use["id"]), ids, NOW) == (None, [])
    with pytest.raises(InvalidRequest, match="does not match"):
        agent.take_result(state, _result("sevt_other"), ids, NOW)
    with pytest.raises(InvalidRequest, match=r"only user\.tool_result"):
        agent.take_result(state, {"type": "user.message", "content": []}, ids, NOW)


def test_terminate_ends_the_session_once() -> None:
    state, ids = agent.AgentState(script=list(CALLS)), _ids()
    use = agent.start(state, ids, NOW)[1]
    assert _kinds(agent.terminate(state, ids, NOW)) == ["session.status_terminated"]
    assert agent.terminate(state, ids, NOW) == [] and state.status == "terminated"
    with pytest.raises(InvalidRequest, match="terminated"):
        agent.take_result(state, _result(use["id"]), ids, NOW)


@pytest.mark.parametrize("script", [[{"name": "web_fetch", "input": {}}],
                                    [{"name": "bash", "input": "ls"}]])
def test_a_script_is_checked(script: list[dict[str, Any]]) -> None:
    with pytest.raises(InvalidRequest, match=r"emulator_script\[0\]"):
        agent.check_script(script)
