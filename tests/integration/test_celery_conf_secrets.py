"""No setting the fleet exposes carries the Redis password.

`celery inspect conf` and Flower's Config tab show what a worker's remote control returns:
`app.conf.table(with_defaults=...)` with Celery's own masking. This runs the real app module in
a fresh interpreter (it reads its settings at import) against a real Redis that requires the
password, and checks both that beat still connects with it and that no exposed value shows it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.support.isolation import free_port

PASSWORD = "Pw-0f-the-fleet-S3CRET"
AMQP_PASSWORD = "Pw-0f-the-broker-S3CRET"
START_TIMEOUT_S = 10.0
WORKER_START_TIMEOUT_S = 60.0
CELERY = str(Path(sys.executable).with_name("celery"))

PROBE = """
import json
from redbeat.schedulers import get_redis
from dispatcher.celery import app

print(json.dumps({
    "ping": get_redis(app).ping(),
    "humanize": app.conf.humanize(with_defaults=False, censored=True),
    "table": app.conf.table(with_defaults=True),
    "table_changes": app.conf.table(with_defaults=False),
}, default=repr))
"""



@pytest.fixture
def locked_redis(tmp_path: Path) -> Iterator[int]:
    """A Redis of its own that requires a user and password (ACL), on a free port."""
    port = free_port()
    acl = tmp_path / "users.acl"
    acl.write_text(f"user default off\nuser fleet on >{PASSWORD} ~* &* +@all\n")
    process = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--aclfile", str(acl), "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = redis.Redis(port=port, username="fleet", password=PASSWORD)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise
                time.sleep(0.05)
        client.close()  # the probe's own connection, not left to the garbage collector
        yield port
    finally:
        process.terminate()
        process.wait(timeout=10)


def _redis_url(port: int, form: str) -> str:
    """The fleet's Redis URL with its credentials in the user part, or in the query (which
    redis-py reads too, and the settings move into the user part, where Celery masks them)."""
    if form == "query":
        return f"redis://127.0.0.1:{port}/0?username=fleet&password={PASSWORD}"
    return f"redis://fleet:{PASSWORD}@127.0.0.1:{port}/0"


@pytest.mark.parametrize("form", ["userinfo", "query"])
def test_no_exposed_setting_carries_the_redis_password(locked_redis: int, form: str) -> None:
    url = _redis_url(locked_redis, form)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DISPATCHER_", "ANTHROPIC_"))}
    env["DISPATCHER_REDIS_URL"] = url
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                          env=env, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    assert found["ping"] is True  # beat reaches the locked Redis with the password
    assert PASSWORD not in done.stdout
    assert PASSWORD not in done.stderr  # nor in a warning at import
    assert "redbeat_redis_url" in found["humanize"]  # the setting is there, without it


@pytest.mark.parametrize(("broker", "form"),
                         [("redis", "userinfo"), ("amqp", "userinfo"), ("redis", "query")])
def test_celery_inspect_conf_of_a_running_worker_shows_no_password(
        locked_redis: int, tmp_path: Path, broker: str, form: str,
        request: pytest.FixtureRequest) -> None:
    """What `celery inspect conf` and Flower's Config tab show, from a real worker; with
    RabbitMQ as the broker, neither its password nor Redis' shows."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DISPATCHER_", "ANTHROPIC_"))}
    if broker == "amqp":
        make_vhost = request.getfixturevalue("rabbitmq_vhost")
        env["DISPATCHER_BROKER_URL"] = make_vhost(f"fleet-{uuid.uuid4().hex[:8]}", AMQP_PASSWORD)
    env.update({"DISPATCHER_REDIS_URL": _redis_url(locked_redis, form),
                "ANTHROPIC_ENVIRONMENT_ID": "env_conf", "ANTHROPIC_ENVIRONMENT_KEY": "sk-ant-k",
                # Nothing is polled (no beat), but never the real API from a test.
                "ANTHROPIC_BASE_URL": "http://127.0.0.1:9"})
    name = f"conf-{os.getpid()}@test"
    log = tmp_path / "worker.log"
    with open(log, "wb") as out:
        worker = subprocess.Popen(
            [CELERY, "-A", "dispatcher", "worker", "-Q", "dispatcher.control", "-c", "1",
             "-n", name, "--without-gossip", "--without-mingle", "-l", "INFO"],
            stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + WORKER_START_TIMEOUT_S
        while b"ready." not in log.read_bytes():
            assert worker.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        shown = subprocess.run([CELERY, "-A", "dispatcher", "inspect", "conf", "-j",
                                "-d", name, "--timeout", "10"], capture_output=True, text=True,
                               env=env, timeout=60, check=False)
        shown_all = subprocess.run([CELERY, "-A", "dispatcher", "inspect", "conf", "-j",
                                    "-d", name, "--timeout", "10", "true"],
                                   capture_output=True, text=True, env=env, timeout=60,
                                   check=False)
    finally:
        worker.terminate()
        worker.wait(timeout=30)
    for result in (shown, shown_all):
        assert result.returncode == 0, result.stdout + result.stderr
        assert "redbeat_redis_url" in result.stdout, result.stdout[:2000]
        assert PASSWORD not in result.stdout + result.stderr
        assert AMQP_PASSWORD not in result.stdout + result.stderr
        assert f"{broker}://" in json.loads(result.stdout)[name]["broker_url"], "the broker used"
    assert PASSWORD not in log.read_text()
    assert AMQP_PASSWORD not in log.read_text()
