"""The two systems under test, each a fleet of real processes on one emulator environment.

* `Ours`: a control worker (`-Q dispatcher.control -B`) and session workers
  (`-Q dispatcher.sessions`), started by `LocalStack` exactly as a user runs them.
* `Peer`: N processes of `python -m bench.peer` (the official SDK's poller, one session at a
  time each, like `ant beta:worker poll --on-work`), so N slots.

Both spawn the same fake session program, which records its own events. The peer's sessions get
`fake.heartbeat: "1"`: under `--on-work` the CLI never heartbeats, the spawned program must (it
plays `ant beta:worker run`).
"""

from __future__ import annotations

import os
import secrets
import shlex
import signal
import time
from pathlib import Path
from typing import Any, ClassVar

from bench import proc
from bench.emu import Created, Emulator
from bench.records import events, wait_for_event
from dispatcher.ops.stack import BIN, FAKE_SESSION, LocalStack

__all__ = ["KEY_PREFIXES", "Fleet", "Ours", "Peer"]

SANDBOX_MARK = "fake_session.py"
# One per session worker (dispatcher/session/guardian.py): what watches the sandboxes.
WATCHDOG_MARK = "guardian.py"
PEER_MARK = "bench.peer"
REPO = Path(__file__).resolve().parent.parent
# The Redis key prefixes of every dispatcher fleet made in this process: removed after a run.
KEY_PREFIXES: list[str] = []


class Fleet:
    name = ""
    label = ""
    session_metadata: ClassVar[dict[str, str]] = {}

    def __init__(self, stack: LocalStack, emu: Emulator, records: Path) -> None:
        self.stack = stack
        self.emu = emu
        self.records = records
        self.environment_id = emu.new_environment(self.name)
        self.tag = secrets.token_hex(2)
        self.members: list[str] = []  # LocalStack process names

    def metadata(self, duration: float, **extra: str) -> dict[str, str]:
        return {"fake.duration": str(duration), **self.session_metadata, **extra}

    def create(self, duration: float, **extra: str) -> Created:
        return self.emu.create_session(self.environment_id, self.metadata(duration, **extra))

    def create_many(self, n: int, duration: float) -> list[Created]:
        return self.emu.create_sessions(self.environment_id, n, self.metadata(duration))

    def warm_up(self) -> None:
        created = self.create(0.1)
        wait_for_event(self.records, created.work_id, "started", timeout=90)
        wait_for_event(self.records, created.work_id, "exited", timeout=30)

    def stop_members(self, names: list[str] | None = None) -> None:
        for name in list(names if names is not None else self.members):
            self.stack.stop(name, timeout=40)
            self.members.remove(name)

    def runner_of(self, work_id: str) -> str | None:
        """The member whose process runs this item's sandbox."""
        raise NotImplementedError

    def kill(self, name: str) -> float:
        """SIGKILL a member; returns when."""
        raise NotImplementedError

    def pids(self) -> dict[str, int]:
        return {name: self.stack.processes[name].pid for name in self.members}

    def _spawn_name(self, role: str) -> str:
        return f"{self.name}-{self.tag}-{role}"


class Ours(Fleet):
    name = "dispatcher"
    label = "dispatcher"

    def __init__(self, stack: LocalStack, emu: Emulator, records: Path, **env: str) -> None:
        super().__init__(stack, emu, records)
        self.key_prefix = f"bench{secrets.token_hex(3)}"
        KEY_PREFIXES.append(self.key_prefix)
        self.env = stack.fleet_env(
            ANTHROPIC_ENVIRONMENT_ID=self.environment_id,
            DISPATCHER_KEY_PREFIX=self.key_prefix,
            DISPATCHER_FAKE_RECORD_DIR=str(records),
            DISPATCHER_SANDBOX_ENV_ALLOW="PATH,HOME,DISPATCHER_FAKE_RECORD_DIR",
            DISPATCHER_STOP_GRACE_SECONDS="5",
            **env,
        )
        self.counter = 0

    def control(self) -> str:
        name = self._spawn_name("control")
        self.stack.worker(name, self.env, queues="dispatcher.control", beat=True)
        self.members.append(name)
        return name

    def sessions(self, concurrency: int, pool: str = "threads") -> str:
        self.counter += 1
        name = self._spawn_name(f"s{self.counter}")
        self.stack.worker(name, self.env, pool=pool, concurrency=concurrency,
                          queues="dispatcher.sessions")
        self.members.append(name)
        return name

    def session_workers(self) -> list[str]:
        return [n for n in self.members if not n.endswith("-control")]

    def start(self, slots: list[int], pool: str = "threads") -> None:
        self.control()
        for concurrency in slots:
            self.sessions(concurrency, pool)
        self.warm_up()

    def runner_of(self, work_id: str) -> str | None:
        """The session worker whose process (or pool child) runs this item's sandbox."""
        started = events(self.records, work_id, "started")
        if not started:
            return None
        runner = int(started[-1]["ppid"])  # the worker process that spawned the sandbox
        everything = proc.processes()
        for name in self.session_workers():
            if runner in {p.pid for p in proc.tree(self.stack.processes[name].pid,
                                                   everything)}:
                return name
        return None

    def kill(self, name: str) -> float:
        now = time.time()
        self.stack.kill(name, signal.SIGKILL)
        self.stack.processes[name].wait()
        self.members.remove(name)
        return now


class Peer(Fleet):
    name = "peer"
    label = "official SDK poller x N"
    session_metadata: ClassVar[dict[str, str]] = {"fake.heartbeat": "1"}

    def __init__(self, stack: LocalStack, emu: Emulator, records: Path) -> None:
        super().__init__(stack, emu, records)
        own = ("ANTHROPIC_", "DISPATCHER_")
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(own)}
        self.env.update({"ANTHROPIC_BASE_URL": stack.base_url,
                         "ANTHROPIC_ENVIRONMENT_ID": self.environment_id,
                         "ANTHROPIC_ENVIRONMENT_KEY": stack.environment_key,
                         "DISPATCHER_FAKE_RECORD_DIR": str(records)})
        self.counter = 0

    def add(self, n: int) -> None:
        """Start n more peer processes and wait until each has polled once."""
        argv = [str(BIN / "python"), "-m", "bench.peer", *shlex.split(FAKE_SESSION)]
        # The log's new entries only: after a big run it holds tens of thousands, and reading
        # it whole every half second was answered 500.
        tail = self.emu.tail()
        polled: set[str] = set()
        for _ in range(n):
            self.counter += 1
            name = self._spawn_name(f"p{self.counter}")
            self.stack._spawn(name, argv, env={**self.env, "PYTHONPATH": str(REPO)})
            self.members.append(name)
        deadline = time.monotonic() + 60 + 3 * n
        while True:
            polled |= {e.get("worker_id") or "" for e in tail.read()
                       if e.get("endpoint") == "poll"
                       and e.get("environment_id") == self.environment_id}
            if len(polled) >= n:
                break
            for name in self.members:
                self.stack._check_alive(name)
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {len(polled)} of {n} peers polled")
            time.sleep(0.5)

    def start(self, n: int) -> None:
        self.add(n)
        self.warm_up()

    def runner_of(self, work_id: str) -> str | None:
        started = events(self.records, work_id, "started")
        if not started:
            return None
        ppid = int(started[-1]["ppid"])
        return next((name for name, pid in self.pids().items() if pid == ppid), None)

    def kill(self, name: str) -> float:
        """Lose the host: the peer and the sandbox it spawned (same process group)."""
        now = time.time()
        os.killpg(self.stack.processes[name].pid, signal.SIGKILL)
        self.stack.processes[name].wait()
        self.members.remove(name)
        return now


def fleet_memory(fleet: Fleet) -> dict[str, Any]:
    """RSS and PSS (kB) of the fleet's own processes, sandboxes (and our guardians) apart."""
    everything = proc.processes()
    own: list[proc.ProcInfo] = []
    launchers: list[proc.ProcInfo] = []
    sandboxes: list[proc.ProcInfo] = []
    for name in fleet.members:
        if name.endswith("-control"):
            continue  # the control plane is not per-session cost
        for p in proc.tree(fleet.stack.processes[name].pid, everything):
            if PEER_MARK in p.cmdline or "celery" in p.cmdline:
                own.append(p)  # the peer's own argv names the fake session too
            elif WATCHDOG_MARK in p.cmdline:
                launchers.append(p)
            elif SANDBOX_MARK in p.cmdline:
                sandboxes.append(p)
            else:
                own.append(p)

    def total(group: list[proc.ProcInfo], field: str) -> int:
        return sum(getattr(p, field) for p in group)

    return {"own_rss": total(own, "rss_kb"), "own_pss": total(own, "pss_kb"),
            "launcher_rss": total(launchers, "rss_kb"), "launcher_pss": total(launchers, "pss_kb"),
            "sandbox_rss": total(sandboxes, "rss_kb"), "sandboxes": len(sandboxes),
            "processes": len(own)}

