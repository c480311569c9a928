"""No setting the fleet exposes carries the Redis password.

`celery inspect conf` and Flower's Config tab show what a worker's remote control returns:
`app.conf.table(with_defaults=...)` with Celery's own masking. This runs the real app module in
a fresh interpreter (it reads its settings at import) against a real Redis that requires the
password, and checks both that beat still connects with it and that no exposed value shows it;
then the same through a Sentinel that has a password of its own.
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
from tests.support.sentinel import SentinelServer

PASSWORD = "Pw-0f-the-fleet-S3CRET"
AMQP_PASSWORD = "Pw-0f-the-broker-S3CRET"
SENTINEL_PASSWORD = "Pw-0f-the-sentinel-S3CRET"
SECRETS = (PASSWORD, AMQP_PASSWORD, SENTINEL_PASSWORD)
START_TIMEOUT_S = 10.0
WORKER_START_TIMEOUT_S = 60.0
CELERY = str(Path(sys.executable).with_name("celery"))

PROBE = """
import json
from redbeat.schedulers import get_redis
from dispatcher.celery import app
from dispatcher.redis_connect import connect
from dispatcher.settings import load_settings

print(json.dumps({
    "ping": get_redis(app).ping(),
    "backend_ping": app.backend.client.ping(),
    "registry_ping": connect(load_settings(), timeout=5).ping(),
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
        yield port
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture
def locked_sentinel(locked_redis: int, tmp_path: Path) -> Iterator[SentinelServer]:
    """A Sentinel with a password of its own, watching the locked Redis."""
    sentinel = SentinelServer(tmp_path / "sentinel", locked_redis,
                              "sentinel auth-user {name} fleet",
                              f"sentinel auth-pass {{name}} {PASSWORD}",
                              f"requirepass {SENTINEL_PASSWORD}", password=SENTINEL_PASSWORD)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while sentinel.master_port() != locked_redis:
            assert time.monotonic() < deadline and sentinel.process.poll() is None
            time.sleep(0.05)
        yield sentinel
    finally:
        sentinel.stop()


def _fleet_env(redis_port: int, sentinel: SentinelServer | None, *,
               form: str = "userinfo") -> dict[str, str]:
    """The fleet's variables for the locked Redis, directly or through the Sentinel; with the
    Sentinel, the URL's host is a closed port: only the Sentinel can lead to the master. The
    direct URL carries its credentials in the user part, or in the query (`form`), which
    redis-py reads too and the settings move into the user part, where Celery masks them."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DISPATCHER_", "ANTHROPIC_"))}
    if sentinel is None:
        env["DISPATCHER_REDIS_URL"] = (
            f"redis://127.0.0.1:{redis_port}/0?username=fleet&password={PASSWORD}"
            if form == "query" else f"redis://fleet:{PASSWORD}@127.0.0.1:{redis_port}/0")
        return env
    env.update({"DISPATCHER_REDIS_URL": f"redis://fleet:{PASSWORD}@127.0.0.1:{free_port()}/0",
                "DISPATCHER_REDIS_SENTINELS": sentinel.address,
                "DISPATCHER_REDIS_SENTINEL_MASTER": sentinel.master_name,
                "DISPATCHER_REDIS_SENTINEL_PASSWORD": SENTINEL_PASSWORD})
    return env


@pytest.mark.parametrize("via", ["url", "query", "sentinel"])
def test_no_exposed_setting_carries_the_redis_password(
        locked_redis: int, via: str, request: pytest.FixtureRequest) -> None:
    sentinel = request.getfixturevalue("locked_sentinel") if via == "sentinel" else None
    env = _fleet_env(locked_redis, sentinel, form="query" if via == "query" else "userinfo")
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                          env=env, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    # beat, the result backend and the registry reach the locked Redis with the password
    assert (found["ping"], found["backend_ping"], found["registry_ping"]) == (True, True, True)
    for secret in SECRETS:
        assert secret not in done.stdout
        assert secret not in done.stderr  # nor in a warning at import
    assert "redbeat_redis_url" in found["humanize"]  # the setting is there, without it


@pytest.mark.parametrize(("broker", "form"), [("redis", "userinfo"), ("amqp", "userinfo"),
                                              ("redis", "query"), ("sentinel", "userinfo")])
def test_celery_inspect_conf_of_a_running_worker_shows_no_password(
        locked_redis: int, tmp_path: Path, broker: str, form: str,
        request: pytest.FixtureRequest) -> None:
    """What `celery inspect conf` and Flower's Config tab show, from a real worker; with
    RabbitMQ as the broker, neither its password nor Redis' shows; through a Sentinel (the
    broker kombu's `sentinel://`), neither Redis' nor the Sentinel's."""
    sentinel = request.getfixturevalue("locked_sentinel") if broker == "sentinel" else None
    env = _fleet_env(locked_redis, sentinel, form=form)
    if broker == "amqp":
        make_vhost = request.getfixturevalue("rabbitmq_vhost")
        env["DISPATCHER_BROKER_URL"] = make_vhost(f"fleet-{uuid.uuid4().hex[:8]}", AMQP_PASSWORD)
    env.update({"ANTHROPIC_ENVIRONMENT_ID": "env_conf", "ANTHROPIC_ENVIRONMENT_KEY": "sk-ant-k",
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
        for secret in SECRETS:
            assert secret not in result.stdout + result.stderr
        assert f"{broker}://" in json.loads(result.stdout)[name]["broker_url"], "the broker used"
    for secret in SECRETS:
        assert secret not in log.read_text()
