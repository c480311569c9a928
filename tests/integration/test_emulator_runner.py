"""The official runner, SDK 2.17's `EnvironmentWorker.handle_item` unmodified, runs a scripted
agent's tool calls in a temporary directory against the emulator over real HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import anthropic
import pytest
from anthropic.lib.environments import EnvironmentWorker

from tests.support.official_runner import (
    ON_WORK,
    SCRIPT,
    check_results,
    scripted_session,
    tool_results,
)

if TYPE_CHECKING:
    from conftest import EmulatorProcess

pytestmark = pytest.mark.integration

# After its turn ends the runner waits `max_idle` for more; short, so the test ends soon.
MAX_IDLE_S = 0.5
# SCRIPT's first four calls, then the other tools of the agent toolset, then its failing one.
MORE = [
    {"name": "write", "input": {"file_path": "more.txt", "content": "second file\n"}},
    {"name": "glob", "input": {"pattern": "*.txt"}},
    {"name": "grep", "input": {"pattern": "runner"}},
]


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


def test_handle_item_runs_every_scripted_tool_call_in_the_sandbox(
        emulator: EmulatorProcess, tmp_path: Path) -> None:
    env = emulator.create_environment()
    session_id, work_id = scripted_session(emulator, env, [*SCRIPT[:4], *MORE, SCRIPT[4]])
    secret = _delivered(emulator, env, work_id)

    asyncio.run(asyncio.wait_for(_handle(emulator, tmp_path, work_id=work_id,
                                         environment_id=env, session_id=session_id,
                                         environment_key="", work_secret=secret), 60))

    results = tool_results(emulator, session_id)
    check_results([*results[:4], *results[7:]])
    assert (tmp_path / "notes.txt").read_text() == "hello from the runner\n"
    texts = ["\n".join(r["content"]) for r in results[4:7]]
    assert [(r["tool"], r["input"], r["is_error"]) for r in results[4:7]] == [
        (c["name"], c["input"], False) for c in MORE]
    assert (tmp_path / "more.txt").read_text() == "second file\n"
    assert "notes.txt" in texts[1] and "more.txt" in texts[1]
    assert "notes.txt" in texts[2] and "more.txt" not in texts[2]

    session = emulator.http.get(f"/v1/sessions/{session_id}", headers=emulator.org_headers)
    assert session.json()["status"] == "idle"
    work = emulator.get(env, work_id)
    assert work["state"] == "stopped", "the runner force-stops its item when the session idles"
    beats = [e for e in emulator.requests_log()
             if e["endpoint"] == "heartbeat" and e["work_id"] == work_id]
    assert beats and beats[0]["expected_last_heartbeat"] == "NO_HEARTBEAT"


async def _run_worker_until(emu: EmulatorProcess, env: str, workdir: Path,
                            work_ids: list[str]) -> None:
    """SDK 2.17's whole worker (`EnvironmentWorker.run`: its poller, then `handle_item`'s flow
    per item) until every item is stopped."""
    client = anthropic.AsyncAnthropic(api_key="unused", base_url=emu.base_url, max_retries=0)
    worker = EnvironmentWorker(client, environment_id=env, environment_key=emu.environment_key,
                               workdir=str(workdir), max_idle=MAX_IDLE_S)
    running = asyncio.create_task(worker.run())
    try:
        while not all(await asyncio.gather(*(asyncio.to_thread(
                lambda w=w: emu.get(env, w)["state"] == "stopped") for w in work_ids))):
            assert not running.done(), running
            await asyncio.sleep(0.2)
    finally:
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running
        await client.close()


def test_the_sdks_own_worker_polls_and_runs_scripted_sessions(
        emulator: EmulatorProcess, tmp_path: Path) -> None:
    env = emulator.create_environment()
    scripts = [[{"name": "write", "input": {"file_path": f"s{n}.txt", "content": f"{n}\n"}},
                {"name": "bash", "input": {"command": f"cat s{n}.txt"}}] for n in range(2)]
    sessions = [scripted_session(emulator, env, script) for script in scripts]
    asyncio.run(asyncio.wait_for(
        _run_worker_until(emulator, env, tmp_path, [w for _, w in sessions]), 60))
    for n, (session_id, work_id) in enumerate(sessions):
        results = tool_results(emulator, session_id)
        assert [r["tool"] for r in results] == ["write", "bash"], "each call once"
        assert results[1]["content"] == [f"{n}"] and not results[1]["is_error"]
        stops = [e for e in emulator.requests_log()
                 if e["endpoint"] == "stop" and e["work_id"] == work_id]
        assert [(s["force"], s["credential"]) for s in stops] == [(True, "sessions_token")]


def test_handle_item_as_an_on_work_program_reads_the_work_secret_variable(
        emulator: EmulatorProcess, tmp_path: Path) -> None:
    env = emulator.create_environment()
    script = [SCRIPT[0], SCRIPT[1], SCRIPT[-1]]
    session_id, work_id = scripted_session(emulator, env, script)
    secret = _delivered(emulator, env, work_id)
    variables = {"PATH": os.environ["PATH"], "ANTHROPIC_BASE_URL": emulator.base_url,
                 "ANTHROPIC_API_KEY": "unused", "ANTHROPIC_WORK_ID": work_id,
                 "ANTHROPIC_ENVIRONMENT_ID": env, "ANTHROPIC_SESSION_ID": session_id,
                 "ANTHROPIC_WORK_SECRET": secret}
    # The on-work program of runner mode: `handle_item()` with no arguments, everything from
    # the variables the poller sets, the secret from ANTHROPIC_WORK_SECRET.
    done = subprocess.run([sys.executable, str(ON_WORK), str(tmp_path), str(MAX_IDLE_S)],
                          env=variables, capture_output=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    results = tool_results(emulator, session_id)
    assert [(r["tool"], r["is_error"]) for r in results] == [
        ("bash", False), ("read", False), ("bash", True)]
    assert (tmp_path / session_id / "notes.txt").read_text() == "hello from bash\n"
    calls = [e for e in emulator.requests_log() if e["work_id"] == work_id
             and e["endpoint"] in ("heartbeat", "stop")]
    assert {e["credential"] for e in calls} == {"sessions_token"}, "no environment key at all"
