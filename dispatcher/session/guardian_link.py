"""This process's link to its worker's guardian (`guardian.py`, which says why there is one).

One connection per process: its lines name the sandbox groups alive, its end-of-file says the
process died. A session worker's main process starts the guardian before its pool forks
(`start`), so a prefork child connects to the same one at its first sandbox: one interpreter
per worker, not one per slot. A process with no guardian to connect to (the one it knew died,
or none was started: a script, a test) starts one of its own, and a guardian that died is
replaced and told every group still alive.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import secrets
import socket
import subprocess
import sys
import threading
from pathlib import Path

from dispatcher.session.guardian import HEARD, peer_uid

__all__ = ["GUARDIAN", "Guardian"]

GUARDIAN_SCRIPT = Path(__file__).with_name("guardian.py")
# Abstract (no file to clean up), unique per start. Another user's connection is refused by the
# guardian itself, so knowing the address gives no power over the worker's sandboxes.
ADDRESS_PREFIX = b"\0dispatcher-guardian-"
# How long a new connection waits for that answer: the guardian gives it at once unless it is
# exiting, when it never does. A loaded host's scheduling delay is far below this.
HEARD_TIMEOUT_SECONDS = 2.0


class Guardian:
    """This process's connection to a guardian, and the groups it told it about."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._address: bytes | None = None  # kept across fork: a child connects to the same
        self._process: subprocess.Popen[bytes] | None = None  # one this process started
        self._conn: socket.socket | None = None
        self._groups: set[int] = set()

    def start(self) -> None:
        """At a session worker's start, before its pool forks. OSError when none can start."""
        with self._lock:
            if self._conn is None:
                self._reconnect()

    def watch(self, pgid: int) -> None:
        """OSError when no guardian can be reached or started (fork failing, say)."""
        with self._lock:
            self._groups.add(pgid)
            try:
                self._send(b"+%d\n" % pgid)
            except OSError:
                self._groups.discard(pgid)
                raise

    def forget(self, pgid: int) -> None:
        """Before the leader is reaped: afterwards its pid (the group id) may be reused."""
        with self._lock:
            self._groups.discard(pgid)
            self._send(b"-%d\n" % pgid)

    @property
    def pid(self) -> int | None:
        """The guardian this process started, if it started one."""
        return None if self._process is None else self._process.pid

    def _send(self, line: bytes) -> None:
        if self._conn is not None:
            try:
                self._conn.sendall(line)  # a few bytes: one write
                return
            except ConnectionError:
                pass  # the guardian died (only then: closing a live one's link ends our groups)
        self._reconnect()

    def _reconnect(self) -> None:
        """Every live group told to the worker's guardian, or to a new one of this process."""
        self._drop_connection()
        conn = _connect(self._address) if self._address is not None else None
        if conn is None:
            conn = self._start_guardian()
        self._conn = conn
        conn.sendall(b"".join(b"+%d\n" % pgid for pgid in self._groups))

    def _start_guardian(self) -> socket.socket:
        if self._process is not None:
            self._process.poll()  # reaps one that died
        address = ADDRESS_PREFIX + b"%d-%s" % (os.getpid(), secrets.token_hex(8).encode())
        ours, theirs = socket.socketpair()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(address)
            listener.listen()
            self._process = subprocess.Popen(
                [sys.executable, "-S", str(GUARDIAN_SCRIPT), str(listener.fileno())],
                stdin=theirs.fileno(), pass_fds=(listener.fileno(),), env={},
                start_new_session=True, close_fds=True)
        except BaseException:
            ours.close()
            raise
        finally:
            listener.close()
            theirs.close()
        # Not waiting for it to start: the first sandbox's lines wait in the socket meanwhile
        # (read even if this process dies first), and a guardian that failed to start fails
        # the next write, which starts another.
        self._address = address
        return ours

    def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(OSError):
                conn.close()

    def _before_fork(self) -> None:
        self._lock.acquire()

    def _after_fork_in_parent(self) -> None:
        self._lock.release()

    def _forget_after_fork(self) -> None:
        """In a forked child: the connection, the groups and the guardian process are the
        parent's; the child keeps the address and connects at its first sandbox. Closing the
        inherited descriptor (never shutting it down) leaves the parent's link open."""
        self._lock = threading.Lock()
        self._process = None
        self._groups = set()
        self._drop_connection()

    def close(self) -> None:
        """At this process's exit: end-of-file tells the guardian to end what is left, if any."""
        with self._lock:
            self._drop_connection()
            if self._process is not None:
                self._process.poll()


def _connect(address: bytes) -> socket.socket | None:
    """A connection the guardian at `address` answered; None when it is gone or exiting, or
    when another user's process holds the address (an abstract name is free for anyone to
    bind once the guardian is gone)."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.settimeout(HEARD_TIMEOUT_SECONDS)
        conn.connect(address)
        if peer_uid(conn) == os.geteuid() and conn.recv(len(HEARD)) == HEARD:
            conn.settimeout(None)
            return conn
    except OSError:
        pass
    conn.close()
    return None


GUARDIAN = Guardian()
atexit.register(GUARDIAN.close)
# A fork waits for a connection or a start in progress (the lock), so no child inherits a
# half-made one it does not know to close, which would hide the parent's death.
os.register_at_fork(before=GUARDIAN._before_fork, after_in_parent=GUARDIAN._after_fork_in_parent,
                    after_in_child=GUARDIAN._forget_after_fork)
