"""The demo's second part: real work through the official runner.

A fleet of its own (its own emulator, one worker with beat, `DISPATCHER_LEASE_MODE=runner`) runs
a few sessions whose on-work program is the SDK's `EnvironmentWorker.handle_item`, unmodified,
through the stdin entry point (`python -m dispatcher.session.stdin_runner`). The emulator's
scripted agent asks each session for real tool calls (a file written by a command, read back,
edited, printed, and a command that fails); the runner executes them in a work directory and
sends the results back, which the emulator records. The summary shows every call and its result.

Needs the SDK (the dev extra). Without it the part is skipped with one line.
"""

from __future__ import annotations

import importlib.util
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["OfficialSession", "official_ok", "run_official", "script_for", "summary_lines"]

OFFICIAL_SESSIONS = 3
# After a session's turn ends the runner waits this long for more (the SDK's default is 60 s).
MAX_IDLE_SECONDS = 0.5
FINISH_TIMEOUT_SECONDS = 90.0
POLL_SECONDS = 0.5
# A result's text in the summary: its first line, cut to this width.
RESULT_WIDTH = 40


@dataclass
class OfficialSession:
    label: str
    script: list[dict[str, Any]]
    session_id: str = ""
    work_id: str = ""
    state: str = "queued"
    # (tool, input, result text, is_error) of every result the emulator recorded, in order.
    calls: list[dict[str, Any]] = field(default_factory=list)
    ok: bool = False


def script_for(index: int) -> list[dict[str, Any]]:
    """One session's tool calls; its own file name, so sessions sharing a directory never meet."""
    name = f"notes-{index}.txt"
    return [
        {"name": "bash", "input": {"command": f"echo 'hello from session {index}' > {name} "
                                              "&& echo wrote"}},
        {"name": "read", "input": {"file_path": name}},
        {"name": "edit", "input": {"file_path": name, "old_string": "hello",
                                   "new_string": "goodbye"}},
        {"name": "bash", "input": {"command": f"cat {name}"}},
        {"name": "bash", "input": {"command": f"ls /no-such-dir-{index}"}},
    ]


def official_ok(session: OfficialSession) -> bool:
    """Every call answered once, in order; the edit printed; only the last command failed."""
    if session.state != "stopped" or len(session.calls) != len(session.script):
        return False
    if [c["tool"] for c in session.calls] != [c["name"] for c in session.script]:
        return False
    errors = [c["is_error"] for c in session.calls]
    index = session.label.rsplit("-", 1)[-1]
    return errors == [False] * (len(errors) - 1) + [True] and (
        session.calls[3]["result"].strip() == f"goodbye from session {index}")


def run_official(redis_url: str, workdir: Path, say: Callable[[str], None]) -> \
        list[OfficialSession] | None:
    """Run the official-runner sessions; None when the SDK is not installed."""
    if importlib.util.find_spec("anthropic") is None:
        say("official runner: skipped, the SDK is not installed (pip install -e '.[dev]')")
        return None
    from dispatcher.ops.stack import LocalStack

    workdir.mkdir(parents=True, exist_ok=True)
    stack = LocalStack(workdir=workdir, redis_url=redis_url, key_prefix="demo-official")
    sessions = [OfficialSession(f"runner-{i + 1}", script_for(i + 1))
                for i in range(OFFICIAL_SESSIONS)]
    try:
        say(f"official runner: emulator {stack.start_emulator()}, one worker in runner mode")
        stack.worker("runner", _fleet_env(stack, workdir / "sandbox"), concurrency=4, beat=True)
        for session in sessions:
            session.session_id, session.work_id = stack.create_session(script=session.script)
        _wait_stopped(stack, sessions)
        _collect(stack, sessions)
    finally:
        stack.stop_all()
    for session in sessions:
        session.ok = official_ok(session)
    return sessions


def _fleet_env(stack: Any, sandbox_dir: Path) -> dict[str, str]:
    sandbox_dir.mkdir(exist_ok=True)
    on_work = (f"{sys.executable} -m dispatcher.session.stdin_runner --workdir {sandbox_dir} "
               f"--max-idle {MAX_IDLE_SECONDS}")
    env: dict[str, str] = stack.fleet_env(
        DISPATCHER_LEASE_MODE="runner", DISPATCHER_ON_WORK=on_work,
        DISPATCHER_SANDBOX_ENV_ALLOW="PATH,HOME")
    return env


def _wait_stopped(stack: Any, sessions: list[OfficialSession]) -> None:
    deadline = time.monotonic() + FINISH_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        for session in sessions:
            session.state = stack.work_state(session.work_id)
        if all(s.state == "stopped" for s in sessions):
            return
        time.sleep(POLL_SECONDS)


def _collect(stack: Any, sessions: list[OfficialSession]) -> None:
    results = [e for e in stack.requests_log() if e.get("endpoint") == "tool_result"]
    for session in sessions:
        session.calls = [{"tool": e["tool"], "input": e["input"], "is_error": e["is_error"],
                          "result": "\n".join(e["content"])}
                         for e in results if e["session_id"] == session.session_id]


def summary_lines(sessions: list[OfficialSession]) -> list[str]:
    """The table: each session's tool calls and their results."""
    lines = [f"{'session':10} {'tool':5} {'input':44} result"]
    for session in sessions:
        label = session.label
        for call in session.calls:
            shown = call["input"].get("command") or call["input"].get("file_path") or ""
            first = (call["result"].strip().splitlines() or [""])[0][:RESULT_WIDTH]
            mark = " (error)" if call["is_error"] else ""
            lines.append(f"{label:10} {call['tool']:5} {shown[:44]:44} {first}{mark}")
            label = ""
        lines.append(f"{session.label:10} {'':5} {'':44} "
                     f"{'ok' if session.ok else 'UNEXPECTED'} ({session.state})")
    good = sum(s.ok for s in sessions)
    lines.append(f"\n{good}/{len(sessions)} sessions ran their tool calls through the official "
                 "runner as scripted")
    return lines
