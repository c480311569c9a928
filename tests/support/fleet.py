"""A real fleet for acceptance and chaos tests: `celery worker`/`beat` subprocesses, real
Redis, the emulator over HTTP, and the emulator's fake session program as the on-work command.

    Fleet              one fleet under test (processes through `LocalStack`)
    flush_fleet_db     empty this worker's fleet database before a fleet test starts
    on_brokers         run a test on the Redis broker, RabbitMQ, or both
    assert_no_overlap  no two attempts of one session ran at the same time
    processes_marked   the live processes a fleet started (`FLEET_MARK` in their environment)
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis

from dispatcher.control.capacity import Capacity
from dispatcher.ops.stack import LocalStack
from dispatcher.workapi import WorkClient
from tests.support.isolation import REDIS_BASE, fleet_db, integration_db, redis_url
from tests.support.waiting import wait_for

CELERY = str(Path(sys.executable).with_name("celery"))
# The brokers a fleet runs on (`DISPATCHER_BROKER_URL`): Redis (the default) or RabbitMQ.
REDIS, AMQP = "redis", "amqp"
# Set to a fleet's own id in the environment of every process it starts (and what they fork):
# its teardown finds any that outlived it, whatever process group it ended up in. Not a
# dispatcher setting, and no sandbox gets it (`DISPATCHER_SANDBOX_ENV_ALLOW`).
FLEET_MARK = "DISPATCHER_TESTS_FLEET_MARK"


def on_brokers(*cases: str | tuple[str, ...], names: str = "fleet") -> Any:
    """Run a test on the fleets named (`redis`, `amqp`); with more `names`, each case is a tuple
    whose first item is the broker: `on_brokers(("redis", "threads"), ..., names="fleet,pool")`.
    Only the tests that show the brokers behave alike run on both: RabbitMQ doubles nothing else.
    A `server_model` among the names picks the emulator's (`tests.support.emulator`).
    """
    indirect = ["fleet", *(["server_model"] if "server_model" in names.split(",") else [])]
    return pytest.mark.parametrize(names, list(cases), indirect=indirect)


def flush_fleet_db() -> None:
    """Empty this worker's fleet database (`isolation.fleet_db`), so a fleet test starts on a
    Redis with nothing of an earlier test's fleets in it."""
    with redis.Redis.from_url(redis_url(fleet_db())) as r:
        r.flushdb()


class Fleet:
    """A fleet under test: processes through `LocalStack`, the emulator from the fixture."""

    def __init__(self, emulator: Any, tmp_path: Path, redis_base: str = REDIS_BASE, *,
                 twin_of: Fleet | None = None) -> None:
        """`twin_of`: a second fleet with the first's environment and key prefix, on another
        Redis database (two compose projects, blue/green): this worker's integration one."""
        self.emulator = emulator
        self.environment_id = (twin_of.environment_id if twin_of
                               else emulator.create_environment())
        self.tmp = tmp_path
        self.records_dir = tmp_path / "records"
        self.records_dir.mkdir()
        self.redis_url = f"{redis_base}/{integration_db() if twin_of else fleet_db()}"
        prefix = twin_of.prefix if twin_of else f"t{uuid.uuid4().hex[:8]}"
        self.stack = LocalStack(workdir=tmp_path, redis_url=self.redis_url,
                                environment_key=emulator.environment_key,
                                api_key=emulator.api_key, key_prefix=prefix,
                                base_url=emulator.base_url, environment_id=self.environment_id)
        self.prefix = self.stack.key_prefix
        self.overrides: dict[str, str] = {}
        self.unset: set[str] = set()  # variables the fleet's processes must not get
        self.admin = WorkClient(base_url=emulator.base_url, environment_id=self.environment_id,
                                environment_key=emulator.environment_key,
                                api_key=emulator.api_key)
        self.redis = redis.Redis.from_url(self.redis_url, decode_responses=True)
        self.mark = uuid.uuid4().hex

    # --- processes ---------------------------------------------------------------------------
    def env(self) -> dict[str, str]:
        env = self.stack.fleet_env(**{
            "DISPATCHER_FAKE_RECORD_DIR": str(self.records_dir),
            "DISPATCHER_SANDBOX_ENV_ALLOW": "PATH,HOME,DISPATCHER_FAKE_RECORD_DIR",
            "DISPATCHER_STOP_GRACE_SECONDS": "2",
            # Each attempt's output, kept where the test can read it (not the user's home).
            "DISPATCHER_SANDBOX_OUTPUT_DIR": str(self.tmp / "output"),
            "DISPATCHER_DESIRED_TTL_SECONDS": "30",
            FLEET_MARK: self.mark,
            **self.overrides,
        })
        return {k: v for k, v in env.items() if k not in self.unset}

    def environment_entry(self, **fields: str | int | float) -> str:
        """This fleet's environment as an entry of an environments file, with `fields` (limits,
        image...) of its own."""
        lines = [f"id = {json.dumps(self.environment_id)}",
                 f"key = {json.dumps(self.emulator.environment_key)}",
                 *(f"{name} = {json.dumps(value)}" for name, value in fields.items())]
        return "[[environment]]\n" + "".join(line + "\n" for line in lines)

    def serve_environments(self, entries: str) -> Path:
        """The fleet's processes serve the environments of an environments file (`entries`, its
        TOML) instead of the one the variables name."""
        path = self.tmp / "environments.toml"
        path.write_text(entries)
        self.unset |= {"ANTHROPIC_ENVIRONMENT_ID", "ANTHROPIC_ENVIRONMENT_KEY"}
        self.overrides["DISPATCHER_ENVIRONMENTS_FILE"] = str(path)
        return path

    def worker(self, name: str, *, pool: str = "threads", concurrency: int = 6,
               queues: str | None = None, beat: bool = False) -> subprocess.Popen[bytes]:
        return self.stack.worker(name, self.env(), pool=pool, concurrency=concurrency,
                                 queues=queues, beat=beat)

    def beat(self, name: str = "beat") -> subprocess.Popen[bytes]:
        return self.stack.celery(name, ["beat", "-l", "INFO"], self.env())

    def use_containers(self, image: str) -> None:
        """Run sessions as containers of the test image (tests/support/sandbox_image)."""
        self.records_dir.chmod(0o777)
        self.overrides.update({
            "DISPATCHER_SANDBOX_RUNTIME": "docker",
            "DISPATCHER_SANDBOX_IMAGE": image,
            "DISPATCHER_FLEET_ID": f"{self.prefix}-{uuid.uuid4().hex[:6]}",
            "DISPATCHER_SANDBOX_NETWORK": "none",  # test machines have no bridge
            "DISPATCHER_SANDBOX_PULL": "never",
            "DISPATCHER_SANDBOX_VOLUMES": f"{self.records_dir}:/records",
            # The cold path unless a test turns the warm pool on (tests/acceptance/test_warm_pool).
            "DISPATCHER_WARM_CONTAINERS": "0",
        })

    def containers(self, engine: Any, *, running: bool = False) -> list[dict[str, Any]]:
        """The engine's containers of this fleet."""
        labels = [f"dispatcher.fleet={self.prefix}"]
        if "DISPATCHER_FLEET_ID" in self.overrides:
            labels.append(f"dispatcher.fleet_id={self.overrides['DISPATCHER_FLEET_ID']}")
        found: list[dict[str, Any]] = engine.containers(
            all=not running, filters={"label": labels})
        return found

    def hostname(self, name: str) -> str:
        return self.stack.hostname(name)

    def slots(self) -> int:
        """The session slots the fleet's workers advertise now."""
        return Capacity(self.redis, prefix=self.prefix).total_slots()

    def wait_slots(self, slots: int, timeout: float = 30) -> None:
        wait_for(lambda: self.slots() >= slots, timeout=timeout,
                 what=f"{slots} advertised slots")

    def status_check(self) -> tuple[int, str]:
        """`dispatcher status --check` against the fleet: its exit code and what it printed."""
        command = Path(sys.executable).with_name("dispatcher")
        done = subprocess.run([str(command), "status", "--check"], env=self.env(),
                              capture_output=True, text=True, timeout=30)
        return done.returncode, done.stdout + done.stderr

    def lease(self, work_id: str) -> dict[str, str]:
        return self.redis.hgetall(f"{self.prefix}:lease:{work_id}")  # type: ignore[return-value]

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        self.stack.kill(name, sig)

    def stop_all(self) -> None:
        """Stop every process of the fleet; fail, once they are killed, if any outlived it (a
        child its parent's stop missed would run on after the test, beat publishing ticks)."""
        try:
            self.stack.stop_all()
        finally:
            self.admin.close()
            self.redis.close()
            left = processes_marked(self.mark)
            for pid, _ in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        assert not left, f"processes of the fleet outlived its stop: {left}"

    def log(self, name: str) -> str:
        return self.stack.log(name)

    # --- sessions ----------------------------------------------------------------------------
    def create(self, **metadata: Any) -> str:
        """Create a session; returns its work id."""
        meta = {k.replace("_", ".", 1) if k.startswith("fake_") else k: str(v)
                for k, v in metadata.items()}
        _, work_id = self.emulator.create_session(self.environment_id, metadata=meta)
        return str(work_id)

    def state(self, work_id: str) -> str:
        return self.admin.get(work_id).state

    def wait_stopped(self, work_ids: list[str], timeout: float = 60) -> None:
        def all_stopped() -> bool:
            return all(self.state(w) == "stopped" for w in work_ids)

        wait_for(all_stopped, timeout=timeout, interval=0.5, what="every work item stopped")

    def records(self, work_id: str) -> list[dict[str, Any]]:
        path = self.records_dir / f"{work_id}.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def events(self, work_id: str, name: str) -> list[dict[str, Any]]:
        return [r for r in self.records(work_id) if r["event"] == name]

    def wait_event(self, work_id: str, name: str, timeout: float = 30, count: int = 1) -> None:
        wait_for(lambda: len(self.events(work_id, name)) >= count, timeout=timeout,
                 what=f"{name} x{count} of {work_id}")

    def sandbox_pids_alive(self) -> list[int]:
        """Pids recorded by any sandbox (and its children) that still exist."""
        alive = []
        for path in self.records_dir.glob("*.jsonl"):
            for line in path.read_text().splitlines():
                record = json.loads(line)
                pid = record.get("pid")
                if pid and _alive(pid):
                    alive.append(pid)
        return alive


def processes_marked(mark: str) -> list[tuple[int, str]]:
    """(pid, command line) of each live process with `FLEET_MARK=mark` in its environment."""
    found = []
    needle = f"{FLEET_MARK}={mark}".encode()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/environ", "rb") as f:
                if needle not in f.read().split(b"\0"):
                    continue
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                command = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        if _alive(int(entry.name)):
            found.append((int(entry.name), command[:200]))
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purpose.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def assert_no_overlap(fleet: Fleet, work_id: str, *, death_times: dict[int, float]) -> None:
    """No two attempts of one session ran at the same time, from the sandboxes' records.

    A sandbox killed with SIGKILL records no exit; the test observed when it died and passes
    that time in `death_times` (pid -> epoch second).
    """
    starts: dict[int, float] = {}
    ends: dict[int, float] = dict(death_times)
    for record in fleet.records(work_id):
        if record["event"] == "started":
            starts[record["pid"]] = record["time"]
        elif record["event"] == "exited":
            ends[record["pid"]] = record["time"]
    spans = sorted((start, ends.get(pid)) for pid, start in starts.items())
    for (_, end), (next_start, _) in itertools.pairwise(spans):
        assert end is not None, f"an attempt of {work_id} has no known end before the next"
        assert next_start >= end, f"attempts of {work_id} overlapped"
