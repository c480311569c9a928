"""The emulator as a real subprocess over real HTTP on 127.0.0.1, and its fixtures.

    emulator            one server per test worker (fast); faults reset after each test. Make
                        a new environment per test: `emulator.create_environment()`.
    emulator_factory    start servers with their own flags (lease expiry modes, short TTLs):
                        `emulator_factory("--lease-expiry", "requeue", "--min-ttl", "1")`,
                        and variables (`env={...}`: keys stay out of the process list);
                        each is stopped and its Redis keys deleted at the end of the test.

Each server gets a unique `--key-prefix`, so its keys never meet anyone else's; they are
deleted when it stops. Redis: the emulators' database (`isolation.EMULATOR_DB`).
$DISPATCHER_TEST_EMULATOR_MODEL (`sdk-2.17`, the default, or `earlier`) starts every server with
that `--server-model`, to run a set of tests under the other setting of every switch; a test's
own flags still win.

    server_model        the model a test's `emulator` follows (the variable's, by default). The
                        focused set (a session run, stops, recovery, a lost reply) runs under
                        both in every full run: `@under_both_models`, or `server_model` among a
                        parametrization's indirect names (`on_brokers(..., names=...)`).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from tests.support.isolation import EMULATOR_DB, free_port, redis_url

# Every setting of the emulator's switches at once (`--server-model`).
SERVER_MODELS = ("sdk-2.17", "earlier")
# An emulator imports FastAPI and pydantic before it answers: about 1 s alone, past 20 s seen
# with two cores shared by four test workers and other runs (load 40).
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0
# What the service requires on every API request (the emulator answers 400 without them); the
# version the official SDK (2.10.0 to 2.17.0) sends.
API_HEADERS = {"anthropic-version": "2026-10-21", "anthropic-beta": "managed-agents-2026-04-01"}


def default_model() -> str:
    """The server model every emulator of this run starts with, unless a test asks for another."""
    return os.environ.get("DISPATCHER_TEST_EMULATOR_MODEL", SERVER_MODELS[0])


class EmulatorProcess:
    """A running `dispatcher emulator` and helpers to drive it over HTTP."""

    def __init__(self, *args: str, log_dir: Path, env: dict[str, str] | None = None) -> None:
        self.redis_url = redis_url(EMULATOR_DB)
        self.prefix = f"emutest{uuid.uuid4().hex[:10]}"
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.environment_key = f"sk-ant-oat01-test-{uuid.uuid4().hex}"
        self.api_key = f"sk-ant-api03-test-{uuid.uuid4().hex}"
        self.log_path = log_dir / f"emulator-{self.port}.log"
        own = {k: v for k, v in os.environ.items() if not k.startswith("DISPATCHER_EMULATOR_")}
        env = {**own, **(env or {})}
        model = default_model()
        command = [sys.executable, "-m", "dispatcher.ops.cli", "emulator", "--port", str(self.port),
                   "--redis-url", self.redis_url, "--key-prefix", self.prefix,
                   "--environment-key", self.environment_key, "--api-key", self.api_key,
                   "--server-model", model, *args]
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        self.http = httpx.Client(base_url=self.base_url, timeout=10.0, headers=API_HEADERS)
        self._wait_ready()

    # --- lifecycle ---------------------------------------------------------------------------
    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"emulator exited at start:\n{self.output()}")
            try:
                if self.http.get("/_emulator/health").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"emulator did not answer within {START_TIMEOUT_S}s:\n{self.output()}")

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        self.http.close()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.cleanup_keys()

    def cleanup_keys(self) -> None:
        r = redis.Redis.from_url(self.redis_url)
        for key in r.scan_iter(f"{self.prefix}:*", count=1000):
            r.delete(key)
        r.close()

    # --- credentials -------------------------------------------------------------------------
    # With the API headers, so a test's own client is a complete caller too.
    @property
    def org_headers(self) -> dict[str, str]:
        return {**API_HEADERS, "x-api-key": self.api_key}

    @property
    def env_headers(self) -> dict[str, str]:
        return {**API_HEADERS, "authorization": f"Bearer {self.environment_key}"}

    def work_url(self, environment_id: str, suffix: str = "") -> str:
        return f"/v1/environments/{environment_id}/work{suffix}"

    # --- making work -------------------------------------------------------------------------
    def create_environment(self, name: str = "test") -> str:
        response = self.http.post("/v1/environments", headers=self.org_headers,
                                  json={"name": name, "config": {"type": "self_hosted"}})
        response.raise_for_status()
        return str(response.json()["id"])

    def create_session(self, environment_id: str,
                       metadata: dict[str, str] | None = None) -> tuple[str, str]:
        """Create a session (which queues its work item); returns (session id, work id)."""
        response = self.http.post("/v1/sessions", headers=self.org_headers, json={
            "environment_id": environment_id, "agent": "agent_test", "metadata": metadata or {}})
        response.raise_for_status()
        body = response.json()
        return str(body["id"]), str(body["work_id"])

    def enqueue(self, environment_id: str, data_type: str,
                metadata: dict[str, str] | None = None) -> dict[str, Any]:
        """Queue a work item of any data type (admin); returns the work item."""
        response = self.http.post(f"/_emulator/environments/{environment_id}/work",
                                  headers=self.org_headers,
                                  json={"data": {"type": data_type}, "metadata": metadata or {}})
        response.raise_for_status()
        return dict(response.json())

    def healthcheck(self, environment_id: str) -> dict[str, Any]:
        response = self.http.post(f"/_emulator/environments/{environment_id}/healthcheck",
                                  headers=self.org_headers)
        response.raise_for_status()
        return dict(response.json())

    # --- switches and the request log --------------------------------------------------------
    def set_faults(self, **changes: Any) -> dict[str, Any]:
        response = self.http.post("/_emulator/faults", headers=self.org_headers, json=changes)
        response.raise_for_status()
        return dict(response.json())

    def reset_faults(self) -> dict[str, Any]:
        response = self.http.delete("/_emulator/faults", headers=self.org_headers)
        response.raise_for_status()
        return dict(response.json())

    def requests_log(self) -> list[dict[str, Any]]:
        response = self.http.get("/_emulator/requests", headers=self.org_headers)
        response.raise_for_status()
        return list(response.json()["data"])

    def clear_requests(self) -> None:
        self.http.delete("/_emulator/requests", headers=self.org_headers).raise_for_status()

    # --- the Work API, thin (tests that check statuses use `http` directly) ------------------
    def poll(self, environment_id: str, *, block_ms: int | None = None,
             worker_id: str | None = None, reclaim_older_than_ms: int | None = None,
             ) -> dict[str, Any] | None:
        params = {k: v for k, v in {"block_ms": block_ms,
                                    "reclaim_older_than_ms": reclaim_older_than_ms}.items()
                  if v is not None}
        headers = {**self.env_headers, **({"anthropic-worker-id": worker_id} if worker_id else {})}
        response = self.http.get(self.work_url(environment_id, "/poll"), params=params,
                                 headers=headers)
        response.raise_for_status()
        found: dict[str, Any] | None = response.json()
        return found

    def get(self, environment_id: str, work_id: str) -> dict[str, Any]:
        response = self.http.get(self.work_url(environment_id, f"/{work_id}"),
                                 headers=self.org_headers)
        response.raise_for_status()
        return dict(response.json())


@pytest.fixture(scope="session")
def _emulator_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmulatorProcess]:
    server = EmulatorProcess(log_dir=tmp_path_factory.mktemp("emulator"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def server_model(request: pytest.FixtureRequest) -> str:
    """The server model of the test's `emulator`: the run's, or the test's parameter."""
    return str(getattr(request, "param", default_model()))


# The focused set's mark: the test runs under each server model.
under_both_models = pytest.mark.parametrize("server_model", SERVER_MODELS, indirect=True)


@pytest.fixture
def emulator(_emulator_server: EmulatorProcess, server_model: str,
             request: pytest.FixtureRequest) -> Iterator[EmulatorProcess]:
    """The shared emulator (fault switches put back after the test); a server of its own for a
    test under the other server model."""
    if server_model != default_model():
        factory = request.getfixturevalue("emulator_factory")
        yield factory("--server-model", server_model)
        return
    yield _emulator_server
    _emulator_server.reset_faults()


@pytest.fixture
def emulator_factory(tmp_path: Path) -> Iterator[Callable[..., EmulatorProcess]]:
    started: list[EmulatorProcess] = []

    def start(*args: str, env: dict[str, str] | None = None) -> EmulatorProcess:
        server = EmulatorProcess(*args, log_dir=tmp_path, env=env)
        started.append(server)
        return server

    try:
        yield start
    finally:
        for server in started:
            server.stop()
