"""What confines a process sandbox beyond its own process group: another user, and rlimits.

Both take effect before the command's first instruction. The user switch is subprocess's own
(`user`, `group`, `extra_groups`: setgroups, setregid, setreuid in the child between fork and
exec, in C, so no Python runs in a forked child of a threaded worker). Resource limits go
through util-linux's `prlimit`, which sets them on itself and execs the command: the process
keeps its pid and group, and the limits bind the command and everything it forks. Setting them
from the worker after the spawn would leave the command a moment without them, and a
`preexec_fn` runs Python in the forked child of a threaded process, which can deadlock.

`prlimit` is one more exec and a dynamic program's start on every session's start path (2 ms
and more, much more on a loaded host), so a limit the worker itself already holds, soft and
hard, is left to inheritance. A session worker takes its sandboxes' core limit at its start
(`adopt_core_limit`): its own core dump would hold what theirs would (the work secrets it
hands them) and more (the Redis password, environment keys). So the default, `core=0`, needs
no `prlimit` at all, nor does a host without it refuse the default. The other limits would
bind the worker's own work: they stay the sandbox's alone.

A sandbox under another user cannot read the worker's `/proc/<pid>/environ` (the Redis URL and
its password, environment keys) nor signal or trace the worker: the kernel allows that only to
the same user or to root. Switching needs a worker that may: root, or CAP_SETUID, CAP_SETGID
and CAP_CHOWN; a worker that cannot is refused at start, naming the setting.
"""

from __future__ import annotations

import contextlib
import functools
import os
import pwd
import re
import resource
import shutil
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = [
    "Confinement",
    "ConfinementError",
    "adopt_core_limit",
    "can_switch_to",
    "confined_argv",
    "confinement_of",
    "parse_rlimits",
    "parse_user",
    "popen_options",
]

# prlimit's long options (util-linux prlimit(1)); a name outside this list is a typo.
RLIMIT_NAMES = frozenset({
    "as", "core", "cpu", "data", "fsize", "locks", "memlock", "msgqueue", "nice", "nofile",
    "nproc", "rss", "rtprio", "rttime", "sigpending", "stack"})
_LIMIT = r"(\d+|unlimited)"
_RLIMIT_VALUE = re.compile(rf"^{_LIMIT}(:{_LIMIT})?$")
# Bits of /proc/self/status CapEff (linux/capability.h). CAP_CHOWN gives the work secret file
# to the sandbox's user; CAP_SETGID and CAP_SETUID switch to it.
CAP_CHOWN, CAP_SETGID, CAP_SETUID = 0, 6, 7


class ConfinementError(ValueError):
    """A user or rlimit setting that cannot be applied; the message names the setting."""


@dataclass(frozen=True)
class Confinement:
    """How a process sandbox is confined; the defaults confine nothing."""

    uid: int | None = None  # None: the worker's own user
    gid: int | None = None
    rlimits: tuple[tuple[str, str], ...] = ()  # (prlimit option, "soft[:hard]")
    prlimit: str = "prlimit"  # the program that applies `rlimits`


@functools.lru_cache(maxsize=8)
def parse_user(text: str) -> tuple[int, int]:
    """`name`, `uid` or `uid:gid` as (uid, gid). A name's group is its primary group; a bare uid
    without a passwd entry gets the group of the same number."""
    uid_text, _, gid_text = text.partition(":")
    if uid_text.isdigit():
        uid = int(uid_text)
        if gid_text:
            if not gid_text.isdigit():
                raise ConfinementError(f"DISPATCHER_PROCESS_USER={text!r}: gid not a number")
            return uid, int(gid_text)
        try:
            return uid, pwd.getpwuid(uid).pw_gid
        except KeyError:
            return uid, uid
    if gid_text:
        raise ConfinementError(f"DISPATCHER_PROCESS_USER={text!r}: use `name` or `uid:gid`")
    try:
        entry = pwd.getpwnam(uid_text)
    except KeyError:
        raise ConfinementError(f"DISPATCHER_PROCESS_USER={text!r}: no such user") from None
    return entry.pw_uid, entry.pw_gid


def parse_rlimits(text: str) -> tuple[tuple[str, str], ...]:
    """`name=soft[:hard],...` (prlimit's names and values, `unlimited` allowed)."""
    limits = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, value = item.partition("=")
        if name not in RLIMIT_NAMES:
            raise ConfinementError(f"DISPATCHER_PROCESS_RLIMITS: {name!r} is not one of "
                                   f"{', '.join(sorted(RLIMIT_NAMES))}")
        if not _RLIMIT_VALUE.match(value):
            raise ConfinementError(f"DISPATCHER_PROCESS_RLIMITS: {item!r} is not "
                                   "name=soft[:hard] (numbers or `unlimited`)")
        limits.append((name, value))
    return tuple(limits)


def confined_argv(argv: list[str], confinement: Confinement) -> list[str]:
    """The command as it is spawned: behind `prlimit` when there are limits to set that the
    worker does not hold itself (the command inherits those)."""
    to_set = [(name, value) for name, value in confinement.rlimits if not _held(name, value)]
    if not to_set:
        return argv
    options = [f"--{name}={value}" for name, value in to_set]
    return [confinement.prlimit, *options, "--", *argv]


def adopt_core_limit(confinement: Confinement) -> None:
    """At a session worker's start: the worker takes its sandboxes' core limit, if it may (a
    limit below its own hard limit), so they inherit it and need no `prlimit` for it."""
    for name, value in confinement.rlimits:
        if _adoptable(name, value):
            # Refused (a soft limit above the hard one): prlimit sets it, or says why not.
            with contextlib.suppress(ValueError, OSError):
                resource.setrlimit(resource.RLIMIT_CORE, _limits(value))


def _adoptable(name: str, value: str) -> bool:
    """Whether a session worker takes this limit itself (`adopt_core_limit`), so its sandboxes
    inherit it and no `prlimit` sets it: a core limit within the worker's hard limit."""
    hard = resource.getrlimit(resource.RLIMIT_CORE)[1]
    return name == "core" and _within(_limits(value)[1], hard)


def _held(name: str, value: str) -> bool:
    """Whether this process's own limit `name` is `value` (prlimit's `soft[:hard]`), soft and
    hard: then a child inherits it exactly as prlimit would set it."""
    which = getattr(resource, f"RLIMIT_{name.upper()}", None)
    return which is not None and resource.getrlimit(which) == _limits(value)


def _limits(value: str) -> tuple[int, int]:
    """prlimit's `soft[:hard]` as (soft, hard); one value sets both, as prlimit does."""
    soft, _, hard = value.partition(":")
    return _limit(soft), _limit(hard or soft)


def _limit(text: str) -> int:
    return resource.RLIM_INFINITY if text == "unlimited" else int(text)


def _within(limit: int, hard: int) -> bool:
    """An unprivileged process may lower its hard limit, never raise it."""
    if hard == resource.RLIM_INFINITY:
        return True
    return limit != resource.RLIM_INFINITY and limit <= hard


def popen_options(confinement: Confinement) -> dict[str, object]:
    """subprocess.Popen's arguments that switch to the sandbox's user (none: stay the worker's).
    `extra_groups=[]` drops the worker's supplementary groups: one of them may open the
    engine's socket or the worker's files."""
    if confinement.uid is None:
        return {}
    return {"user": confinement.uid, "group": confinement.gid, "extra_groups": []}


def can_switch_to(uid: int, gid: int, *, status: Mapping[str, str] | None = None) -> bool:
    """Whether this process may run a sandbox as `uid:gid`: it is them already, or it holds
    what the switch and the secret file's hand-over need (root holds them all)."""
    if (uid, gid) == (os.geteuid(), os.getegid()):
        return True
    caps = int((status or _proc_status()).get("CapEff", "0"), 16)
    return all(caps >> bit & 1 for bit in (CAP_CHOWN, CAP_SETGID, CAP_SETUID))


def _proc_status() -> dict[str, str]:
    with open("/proc/self/status") as f:
        return {key: value.strip() for key, _, value in (line.partition(":") for line in f)}


@functools.lru_cache(maxsize=8)
def confinement_of(user: str | None, rlimits: str) -> Confinement:
    """The settings' text as a Confinement; ConfinementError naming the setting."""
    limits = parse_rlimits(rlimits)
    prlimit = "prlimit"
    if any(not _adoptable(name, value) for name, value in limits):
        found = shutil.which("prlimit")
        if found is None:
            raise ConfinementError("DISPATCHER_PROCESS_RLIMITS needs util-linux's `prlimit` on "
                                   "PATH; install it or set the variable empty")
        prlimit = found
    if not user:
        return Confinement(rlimits=limits, prlimit=prlimit)
    uid, gid = parse_user(user)
    return Confinement(uid=uid, gid=gid, rlimits=limits, prlimit=prlimit)
