"""The official runner, SDK 2.17's `EnvironmentWorker.handle_item` unmodified, runs a scripted
agent's tool calls in a temporary directory against the emulator over real HTTP."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anthropic
import pytest
from anthropic.lib.environments import EnvironmentWorker

if TYPE_CHECKING:
    from conftest import EmulatorProcess

pytestmark = pytest.mark.integration

# After its turn ends the runner waits `max_idle` for more; short, so the test ends soon.
MAX_IDLE_S = 0.5
SCRIPT = [
    {"name": "bash", "input": {"command": "printf 'hello from bash\\n' > notes.txt && echo wrote"}},
    {"name": "read", "input": {"file_path": "notes.txt"}},
    {"name": "edit", "input": {"file_path": "notes.txt", "old_string": "bash",
                               "new_string": "the runner"}},
    {"name": "bash", "input": {"command": "cat notes.txt"}},
    {"name": "write", "input": {"file_path": "more.txt", "content": "second file\n"}},
    {"name": "glob", "input": {"pattern": "*.txt"}},
    {"name": "grep", "input": {"pattern": "runner"}},
    {"name": "bash", "input": {"command": "echo failing >&2; exit 3"}},
]


def _scripted_session(emu: EmulatorProcess, env: str,
                      script: list[dict[str, Any]]) -> tuple[str, str]:
    response = emu.http.post("/v1/sessions", headers=emu.org_headers, json={
        "environment_id": env, "agent": "agent_scripted", "emulator_script": script})
    response.raise_for_status()
    return str(response.json()["id"]), str(response.json()["work_id"])


def _delivered(emu: EmulatorProcess, env: str, work_id: str) -> str:
    """Poll and ack the item as a fleet would, and return its secret."""
    work = emu.poll(env, block_ms=500)
    assert work is not None and work["id"] == work_id
    emu.http.post(emu.work_url(env, f"/{work_id}/ack"),
                  headers=emu.env_headers).raise_for_status()
    return str(work["secret"])


async def _handle(emu: EmulatorProcess, workdir: Path, **item: str) -> None:
    client = anthropic.AsyncAnthropic(api_key="unused-the-item-token-is-the-bearer",
                                      base_url=emu.base_url, max_retries=0)
    try:
        await EnvironmentWorker(client, workdir=str(workdir), max_idle=MAX_IDLE_S).handle_item(
            **item)
    finally:
        await client.close()


def _results(emu: EmulatorProcess, session_id: str) -> list[dict[str, Any]]:
    return [entry for entry in emu.requests_log()
            if entry.get("endpoint") == "tool_result" and entry.get("session_id") == session_id]


def test_handle_item_runs_every_scripted_tool_call_in_the_sandbox(
        emulator: EmulatorProcess, tmp_path: Path) -> None:
    env = emulator.create_environment()
    session_id, work_id = _scripted_session(emulator, env, SCRIPT)
    secret = _delivered(emulator, env, work_id)

    asyncio.run(asyncio.wait_for(_handle(emulator, tmp_path, work_id=work_id,
                                         environment_id=env, session_id=session_id,
                                         environment_key="", work_secret=secret), 60))

    results = _results(emulator, session_id)
    assert [(r["tool"], r["input"]) for r in results] == [(c["name"], c["input"])
                                                          for c in SCRIPT], "each call once"
    texts = ["\n".join(r["content"]) for r in results]
    errors = [r["is_error"] for r in results]
    assert texts[0].strip() == "wrote" and not errors[0]
    assert "hello from bash" in texts[1] and not errors[1]
    assert not errors[2] and (tmp_path / "notes.txt").read_text() == "hello from the runner\n"
    assert texts[3].strip() == "hello from the runner" and not errors[3]
    assert not errors[4] and (tmp_path / "more.txt").read_text() == "second file\n"
    assert "notes.txt" in texts[5] and "more.txt" in texts[5] and not errors[5]
    assert "notes.txt" in texts[6] and "more.txt" not in texts[6] and not errors[6]
    assert errors[7] and "failing" in texts[7], "a failing command is an error result"

    session = emulator.http.get(f"/v1/sessions/{session_id}", headers=emulator.org_headers)
    assert session.json()["status"] == "idle"
    work = emulator.get(env, work_id)
    assert work["state"] == "stopped", "the runner force-stops its item when the session idles"
    beats = [e for e in emulator.requests_log()
             if e["endpoint"] == "heartbeat" and e["work_id"] == work_id]
    assert beats and beats[0]["expected_last_heartbeat"] == "NO_HEARTBEAT"
