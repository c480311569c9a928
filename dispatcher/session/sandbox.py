"""Start one session's sandbox in its own process group, and signal or reap that group.

The contract is the official CLI's `--on-work`: the command (split like a shell would, never run
through one) gets `ANTHROPIC_SESSION_ID`, `ANTHROPIC_WORK_ID`, `ANTHROPIC_ENVIRONMENT_ID`,
`ANTHROPIC_ENVIRONMENT_KEY` (and `ANTHROPIC_BASE_URL` when configured) in its environment and
the work item JSON, secret included, on stdin. Unlike the CLI, which passes its whole
environment on, a sandbox gets only an explicit allow-list of the worker's variables: the
worker holds broker URLs and may hold the organisation key, which a sandbox must never see.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "CommandError",
    "Sandbox",
    "SandboxSpec",
    "build_environment",
    "resolve_command",
]

LAUNCHER = Path(__file__).with_name("launcher.py")
# Never handed to a sandbox, even when an operator allow-lists it by mistake: the organisation
# key, and the Redis URL, whose holder reads every work item's secret from the registry.
NEVER_PASSED = frozenset({"ANTHROPIC_API_KEY", "DISPATCHER_REDIS_URL"})


class CommandError(Exception):
    """The on-work command is missing, empty or not executable."""


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


class Sandbox:
    """A running sandbox: the launcher leads its process group, the command runs inside it."""

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        self._process = process
        self.pgid = process.pid  # start_new_session makes the launcher the group leader
        self.started_at = time.time()

    @classmethod
    def start(cls, spec: SandboxSpec) -> Sandbox:
        # The parent-death signal is tied to the thread that forks: tell the launcher our pid so
        # it can detect a parent that died before its prctl took effect.
        argv = [sys.executable, "-S", str(LAUNCHER), str(os.getpid()), *spec.argv]
        process = subprocess.Popen(
            argv, stdin=subprocess.PIPE, env=spec.env, start_new_session=True, close_fds=True
        )
        sandbox = cls(process)
        # Feed stdin from a thread: a command that never reads it must not block the supervisor.
        threading.Thread(target=sandbox._feed, args=(spec.stdin,), daemon=True).start()
        return sandbox

    def _feed(self, data: bytes) -> None:
        stdin = self._process.stdin
        assert stdin is not None
        try:
            stdin.write(data)
        except (BrokenPipeError, OSError):
            pass  # the command exited or closed stdin without reading: its choice
        finally:
            with contextlib.suppress(OSError):
                stdin.close()

    @property
    def pid(self) -> int:
        return self._process.pid

    def wait(self, timeout: float) -> int | None:
        """The launcher's exit code, or None if it still runs after `timeout` seconds."""
        try:
            return self._process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def signal_group(self, signum: int) -> None:
        # ProcessLookupError: the whole group is already gone.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pgid, signum)

    def kill_group(self) -> None:
        """SIGKILL everything left in the group (also forked children that outlived the command)
        and reap the launcher."""
        self.signal_group(signal.SIGKILL)
        if self._process.returncode is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._process.wait(timeout=5)

    def group_alive(self) -> bool:
        try:
            os.killpg(self.pgid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
