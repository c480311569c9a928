"""Sandboxes: the command contract, the environment allow-list, the process group's life."""

from __future__ import annotations

import os
import resource
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from dispatcher.session.guardian import PARENT_DEATH_GRACE_SECONDS
from dispatcher.session.sandbox import (
    EXIT_UNKNOWN,
    CommandError,
    Sandbox,
    SandboxSpec,
    SandboxStartError,
    build_environment,
    resolve_command,
)
from tests.support.waiting import wait_for


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


def test_stdin_and_exit_code_pass_through(tmp_path: Path) -> None:
    sandbox = Sandbox.start(_spec("""
        import sys
        sys.exit(7 if sys.stdin.read() == '{"id": "work_1"}' else 1)
    """, tmp_path))
    assert sandbox.wait(10) == 7
    sandbox.kill_group()


def test_a_sandbox_is_waited_on_whatever_its_descriptors_number() -> None:
    """A worker of hundreds of sessions holds descriptors past 1,024, where `select` refuses
    them: a sandbox spawned then is still waited on, its exit seen."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1200:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        sandbox = Sandbox.start(SandboxSpec(argv=["/bin/sh", "-c", "sleep 0.3; exit 3"],
                                            env={}, stdin=b"", work_id="w", attempt=1))
        assert sandbox.wait(0.05) is None, "still running"
        assert sandbox.wait(10) == 3
        sandbox.kill_group()
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


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
    while len(_pids_in_group(sandbox.pgid)) < 3 and time.time() < deadline:
        time.sleep(0.05)
    assert len(_pids_in_group(sandbox.pgid)) == 3, "the command and its two children"
    sandbox.signal_group(signal.SIGTERM)
    assert sandbox.wait(10) == 143, "the command's own exit"
    sandbox.kill_group()
    # SIGKILL takes effect as each process is next scheduled: on busy cores, not at once.
    wait_for(lambda: not _pids_in_group(sandbox.pgid), timeout=10, what="the group gone")


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
    pgid = _sigkill_a_worker_running(script, tmp_path, members=2)
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


def test_the_leader_is_reaped_only_after_its_group_was_signalled(tmp_path: Path) -> None:
    """Reaping the leader frees its pid, the group id: a later killpg could hit another
    session's new command. So `wait` leaves it a zombie and `kill_group` reaps it."""
    sandbox = Sandbox.start(_spec("import sys; sys.exit(3)", tmp_path))
    assert sandbox.wait(10) == 3
    assert _state(sandbox.pid) == "Z", "exited but not reaped: the pid stays reserved"
    assert sandbox.wait(0) == 3, "asking again gives the same answer"
    sandbox.kill_group()
    assert _state(sandbox.pid) is None, "reaped by kill_group, after the group's SIGKILL"
    sandbox.signal_group(signal.SIGTERM)  # a no-op now: the group id is no longer ours


def test_an_exit_reaped_by_another_thread_keeps_its_code(tmp_path: Path) -> None:
    """The fence's `kill_group` (or any `Popen.wait`) may reap the leader while the attempt's
    thread peeks at it: the peek meets ECHILD, and takes the code Popen kept."""
    sandbox = Sandbox.start(_spec("import sys; sys.exit(5)", tmp_path))
    assert sandbox._process.wait(10) == 5  # reaped as kill_group reaps it, from elsewhere
    assert sandbox.wait(10) == 5
    sandbox.kill_group()


def test_an_exit_reaped_outside_popen_is_a_failure_not_a_success(tmp_path: Path) -> None:
    """A `waitpid` that bypassed Popen leaves no code to be had: the exit is reported as
    `EXIT_UNKNOWN`, never 0 (which would end the session as completed)."""
    sandbox = Sandbox.start(_spec("import sys; sys.exit(0)", tmp_path))
    os.waitpid(sandbox.pid, 0)
    assert sandbox.wait(10) == EXIT_UNKNOWN
    sandbox.kill_group()


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


def test_a_worker_dying_before_its_new_guardian_is_up_still_takes_its_sandbox(
        tmp_path: Path) -> None:
    """The first sandbox starts the guardian and tells it the group without waiting for it to
    be up; the worker dies at once. The guardian, once up, reads what was sent before the end
    and ends the group."""
    pgid_file = tmp_path / "pgid"
    worker = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import os, signal
        from dispatcher.session.sandbox import Sandbox, SandboxSpec
        s = Sandbox.start(SandboxSpec(argv=["sleep", "60"], env={{"PATH": os.environ["PATH"]}},
                                      stdin=b""))
        open({str(pgid_file)!r}, "w").write(f"{{s.pgid}}\\n")
        os.kill(os.getpid(), signal.SIGKILL)
    """)])
    worker.wait()
    (pgid,) = _wait_for_lines(pgid_file, 1, time.time() + 10)
    deadline = time.monotonic() + PARENT_DEATH_GRACE_SECONDS + 5
    while _pids_in_group(int(pgid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _pids_in_group(int(pgid)) == []


def test_a_dying_worker_gives_the_sandbox_sigterm_and_a_short_grace(tmp_path: Path) -> None:
    """The guardian's parent-death path: SIGTERM first, so a spawn script's trap can clean up
    (stop its container), then SIGKILL after a bounded grace."""
    trapped = tmp_path / "trapped"
    script = tmp_path / "spawn.sh"
    script.write_text(f"#!/bin/sh\ntrap 'echo cleaned > {trapped}; exit 0' TERM\n"
                      "sleep 60 &\nwait $!\n")
    script.chmod(0o755)
    pgid = _sigkill_a_worker_running([str(script)], tmp_path, members=2)
    killed_at = time.monotonic()
    while _pids_in_group(pgid) and time.monotonic() - killed_at < 10:
        time.sleep(0.05)
    assert _pids_in_group(pgid) == []
    assert time.monotonic() - killed_at < PARENT_DEATH_GRACE_SECONDS + 2
    assert trapped.read_text() == "cleaned\n", "the script's TERM trap ran"


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


def _guardians_of(pid: int) -> list[int]:
    """Live guardian processes whose parent is `pid` (from /proc: ps cuts long argvs)."""
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            stat = Path(f"/proc/{entry}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(stat[1]) == pid and stat[0] != "Z" and b"guardian.py" in cmdline:
            found.append(int(entry))
    return found


def test_a_killed_guardian_is_replaced_and_told_every_live_group(tmp_path: Path) -> None:
    """Someone SIGKILLs the guardian: the next sandbox starts a new one, which learns the groups
    the old one watched, so a worker dying afterwards still takes both sandboxes with it."""
    pgids_file = tmp_path / "pgids"
    worker = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import os, signal, time
        from dispatcher.session.sandbox import GUARDIAN, Sandbox, SandboxSpec
        spec = SandboxSpec(argv=["sleep", "60"], env={{"PATH": os.environ["PATH"]}}, stdin=b"")
        first = Sandbox.start(spec)
        os.kill(GUARDIAN.pid, signal.SIGKILL)
        # Dead (a zombie until the next start polls it), not merely signalled: a guardian
        # still alive takes the second group's line into its pipe and then dies with it.
        while open(f"/proc/{{GUARDIAN.pid}}/stat").read().rsplit(")", 1)[1].split()[0] != "Z":
            time.sleep(0.01)
        second = Sandbox.start(spec)
        open({str(pgids_file)!r}, "w").write(f"{{first.pgid}} {{second.pgid}}")
        time.sleep(60)
    """)])
    deadline = time.time() + 10
    while not pgids_file.exists() or not pgids_file.read_text():
        assert time.time() < deadline
        time.sleep(0.05)
    pgids = [int(p) for p in pgids_file.read_text().split()]
    assert len(_guardians_of(worker.pid)) == 1, "one guardian, the new one"
    worker.kill()
    worker.wait()
    while any(map(_pids_in_group, pgids)) and time.time() < deadline:
        time.sleep(0.05)
    assert [_pids_in_group(p) for p in pgids] == [[], []]


def _wait_for_lines(path: Path, count: int, deadline: float) -> list[str]:
    """The first `count` whole lines of `path`, once written; fails at `deadline`."""
    while True:
        text = path.read_text() if path.exists() else ""
        lines = text.splitlines()[:text.count("\n")]
        if len(lines) >= count:
            return lines[:count]
        assert time.time() < deadline, f"{path.name}: {len(lines)} of {count} lines"
        time.sleep(0.05)


def _lines_from(worker: subprocess.Popen[bytes], path: Path, count: int,
                deadline: float) -> list[str]:
    """`_wait_for_lines` of a stand-in worker (started in a session of its own), which is
    SIGKILLed with its children if they never come."""
    try:
        return _wait_for_lines(path, count, deadline)
    except AssertionError:
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()
        raise


def test_a_forked_child_shares_its_parents_guardian_which_sees_each_death_apart(
        tmp_path: Path) -> None:
    """A prefork pool: the main process starts the guardian before forking; a child's sandboxes
    go to the same guardian on a connection of the child's own. The parent dying ends the
    parent's sandbox while the child's runs on; the child dying then ends its own, and the
    guardian, with nobody left to watch, exits."""
    out = tmp_path / "pids"
    worker = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import os, time
        from dispatcher.session.sandbox import GUARDIAN, Sandbox, SandboxSpec
        spec = SandboxSpec(argv=["sleep", "60"], env={{"PATH": os.environ["PATH"]}}, stdin=b"")
        GUARDIAN.start()
        parents = Sandbox.start(spec)
        if os.fork() == 0:
            try:
                childs = Sandbox.start(spec)
                open({str(out)!r}, "w").write(
                    f"{{parents.pgid}} {{childs.pgid}} {{os.getpid()}} {{GUARDIAN.pid}}\\n")
                time.sleep(60)
            finally:
                os._exit(0)
        time.sleep(60)
    """)], start_new_session=True)
    deadline = time.time() + 30  # every step below, on a loaded host
    (line,) = _lines_from(worker, out, 1, deadline)
    parents, childs, child, childs_guardian = line.split()
    guardians = _guardians_of(worker.pid)
    assert len(guardians) == 1 and childs_guardian == "None", "the child started none"
    assert _guardians_of(int(child)) == []
    worker.kill()
    worker.wait()
    while _pids_in_group(int(parents)) and time.time() < deadline:
        time.sleep(0.05)
    assert _pids_in_group(int(parents)) == [], "the guardian ended the parent's sandbox"
    assert _pids_in_group(int(childs)) != [], "the child lives, and so does its sandbox"
    assert _state(guardians[0]) not in (None, "Z"), "the guardian watches the child still"
    os.kill(int(child), signal.SIGKILL)
    while _pids_in_group(int(childs)) and time.time() < deadline:
        time.sleep(0.05)
    assert _pids_in_group(int(childs)) == []
    while _state(guardians[0]) not in (None, "Z") and time.time() < deadline:
        time.sleep(0.05)
    assert _state(guardians[0]) in (None, "Z"), "nobody left to watch: the guardian exited"


def test_children_dying_together_are_all_ended_within_one_grace(tmp_path: Path) -> None:
    """Four pool children, each running a sandbox that ignores SIGTERM, are SIGKILLed at once:
    one guardian ends the four groups side by side, each after one grace, not one after the
    other (four graces would outlast recovery's 8 s and let two runners of a session meet)."""
    script = tmp_path / "stubborn.sh"
    script.write_text("#!/bin/sh\ntrap '' TERM\nsleep 60 &\nwait $!\nwait $!\n")
    script.chmod(0o755)
    out = tmp_path / "groups"
    children = 4
    worker = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import os, time
        from dispatcher.session.sandbox import GUARDIAN, Sandbox, SandboxSpec
        spec = SandboxSpec(argv=[{str(script)!r}], env={{"PATH": os.environ["PATH"]}},
                           stdin=b"")
        GUARDIAN.start()
        for _ in range({children}):
            if os.fork() == 0:
                try:
                    s = Sandbox.start(spec)
                    with open({str(out)!r}, "a") as f:
                        f.write(f"{{s.pgid}} {{os.getpid()}}\\n")
                    time.sleep(60)
                finally:
                    os._exit(0)
        time.sleep(60)
    """)], start_new_session=True)
    deadline = time.time() + 15
    lines = [line.split() for line in _lines_from(worker, out, children, deadline)]
    groups = [int(pgid) for pgid, _ in lines]
    while any(len(_pids_in_group(g)) < 2 for g in groups) and time.time() < deadline:
        time.sleep(0.05)
    assert len(_guardians_of(worker.pid)) == 1
    assert all(_guardians_of(int(pid)) == [] for _, pid in lines), "no child started its own"
    killed_at = time.monotonic()
    for _, pid in lines:
        os.kill(int(pid), signal.SIGKILL)
    while any(map(_pids_in_group, groups)) and time.monotonic() - killed_at < 20:
        time.sleep(0.05)
    took = time.monotonic() - killed_at
    worker.kill()
    worker.wait()
    assert [_pids_in_group(g) for g in groups] == [[]] * children
    assert PARENT_DEATH_GRACE_SECONDS - 0.5 < took < 2 * PARENT_DEATH_GRACE_SECONDS, (
        f"ended after {took:.1f} s: SIGTERM ignored, so one grace, side by side")


def _connect_as(uid: int, address: bytes, line: bytes) -> str:
    """From a forked child running as `uid`: connect, send `line`, and what came back."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.setuid(uid)
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            conn.settimeout(5)
            conn.connect(address)
            try:
                conn.sendall(line)
                answer = repr(conn.recv(1))
            except OSError as exc:
                answer = type(exc).__name__
            os.write(write_end, answer.encode())
        finally:
            os._exit(0)
    os.close(write_end)
    os.waitpid(pid, 0)
    with os.fdopen(read_end, "rb") as f:
        return f.read().decode()


@pytest.mark.skipif(os.geteuid() != 0, reason="connecting as another user needs root")
def test_another_users_connection_is_not_heard(tmp_path: Path) -> None:
    """Anyone on the host can reach the guardian's abstract address, but only the worker's own
    user may name groups to end: another user's connection gets no answer, and its end ends
    nothing."""
    bystander = subprocess.Popen(["sleep", "60"], start_new_session=True)
    out = tmp_path / "address"
    worker = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from dispatcher.session.sandbox import GUARDIAN
        GUARDIAN.start()
        open({str(out)!r}, "w").write(GUARDIAN._address.hex() + "\\n")
        time.sleep(60)
    """)])
    try:
        (address,) = _wait_for_lines(out, 1, time.time() + 10)
        heard = _connect_as(65534, bytes.fromhex(address), b"+%d\n" % bystander.pid)
        assert heard in ("b''", "ConnectionResetError", "BrokenPipeError"), heard
        time.sleep(PARENT_DEATH_GRACE_SECONDS + 0.5)
        assert bystander.poll() is None, "the intruder's end ended nothing"
    finally:
        worker.kill()
        worker.wait()
        bystander.kill()
        bystander.wait()


def test_a_worker_that_exits_normally_leaves_no_guardian(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent("""
        import os
        from dispatcher.session.sandbox import GUARDIAN, Sandbox, SandboxSpec
        s = Sandbox.start(SandboxSpec(argv=["true"], env={"PATH": os.environ["PATH"]},
                                      stdin=b""))
        s.wait(10); s.kill_group()
        print(GUARDIAN.pid)
    """)], capture_output=True, text=True, timeout=20)
    guardian = int(done.stdout)
    deadline = time.time() + 5
    while _state(guardian) not in (None, "Z") and time.time() < deadline:
        time.sleep(0.05)
    assert _state(guardian) in (None, "Z"), "end-of-file: the guardian exited"


def test_a_missing_command_is_a_failed_start_naming_it(tmp_path: Path) -> None:
    with pytest.raises(SandboxStartError, match="not found: '/nonexistent/run-me'"):
        Sandbox.start(SandboxSpec(argv=["/nonexistent/run-me"], env={}, stdin=b""))


def test_a_sandbox_that_cannot_be_guarded_never_runs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No guardian can start (here: no interpreter to start it with; in life, fork failing):
    the sandbox, already spawned, is killed and reaped, and the attempt fails to start."""
    from dispatcher.session import sandbox as module
    from dispatcher.session.guardian_link import Guardian

    marker = tmp_path / "ran"
    script = _spec(f"import time; time.sleep(0.5); open({str(marker)!r}, 'w')", tmp_path)
    monkeypatch.setattr(module, "GUARDIAN", Guardian())
    monkeypatch.setattr(sys, "executable", "/nonexistent/python")
    with pytest.raises(SandboxStartError, match="no guardian for the sandbox"):
        Sandbox.start(script)
    time.sleep(1.0)
    assert not marker.exists(), "killed before it could do anything"
