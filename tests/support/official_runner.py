"""The official runner's tests share this: a scripted agent's calls and what their results must
be, a session it drives, and the on-work program of runner mode in processes, the SDK's
documented recipe for an already-claimed item: `handle_item()` with no arguments (it reads the
`ANTHROPIC_*` variables, the work secret from ANTHROPIC_WORK_SECRET), unmodified.

    python tests/support/official_runner.py WORKDIR MAX_IDLE_SECONDS

Each session works in WORKDIR/<session id>, so sessions of one fleet never share files.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from pathlib import Path
from typing import Any

__all__ = ["ON_WORK", "SCRIPT", "check_results", "scripted_session", "tool_results"]

ON_WORK = Path(__file__)
# A session's tool calls: a command that writes a file, read it back, edit it, read the edit
# with a command, and a command that fails.
SCRIPT: list[dict[str, Any]] = [
    {"name": "bash", "input": {"command": "printf 'hello from bash\\n' > notes.txt && echo wrote"}},
    {"name": "read", "input": {"file_path": "notes.txt"}},
    {"name": "edit", "input": {"file_path": "notes.txt", "old_string": "bash",
                               "new_string": "the runner"}},
    {"name": "bash", "input": {"command": "cat notes.txt"}},
    {"name": "bash", "input": {"command": "echo failing >&2; exit 3"}},
]


def check_results(results: list[dict[str, Any]]) -> None:
    """The results of SCRIPT's calls: each call once, each with its expected text."""
    assert [(r["tool"], r["input"]) for r in results] == [(c["name"], c["input"])
                                                          for c in SCRIPT], "each call once"
    texts = ["\n".join(r["content"]) for r in results]
    errors = [r["is_error"] for r in results]
    assert texts[0].strip() == "wrote" and not errors[0]
    assert "hello from bash" in texts[1] and not errors[1]
    assert not errors[2], texts[2]
    assert texts[3].strip() == "hello from the runner" and not errors[3]
    assert errors[4] and "failing" in texts[4], "a failing command is an error result"


def scripted_session(emulator: Any, environment_id: str,
                     script: list[dict[str, Any]]) -> tuple[str, str]:
    """A session the emulator's scripted agent drives through `script`; (session id, work id)."""
    response = emulator.http.post("/v1/sessions", headers=emulator.org_headers, json={
        "environment_id": environment_id, "agent": "agent_scripted",
        "emulator_script": script})
    response.raise_for_status()
    return str(response.json()["id"]), str(response.json()["work_id"])


def tool_results(emulator: Any, session_id: str) -> list[dict[str, Any]]:
    """The tool results the emulator recorded for the session, in order."""
    return [entry for entry in emulator.requests_log()
            if entry.get("endpoint") == "tool_result" and entry.get("session_id") == session_id]


async def _handle_item(workdir: Path, max_idle: float) -> None:
    from anthropic import AsyncAnthropic

    workdir.mkdir(parents=True, exist_ok=True)
    worker = AsyncAnthropic().beta.environments.work.worker(workdir=str(workdir),
                                                            max_idle=max_idle)
    await worker.handle_item()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    asyncio.run(_handle_item(Path(sys.argv[1]) / os.environ["ANTHROPIC_SESSION_ID"],
                             float(sys.argv[2])))
