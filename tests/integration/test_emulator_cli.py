"""`dispatcher emulator` as a user starts it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
import redis

from tests.support.isolation import EMULATOR_DB, free_port, redis_url

pytestmark = pytest.mark.integration

DISPATCHER = Path(sys.executable).with_name("dispatcher")
API_HEADERS = {"anthropic-version": "2026-10-21", "anthropic-beta": "managed-agents-2026-04-01"}


def test_help_works_from_the_console_script_and_the_module() -> None:
    for command in ([str(DISPATCHER)], [sys.executable, "-m", "dispatcher.ops.cli"]):
        result = subprocess.run([*command, "emulator", "--help"], capture_output=True,
                                text=True, timeout=30, check=True)
        for flag in ("--redis-url", "--lease-expiry", "--environment-key", "--api-key",
                     "--stop-response", "--drop-rate", "--create-environment"):
            assert flag in result.stdout


def test_it_prints_generated_keys_environments_and_where_it_listens(tmp_path: Path) -> None:
    port = free_port()
    prefix = f"emucli{uuid.uuid4().hex[:8]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISPATCHER_EMULATOR_")}
    log = tmp_path / "out.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [str(DISPATCHER), "emulator", "--port", str(port), "--key-prefix", prefix,
             "--redis-url", redis_url(EMULATOR_DB), "--create-environment", "demo"],
            stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 20
        while "listening on" not in log.read_text():
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        lines = dict(line.split(": ", 1) for line in log.read_text().splitlines()
                     if ": " in line)
        assert lines["environment key"].startswith("sk-ant-oat01-")
        assert lines["api key"].startswith("sk-ant-api03-")
        env_id = lines["environment demo"]
        assert f"http://127.0.0.1:{port}" in log.read_text()
        stats = httpx.get(f"http://127.0.0.1:{port}/v1/environments/{env_id}/work/stats",
                          headers={**API_HEADERS, "x-api-key": lines["api key"]})
        assert stats.status_code == 200
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
    finally:
        if process.poll() is None:
            process.kill()
        r = redis.Redis.from_url(redis_url(EMULATOR_DB))
        for key in r.scan_iter(f"{prefix}:*"):
            r.delete(key)
