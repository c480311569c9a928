"""Start one session's sandbox in its own process group, and signal or reap that group.

The contract is the official CLI's `--on-work`: the command (split like a shell would, never run
through one) gets `ANTHROPIC_SESSION_ID`, `ANTHROPIC_WORK_ID`, `ANTHROPIC_ENVIRONMENT_ID`,
`ANTHROPIC_ENVIRONMENT_KEY` (and `ANTHROPIC_BASE_URL` when configured) in its environment and
the work item JSON, secret included, on stdin. Unlike the CLI, which passes its whole
environment on, a sandbox gets only an explicit allow-list of the worker's variables: the
worker holds broker URLs and may hold the organisation key, which a sandbox must never see.

The allow-list is not a boundary between a sandbox and its worker when both run as the same
user: the sandbox can read `/proc/<worker pid>/environ`. Run sandboxes as another user
(`DISPATCHER_PROCESS_USER`, `confine.py`) or in containers (`DISPATCHER_SANDBOX_RUNTIME=docker`).

The worker spawns the command itself, no process in between: per session, nothing but the
sandbox's own processes. One guardian per worker (`guardian.py`, reached through
`guardian_link.py`) ends the groups of a worker process that died; see there why it is one per
worker and not one per session.
"""

from __future__ import annotations

import contextlib
import os
import select
import shlex
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass

from dispatcher.session.cgroups import CgroupError, SessionCgroup, admit, gate_argv
from dispatcher.session.confine import Confinement, confined_argv, popen_options
from dispatcher.session.guardian_link import GUARDIAN
from dispatcher.session.infra import Blame, spawn_blame
from dispatcher.session.output import LiveOutput, pump

__all__ = [
    "EXIT_UNKNOWN",
    "GUARDIAN",
    "CommandError",
    "EngineError",
    "Sandbox",
    "SandboxInfraError",
    "SandboxSpec",
    "SandboxStartError",
    "build_environment",
    "resolve_command",
]

# Never handed to a sandbox, even when an operator allow-lists it by mistake: the organisation
# key, and the Redis URL, whose holder reads every work item's secret from the registry.
NEVER_PASSED = frozenset({"ANTHROPIC_API_KEY", "DISPATCHER_REDIS_URL"})
UNCONFINED = Confinement()  # the worker's own user and limits
# How long `kill_group` waits to reap the leader after SIGKILL; a process in uninterruptible
# sleep (D state, a hung NFS read) may outlast it, and is reaped at the next call.
REAP_SECONDS = 5.0
# The exit code of a command reaped outside Popen, its status lost: a failure (no command of
# ours is known to exit 255 on purpose; a code of 0 would end the session as completed).
EXIT_UNKNOWN = 255
# How long a peek that found the leader reaped by another thread waits for the code Popen
# keeps: that thread sets it microseconds after its `waitpid`.
REAPED_CODE_WAIT_SECONDS = 0.5
# Without pidfds, how often `wait` looks whether the command exited.
PEEK_INTERVAL_SECONDS = 0.02
# After the group is killed, how long `kill_group` waits for the output pipe's last bytes. A
# process that left the group (setsid) may hold the pipe open for ever: its copier then runs on
# alone, and the file has what came so far.
OUTPUT_DRAIN_SECONDS = 2.0


class CommandError(Exception):
    """The on-work command is missing, empty or not executable."""


class EngineError(Exception):
    """The container engine cannot be used: unreachable, refused, or without the image."""


class SandboxStartError(Exception):
    """The sandbox could not be started (the engine refused the container, say): a failed
    attempt, with the reason in the message."""


class SandboxInfraError(SandboxStartError):
    """The sandbox could not be started for the infrastructure's reasons, not the session's
    (`infra.py`): an engine down, too slow, failing, without the image; a host out of
    processes, memory or descriptors. The attempt is started again, not counted."""


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
    """A running sandbox: the command leads its own process group, spawned by the worker.

    The leader is never reaped before its group was signalled: a reaped leader's pid (the group
    id) may be taken by another session's command, which a late `killpg` would hit. `wait`
    therefore only peeks at the exit (`waitid` with WNOWAIT): the zombie keeps the pid reserved
    until `kill_group` has signalled the group, and only then is it reaped. The worker's
    guardian (`guardian.py`) knows the group from the spawn until just before that reaping.
    """

    def __init__(self, process: subprocess.Popen[bytes], secret_dir: str | None = None,
                 output: threading.Thread | None = None,
                 cgroup: SessionCgroup | None = None) -> None:
        self._process = process
        self._output = output
        self._cgroup = cgroup
        self.pgid = process.pid  # start_new_session makes the command the group leader
        self.started_at = time.time()
        self._secret_dir = secret_dir
        self._exit_code: int | None = None
        self._reaped = False
        self._pidfd = _pidfd(process.pid)
        self._watched = True  # by this process's guardian, from `start` until reaped

    @classmethod
    def start(cls, spec: SandboxSpec, confinement: Confinement = UNCONFINED,
              output: LiveOutput | None = None, cgroup: SessionCgroup | None = None) -> Sandbox:
        """`output`: the attempt's output file, fed from the command's stdout and stderr (one
        pipe, so the file has them in the order written); None: the worker's own. `cgroup`:
        the sandbox's own, entered before the command runs (`cgroups.py`)."""
        env, secret_dir = dict(spec.env), None
        if spec.secret_file is not None:
            secret_dir, env["ANTHROPIC_WORK_SECRET_FILE"] = _write_secret(
                spec.secret_file, owner=confinement)
        read_end, write_end = os.pipe() if output is not None else (None, None)
        argv = confined_argv(spec.argv, confinement)
        try:
            process = _spawn(argv if cgroup is None else gate_argv(argv), env, confinement,
                             output=write_end)
            if cgroup is not None:
                _enter(process, cgroup)
        except BaseException:
            _remove_secret(secret_dir)
            for end in (read_end, write_end):
                if end is not None:
                    os.close(end)
            if output is not None:
                output.close()
            if cgroup is not None:
                cgroup.remove()
            raise
        copier = None
        if output is not None and read_end is not None and write_end is not None:
            os.close(write_end)  # the sandbox holds the only write ends: end-of-file at its end
            copier = pump(read_end, output)
        try:
            GUARDIAN.watch(process.pid)
        except OSError as exc:  # unguarded, it could outlive a dying worker: never run it
            _abandon(process)
            _remove_secret(secret_dir)
            raise SandboxStartError(f"no guardian for the sandbox: {exc}") from None
        sandbox = cls(process, secret_dir, copier, cgroup)
        rest = sandbox._write_now(spec.stdin)
        # What the pipe did not take goes from a thread: a command that never reads its stdin
        # must not block the supervisor. Usually all of it fits and stdin is closed here.
        if rest:
            threading.Thread(target=sandbox._feed, args=(rest,), daemon=True).start()
        else:
            sandbox._close_stdin()
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
        except OSError:  # the command is gone: its exit status tells the supervisor
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
        try:
            stdin.write(data)
        except (BrokenPipeError, OSError):
            pass  # the command exited or closed stdin without reading: its choice
        finally:
            self._close_stdin()

    @property
    def pid(self) -> int:
        return self._process.pid

    def describe(self) -> dict[str, str | int]:
        return {"pid": self.pid}

    def wait(self, timeout: float) -> int | None:
        """The command's exit code, or None if it still runs after `timeout` seconds. The
        leader is left unreaped (see the class)."""
        if self._exit_code is not None or self._reaped:
            return self._exit_code
        pidfd = self._pidfd  # read once: the hub looks while `kill_group` may close it
        if pidfd is not None:
            # poll, not select: a worker of hundreds of sessions holds descriptors past select's
            # 1,024 (each session's pidfd, output pipe, connections), and select refuses them.
            waiting = select.poll()
            waiting.register(pidfd, select.POLLIN)
            if waiting.poll(max(0, int(timeout * 1000))):
                self._exit_code = self._peek()
            return self._exit_code
        deadline = time.monotonic() + timeout
        while (code := self._peek()) is None and time.monotonic() < deadline:
            time.sleep(PEEK_INTERVAL_SECONDS)
        self._exit_code = code
        return code

    def _peek(self) -> int | None:
        try:
            info = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return self._reaped_elsewhere()
        if info is None or info.si_pid == 0:
            return None
        if info.si_code == os.CLD_EXITED:
            return info.si_status
        return -info.si_status  # killed by a signal, as Popen reports it

    def _reaped_elsewhere(self) -> int:
        """The leader was reaped by another thread while this one peeked: `kill_group` from
        the fence, or a `Popen.wait`. Popen keeps the code it reaped; if the reaper is still
        between its `waitpid` and setting it, the code comes a moment later. A code no one kept
        (a `waitpid` outside Popen) is `EXIT_UNKNOWN`: a failure, never a success. Not
        `Popen.poll`: on ECHILD it reports 0, a success."""
        deadline = time.monotonic() + REAPED_CODE_WAIT_SECONDS
        while self._process.returncode is None and time.monotonic() < deadline:
            time.sleep(PEEK_INTERVAL_SECONDS)
        code = self._process.returncode
        return EXIT_UNKNOWN if code is None else code

    def signal_group(self, signum: int) -> None:
        if self._reaped:
            return  # the group id may belong to someone else now
        # ProcessLookupError: the whole group is already gone.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pgid, signum)

    def kill_group(self) -> None:
        """SIGKILL everything left in the group (also forked children that outlived the command),
        then reap the leader and delete the secret file."""
        self.signal_group(signal.SIGKILL)
        if self._cgroup is not None:
            self._cgroup.kill()  # also what left the group (setsid, a daemonised child)
        if not self._reaped:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._process.wait(timeout=REAP_SECONDS)
                self._reaped = True
        if self._reaped:
            if self._watched:  # once: the group id may be another sandbox's by a second call
                GUARDIAN.forget(self.pgid)
                self._watched = False
            if self._pidfd is not None:
                os.close(self._pidfd)
                self._pidfd = None
        _remove_secret(self._secret_dir)
        self._secret_dir = None
        if self._output is not None:
            self._output.join(timeout=OUTPUT_DRAIN_SECONDS)
            self._output = None
        if self._reaped and self._cgroup is not None and self._cgroup.remove():
            self._cgroup = None

    def group_alive(self) -> bool:
        try:
            os.killpg(self.pgid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def _abandon(process: subprocess.Popen[bytes]) -> None:
    """A sandbox that must not run: its group killed, its leader reaped."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    if process.stdin is not None:
        process.stdin.close()


def _enter(process: subprocess.Popen[bytes], cgroup: SessionCgroup) -> None:
    """The gated process into its cgroup; a sandbox that cannot enter it never runs."""
    try:
        admit(process.pid, cgroup)
    except (OSError, CgroupError) as exc:
        _abandon(process)
        raise SandboxStartError(f"the sandbox could not enter its cgroup {cgroup.path}: "
                                f"{exc}") from None


def _spawn(argv: list[str], env: dict[str, str], confinement: Confinement, *,
           output: int | None = None) -> subprocess.Popen[bytes]:
    """The command as the leader of a new session (and so of a new process group), under the
    sandbox's user if any; its stdout and stderr to `output` (a descriptor) if given.

    A session, not only a group: on a kernel with scheduler autogroups (most distributions'
    default) a new session is also a scheduling group of its own, so a sandbox's start does not
    share its worker's CPU share with the worker and every other sandbox of it. A group alone
    (`process_group=0`) spawned faster on a busy host but started the sandbox's program later:
    the fake session's own start took 70 ms against 53 in back-to-back runs of the benchmark's
    idle dispatch."""
    try:
        process: subprocess.Popen[bytes] = subprocess.Popen(  # type: ignore[call-overload]
            argv, stdin=subprocess.PIPE, stdout=output, stderr=output, env=env,
            start_new_session=True, close_fds=True, **popen_options(confinement))
        return process
    except FileNotFoundError:
        raise SandboxStartError(f"on-work command not found: {argv[0]!r}") from None
    except PermissionError:
        raise SandboxStartError(f"on-work command not executable: {argv[0]!r}") from None
    except OSError as exc:
        if spawn_blame(exc.errno) == Blame.INFRASTRUCTURE:
            raise SandboxInfraError(f"the host could not start the sandbox: {exc}") from None
        raise SandboxStartError(f"on-work command could not start: {exc}") from None


def _pidfd(pid: int) -> int | None:
    """A descriptor that becomes readable when `pid` exits (Linux 5.3+); None elsewhere."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def _write_secret(secret: str, *, owner: Confinement) -> tuple[str, str]:
    """A 0600 file holding the secret, in a 0700 directory of its own; (directory, path). Both
    belong to the sandbox's user when it has one of its own: only it can read them."""
    directory = tempfile.mkdtemp(prefix="dispatcher-secret-")
    path = os.path.join(directory, "work-secret")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret)
    if owner.uid is not None:
        for item in (path, directory):
            os.chown(item, owner.uid, owner.gid if owner.gid is not None else -1)
    return directory, path


def _remove_secret(directory: str | None) -> None:
    if directory is not None:
        shutil.rmtree(directory, ignore_errors=True)


