"""Sandboxes: the command contract, the environment allow-list, the process group's life."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from dispatcher.session.sandbox import (
    CommandError,
    Sandbox,
    SandboxSpec,
    build_environment,
    resolve_command,
)


def test_the_command_is_split_like_a_shell_but_never_run_by_one() -> None:
    argv = resolve_command("sh -c 'echo $HOME; rm -rf /' extra")
    assert argv[1:] == ["-c", "echo $HOME; rm -rf /", "extra"]
    assert os.path.isabs(argv[0])


@pytest.mark.parametrize(
    ("command", "message"),
    [(None, "DISPATCHER_ON_WORK is not set"), ("", "DISPATCHER_ON_WORK is not set"),
     ("'unclosed", "cannot be split"), ("/nonexistent/run-me", "not found"),
     ("{not_executable}", "not found or not executable")],
)
def test_a_bad_command_is_a_clear_error(
    command: str | None, message: str, tmp_path: Path
) -> None:
    plain = tmp_path / "plain.sh"
    plain.write_text("echo hi")
    plain.chmod(0o644)
    with pytest.raises(CommandError, match=message):
        resolve_command(command and command.format(not_executable=plain))


def test_only_allow_listed_variables_reach_the_sandbox_and_never_the_org_key() -> None:
    env = build_environment(
        worker_env={"PATH": "/bin", "DISPATCHER_REDIS_URL": "redis://secret", "HOME": "/root",
                    "ANTHROPIC_API_KEY": "sk-org"},
        allow=["PATH", "ANTHROPIC_API_KEY"],
        contract={"ANTHROPIC_WORK_ID": "work_1", "ANTHROPIC_BASE_URL": None},
    )
    assert env == {"PATH": "/bin", "ANTHROPIC_WORK_ID": "work_1"}


def test_the_redis_url_never_reaches_the_sandbox_even_when_allow_listed() -> None:
    """Redis holds every work item's secret: its URL (and password) is the fleet's, not a
    session's."""
    env = build_environment(
        worker_env={"PATH": "/bin", "DISPATCHER_REDIS_URL": "redis://:pw@redis:6379/0"},
        allow=["PATH", "DISPATCHER_REDIS_URL"], contract={"ANTHROPIC_WORK_ID": "work_1"})
    assert env == {"PATH": "/bin", "ANTHROPIC_WORK_ID": "work_1"}


def _spec(script: str, tmp_path: Path) -> SandboxSpec:
    path = tmp_path / "sandbox.py"
    path.write_text(textwrap.dedent(script))
    return SandboxSpec(argv=[sys.executable, str(path)], env={"PATH": os.environ["PATH"]},
                       stdin=b'{"id": "work_1"}')


def _pids_in_group(pgid: int) -> list[int]:
    out = subprocess.run(["ps", "-eo", "pid=,pgid=,stat="], capture_output=True, text=True)
    return [int(p) for p, g, s in (line.split() for line in out.stdout.splitlines())
            if int(g) == pgid and not s.startswith("Z")]


def test_stdin_and_exit_code_pass_through_the_launcher(tmp_path: Path) -> None:
    sandbox = Sandbox.start(_spec("""
        import sys
        sys.exit(7 if sys.stdin.read() == '{"id": "work_1"}' else 1)
    """, tmp_path))
    assert sandbox.wait(10) == 7


def test_sigterm_to_the_group_reaches_the_command_and_kill_group_leaves_nothing(
    tmp_path: Path,
) -> None:
    sandbox = Sandbox.start(_spec("""
        import os, signal, sys, time
        for _ in range(2):
            if os.fork() == 0:
                time.sleep(60); os._exit(0)
        signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))
        time.sleep(60)
    """, tmp_path))
    deadline = time.time() + 10
    while len(_pids_in_group(sandbox.pgid)) < 4 and time.time() < deadline:
        time.sleep(0.05)
    assert len(_pids_in_group(sandbox.pgid)) == 4, "launcher, command and two children"
    sandbox.signal_group(signal.SIGTERM)
    assert sandbox.wait(10) == 143, "the launcher reports the command's own exit"
    sandbox.kill_group()
    time.sleep(0.2)
    assert _pids_in_group(sandbox.pgid) == []


def test_the_group_dies_with_a_worker_killed_by_sigkill(tmp_path: Path) -> None:
    """The parent (a stand-in for a worker) is SIGKILLed: nothing of its sandbox survives."""
    pgid_file = tmp_path / "pgid"
    script = _spec("""
        import os, time
        if os.fork() == 0:
            time.sleep(60); os._exit(0)
        time.sleep(60)
    """, tmp_path).argv
    worker = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import os, time
        from dispatcher.session.sandbox import Sandbox, SandboxSpec
        s = Sandbox.start(SandboxSpec(argv={script!r}, env={{"PATH": os.environ["PATH"]}},
                                      stdin=b""))
        open({str(pgid_file)!r}, "w").write(str(s.pgid))
        time.sleep(60)
    """)])
    deadline = time.time() + 10
    while not pgid_file.exists() or not pgid_file.read_text():
        assert time.time() < deadline
        time.sleep(0.05)
    pgid = int(pgid_file.read_text())
    while len(_pids_in_group(pgid)) < 3 and time.time() < deadline:
        time.sleep(0.05)
    assert len(_pids_in_group(pgid)) == 3
    worker.kill()
    worker.wait()
    deadline = time.time() + 5
    while _pids_in_group(pgid) and time.time() < deadline:
        time.sleep(0.05)
    assert _pids_in_group(pgid) == []
