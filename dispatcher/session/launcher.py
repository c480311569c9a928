"""The sandbox's watchdog: `python -S launcher.py PARENT_PID [COMMAND [ARGS...]]`.

Started by a session worker as the leader of a new process group, it runs the on-work command in
that same group and waits for it. It exists for one case Celery cannot cover: a worker killed
with SIGKILL. Celery's pool children die with their parent, but a subprocess of a task is
orphaned and runs on (celery#1106). The launcher watches its parent through a pidfd (Linux
5.3+; on older kernels it asks for a signal instead, PR_SET_PDEATHSIG) and when the parent dies
ends the whole group, grandchildren included: SIGTERM first, so a spawn script's trap can
clean up (stop its container, say), then SIGKILL after a short grace. The pidfd costs nothing
to set up, where ctypes, needed for prctl, takes about 10 ms to import: most of the launcher's
start-up.

Without a command on its argv it reads one from stdin first (`request`): a worker starts the
launcher ahead of the session that will use it (`sandbox.Spares`), so a session's start does
not wait for an interpreter's. The request is a header line `ARGC ENVC NBYTES`, then NBYTES of
NUL-separated fields: the command's argv, then its environment as `NAME=VALUE`. The rest of
stdin (the work item) is the command's. Through a pipe, the environment's key is in no argv; a
launcher that reads end-of-file instead (its worker exited before it was used) exits quietly.

It ignores SIGTERM and SIGINT through handlers (not SIG_IGN, which the command would inherit
across exec), because the supervisor signals the whole group: the command decides how to stop;
the launcher stays to report its exit status. Standard library only, and run with -S, so even
a launcher started for the session itself adds a few milliseconds, not a full interpreter
start-up.
"""

# The C module, not `signal`: that one imports enum, a quarter of the launcher's start-up.
import _signal as signal  # type: ignore[import-not-found]  # no stub; same API as `signal`
import os
import select
import sys
import time

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
# Without pidfds: the signal the kernel sends us when the worker thread that started us dies.
PARENT_DEATH_SIGNAL = signal.SIGUSR2
EXIT_COMMAND_NOT_FOUND = 127
EXIT_COMMAND_NOT_EXECUTABLE = 126
# Between SIGTERM and SIGKILL when the worker died. Recovery starts the session's next attempt
# after 5 s without pulses; the old sandbox must be gone well before that, so two runners of one
# session never overlap. A trap that needs longer is cut short.
PARENT_DEATH_GRACE_SECONDS = 2.0
GRACE_POLL_SECONDS = 0.05


def _kill_group(signum: int, frame: object) -> None:
    os.killpg(os.getpgrp(), signal.SIGKILL)


def _end_group(signum: int, frame: object) -> None:
    """The worker died: SIGTERM the group, give the command a short grace, then SIGKILL."""
    group = os.getpgrp()
    os.killpg(group, signal.SIGTERM)  # our own handler ignores it
    deadline = time.monotonic() + PARENT_DEATH_GRACE_SECONDS
    while time.monotonic() < deadline:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break  # the command (our only child) exited and was reaped
        if pid:
            break
        time.sleep(GRACE_POLL_SECONDS)
    os.killpg(group, signal.SIGKILL)


def _ignore(signum: int, frame: object) -> None:
    """The command in our group gets this signal too; it is the one that must act on it."""


def _parent_pidfd(parent_pid: int) -> int | None:
    """A pidfd that becomes readable when the parent exits; None where pidfds do not exist."""
    try:
        fd = os.pidfd_open(parent_pid)
    except (AttributeError, OSError):
        _watch_parent_by_signal()
        fd = None
    if os.getppid() != parent_pid:  # the parent died before we were watching
        _kill_group(PARENT_DEATH_SIGNAL, None)  # nothing was started yet: no grace needed
    return fd


def _watch_parent_by_signal() -> None:
    import ctypes  # only here: its import is most of a launcher's start-up time

    signal.signal(PARENT_DEATH_SIGNAL, _end_group)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, int(PARENT_DEATH_SIGNAL), 0, 0, 0)


def _wait(pid: int, parent_fd: int | None) -> int:
    """Wait for the command to exit; kill the group if the parent dies first."""
    if parent_fd is not None:
        watch = select.poll()
        watch.register(parent_fd, select.POLLIN)
        watch.register(os.pidfd_open(pid), select.POLLIN)
        while True:
            ready = {fd for fd, _ in watch.poll()}
            if parent_fd in ready:
                _end_group(PARENT_DEATH_SIGNAL, None)
            if ready - {parent_fd}:
                break
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _spawn(argv: list[str], env: dict[str, str]) -> int:
    try:
        return os.posix_spawnp(argv[0], argv, env)
    except FileNotFoundError:
        sys.stderr.write(f"dispatcher launcher: on-work command not found: {argv[0]!r}\n")
        sys.exit(EXIT_COMMAND_NOT_FOUND)
    except PermissionError:
        sys.stderr.write(f"dispatcher launcher: on-work command not executable: {argv[0]!r}\n")
        sys.exit(EXIT_COMMAND_NOT_EXECUTABLE)


def _read_exactly(count: int) -> bytes | None:
    """`count` bytes of stdin and not one more (the rest is the command's); None at its end."""
    data = b""
    while len(data) < count:
        chunk = os.read(0, count - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def request() -> tuple[list[str], dict[str, str]] | None:
    """The command and its environment, read from stdin; None if the worker never sent one."""
    header = b""
    while not header.endswith(b"\n"):
        byte = os.read(0, 1)  # byte by byte: the header must not swallow the command's stdin
        if not byte:
            return None
        header += byte
    argc, envc, size = (int(part) for part in header.split())
    payload = _read_exactly(size) if size else b""
    if payload is None:
        return None
    fields = [f.decode("utf-8", "surrogateescape") for f in payload.split(b"\0")] if size else []
    if len(fields) != argc + envc:
        sys.exit(f"dispatcher launcher: a request of {len(fields)} fields, not {argc + envc}")
    env = dict(item.partition("=")[::2] for item in fields[argc:])
    return fields[:argc], env


def encode_request(argv: list[str], env: dict[str, str]) -> bytes:
    """What a worker writes to a waiting launcher's stdin before the command's own stdin."""
    fields = [*argv, *(f"{name}={value}" for name, value in env.items())]
    payload = b"\0".join(f.encode("utf-8", "surrogateescape") for f in fields)
    return b"%d %d %d\n" % (len(argv), len(env), len(payload)) + payload


def main() -> None:
    parent_pid, argv = int(sys.argv[1]), sys.argv[2:]
    parent_fd = _parent_pidfd(parent_pid)
    signal.signal(signal.SIGTERM, _ignore)
    signal.signal(signal.SIGINT, _ignore)
    env: dict[str, str] = dict(os.environ)
    if not argv:
        asked = request()
        if asked is None:
            sys.exit(0)  # never used: its worker exited or gave it up
        argv, env = asked
    pid = _spawn(argv, env)
    if parent_fd is not None:
        os.set_inheritable(parent_fd, False)
    code = _wait(pid, parent_fd)
    sys.exit(128 - code if code < 0 else code)


if __name__ == "__main__":
    main()
