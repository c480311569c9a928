"""A cgroup (v2) per process sandbox, where the host delegates one to the worker.

rlimits bound a process, not a session: a sandbox that forks a hundred children gets a hundred
address spaces. A cgroup bounds them all together, as a container's does: `memory.max`,
`pids.max` and `cpu.max` from `DISPATCHER_SANDBOX_MEMORY`, `_PIDS_LIMIT` and `_CPUS` (or the
environment's own `memory`, `pids_limit`, `cpus`), and `cgroup.kill` ends every process of
the session at its end, also one that left its process group.

`DISPATCHER_PROCESS_CGROUP` says where: `auto` (the default) uses the worker's own cgroup when
it already hands memory, pids and cpu to its children and the worker may write it, else runs
without (one line at start says which and why); a path names a delegated cgroup (systemd's
`Delegate=yes`, a directory an administrator `chown`ed to the worker), which must work or the
worker refuses to start; `off` never uses one. cgroup v2 only: under v1 (or the hybrid layout,
where the controllers stay in v1) there is nothing to delegate safely.

A sandbox is put in its cgroup before it runs a single instruction of its own: it is spawned
behind a gate (`sh` stopping itself with SIGSTOP), moved while stopped, then continued. Moving
it after the start would let a quick fork escape into the worker's cgroup. (A gate reading a
pipe would need a descriptor number `sh` can name, one digit in dash; a stop needs none.)
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import signal
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CGROUP_ROOT", "CgroupError", "Limits", "Parent", "SessionCgroup", "admit",
           "find_parent", "gate_argv", "limits_of", "parent_for", "remove_left_behind"]

CGROUP_ROOT = Path("/sys/fs/cgroup")
CONTROLLERS = ("cpu", "memory", "pids")
# cpu.max's period: the kernel's default, 100 ms; the quota is CPUs times this.
CPU_PERIOD_MICROSECONDS = 100_000
# Once its processes are killed, a cgroup can be removed when the kernel has let them go: a few
# milliseconds, longer on a loaded host.
REMOVE_WAIT_SECONDS = 2.0
REMOVE_POLL_SECONDS = 0.02
# The gate: stops itself; once the worker moved it into its cgroup and continued it, it runs
# the command in its own place (same pid, so same cgroup).
GATE = 'kill -STOP $$; exec "$@"'
# The prefix of the sandboxes' cgroups, so that a worker's start removes those a dead worker left.
PREFIX = "dispatcher-"
# A sandbox enters its cgroup milliseconds after making it: one this old and empty is left over.
LEFT_BEHIND_SECONDS = 60.0
_UNITS = {"b": 1, "k": 1024, "m": 1024**2, "g": 1024**3}
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


class CgroupError(Exception):
    """The named cgroup cannot be used; the message says why."""


@dataclass(frozen=True)
class Limits:
    memory_bytes: int
    pids: int
    cpus: float

    def files(self) -> dict[str, str]:
        quota = max(1000, int(self.cpus * CPU_PERIOD_MICROSECONDS))  # the kernel's minimum: 1 ms
        return {"memory.max": str(self.memory_bytes), "pids.max": str(self.pids),
                "cpu.max": f"{quota} {CPU_PERIOD_MICROSECONDS}"}


def limits_of(memory: str, pids: int, cpus: float) -> Limits:
    """The docker runtime's spelling (`512m`, 256, 1.5) as a cgroup's values."""
    number, unit = re.fullmatch(r"(\d+)([bkmg]?)", memory).groups()  # type: ignore[union-attr]
    return Limits(int(number) * _UNITS[unit or "b"], pids, cpus)


@dataclass(frozen=True)
class Parent:
    """The cgroup whose children the sandboxes' cgroups are."""

    path: Path


def gate_argv(argv: list[str], shell: str = "/bin/sh") -> list[str]:
    return [shell, "-c", GATE, "dispatcher-gate", *argv]


def admit(pid: int, cgroup: SessionCgroup) -> None:
    """Move the gated process `pid` into `cgroup` while it is stopped, then continue it."""
    info = os.waitid(os.P_PID, pid, os.WSTOPPED | os.WEXITED | os.WNOWAIT)
    if info is None or info.si_code != os.CLD_STOPPED:
        raise CgroupError("the sandbox ended at its gate")
    cgroup.add(pid)
    os.kill(pid, signal.SIGCONT)


def find_parent(setting: str, *, root: Path = CGROUP_ROOT,
                proc_cgroup: str = "/proc/self/cgroup") -> tuple[Parent | None, str]:
    """The parent to use and a reason, for the start-up line. CgroupError when a path was
    named and cannot be used; `auto` finding none is no error (None and why)."""
    if setting == "off":
        return None, "DISPATCHER_PROCESS_CGROUP=off"
    try:
        path = _own_cgroup(root, proc_cgroup) if setting == "auto" else Path(setting)
        _check(path, root)
    except CgroupError as exc:
        if setting == "auto":
            return None, str(exc)
        raise CgroupError(f"DISPATCHER_PROCESS_CGROUP={setting}: {exc}") from None
    return Parent(path), f"cgroup v2 at {path}"


def remove_left_behind(parent: Parent, *, now: float | None = None) -> None:
    """At a worker's start: empty sandbox cgroups a killed worker left. One still holding
    processes (another worker's sandbox) cannot be removed, and stays; one made less than
    `LEFT_BEHIND_SECONDS` ago may be another worker's sandbox about to enter it, and stays."""
    now = time.time() if now is None else now
    for child in parent.path.glob(f"{PREFIX}*"):
        with contextlib.suppress(OSError):
            if now - child.stat().st_mtime > LEFT_BEHIND_SECONDS:
                child.rmdir()


def _own_cgroup(root: Path, proc_cgroup: str) -> Path:
    if not (root / "cgroup.controllers").is_file():
        raise CgroupError(f"no cgroup v2 hierarchy at {root} (cgroup v1 or hybrid host)")
    with open(proc_cgroup) as file:
        for line in file:
            hierarchy, _, rest = line.rstrip("\n").partition(":")
            controllers, _, path = rest.partition(":")
            if hierarchy == "0" and controllers == "":
                return root / path.lstrip("/")
    raise CgroupError("this process is in no cgroup v2")


def _check(path: Path, root: Path) -> None:
    if not (path / "cgroup.controllers").is_file():
        raise CgroupError(f"{path} is not a cgroup v2 directory")
    delegated = (path / "cgroup.subtree_control").read_text().split()
    missing = [c for c in CONTROLLERS if c not in delegated]
    if missing:
        raise CgroupError(f"{path} does not hand {', '.join(missing)} to its children "
                          "(cgroup.subtree_control)")
    if not (os.access(path, os.W_OK) and os.access(path / "cgroup.procs", os.W_OK)):
        raise CgroupError(f"{path} is not writable by this worker")


@functools.lru_cache(maxsize=4)
def parent_for(setting: str) -> Parent | None:
    """`find_parent` once per process and setting (checked at start, used per sandbox)."""
    return find_parent(setting)[0]


class SessionCgroup:
    """One sandbox's cgroup: made with its limits, the sandbox moved in, killed and removed."""

    def __init__(self, parent: Parent, work_id: str, attempt: int, limits: Limits) -> None:
        name = f"{PREFIX}{_UNSAFE.sub('_', work_id)[:80]}-{attempt}-{uuid.uuid4().hex[:8]}"
        self.path = parent.path / name
        self.path.mkdir(mode=0o755)
        try:
            for file, value in limits.files().items():
                (self.path / file).write_text(value)
        except OSError:
            self.remove()
            raise

    def add(self, pid: int) -> None:
        (self.path / "cgroup.procs").write_text(str(pid))

    def kill(self) -> None:
        """Every process in it, whatever its group (Linux 5.14+; earlier: the group's kill)."""
        with contextlib.suppress(OSError):
            (self.path / "cgroup.kill").write_text("1")

    def remove(self) -> bool:
        """Remove the (emptied) cgroup; False if it still holds processes after a wait."""
        deadline = time.monotonic() + REMOVE_WAIT_SECONDS
        while True:
            try:
                self.path.rmdir()
                return True
            except FileNotFoundError:
                return True
            except OSError:
                if time.monotonic() >= deadline:
                    return False
                time.sleep(REMOVE_POLL_SECONDS)
