"""The sandbox's watchdog: `python -S launcher.py PARENT_PID COMMAND [ARGS...]`.

Started by a session task as the leader of a new process group, it runs the on-work command in
that same group and waits for it. It exists for one case Celery cannot cover: a worker killed
with SIGKILL. Celery's pool children die with their parent, but a subprocess of a task is
orphaned and runs on (celery#1106). The launcher asks the kernel for a signal when its parent
dies (PR_SET_PDEATHSIG) and then kills the whole group, grandchildren included.

It ignores SIGTERM and SIGINT through handlers (not SIG_IGN, which the command would inherit
across exec), because the supervisor signals the whole group: the command decides how to stop;
the launcher stays to report its exit status. Standard library only, and run with -S, so it
adds a few milliseconds to a session's start, not a full interpreter start-up.
"""

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
# The signal the kernel sends us when the worker thread that started us dies.
PARENT_DEATH_SIGNAL = signal.SIGUSR2
EXIT_COMMAND_NOT_FOUND = 127
EXIT_COMMAND_NOT_EXECUTABLE = 126


def _kill_group(signum: int, frame: object) -> None:
    os.killpg(os.getpgrp(), signal.SIGKILL)


def _ignore(signum: int, frame: object) -> None:
    """The command in our group gets this signal too; it is the one that must act on it."""


def _watch_parent(parent_pid: int) -> None:
    signal.signal(PARENT_DEATH_SIGNAL, _kill_group)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, int(PARENT_DEATH_SIGNAL), 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        _kill_group(PARENT_DEATH_SIGNAL, None)


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
    _watch_parent(parent_pid)
    signal.signal(signal.SIGTERM, _ignore)
    signal.signal(signal.SIGINT, _ignore)
    pid = _spawn(argv)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    sys.exit(128 - code if code < 0 else code)


if __name__ == "__main__":
    main()
