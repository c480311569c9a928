"""Start one session's sandbox in its own process group, and signal or reap that group.

The contract is the official CLI's `--on-work`: the command (split like a shell would, never run
through one) gets `ANTHROPIC_SESSION_ID`, `ANTHROPIC_WORK_ID`, `ANTHROPIC_ENVIRONMENT_ID`,
`ANTHROPIC_ENVIRONMENT_KEY` (and `ANTHROPIC_BASE_URL` when configured) in its environment and
the work item JSON, secret included, on stdin. Unlike the CLI, which passes its whole
environment on, a sandbox gets only an explicit allow-list of the worker's variables: the
worker holds broker URLs and may hold the organisation key, which a sandbox must never see.

The allow-list is not a boundary between a sandbox and its worker when both run as the same
user: the sandbox can read `/proc/<worker pid>/environ`. Run sandboxes as another user (from the
on-work script) or in containers (`DISPATCHER_SANDBOX_RUNTIME=docker`).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import select
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from dispatcher.session.launcher import encode_request

__all__ = [
    "CommandError",
    "EngineError",
    "Sandbox",
    "SandboxSpec",
    "SandboxStartError",
    "build_environment",
    "resolve_command",
]

LAUNCHER = Path(__file__).with_name("launcher.py")
# Never handed to a sandbox, even when an operator allow-lists it by mistake: the organisation
# key, and the Redis URL, whose holder reads every work item's secret from the registry.
NEVER_PASSED = frozenset({"ANTHROPIC_API_KEY", "DISPATCHER_REDIS_URL"})
# How long after a command got its stdin the next spare launcher is started. A sandbox's own
# start (an interpreter's, typically) takes tens of ms; on two busy cores a launcher started at
# once beside it cost it about 8 ms at p50 (the start path's breakdown). A session that arrives
# in the same worker process meanwhile starts its own launcher, as without a spare.
SPARE_REFILL_DELAY_SECONDS = 0.1
# An unused launcher exits at once on end-of-file; reaping it never holds an exit longer.
SPARE_EXIT_SECONDS = 2.0
# Without pidfds, how often `wait` looks whether the launcher exited.
PEEK_INTERVAL_SECONDS = 0.02


class CommandError(Exception):
    """The on-work command is missing, empty or not executable."""


class EngineError(Exception):
    """The container engine cannot be used: unreachable, refused, or without the image."""


class SandboxStartError(Exception):
    """The sandbox could not be started (the engine refused the container, say): a failed
    attempt, with the reason in the message."""


def resolve_command(on_work: str | None) -> list[str]:
    """Split the command like a shell and check that its program can be run."""
    if not on_work:
        raise CommandError("DISPATCHER_ON_WORK is not set: the command to run per session")
    try:
        argv = shlex.split(on_work)
    except ValueError as exc:
        raise CommandError(f"DISPATCHER_ON_WORK cannot be split: {exc}") from None
    if not argv:
        raise CommandError("DISPATCHER_ON_WORK is empty")
    program = shutil.which(argv[0])
    if program is None:
        raise CommandError(f"on-work command not found or not executable: {argv[0]!r}")
    return [program, *argv[1:]]


def build_environment(
    *,
    worker_env: Mapping[str, str],
    allow: list[str],
    contract: Mapping[str, str | None],
) -> dict[str, str]:
    """The allow-listed worker variables plus the CLI's contract variables (None: left out)."""
    env = {name: worker_env[name] for name in allow if name in worker_env}
    env.update({name: value for name, value in contract.items() if value is not None})
    for name in NEVER_PASSED:
        env.pop(name, None)
    return env


@dataclass(frozen=True)
class SandboxSpec:
    argv: list[str]
    env: dict[str, str]
    stdin: bytes
    work_id: str = ""
    session_id: str = ""
    attempt: int = 1
    # The work secret to hand over as a 0600 file (runner and handoff modes); None: no file.
    secret_file: str | None = None
    # The environment the session belongs to (container labels; its key is in `env`).
    environment_id: str = ""


class Sandbox:
    """A running sandbox: the launcher leads its process group, the command runs inside it.

    The launcher is never reaped before its group was signalled: a reaped leader's pid (the
    group id) may be taken by another session's launcher, which a late `killpg` would hit.
    `wait` therefore only peeks at the exit (`waitid` with WNOWAIT): the zombie keeps the pid
    reserved until `kill_group` has signalled the group, and only then is it reaped.
    """

    def __init__(self, process: subprocess.Popen[bytes], secret_dir: str | None = None) -> None:
        self._process = process
        self.pgid = process.pid  # start_new_session makes the launcher the group leader
        self.started_at = time.time()
        self._secret_dir = secret_dir
        self._exit_code: int | None = None
        self._reaped = False
        self._pidfd = _pidfd(process.pid)

    @classmethod
    def start(cls, spec: SandboxSpec) -> Sandbox:
        env, secret_dir = dict(spec.env), None
        if spec.secret_file is not None:
            secret_dir, env["ANTHROPIC_WORK_SECRET_FILE"] = _write_secret(spec.secret_file)
        try:
            process = SPARES.take()
        except BaseException:
            _remove_secret(secret_dir)
            raise
        sandbox = cls(process, secret_dir)
        rest = sandbox._write_now(encode_request(spec.argv, env) + spec.stdin)
        # What the pipe did not take goes from a thread: a command that never reads its stdin
        # must not block the supervisor. Usually all of it fits and stdin is closed here: no
        # thread, waiting for the GIL behind this one, stands between the command and the end
        # of its input.
        if not rest:
            sandbox._close_stdin()
        threading.Thread(target=sandbox._feed, args=(rest,), daemon=True).start()
        return sandbox

    def _write_now(self, data: bytes) -> bytes:
        """Write what the pipe takes without blocking; returns the rest."""
        stdin = self._process.stdin
        assert stdin is not None
        fd = stdin.fileno()
        os.set_blocking(fd, False)
        try:
            written = os.write(fd, data)
        except BlockingIOError:
            written = 0
        except OSError:  # the launcher is gone: its exit status tells the supervisor
            written = len(data)
        finally:
            os.set_blocking(fd, True)
        return data[written:]

    def _close_stdin(self) -> None:
        with contextlib.suppress(OSError):
            self._process.stdin.close()  # type: ignore[union-attr]  # always a pipe

    def _feed(self, data: bytes) -> None:
        stdin = self._process.stdin
        assert stdin is not None
        if data:
            try:
                stdin.write(data)
            except (BrokenPipeError, OSError):
                pass  # the command exited or closed stdin without reading: its choice
            finally:
                self._close_stdin()
        # Off the session's path, and a moment later: the next launcher's start is an
        # interpreter's, whose CPU this sandbox's own start would otherwise share.
        time.sleep(SPARE_REFILL_DELAY_SECONDS)
        SPARES.refill()

    @property
    def pid(self) -> int:
        return self._process.pid

    def describe(self) -> dict[str, str | int]:
        return {"pid": self.pid}

    def wait(self, timeout: float) -> int | None:
        """The launcher's exit code, or None if it still runs after `timeout` seconds. The
        launcher is left unreaped (see the class)."""
        if self._exit_code is not None or self._reaped:
            return self._exit_code
        if self._pidfd is not None:
            ready, _, _ = select.select([self._pidfd], [], [], timeout)
            if ready:
                self._exit_code = self._peek()
            return self._exit_code
        deadline = time.monotonic() + timeout
        while (code := self._peek()) is None and time.monotonic() < deadline:
            time.sleep(PEEK_INTERVAL_SECONDS)
        self._exit_code = code
        return code

    def _peek(self) -> int | None:
        info = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        if info is None or info.si_pid == 0:
            return None
        if info.si_code == os.CLD_EXITED:
            return info.si_status
        return -info.si_status  # killed by a signal, as Popen reports it

    def signal_group(self, signum: int) -> None:
        if self._reaped:
            return  # the group id may belong to someone else now
        # ProcessLookupError: the whole group is already gone.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pgid, signum)

    def kill_group(self) -> None:
        """SIGKILL everything left in the group (also forked children that outlived the command),
        then reap the launcher and delete the secret file."""
        self.signal_group(signal.SIGKILL)
        if not self._reaped:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._process.wait(timeout=5)
                self._reaped = True
        if self._reaped and self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None
        _remove_secret(self._secret_dir)
        self._secret_dir = None

    def group_alive(self) -> bool:
        try:
            os.killpg(self.pgid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


class Spares:
    """A launcher started ahead, waiting for the next session of this process (one at most).

    A launcher is an interpreter, and an interpreter's start (about 10 ms on an idle host,
    several times that on a loaded one) was the largest step between a session's message and
    its command's exec. Starting the next launcher right after one is used takes it off the
    path; a session that finds none (two starting at once, the first of a process) starts one
    itself, as every session did before.

    Only with pidfds (Linux 5.3+): without them the launcher watches its parent through a
    parent-death signal, which the kernel ties to the thread that forked it, and the thread that
    refills (a sandbox's stdin feeder) ends long before the session. A spare belongs to the
    process that started it: a forked child (a prefork pool's) starts its own.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._spare: subprocess.Popen[bytes] | None = None
        self._owner = 0
        self.enabled = _pidfds_work()

    def take(self) -> subprocess.Popen[bytes]:
        """A waiting launcher: the spare if it is ours and alive, else a new one."""
        with self._lock:
            spare, self._spare = self._spare, None
            ours = self._owner == os.getpid()
        if spare is not None and ours:
            if spare.poll() is None:
                return spare
            _discard(spare)  # killed from outside while it waited
        return _start_launcher()

    def refill(self) -> None:
        if not self.enabled:
            return
        with self._lock:
            if self._spare is not None and self._owner == os.getpid():
                return
        spare = _start_launcher()
        with self._lock:
            if self._spare is None or self._owner != os.getpid():
                self._spare, self._owner = spare, os.getpid()
                return
        _discard(spare)  # another thread refilled first

    def close(self) -> None:
        """End this process's spare (it reads end-of-file and exits), at the process's exit."""
        with self._lock:
            spare, self._spare = self._spare, None
            ours = self._owner == os.getpid()
        if spare is not None and ours:
            _discard(spare)


def _discard(launcher: subprocess.Popen[bytes]) -> None:
    """An unused launcher: end-of-file on its stdin makes it exit; reap it."""
    with contextlib.suppress(OSError):
        launcher.stdin.close()  # type: ignore[union-attr]  # always a pipe
    with contextlib.suppress(subprocess.TimeoutExpired):
        launcher.wait(timeout=SPARE_EXIT_SECONDS)


def _start_launcher() -> subprocess.Popen[bytes]:
    """A launcher leading a new process group, waiting for its command on stdin. Its own
    environment is empty: the command's comes with the request. The launcher is told our pid
    so it can tell a parent that died before it was watching."""
    argv = [sys.executable, "-S", str(LAUNCHER), str(os.getpid())]
    return subprocess.Popen(argv, stdin=subprocess.PIPE, env={}, start_new_session=True,
                            close_fds=True)


def _pidfds_work() -> bool:
    fd = _pidfd(os.getpid())
    if fd is None:
        return False
    os.close(fd)
    return True


def _pidfd(pid: int) -> int | None:
    """A descriptor that becomes readable when `pid` exits (Linux 5.3+); None elsewhere."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def _write_secret(secret: str) -> tuple[str, str]:
    """A 0600 file holding the secret, in a 0700 directory of its own; (directory, path)."""
    directory = tempfile.mkdtemp(prefix="dispatcher-secret-")
    path = os.path.join(directory, "work-secret")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret)
    return directory, path


def _remove_secret(directory: str | None) -> None:
    if directory is not None:
        shutil.rmtree(directory, ignore_errors=True)


SPARES = Spares()
atexit.register(SPARES.close)
