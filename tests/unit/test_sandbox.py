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

from dispatcher.session.launcher import PARENT_DEATH_GRACE_SECONDS
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
    sandbox.kill_group()


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


def _sigkill_a_worker_running(argv: list[str], tmp_path: Path, *, members: int) -> int:
    """Start a sandbox from a stand-in worker, wait until its group has `members` processes,
    SIGKILL the worker; returns the group id."""
    pgid_file = tmp_path / "pgid"
    worker = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import os, time
        from dispatcher.session.sandbox import Sandbox, SandboxSpec
        s = Sandbox.start(SandboxSpec(argv={argv!r}, env={{"PATH": os.environ["PATH"]}},
                                      stdin=b""))
        open({str(pgid_file)!r}, "w").write(str(s.pgid))
        time.sleep(60)
    """)])
    deadline = time.time() + 10
    while not pgid_file.exists() or not pgid_file.read_text():
        assert time.time() < deadline
        time.sleep(0.05)
    pgid = int(pgid_file.read_text())
    while len(_pids_in_group(pgid)) < members and time.time() < deadline:
        time.sleep(0.05)
    assert len(_pids_in_group(pgid)) == members
    worker.kill()
    worker.wait()
    return pgid


def test_the_group_dies_with_a_worker_killed_by_sigkill(tmp_path: Path) -> None:
    """The parent (a stand-in for a worker) is SIGKILLed: nothing of its sandbox survives."""
    script = _spec("""
        import os, time
        if os.fork() == 0:
            time.sleep(60); os._exit(0)
        time.sleep(60)
    """, tmp_path).argv
    pgid = _sigkill_a_worker_running(script, tmp_path, members=3)
    deadline = time.time() + 5
    while _pids_in_group(pgid) and time.time() < deadline:
        time.sleep(0.05)
    assert _pids_in_group(pgid) == []


def _state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0]
    except FileNotFoundError:
        return None


def test_the_launcher_is_reaped_only_after_its_group_was_signalled(tmp_path: Path) -> None:
    """Reaping the leader frees its pid, the group id: a later killpg could hit another
    session's new launcher. So `wait` leaves it a zombie and `kill_group` reaps it."""
    sandbox = Sandbox.start(_spec("import sys; sys.exit(3)", tmp_path))
    assert sandbox.wait(10) == 3
    assert _state(sandbox.pid) == "Z", "exited but not reaped: the pid stays reserved"
    assert sandbox.wait(0) == 3, "asking again gives the same answer"
    sandbox.kill_group()
    assert _state(sandbox.pid) is None, "reaped by kill_group, after the group's SIGKILL"
    sandbox.signal_group(signal.SIGTERM)  # a no-op now: the group id is no longer ours


def test_the_secret_file_is_private_and_gone_with_the_sandbox(tmp_path: Path) -> None:
    out = tmp_path / "seen"
    spec = _spec(f"""
        import os, stat
        path = os.environ["ANTHROPIC_WORK_SECRET_FILE"]
        mode = stat.S_IMODE(os.stat(path).st_mode)
        dir_mode = stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode)
        open({str(out)!r}, "w").write(f"{{path}} {{mode:o}} {{dir_mode:o}} " + open(path).read())
    """, tmp_path)
    sandbox = Sandbox.start(SandboxSpec(argv=spec.argv, env=spec.env, stdin=b"",
                                        secret_file="s3cr3t"))
    assert sandbox.wait(10) == 0
    path, mode, dir_mode, content = out.read_text().split()
    assert (mode, dir_mode, content) == ("600", "700", "s3cr3t")
    assert "s3cr3t" not in spec.env.values()
    sandbox.kill_group()
    assert not Path(path).exists() and not Path(path).parent.exists()


def test_a_dying_worker_gives_the_sandbox_sigterm_and_a_short_grace(tmp_path: Path) -> None:
    """The launcher's parent-death path: SIGTERM first, so a spawn script's trap can clean up
    (stop its container), then SIGKILL after a bounded grace."""
    trapped = tmp_path / "trapped"
    script = tmp_path / "spawn.sh"
    script.write_text(f"#!/bin/sh\ntrap 'echo cleaned > {trapped}; exit 0' TERM\n"
                      "sleep 60 &\nwait $!\n")
    script.chmod(0o755)
    pgid = _sigkill_a_worker_running([str(script)], tmp_path, members=3)
    killed_at = time.monotonic()
    while _pids_in_group(pgid) and time.monotonic() - killed_at < 10:
        time.sleep(0.05)
    assert _pids_in_group(pgid) == []
    assert time.monotonic() - killed_at < PARENT_DEATH_GRACE_SECONDS + 2
    assert trapped.read_text() == "cleaned\n", "the script's TERM trap ran"


def test_a_launcher_started_ahead_runs_the_next_command_with_its_own_environment(
        tmp_path: Path) -> None:
    """The spare launcher: started before the session, it reads the command and its
    environment from stdin, leaves the work item to the command, and keeps the key out of
    every argv."""
    from dispatcher.session.sandbox import SPARES

    assert SPARES.enabled, "this kernel has pidfds"
    out = tmp_path / "seen"
    spec = _spec(f"""
        import os, sys
        open({str(out)!r}, "w").write(os.environ["ANTHROPIC_ENVIRONMENT_KEY"] + "|" +
                                      sys.stdin.read())
    """, tmp_path)
    spec = SandboxSpec(argv=spec.argv, env={**spec.env, "ANTHROPIC_ENVIRONMENT_KEY": "k=1 2"},
                       stdin=spec.stdin)
    first = Sandbox.start(spec)
    assert first.wait(10) == 0
    first.kill_group()
    deadline = time.monotonic() + 10
    while SPARES._spare is None and time.monotonic() < deadline:
        time.sleep(0.01)  # refilled once the first command had its stdin
    spare = SPARES._spare
    assert spare is not None
    with open(f"/proc/{spare.pid}/cmdline", "rb") as f:
        assert b"k=1" not in f.read()
    second = Sandbox.start(spec)
    assert second.pid == spare.pid, "the second session used the launcher started ahead"
    assert second.wait(10) == 0
    second.kill_group()
    assert out.read_text() == 'k=1 2|{"id": "work_1"}'


def test_an_unused_launcher_exits_when_its_worker_lets_go(tmp_path: Path) -> None:
    """End of file instead of a request: the worker exited (or gave it up); nothing runs."""
    from dispatcher.session.sandbox import _start_launcher

    launcher = _start_launcher()
    assert launcher.stdin is not None
    launcher.stdin.close()
    assert launcher.wait(10) == 0


def test_the_launcher_request_leaves_the_rest_of_stdin_to_the_command() -> None:
    from dispatcher.session.launcher import encode_request
    from dispatcher.session.sandbox import LAUNCHER

    request = encode_request(["/bin/cat", "-"], {"A": "1=2", "B": ""})
    header, _, payload = request.partition(b"\n")
    assert header == b"2 2 %d" % len(payload)
    assert payload.split(b"\0") == [b"/bin/cat", b"-", b"A=1=2", b"B="]
    done = subprocess.run(
        [sys.executable, "-S", str(LAUNCHER), str(os.getpid())],
        input=request + b"rest of stdin", capture_output=True, timeout=10)
    assert (done.returncode, done.stdout) == (0, b"rest of stdin")


def test_stdin_larger_than_the_pipe_reaches_the_command_whole(tmp_path: Path) -> None:
    """What the pipe does not take at once is fed from a thread, then stdin is closed."""
    out = tmp_path / "length"
    spec = _spec(f"""
        import sys
        open({str(out)!r}, "w").write(str(len(sys.stdin.buffer.read())))
    """, tmp_path)
    big = b"x" * 300_000
    sandbox = Sandbox.start(SandboxSpec(argv=spec.argv, env=spec.env, stdin=big))
    assert sandbox.wait(20) == 0
    sandbox.kill_group()
    assert out.read_text() == str(len(big))
