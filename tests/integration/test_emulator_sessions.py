"""The session side over real HTTP, read with SDK 2.17's own resources and types: who may read a
session, its event log and live stream, tool results, termination, what is not served."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anthropic
import pydantic
import pytest
from anthropic.lib.environments import EnvironmentWorker
from anthropic.types.beta import BetaManagedAgentsSession
from anthropic.types.beta.sessions import BetaManagedAgentsSessionEvent

if TYPE_CHECKING:
    from conftest import EmulatorProcess

pytestmark = pytest.mark.integration

EVENT = pydantic.TypeAdapter(BetaManagedAgentsSessionEvent)
ONE_CALL = [{"name": "bash", "input": {"command": "echo one"}}]


@pytest.fixture(autouse=True)
def _no_ambient_credentials(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in ("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN", "ANTHROPIC_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    yield


def _session(emu: EmulatorProcess, env: str,
             script: list[dict[str, Any]] | None = None) -> tuple[str, str]:
    body: dict[str, Any] = {"environment_id": env, "agent": "agent_test"}
    if script is not None:
        body["emulator_script"] = script
    response = emu.http.post("/v1/sessions", headers=emu.org_headers, json=body)
    response.raise_for_status()
    return str(response.json()["id"]), str(response.json()["work_id"])


def _token_of(emu: EmulatorProcess, env: str) -> str:
    work = emu.poll(env, block_ms=500)
    assert work is not None
    secret = work["secret"]
    token: str = json.loads(base64.urlsafe_b64decode(secret + "=" * (-len(secret) % 4)))[
        "sessions_token"]
    return token


def _client(emu: EmulatorProcess, bearer: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(auth_token=bearer, base_url=emu.base_url, max_retries=0)


def test_a_session_without_a_script_is_idle_at_once(emulator: EmulatorProcess) -> None:
    env = emulator.create_environment()
    session_id, _ = _session(emulator, env)
    client = _client(emulator, emulator.api_key)
    raw = emulator.http.get(f"/v1/sessions/{session_id}", headers=emulator.org_headers).json()
    session = BetaManagedAgentsSession.model_validate(raw)  # strictly the SDK's type
    assert session.status == "idle" and session.resources == []
    assert session.agent.skills == [] and session.agent.id == "agent_test"
    events = list(client.beta.sessions.events.list(session_id))
    assert [e.type for e in events] == ["session.status_running", "session.status_idle"]
    assert events[-1].stop_reason.type == "end_turn"  # type: ignore[union-attr]
    client.close()


def test_who_may_read_a_session(emulator_factory: Callable[..., EmulatorProcess]) -> None:
    emu = emulator_factory()
    env = emu.create_environment()
    own = emu.http.post("/v1/environments", headers=emu.org_headers, json={
        "name": "own", "environment_key": "sk-ant-oat01-own-key-of-this-env"}).json()["id"]
    session_id, _ = _session(emu, env)
    other_session, _ = _session(emu, env)
    token = _token_of(emu, env)
    path = f"/v1/sessions/{session_id}"
    for bearer in (emu.api_key, emu.environment_key, token):
        assert emu.http.get(path, headers={**emu.env_headers,
                                           "authorization": f"Bearer {bearer}"}).status_code == 200
    refused = emu.http.get(f"/v1/sessions/{other_session}",
                           headers={**emu.env_headers, "authorization": f"Bearer {token}"})
    assert refused.status_code == 401, "a token opens its own item's session only"
    foreign = emu.http.get(path, headers={
        **emu.env_headers, "authorization": "Bearer sk-ant-oat01-own-key-of-this-env"})
    assert foreign.status_code == 403 and own
    assert emu.http.get(path).status_code == 401


def test_events_list_pages_filters_and_parses_as_the_sdks_types(
        emulator: EmulatorProcess) -> None:
    env = emulator.create_environment()
    session_id, _ = _session(emulator, env, ONE_CALL)
    path = f"/v1/sessions/{session_id}/events"
    page = emulator.http.get(path, params={"limit": 1}, headers=emulator.org_headers).json()
    assert len(page["data"]) == 1 and page["next_page"]
    client = _client(emulator, emulator.environment_key)
    everything = list(client.beta.sessions.events.list(session_id, limit=1))
    assert [e.type for e in everything] == [
        "session.status_running", "agent.tool_use", "session.status_idle"]
    for row in emulator.http.get(path, headers=emulator.org_headers).json()["data"]:
        EVENT.validate_python(row)
    uses = list(client.beta.sessions.events.list(session_id, types=["agent.tool_use"]))
    assert [(u.name, u.input) for u in uses] == [("bash", {"command": "echo one"})]  # type: ignore[union-attr]
    idle = everything[-1]
    assert idle.stop_reason.event_ids == [uses[0].id]  # type: ignore[union-attr]
    client.close()


def test_tool_results_move_the_script_on_and_are_logged_once(emulator: EmulatorProcess) -> None:
    env = emulator.create_environment()
    session_id, work_id = _session(emulator, env, [*ONE_CALL, *ONE_CALL])
    client = _client(emulator, emulator.environment_key)
    sessions = client.beta.sessions
    first = next(iter(sessions.events.list(session_id, types=["agent.tool_use"])))
    with pytest.raises(anthropic.BadRequestError):
        sessions.events.send(session_id, events=[{
            "type": "user.tool_result", "tool_use_id": "sevt_nope", "content": []}])
    result = {"type": "user.tool_result", "tool_use_id": first.id, "is_error": False,
              "content": [{"type": "text", "text": "one"}]}
    sent = sessions.events.send(session_id, events=[result])  # type: ignore[list-item]
    assert [e.type for e in sent.data] == ["user.tool_result"]  # type: ignore[union-attr]
    again = sessions.events.send(session_id, events=[result])  # type: ignore[list-item]
    assert again.data == [], "a repeated result is accepted and ignored"
    uses = list(sessions.events.list(session_id, types=["agent.tool_use"]))
    assert len(uses) == 2 and uses[1].id != first.id
    logged = [e for e in emulator.requests_log() if e["endpoint"] == "tool_result"
              and e["session_id"] == session_id]
    assert logged == [{**logged[0], "tool": "bash", "input": {"command": "echo one"},
                       "content": ["one"], "is_error": False, "work_id": work_id,
                       "tool_use_id": first.id}]
    client.close()


async def _stream_until_terminated(emu: EmulatorProcess, session_id: str) -> list[str]:
    client = anthropic.AsyncAnthropic(auth_token=emu.environment_key, base_url=emu.base_url,
                                      max_retries=0)
    seen = []
    stream = await client.beta.sessions.events.stream(session_id)
    terminator = asyncio.create_task(asyncio.to_thread(
        emu.http.post, f"/_emulator/sessions/{session_id}/terminate",
        headers=emu.org_headers))
    async for event in stream:
        seen.append(event.type)
    await terminator
    await client.close()
    return seen


def test_the_event_stream_carries_new_events_until_the_session_terminates(
        emulator: EmulatorProcess) -> None:
    env = emulator.create_environment()
    session_id, _ = _session(emulator, env, ONE_CALL)
    seen = asyncio.run(asyncio.wait_for(_stream_until_terminated(emulator, session_id), 20))
    assert seen == ["session.status_terminated"], "only what came after it opened"
    session = emulator.http.get(f"/v1/sessions/{session_id}", headers=emulator.org_headers)
    assert session.json()["status"] == "terminated"
    refused = emulator.http.post(f"/v1/sessions/{session_id}/events", headers=emulator.org_headers,
                                 json={"events": [{"type": "user.tool_result",
                                                   "tool_use_id": "x", "content": []}]})
    assert refused.status_code == 400


def test_handle_item_skips_a_terminated_session_and_runs_on_the_environment_key(
        emulator: EmulatorProcess, tmp_path: Path) -> None:
    """No secret: every call of the item on the environment key (the SDK's fallback)."""
    env = emulator.create_environment()
    session_id, work_id = _session(emulator, env, ONE_CALL)
    emulator.http.post(f"/_emulator/sessions/{session_id}/terminate",
                       headers=emulator.org_headers).raise_for_status()
    assert emulator.poll(env, block_ms=500) is not None
    emulator.http.post(emulator.work_url(env, f"/{work_id}/ack"), headers=emulator.env_headers)

    async def handle() -> None:
        client = anthropic.AsyncAnthropic(api_key="unused", base_url=emulator.base_url,
                                          max_retries=0)
        await EnvironmentWorker(client, workdir=str(tmp_path)).handle_item(
            work_id=work_id, environment_id=env, session_id=session_id,
            environment_key=emulator.environment_key)
        await client.close()

    asyncio.run(asyncio.wait_for(handle(), 30))
    assert emulator.get(env, work_id)["state"] == "stopped"
    calls = [e for e in emulator.requests_log() if e["work_id"] == work_id]
    assert {e["credential"] for e in calls if e["endpoint"] in ("heartbeat", "stop")} == {
        "environment"}
    assert not [e for e in emulator.requests_log() if e.get("session_id") == session_id
                and e["endpoint"] == "tool_result"], "no tool ran"


def test_memory_stores_are_not_served_and_say_so(emulator: EmulatorProcess) -> None:
    for bearer in (emulator.environment_key, "sk-ant-req-any-token"):
        refused = emulator.http.get("/v1/memory_stores/memstore_1/memories", headers={
            **emulator.env_headers, "authorization": f"Bearer {bearer}"})
        assert refused.status_code == 404
        assert "memory stores are not served" in refused.json()["error"]["message"]


def test_a_script_names_only_tools_of_the_agent_toolset(emulator: EmulatorProcess) -> None:
    env = emulator.create_environment()
    refused = emulator.http.post("/v1/sessions", headers=emulator.org_headers, json={
        "environment_id": env, "emulator_script": [{"name": "web_fetch", "input": {}}]})
    assert refused.status_code == 400 and "emulator_script[0].name" in refused.text
