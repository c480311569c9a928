"""The process runtime's watchdog: `python -S guardian.py`, one per session-worker process.

It exists for one case Celery cannot cover: a worker killed with SIGKILL. Celery's pool children
die with their parent, but a subprocess of a task is orphaned and runs on (celery#1106). The
worker starts its sandboxes itself, each leading a new process group, and tells its guardian
on a pipe which groups are alive: `+PGID` when one starts, `-PGID` before the worker reaps its
leader. The worker holds the pipe's only write end, so the guardian reads end-of-file exactly
when the worker is gone, however it died; it then ends every group still listed: SIGTERM first,
so a spawn script's trap can clean up (stop its container, say), then SIGKILL after a short
grace, grandchildren included.

Why one guardian per worker process and not one watchdog per session. A session's watchdog was
a `python -S` launcher leading its group and waiting on the command: 9 MB RSS (3.3 MB PSS) per
session, 9 GB for a thousand. The other ways to keep a per-session process cost a compiler on
every host (a small C program) or still leave the group unguarded (a parent-death signal set
before exec, through `setpriv --pdeathsig` or a `preexec_fn`, reaches the leader only, not its
children, and fires when the *thread* that forked it ends). End-of-file on a pipe needs neither
pidfds nor prctl, works under every pool (a prefork child starts its own guardian), and costs
one interpreter per worker process, shared by all its sessions.

What it does not cover: the moment between a sandbox's spawn returning and its `+PGID` line (a
few lines of the worker's code). A worker SIGKILLed exactly there leaves that one sandbox
running unguarded until it exits by itself; recovery still starts the session's next attempt.
Standard library only, run with -S: no site packages to import, so its start costs a few
milliseconds once per worker process.
"""

# The C module, not `signal`: that one imports enum, a quarter of the interpreter's start-up.
import _signal as signal  # type: ignore[import-not-found]  # no stub; same API as `signal`
import contextlib
import os
import time

# Between SIGTERM and SIGKILL when the worker died. Recovery starts the session's next attempt
# after 5 s without pulses; the old sandbox must be gone well before that, so two runners of one
# session never overlap. A trap that needs longer is cut short.
PARENT_DEATH_GRACE_SECONDS = 2.0
GRACE_POLL_SECONDS = 0.05
READ_BYTES = 4096  # a line is at most 12 bytes; one read takes many


def watched_groups() -> set[int]:
    """Follow the worker's `+PGID` / `-PGID` lines until end-of-file; the groups still alive."""
    groups: set[int] = set()
    pending = b""
    while chunk := os.read(0, READ_BYTES):
        *lines, pending = (pending + chunk).split(b"\n")
        for line in lines:
            apply_line(groups, line)
    return groups


def apply_line(groups: set[int], line: bytes) -> None:
    if line[:1] == b"+":
        groups.add(int(line[1:]))
    elif line[:1] == b"-":
        groups.discard(int(line[1:]))


def end_groups(groups: set[int]) -> None:
    """The worker died: SIGTERM each group, a grace while any leader still runs, SIGKILL."""
    for group in groups:
        _signal_group(group, signal.SIGTERM)
    deadline = time.monotonic() + PARENT_DEATH_GRACE_SECONDS
    while any(map(_leader_running, groups)) and time.monotonic() < deadline:
        time.sleep(GRACE_POLL_SECONDS)
    for group in groups:
        _signal_group(group, signal.SIGKILL)


def _signal_group(group: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # the whole group is gone already
        os.killpg(group, signum)


def _leader_running(group: int) -> bool:
    """The group's leader (pid == group id) still runs: not exited, not a zombie, same group."""
    try:
        with open(f"/proc/{group}/stat", "rb") as f:
            fields = f.read().rpartition(b")")[2].split()
    except OSError:
        return False
    state, pgrp = fields[0], int(fields[2])
    return state not in (b"Z", b"X") and pgrp == group


def main() -> None:
    end_groups(watched_groups())


if __name__ == "__main__":
    main()
