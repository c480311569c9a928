"""The sandbox's watchdog: `python -S launcher.py PARENT_PID COMMAND [ARGS...]`.

Started by a session task as the leader of a new process group, it runs the on-work command in
that same group and waits for it. It exists for one case Celery cannot cover: a worker killed
with SIGKILL. Celery's pool children die with their parent, but a subprocess of a task is
orphaned and runs on (celery#1106). The launcher watches its parent through a pidfd (Linux
5.3+; on older kernels it asks for a signal instead, PR_SET_PDEATHSIG) and when the parent dies
ends the whole group, grandchildren included: SIGTERM first, so a spawn script's trap can
clean up (stop its container, say), then SIGKILL after a short grace. The pidfd costs nothing
to set up, where ctypes, needed for prctl, takes about 10 ms to import: most of the launcher's
start-up.

It ignores SIGTERM and SIGINT through handlers (not SIG_IGN, which the command would inherit
across exec), because the supervisor signals the whole group: the command decides how to stop;
the launcher stays to report its exit status. Standard library only, and run with -S, so it
adds a few milliseconds to a session's start, not a full interpreter start-up.
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


def _spawn(argv: list[str]) -> int:
    try:
        return os.posix_spawnp(argv[0], argv, os.environ)
    except FileNotFoundError:
        sys.stderr.write(f"dispatcher launcher: on-work command not found: {argv[0]!r}\n")
        sys.exit(EXIT_COMMAND_NOT_FOUND)
    except PermissionError:
        sys.stderr.write(f"dispatcher launcher: on-work command not executable: {argv[0]!r}\n")
        sys.exit(EXIT_COMMAND_NOT_EXECUTABLE)


def main() -> None:
    parent_pid, argv = int(sys.argv[1]), sys.argv[2:]
    parent_fd = _parent_pidfd(parent_pid)
    signal.signal(signal.SIGTERM, _ignore)
    signal.signal(signal.SIGINT, _ignore)
    pid = _spawn(argv)
    if parent_fd is not None:
        os.set_inheritable(parent_fd, False)
    code = _wait(pid, parent_fd)
    sys.exit(128 - code if code < 0 else code)


if __name__ == "__main__":
    main()
