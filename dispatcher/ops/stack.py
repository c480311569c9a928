"""The whole system on 127.0.0.1, as processes: Redis, the emulator, Celery workers, Flower.

Used by `dispatcher demo` and the benchmarks, so what a newcomer sees and what we measure run
exactly as a user would run them: `dispatcher emulator`, `celery -A dispatcher worker`,
`celery -A dispatcher flower`, each a real process with its own log file.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx
import redis

from dispatcher.emulator.cli import ENV_API_KEY, ENV_ENVIRONMENT_KEY
from dispatcher.workapi import ANTHROPIC_VERSION, BETA

__all__ = ["API_HEADERS", "LocalStack", "free_port"]

# What every request to the API needs; the emulator, as the service, refuses one without them.
API_HEADERS = {"anthropic-version": ANTHROPIC_VERSION, "anthropic-beta": BETA}

BIN = Path(sys.executable).parent
STARTUP_TIMEOUT_SECONDS = 30.0
# How long a process has from SIGTERM to exit before it is SIGKILLed: a worker's warm shutdown
# waits for its running tasks, and a stop should see that shutdown, not a kill.
STOP_TIMEOUT_SECONDS = 20.0
# How long a process group's members take to go once SIGKILLed (the kernel's work; generous for
# a loaded host), before `stop` says which outlived it.
GROUP_KILL_WAIT_SECONDS = 5.0
# Standard library only, so it runs by path with -S: a sandbox that starts in ~15 ms, not ~60.
FAKE_SESSION = f"{sys.executable} -S {Path(__file__).parents[1] / 'emulator' / 'fake_session.py'}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait(predicate: Any, what: str, timeout: float = STARTUP_TIMEOUT_SECONDS) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not come up within {timeout:.0f} s")
        time.sleep(0.1)


@dataclass
class LocalStack:
    workdir: Path
    redis_url: str = "redis://127.0.0.1:6379/0"
    environment_key: str = field(default_factory=lambda: "sk-ant-oat01-" + secrets.token_hex(16))
    api_key: str = field(default_factory=lambda: "sk-ant-api03-" + secrets.token_hex(16))
    key_prefix: str = field(default_factory=lambda: "demo" + secrets.token_hex(3))
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    # Every process started, a name's earlier ones too (a worker started again under its name):
    # `stop_all` stops them all, not only the latest of each name.
    spawned: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)
    base_url: str = ""
    environment_id: str = ""
    _logs: list[IO[bytes]] = field(default_factory=list)

    # --- Redis -------------------------------------------------------------------------------
    def ensure_redis(self) -> str:
        """Use the Redis at `redis_url` if it answers, else start a private one."""
        if self._redis_answers(self.redis_url):
            return self.redis_url
        server = shutil.which("redis-server")
        if server is None:
            raise RuntimeError(f"no Redis answers at {self.redis_url} and redis-server is missing")
        port = free_port()
        self.redis_url = f"redis://127.0.0.1:{port}/0"
        self._spawn("redis", [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                              "--appendonly", "no"])
        _wait(lambda: self._redis_answers(self.redis_url), "redis-server")
        return self.redis_url

    @staticmethod
    def _redis_answers(url: str) -> bool:
        try:
            return bool(redis.Redis.from_url(url, socket_connect_timeout=1).ping())
        except redis.RedisError:
            return False

    # --- the emulator -----------------------------------------------------------------------
    def start_emulator(self, *extra: str, env: dict[str, str] | None = None) -> str:
        """`extra`: more of `dispatcher emulator`'s options; `env`: variables added to this
        process's for it. Its keys and Redis URL (which may hold a password) go in its
        environment, never its argv, which every user of the host can read (`ps`)."""
        port = free_port()
        self.base_url = f"http://127.0.0.1:{port}"
        self._spawn("emulator", [str(BIN / "dispatcher"), "emulator", "--port", str(port),
                                 "--key-prefix", f"{self.key_prefix}-emulator", *extra],
                    env={**os.environ, **(env or {}), "DISPATCHER_REDIS_URL": self.redis_url,
                         ENV_ENVIRONMENT_KEY: self.environment_key, ENV_API_KEY: self.api_key})
        _wait(self._emulator_answers, "the emulator")
        self.environment_id = self.create_environment()
        return self.base_url

    def _emulator_answers(self) -> bool:
        self._check_alive("emulator")
        try:
            return httpx.get(f"{self.base_url}/openapi.json", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def _admin(self, method: str, path: str, **kwargs: Any) -> Any:
        response = httpx.request(method, f"{self.base_url}{path}", timeout=10,
                                 headers={**API_HEADERS, "x-api-key": self.api_key}, **kwargs)
        response.raise_for_status()
        return response.json() if response.content else None

    def create_environment(self, name: str = "demo") -> str:
        body = {"name": name, "config": {"type": "self_hosted"}}
        return str(self._admin("POST", "/v1/environments", json=body)["id"])

    def create_session(self, metadata: dict[str, str] | None = None, *,
                       script: list[dict[str, Any]] | None = None) -> tuple[str, str]:
        """Create a session on the emulator; returns (session id, work id). `script`: the tool
        calls its scripted agent asks for (the emulator's `emulator_script`)."""
        body: dict[str, Any] = {"environment_id": self.environment_id, "agent": "demo",
                                "metadata": metadata or {}}
        if script is not None:
            body["emulator_script"] = script
        session = self._admin("POST", "/v1/sessions", json=body)
        return str(session["id"]), str(session["work_id"])

    def work_state(self, work_id: str) -> str:
        path = f"/v1/environments/{self.environment_id}/work/{work_id}"
        return str(self._admin("GET", path)["state"])

    def requests_log(self) -> list[dict[str, Any]]:
        """The emulator's request log (with the scripted agents' tool results)."""
        return list(self._admin("GET", "/_emulator/requests")["data"])

    # --- the fleet ----------------------------------------------------------------------------
    def fleet_env(self, **overrides: str) -> dict[str, str]:
        own = ("ANTHROPIC_", "DISPATCHER_")
        env = {k: v for k, v in os.environ.items() if not k.startswith(own)}
        env.update({
            "ANTHROPIC_BASE_URL": self.base_url,
            "ANTHROPIC_ENVIRONMENT_ID": self.environment_id,
            "ANTHROPIC_ENVIRONMENT_KEY": self.environment_key,
            "DISPATCHER_REDIS_URL": self.redis_url,
            "DISPATCHER_KEY_PREFIX": self.key_prefix,
            "DISPATCHER_ON_WORK": FAKE_SESSION,
        })
        env.update(overrides)
        return env

    def celery(self, name: str, args: list[str], env: dict[str, str], *,
               wrapper: Sequence[str] = ()) -> subprocess.Popen[bytes]:
        """`celery` with `args`; `wrapper` runs it inside another command (a test's network
        namespace: `ip netns exec NS`), which must exec it, so the pid stays the worker's."""
        argv = [*wrapper, str(BIN / "celery"), "-A", "dispatcher", *args]
        return self._spawn(name, argv, env=env)

    def worker(self, name: str, env: dict[str, str], *, pool: str = "threads",
               concurrency: int = 10, queues: str | None = None, beat: bool = False,
               wrapper: Sequence[str] = ()) -> subprocess.Popen[bytes]:
        args = ["worker", "-n", f"{name}@%h", "-P", pool, "-c", str(concurrency), "-l", "INFO",
                "--without-mingle", "--without-gossip"]
        args += ["-Q", queues] if queues else []
        args += ["-B"] if beat else []
        return self.celery(name, args, env, wrapper=wrapper)

    def webhooks(self, name: str, env: dict[str, str], *, port: int,
                 signing_key: str) -> subprocess.Popen[bytes]:
        """`dispatcher webhooks` on 127.0.0.1:`port`, with the signing key in its environment
        (never its argv) and Redis, but no environment key: it only wakes the fleet."""
        own = {k: v for k, v in env.items()
               if k not in ("ANTHROPIC_ENVIRONMENT_KEY", "DISPATCHER_ON_WORK")}
        process = self._spawn(name, [str(BIN / "dispatcher"), "webhooks", "--port", str(port)],
                              env={**own, "ANTHROPIC_WEBHOOK_SIGNING_KEY": signing_key})
        _wait(lambda: self._answers(name, f"http://127.0.0.1:{port}/health"), name)
        return process

    def _answers(self, name: str, url: str) -> bool:
        self._check_alive(name)
        try:
            return httpx.get(url, timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def hostname(self, name: str) -> str:
        return f"{name}@{socket.gethostname()}"

    # --- processes ----------------------------------------------------------------------------
    def _spawn(self, name: str, argv: list[str],
               env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = open(self.workdir / f"{name}.log", "ab")  # noqa: SIM115 (closed in stop_all)
        self._logs.append(log)
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env,
                                   cwd=self.workdir, start_new_session=True)
        self.processes[name] = process
        self.spawned.append((name, process))
        return process

    def _check_alive(self, name: str) -> None:
        code = self.processes[name].poll()
        if code is not None:
            tail = (self.workdir / f"{name}.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{name} exited with {code}:\n{tail}")

    def log(self, name: str) -> str:
        return (self.workdir / f"{name}.log").read_text(errors="replace")

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        self.processes[name].send_signal(sig)

    def stop(self, name: str, *, timeout: float = STOP_TIMEOUT_SECONDS) -> None:
        _stop(self.processes[name], timeout=timeout)

    def stop_all(self) -> None:
        """Stop everything this stack started, workers first, Redis last. A process whose group
        outlived it fails the stop once every other is stopped too: raised at once, it would
        leave the rest (the emulator, Redis) running after the stack."""
        rank = {"emulator": 1, "redis": 2}
        with contextlib.ExitStack() as stopping:  # its callbacks run last in, first out
            for log in self._logs:
                stopping.callback(log.close)
            for _, process in sorted(self.spawned, key=lambda spawned: -rank.get(spawned[0], 0)):
                stopping.callback(_stop, process, timeout=STOP_TIMEOUT_SECONDS)


def _stop(process: subprocess.Popen[bytes], *, timeout: float) -> None:
    """SIGTERM, SIGKILL past `timeout`, then the rest of its process group killed: each process
    starts a group of its own (`start_new_session`), and what it forked stays in it. A child
    does not die with its parent: a worker SIGKILLed (here, or by a test) leaves its embedded
    beat (`-B`) or its prefork pool children running, and beat goes on publishing ticks."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    with contextlib.suppress(ProcessLookupError):  # the group is empty: nothing to do
        os.killpg(process.pid, signal.SIGKILL)
    deadline = time.monotonic() + GROUP_KILL_WAIT_SECONDS
    while (left := _group_members(process.pid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    if left:
        raise RuntimeError(f"processes of group {process.pid} outlived SIGKILL: {left}")


def _group_members(pgid: int) -> list[int]:
    """The live processes of process group `pgid` (a zombie is dead: only its reaping is left);
    none known where there is no /proc."""
    members: list[int] = []
    if not os.path.isdir("/proc"):
        return members
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            members.append(int(entry.name))
    return members
