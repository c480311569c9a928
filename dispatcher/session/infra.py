"""Whose failure a sandbox's start is: the infrastructure's (the fleet's) or the session's.

An engine that does not answer, answers too slowly, fails with a 5xx, or lost the image says
nothing about the session: the attempt is started again, not counted against the attempt limit,
and the item is not stopped. A container the engine refuses as given (a bad command, a bad
setting: a 4xx, or an OCI runtime's error about the command) is the session's: a failed
attempt. The same split for the process runtime: a fork or exec refused for lack of resources
(EAGAIN, ENOMEM, EMFILE, ENFILE) is the host's; a missing or non-executable command is the
session's. Pure functions, table-tested (tests/unit/test_infra.py).
"""

from __future__ import annotations

import errno
from enum import StrEnum

__all__ = ["Blame", "engine_blame", "spawn_blame"]


class Blame(StrEnum):
    INFRASTRUCTURE = "infrastructure"  # the fleet's: start again, not counted
    SESSION = "session"  # the session's: a failed attempt


# What the OCI runtime says (in a 400 or, from older engines, a 500) when the container's own
# command cannot run: the session's, whatever the status.
_SESSION_MESSAGES = (
    "executable file not found",
    "no such file or directory",
    "permission denied",
    "exec format error",
    "not a directory",
    "invalid reference format",
    "invalid mount config",
)

# Errors of fork/exec that say the host ran out of something, not that the command is wrong.
_RESOURCE_ERRNOS = frozenset({errno.EAGAIN, errno.ENOMEM, errno.EMFILE, errno.ENFILE,
                              errno.ENOSPC})


def engine_blame(status: int | None, message: str, *, answered: bool) -> Blame:
    """Whose failure an engine call of a sandbox's start is. `answered`: the engine sent an HTTP
    answer (False: refused connection, reset, timed out); `status`: its status."""
    if not answered or status is None:
        return Blame.INFRASTRUCTURE  # down, cut off, or slower than the client's bound
    text = message.lower()
    if status == 404:
        # The image lost, or the container just made removed: the engine's. Anything else it
        # cannot find (a network, a volume the settings name) is what the attempt asked for.
        lost = "no such image" in text or "no such container" in text
        return Blame.INFRASTRUCTURE if lost else Blame.SESSION
    if status == 409:
        return Blame.INFRASTRUCTURE  # a container of the attempt exists: a create that landed
    if any(m in text for m in _SESSION_MESSAGES):
        return Blame.SESSION
    if status >= 500:
        return Blame.INFRASTRUCTURE
    return Blame.SESSION


def spawn_blame(code: int | None) -> Blame:
    """Whose failure a process sandbox's fork or exec failing with errno `code` is."""
    return Blame.INFRASTRUCTURE if code in _RESOURCE_ERRNOS else Blame.SESSION
