"""A fleet under fault injection: the `Fleet` of tests/support/fleet.py (real `celery`
processes, the emulator over HTTP, the fake session program) plus what chaos needs on top:

* a watcher thread that follows the sandboxes' records and the process table, so a sandbox
  killed with SIGKILL (which records no exit) still has a bound on when it ended;
* `kill` / `restart` of fleet processes, noting when and whom;
* `finish`: wait for every session to end, check every invariant (`invariants.py`) and
  return the scenario's figures for docs/reliability.md.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dispatcher.workapi import WorkAPIError
from tests.support import invariants
from tests.support.fleet import Fleet
from tests.support.waiting import wait_for

__all__ = ["ChaosFleet", "Figures", "RedisServer", "Watcher"]

WATCH_INTERVAL_SECONDS = 0.05
# Slack on top of the stop grace before a stop counts as not honoured: the supervisor's tick
# (0.2 s), the bridge's scan of `list` (1 s), a beat tick and a loaded two-core machine.
STOP_MARGIN_SECONDS = 4.0
# Slack on the lease TTL when reading gaps between heartbeats off the request log.
TTL_MARGIN_SECONDS = 0.5


@dataclass
class Figures:
    scenario: str
    sessions: int = 0
    faults: int = 0
    fault_kinds: str = ""
    attempts: int = 0
    lost: int = 0
    duplicated: int = 0
    stops: int = 0
    stop_latency_max_s: float | None = None
    seconds: float = 0.0
    # Partitions: from the cut until the cut-off host's sandboxes were dead (fenced), and until
    # every one of their sessions ran again elsewhere (moved).
    fenced_after_s: float | None = None
    moved_after_s: float | None = None
    violations: list[str] = field(default_factory=list)


class Watcher:
    """Follows `<records>/*.jsonl` and the process table every few tens of milliseconds."""

    def __init__(self, records_dir: Path) -> None:
        self.records_dir = records_dir
        self.offsets: dict[Path, int] = {}
        self.records: dict[str, list[dict[str, Any]]] = {}
        self.last_seen_alive: dict[int, float] = {}
        self.first_seen_dead: dict[int, float] = {}
        self.worker_of: dict[int, int] = {}  # sandbox pid -> pid of the process that ran it
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chaos-watcher", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.scan()
            self._stop.wait(WATCH_INTERVAL_SECONDS)

    def scan(self) -> None:
        with self._lock:
            for path in sorted(self.records_dir.glob("*.jsonl")):
                self._read_new(path)
            now = time.time()
            for lines in self.records.values():
                for r in lines:
                    pid = int(r["pid"])
                    if pid in self.first_seen_dead:
                        continue
                    if invariants._alive(pid, wrote_at=float(r["time"])):
                        self.last_seen_alive[pid] = now
                    else:
                        self.first_seen_dead[pid] = now

    def _read_new(self, path: Path) -> None:
        offset = self.offsets.get(path, 0)
        try:
            if path.stat().st_size <= offset:
                return  # nothing new: a stat is far cheaper than an open, with 1,000 sessions
        except FileNotFoundError:
            return
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
        end = data.rfind(b"\n") + 1  # only whole lines; a line is one O_APPEND write
        self.offsets[path] = offset + end
        for line in data[:end].splitlines():
            if not line.strip():
                continue
            record = json.loads(line)
            self.records.setdefault(path.stem, []).append(record)
            if record["event"] == "started":
                self.worker_of[int(record["pid"])] = _worker_of(int(record["ppid"]))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.scan()

    def ended_at(self, pid: int, records: list[dict[str, Any]]) -> float | None:
        for r in records:
            if r["event"] == "exited" and int(r["pid"]) == pid:
                return float(r["time"])
        return self.first_seen_dead.get(pid)


def _worker_of(runner: int) -> int:
    """The fleet worker whose process spawned a sandbox: the worker itself (threads pool), or
    the worker whose pool child it is (prefork). Workers are this test process's children."""
    parent = _parent_of(runner)
    return runner if parent == os.getpid() else parent


def _parent_of(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[-1].split()[1])
    except (FileNotFoundError, ProcessLookupError, ValueError, IndexError):
        return 0


class ChaosFleet:
    def __init__(self, fleet: Fleet, *, scenario: str, ttl: float, grace: float) -> None:
        self.fleet = fleet
        self.scenario = scenario
        self.ttl = ttl
        self.grace = grace
        self.started = time.time()
        self.watcher = Watcher(fleet.records_dir)
        self.work_ids: list[str] = []
        self.expect_stopped: set[str] = set()  # stopped by the test: not expected to complete
        self.stop_requested: dict[str, float] = {}
        self.killed_at: dict[int, float] = {}  # sandbox pid -> when its worker was SIGKILLed
        self.fault_kinds: dict[str, int] = {}
        self.rng = random.Random()
        self.specs: dict[str, dict[str, Any]] = {}
        self._emulator_redis: Any = None
        # A stop must end its sandbox within this; a scenario whose fault delays stops by a
        # documented bound (a standby beat taking over) adds that bound.
        self.stop_bound_seconds = grace + STOP_MARGIN_SECONDS
        self.fenced_after_s: float | None = None
        self.moved_after_s: float | None = None
        fleet.overrides.update({
            "DISPATCHER_DESIRED_TTL_SECONDS": str(int(ttl)),
            "DISPATCHER_STOP_GRACE_SECONDS": str(grace),
            # Every session must eventually complete here: random kills may hit one twice.
            "DISPATCHER_MAX_ATTEMPTS": "20",
        })

    def close(self) -> None:
        """Stop the watcher and every fleet process; drop connections."""
        self.watcher._stop.set()
        self.fleet.stop_all()
        if self._emulator_redis is not None:
            self._emulator_redis.close()

    # --- processes ---------------------------------------------------------------------------
    def control(self, name: str = "control", *, beat: bool = True) -> None:
        self.fleet.worker(name, concurrency=4, queues="dispatcher.control", beat=beat)
        self.specs[name] = {"kind": "worker", "concurrency": 4, "queues": "dispatcher.control",
                            "beat": beat}

    def sessions_worker(self, name: str, *, concurrency: int = 4, pool: str = "threads") -> None:
        self.fleet.worker(name, pool=pool, concurrency=concurrency, queues="dispatcher.sessions")
        self.specs[name] = {"kind": "worker", "concurrency": concurrency, "pool": pool,
                            "queues": "dispatcher.sessions", "beat": False}

    def beat(self, name: str = "beat") -> None:
        self.fleet.beat(name)
        self.specs[name] = {"kind": "beat"}

    def start(self, name: str) -> None:
        spec = dict(self.specs[name])
        if spec.pop("kind") == "beat":
            self.fleet.beat(name)
        else:
            self.fleet.worker(name, **spec)

    def process(self, name: str) -> subprocess.Popen[bytes]:
        return self.fleet.stack.processes[name]

    def kill(self, name: str, sig: int = signal.SIGKILL, *, fault: str | None = None) -> float:
        """Signal a fleet process; for SIGKILL, wait until it is gone and note its sandboxes."""
        process = self.process(name)
        self.watcher.scan()  # map sandboxes that started a moment ago to their worker
        at = time.time()
        process.send_signal(sig)
        if sig == signal.SIGKILL:
            process.wait(timeout=10)
            with self.watcher._lock:
                for pid, worker in self.watcher.worker_of.items():
                    if worker == process.pid:
                        self.killed_at.setdefault(pid, at)
        self.fault(fault or signal.Signals(sig).name)
        return at

    def restart_redis(self, server: RedisServer) -> None:
        """SIGKILL the fleet's redis-server and start it again, empty, on the same port."""
        server.kill()
        time.sleep(0.5)
        server.start()
        self.fault("Redis restarted empty")
        self.fleet.redis.connection_pool.reset()

    def fault(self, kind: str, count: int = 1) -> None:
        self.fault_kinds[kind] = self.fault_kinds.get(kind, 0) + count

    def running_on(self, name: str) -> list[str]:
        """Work ids whose sandbox currently runs under the named worker."""
        pid = self.process(name).pid
        self.watcher.scan()
        with self.watcher._lock:
            found = []
            for work_id, lines in self.watcher.records.items():
                for r in lines:
                    if r["event"] == "started" and self.watcher.worker_of.get(r["pid"]) == pid \
                            and r["pid"] not in self.watcher.first_seen_dead:
                        found.append(work_id)
            return found

    # --- sessions ----------------------------------------------------------------------------
    def create(self, count: int, **metadata: Any) -> list[str]:
        made = [self.fleet.create(**metadata) for _ in range(count)]
        self.work_ids += made
        return made

    def stop(self, work_id: str, *, force: bool = False) -> None:
        self.stop_requested[work_id] = time.time()
        self.expect_stopped.add(work_id)
        try:
            self.fleet.admin.stop(work_id, force=force)
        except WorkAPIError:
            # Under the API's faults a stop may land with its reply lost and its retry be
            # refused (409): what counts is that the server took it.
            if self.stored_states([work_id])[work_id] not in ("stopping", "stopped"):
                raise

    def watch_cut(self, work_ids: list[str], *, cut_at: float, timeout: float = 60) -> None:
        """After a cut at `cut_at`: wait until the first attempts of `work_ids` are dead, then
        until each session started again; note both times for the figures."""
        first = [self.fleet.events(w, "started")[0] for w in work_ids]
        wait_for(lambda: not any(invariants._alive(int(r["pid"]), wrote_at=float(r["time"]))
                                 for r in first),
                 timeout=timeout, interval=0.05, what="the cut-off sandboxes dead")
        self.fenced_after_s = round(time.time() - cut_at, 2)
        wait_for(lambda: all(len(self.fleet.events(w, "started")) >= 2 for w in work_ids),
                 timeout=timeout, interval=0.1, what="every session started again elsewhere")
        self.moved_after_s = round(time.time() - cut_at, 2)

    def wait_started(self, work_ids: list[str], timeout: float = 60) -> None:
        wait_for(lambda: all(self.fleet.events(w, "started") for w in work_ids),
                 timeout=timeout, interval=0.1, what="sandboxes started")

    def states(self) -> dict[str, str]:
        return {w: self.state(w) for w in self.work_ids}

    def stored_states(self, work_ids: list[str]) -> dict[str, str]:
        """The items' states as the emulator stores them, read from its Redis in one round
        trip: for waiting on hundreds of sessions without a `get` each (which the API's faults
        hit, and which would fill the capped request log). Lapses are applied lazily, on the
        fleet's polls, so the final word is still `states()`."""
        emulator = self.fleet.emulator
        if self._emulator_redis is None:
            import redis

            self._emulator_redis = redis.Redis.from_url(emulator.redis_url,
                                                        decode_responses=True)
        raws = self._emulator_redis.mget([f"{emulator.prefix}:work:{w}" for w in work_ids])
        return {w: json.loads(raw)["state"] if raw else "missing"
                for w, raw in zip(work_ids, raws, strict=True)}

    def state(self, work_id: str) -> str:
        """The item's state; the API's faults apply to `get` too, so try until one answers."""
        for _ in range(50):
            try:
                return self.fleet.state(work_id)
            except WorkAPIError:
                time.sleep(0.2)
        return self.fleet.state(work_id)

    # --- the end: wait, check every invariant, figures --------------------------------------
    def finish(self, *, timeout: float = 120, check_duplicates: bool = True) -> Figures:
        deadline = time.monotonic() + timeout
        waiting = list(self.work_ids)
        while waiting and time.monotonic() < deadline:
            waiting = [w for w, s in self.stored_states(waiting).items() if s != "stopped"]
            if waiting:
                time.sleep(0.5)
        states = self.states()
        # Sessions end when their sandbox exits; what is left of a group is killed right after.
        wait_for(lambda: not invariants.no_sandbox_survives(self._records()), timeout=10,
                 what="no sandbox left", interval=0.2)
        self.watcher.close()
        end_time = time.time()
        log = [e for e in self.fleet.emulator.requests_log()
               if e.get("environment_id") in (None, self.fleet.environment_id)]
        records = self._records()
        spans = invariants.sandbox_spans(records, last_seen_alive=self.watcher.last_seen_alive,
                                         killed_at=self.killed_at,
                                         first_seen_dead=self.watcher.first_seen_dead)
        ended = {w: self._sandbox_end(w, after=t) for w, t in self.stop_requested.items()}
        violations = [
            *invariants.every_session_stopped(states),
            *invariants.leases_kept_alive(log, ttl=self.ttl, margin=TTL_MARGIN_SECONDS,
                                          end_time=end_time),
            *invariants.no_overlapping_attempts(spans),
            *invariants.no_stale_token_after_412(log),
            *invariants.no_sandbox_survives(records),
            *invariants.stops_honoured(self.stop_requested, ended,
                                       bound=self.stop_bound_seconds),
        ]
        completed = {w: sum(1 for r in records.get(w, [])
                            if r["event"] == "exited" and r.get("reason") == "completed")
                     for w in self.work_ids}
        lost = [w for w in self.work_ids if states[w] != "stopped"
                or (w not in self.expect_stopped and completed[w] == 0)]
        duplicated = [w for w, n in completed.items() if n > 1]
        violations += [f"{w}: never ran to completion (lost)" for w in lost
                       if states[w] == "stopped"]
        if check_duplicates:
            violations += [f"{w}: ran to completion {completed[w]} times" for w in duplicated]
        if violations:
            # The emulator's keys go with the test; its request log is the evidence.
            with open(self.fleet.tmp / "requests.jsonl", "w") as f:
                f.writelines(json.dumps(e) + "\n" for e in log)
        latencies = [end - self.stop_requested[w] for w, end in ended.items() if end is not None]
        figures = Figures(
            scenario=self.scenario, sessions=len(self.work_ids),
            faults=sum(self.fault_kinds.values()),
            fault_kinds=", ".join(f"{k} x{v}" for k, v in sorted(self.fault_kinds.items())),
            attempts=sum(1 for s in spans), lost=len(lost), duplicated=len(duplicated),
            stops=len(self.stop_requested),
            stop_latency_max_s=round(max(latencies), 2) if latencies else None,
            seconds=round(end_time - self.started, 1), fenced_after_s=self.fenced_after_s,
            moved_after_s=self.moved_after_s, violations=violations,
        )
        return figures

    def _records(self) -> dict[str, list[dict[str, Any]]]:
        return {w: self.fleet.records(w) for w in self.work_ids}

    def _sandbox_end(self, work_id: str, *, after: float) -> float | None:
        """When the sandboxes of `work_id` that ran at `after` (the stop) ended."""
        records = self.fleet.records(work_id)
        ends = []
        for r in records:
            if r["event"] != "started" or float(r["time"]) > after:
                continue  # a later attempt (a drain hands the session over) is not stopped
            end = self.watcher.ended_at(int(r["pid"]), records)
            if end is None:
                return None
            if end >= after:
                ends.append(end)
        return max(ends) if ends else after

    def log_lines(self, needle: str) -> list[str]:
        lines = []
        for name in self.specs:
            lines += [f"{name}: {line}" for line in self.fleet.log(name).splitlines()
                      if needle in line]
        return lines


class RedisServer:
    """A private `redis-server` (no persistence) that a test may kill and start again empty."""

    def __init__(self, workdir: Path, port: int) -> None:
        self.workdir = workdir
        self.port = port
        self.url = f"redis://127.0.0.1:{port}"
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        log = open(self.workdir / f"redis-{self.port}.log", "ab")  # noqa: SIM115
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        import redis

        def answers() -> bool:
            try:
                return bool(redis.Redis.from_url(self.url, socket_connect_timeout=0.5).ping())
            except redis.RedisError:
                return False

        wait_for(answers, timeout=20, what="redis-server", interval=0.05)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def figures_dict(figures: Figures) -> dict[str, Any]:
    return asdict(figures)


def env_path(name: str) -> str | None:
    return os.environ.get(name)
