"""The process runtime's watchdog: `python -S guardian.py LISTENER_FD`, one per session worker.

It exists for one case Celery cannot cover: a worker killed with SIGKILL. Celery's pool children
die with their parent, but a subprocess of a task is orphaned and runs on (celery#1106). A
worker process starts its sandboxes itself, each leading a new process group, and tells the
guardian on a connection of its own which groups are alive: `+PGID` when one starts, `-PGID`
before it reaps the leader. Only that process holds its connection, so the guardian reads
end-of-file on it exactly when the process is gone, however it died; it then ends every group
that connection still lists: SIGTERM first, so a spawn script's trap can clean up (stop its
container, say), then SIGKILL after a short grace, grandchildren included.

One guardian serves every process of a worker. The first connection is the starter's (stdin, a
socketpair end); the others reach the listening socket (`LISTENER_FD`, bound to an abstract
address the worker's processes inherit): a prefork pool's children, forked after the main
process started the guardian, each connect once. A process that dies has its own groups ended
while the others' run on, on a deadline of their own, so ten children dying at once are all
ended within one grace. A connection from another user is closed unheard: only the worker's own
user may name groups to end. Each accepted connection is answered one byte, `!`, so a process
that connected while the guardian was exiting knows it was not heard (and starts its own); the
process checks the answer came from its own user too. The guardian exits once no connection is
left and every group it was ending is gone.

Why one guardian per worker and not one watchdog per session. A session's watchdog was a
`python -S` launcher leading its group and waiting on the command: 9 MB RSS (3.3 MB PSS) per
session, 9 GB for a thousand; and one guardian per prefork child still cost a whole interpreter
per slot. The other ways to keep a per-session process cost a compiler on every host (a small C
program) or still leave the group unguarded (a parent-death signal set before exec, through
`setpriv --pdeathsig` or a `preexec_fn`, reaches the leader only, not its children, and fires
when the *thread* that forked it ends). End-of-file on a connection needs neither pidfds nor
prctl, and works under every pool.

What it does not cover: the moment between a sandbox's spawn returning and its `+PGID` line (a
few lines of the worker's code). A worker SIGKILLed exactly there leaves that one sandbox
running unguarded until it exits by itself; recovery still starts the session's next attempt.
Standard library only, C modules where the Python wrapper would import more (`socket` and
`signal` import enum, a quarter of the interpreter's start-up), run with -S: its start costs a
few milliseconds once per worker.
"""

# The C modules, not `socket` and `signal`: those import enum.
import _signal as signal  # type: ignore[import-not-found]  # no stub; same API as `signal`
import _socket  # the C half of `socket`
import contextlib
import os
import select
import sys
import time

# Between SIGTERM and SIGKILL when a worker process died. Recovery starts the session's next
# attempt after 8 s without pulses; the old sandbox must be gone well before that, so two
# runners of one session never overlap. A trap that needs longer is cut short.
PARENT_DEATH_GRACE_SECONDS = 2.0
GRACE_POLL_SECONDS = 0.05
READ_BYTES = 4096  # a line is at most 12 bytes; one read takes many
HEARD = b"!"  # the answer to a connection the guardian accepted and will watch
UCRED_BYTES = 12  # struct ucred: pid, uid, gid, 32 bits each


class Link:
    """One worker process's connection: the groups it says are alive."""

    __slots__ = ("conn", "groups", "pending")

    def __init__(self, conn: _socket.socket) -> None:
        self.conn = conn
        self.groups: set[int] = set()
        self.pending = b""

    def take(self, chunk: bytes) -> None:
        *lines, self.pending = (self.pending + chunk).split(b"\n")
        for line in lines:
            apply_line(self.groups, line)


class Ending:
    """A dead process's groups: told SIGTERM, SIGKILLed once their leaders exit or at the
    deadline, whichever first."""

    __slots__ = ("deadline", "groups")

    def __init__(self, groups: set[int], now: float) -> None:
        self.groups = groups
        self.deadline = now + PARENT_DEATH_GRACE_SECONDS
        for group in groups:
            _signal_group(group, signal.SIGTERM)

    def finish_if_due(self, now: float) -> bool:
        """True once the groups were SIGKILLed (grandchildren that outlived a leader too)."""
        if now < self.deadline and any(map(_leader_running, self.groups)):
            return False
        for group in self.groups:
            _signal_group(group, signal.SIGKILL)
        return True


def apply_line(groups: set[int], line: bytes) -> None:
    """`+PGID` or `-PGID`; anything else is no group of ours (and must not end the guardian,
    which watches every process of the worker)."""
    try:
        group = int(line[1:])
    except ValueError:
        return
    if line[:1] == b"+" and group > 1:
        groups.add(group)
    elif line[:1] == b"-":
        groups.discard(group)


def serve(first: _socket.socket, listener: _socket.socket) -> None:
    """Watch the starter's connection and every one accepted, until none is left."""
    poller = select.poll()
    links: dict[int, Link] = {}
    endings: list[Ending] = []

    def watch(conn: _socket.socket) -> None:
        links[conn.fileno()] = Link(conn)
        poller.register(conn.fileno(), select.POLLIN)

    # The starter's lines may be waiting already, and it may have died since: read them to
    # the end like any other's. It is not answered: it knows it started this guardian.
    watch(first)
    poller.register(listener.fileno(), select.POLLIN)
    while links or endings:
        timeout_ms = int(GRACE_POLL_SECONDS * 1000) if endings else None
        for fd, _ in poller.poll(timeout_ms):
            if fd == listener.fileno():
                conn = _accept(listener)
                if conn is not None:
                    watch(conn)
                continue
            link = links[fd]
            try:
                chunk = link.conn.recv(READ_BYTES)
            except ConnectionError:
                chunk = b""  # reset: as dead as end-of-file
            except OSError:
                continue  # not the process's end (out of memory, say): read again later
            if chunk:
                link.take(chunk)
                continue
            poller.unregister(fd)
            del links[fd]
            link.conn.close()
            if link.groups:
                endings.append(Ending(link.groups, time.monotonic()))
        now = time.monotonic()
        endings = [e for e in endings if not e.finish_if_due(now)]
    listener.close()  # a connection still in its backlog is reset: that process starts its own


def _accept(listener: _socket.socket) -> "_socket.socket | None":
    """A connection from this guardian's own user, answered `HEARD`; None for anyone else's
    (closed unheard) or one gone already."""
    try:
        fd, _ = listener._accept()  # type: ignore[attr-defined]  # the C accept: (fd, address)
    except OSError:
        # Out of descriptors, say: the connection stays queued and the listener readable, so
        # wait a moment rather than spin on it.
        time.sleep(GRACE_POLL_SECONDS)
        return None
    conn = _socket.socket(fileno=fd)
    try:
        if peer_uid(conn) == os.geteuid():
            conn.sendall(HEARD)
            return conn
    except OSError:
        pass  # gone already: nothing to watch
    conn.close()
    return None


def peer_uid(conn: _socket.socket) -> int | None:
    """The connected process's effective uid (SO_PEERCRED: struct ucred, pid uid gid)."""
    cred = conn.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, UCRED_BYTES)
    return int.from_bytes(cred[4:8], sys.byteorder) if len(cred) == UCRED_BYTES else None


def _signal_group(group: int, signum: int) -> None:
    # ProcessLookupError: the whole group is gone already. PermissionError: its id was reused
    # by another user's group; either way nothing of ours is left in it to end.
    with contextlib.suppress(ProcessLookupError, PermissionError):
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
    serve(_socket.socket(fileno=0), _socket.socket(fileno=int(sys.argv[1])))


if __name__ == "__main__":
    main()
