"""The operator commands against the emulator and a registry on real Redis.

Most tests run `main([...])` in-process with the environment monkeypatched; a few run the
`dispatcher` console script as a user would. Exit codes: 0 ok, 1 API error, 2 usage or config,
3 unreachable, 4 not found.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from dispatcher.control.capacity import Capacity
from dispatcher.lease.model import Lease, Phase, StopKind
from dispatcher.lease.registry import LeaseRegistry
from dispatcher.metrics import Metrics
from dispatcher.ops.cli import main
from dispatcher.session.warm_book import WarmBook
from tests.support.isolation import free_port, integration_db, redis_url

pytestmark = pytest.mark.integration

DISPATCHER = Path(sys.executable).with_name("dispatcher")


@dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


@dataclass
class Cli:
    """`dispatcher` in-process, against one fresh environment of the shared emulator."""

    emulator: Any
    environment_id: str
    monkeypatch: pytest.MonkeyPatch
    capsys: pytest.CaptureFixture[str]

    def __call__(self, *argv: str) -> Result:
        self.capsys.readouterr()
        code = main(list(argv))
        captured = self.capsys.readouterr()
        result = Result(code, captured.out, captured.err)
        for key in (self.emulator.environment_key, self.emulator.api_key):
            assert key not in result.out + result.err, "a key was printed"
        return result

    def env(self) -> dict[str, str]:
        return {"ANTHROPIC_BASE_URL": self.emulator.base_url,
                "ANTHROPIC_ENVIRONMENT_ID": self.environment_id,
                "ANTHROPIC_ENVIRONMENT_KEY": self.emulator.environment_key,
                "ANTHROPIC_API_KEY": self.emulator.api_key}

    def session(self, **metadata: str) -> tuple[str, str]:
        """A queued session; returns (session id, work id)."""
        session_id, work_id = self.emulator.create_session(self.environment_id, metadata)
        return str(session_id), str(work_id)

    def state(self, work_id: str) -> str:
        return str(self.emulator.get(self.environment_id, work_id)["state"])


def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(("ANTHROPIC_", "DISPATCHER_")) and name != "DISPATCHER_TEST_REDIS":
            monkeypatch.delenv(name)


@pytest.fixture
def cli(emulator: Any, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> Cli:
    _clean_env(monkeypatch)
    runner = Cli(emulator, emulator.create_environment(), monkeypatch, capsys)
    for name, value in runner.env().items():
        monkeypatch.setenv(name, value)
    return runner



# --- stats, list, show ----------------------------------------------------------------------
def test_stats_counts_the_queue(cli: Cli) -> None:
    cli.session()
    cli.session()
    result = cli("stats", "--json")
    assert result.code == 0, result.err
    assert result.json()["depth"] == 2
    assert result.json()["pending"] == 0
    human = cli("stats")
    assert re.search(r"^depth\s+2$", human.out, re.MULTILINE), human.out


def test_stats_takes_either_key(cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ANTHROPIC_ENVIRONMENT_KEY")
    assert cli("stats", "--json").code == 0
    monkeypatch.delenv("ANTHROPIC_API_KEY")
    monkeypatch.setenv("ANTHROPIC_ENVIRONMENT_KEY", cli.emulator.environment_key)
    assert cli("stats", "--json").code == 0


def test_list_pages_filters_and_never_needs_the_organisation_key(
        cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    work_ids = [cli.session()[1] for _ in range(3)]
    cli.emulator.http.post(cli.emulator.work_url(cli.environment_id, f"/{work_ids[0]}/stop"),
                           headers=cli.emulator.org_headers, json={"force": True})
    monkeypatch.delenv("ANTHROPIC_API_KEY")

    one_page = cli("list", "--limit", "2", "--json").json()
    assert len(one_page["data"]) == 2 and one_page["next_page"]
    every = cli("list", "--limit", "2", "--all", "--json").json()
    assert sorted(w["id"] for w in every["data"]) == sorted(work_ids)
    assert every["next_page"] is None
    assert all("secret" not in w for w in every["data"])
    stopped = cli("list", "--all", "--state", "stopped", "--json").json()
    assert [w["id"] for w in stopped["data"]] == [work_ids[0]]
    human = cli("list", "--all")
    assert human.code == 0 and all(w in human.out for w in work_ids)
    assert "STATE" in human.out.splitlines()[0]


def test_show_prints_the_item_without_its_secret(cli: Cli) -> None:
    session_id, work_id = cli.session(team="blue")
    result = cli("show", work_id, "--json")
    assert result.code == 0, result.err
    body = result.json()
    assert (body["id"], body["state"], body["data"]["id"]) == (work_id, "queued", session_id)
    assert body["metadata"] == {"team": "blue"}
    assert "secret" not in body
    human = cli("show", work_id)
    assert work_id in human.out and "metadata.team" in human.out and "secret" not in human.out


# --- stop, update ---------------------------------------------------------------------------
def test_stop_graceful_force_and_again(cli: Cli) -> None:
    _, queued = cli.session()
    result = cli("stop", queued, "--json")
    assert result.code == 0, result.err
    assert result.json()["already_stopped"] is False
    assert cli.state(queued) == "stopped"
    again = cli("stop", queued, "--json")
    assert again.code == 0 and again.json()["already_stopped"] is True
    _, other = cli.session()
    forced = cli("stop", other, "--force")
    assert forced.code == 0 and "force" in forced.out
    assert cli.state(other) == "stopped"


def test_update_sets_empties_and_deletes_keys(cli: Cli) -> None:
    _, work_id = cli.session(old="1", gone="x")
    result = cli("update", work_id, "team=red", "note=", "--delete", "gone", "--json")
    assert result.code == 0, result.err
    assert result.json()["metadata"] == {"old": "1", "team": "red", "note": ""}
    assert cli.emulator.get(cli.environment_id, work_id)["metadata"] == result.json()["metadata"]


@pytest.mark.parametrize("argv", [["update", "work_x"], ["update", "work_x", "novalue"],
                                  ["update", "work_x", "=v"],
                                  ["update", "work_x", "a=1", "--delete", "a"],
                                  ["list", "--limit", "0"], ["show", ".."], ["stop", "a/../b"],
                                  ["update", "%2e%2e", "a=b"]])
def test_usage_errors_exit_2(cli: Cli, argv: list[str]) -> None:
    result = cli(*argv)
    assert result.code == 2
    assert result.err.startswith(f"dispatcher {argv[0]}: ")


# --- errors ---------------------------------------------------------------------------------
def test_unknown_work_id_exits_4(cli: Cli) -> None:
    for argv in (["show", "work_nope"], ["stop", "work_nope"], ["update", "work_nope", "a=b"]):
        result = cli(*argv, "--json")
        assert result.code == 4, (argv, result.err)
        assert result.json()["error"]["type"] == "not_found"
        assert result.json()["error"]["status"] == 404


def test_a_bad_key_exits_1(cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    wrong = f"sk-ant-api03-wrong-{uuid.uuid4().hex}"
    monkeypatch.setenv("ANTHROPIC_API_KEY", wrong)
    _, work_id = cli.session()
    result = cli("show", work_id, "--json")
    assert result.code == 1
    assert result.json()["error"]["status"] == 401
    assert wrong not in result.out + result.err
    monkeypatch.setenv("ANTHROPIC_ENVIRONMENT_KEY", "sk-ant-oat01-wrong")
    assert cli("list").code == 1


@pytest.mark.parametrize(("argv", "removed", "named"), [
    (["show", "work_x"], "ANTHROPIC_API_KEY", "ANTHROPIC_API_KEY"),
    (["update", "work_x", "a=b"], "ANTHROPIC_API_KEY", "ANTHROPIC_API_KEY"),
    (["list"], "ANTHROPIC_ENVIRONMENT_KEY", "ANTHROPIC_ENVIRONMENT_KEY"),
    (["stats"], "ANTHROPIC_*_KEY", "ANTHROPIC_ENVIRONMENT_KEY nor ANTHROPIC_API_KEY"),
    (["stop", "work_x"], "ANTHROPIC_*_KEY", "ANTHROPIC_ENVIRONMENT_KEY nor ANTHROPIC_API_KEY"),
    (["stats"], "ANTHROPIC_ENVIRONMENT_ID", "ANTHROPIC_ENVIRONMENT_ID"),
])
def test_a_missing_setting_exits_2_naming_it(cli: Cli, monkeypatch: pytest.MonkeyPatch,
                                             argv: list[str], removed: str, named: str) -> None:
    names = (["ANTHROPIC_ENVIRONMENT_KEY", "ANTHROPIC_API_KEY"] if removed == "ANTHROPIC_*_KEY"
             else [removed])
    for name in names:
        monkeypatch.delenv(name)
    result = cli(*argv)
    assert result.code == 2
    assert named in result.err and len(result.err.strip().splitlines()) == 1


def test_a_server_that_is_down_exits_3(cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANTHROPIC_BASE_URL", f"http://127.0.0.1:{free_port()}")
    started = time.monotonic()
    result = cli("stats", "--json")
    assert result.code == 3
    assert result.json()["error"]["type"] == "unreachable"
    assert time.monotonic() - started < 5, "one retry, not the fleet's patience"


# --- status ---------------------------------------------------------------------------------
@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> Iterator[LeaseRegistry]:
    _clean_env(monkeypatch)
    url = redis_url(integration_db())
    prefix = f"opcli{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("DISPATCHER_REDIS_URL", url)
    monkeypatch.setenv("DISPATCHER_KEY_PREFIX", prefix)
    r = redis.Redis.from_url(url, decode_responses=True)
    try:
        yield LeaseRegistry(r, prefix=prefix)
    finally:
        for key in r.scan_iter(f"{prefix}:*"):
            r.delete(key)
        r.close()


def _advertise(registry: LeaseRegistry) -> None:
    """Two workers' slot advertisements, as live workers renew them (one goes stale after
    `WORKER_STALE_SECONDS`: a reader started seconds later on a busy machine renews first)."""
    capacity = Capacity(registry.redis, prefix=registry.keys.prefix)
    capacity.advertise(hostname="w1@host", slots=4, pool="threads", queues=["dispatcher.sessions"])
    capacity.advertise(hostname="w2@host", slots=2, pool="prefork", queues=["dispatcher.sessions"])


def _fill(registry: LeaseRegistry) -> None:
    now = time.time()
    _advertise(registry)
    Capacity(registry.redis, prefix=registry.keys.prefix).set_draining("w2@host")
    common = {"environment_id": "env_1", "mode": "dispatcher", "queue": "dispatcher.sessions"}
    registry.create(Lease(work_id="work_run", session_id="sesn_run", phase=Phase.RUNNING,
                          attempt=2, worker="w1@host", claimed_at=now - 100, ttl_seconds=30,
                          heartbeat_ok_at=now - 10, **common), work_json='{"secret": "s"}')
    registry.create(Lease(work_id="work_queued", session_id="sesn_queued",
                          phase=Phase.DISPATCHED, claimed_at=now - 1, **common), work_json="{}")
    registry.create(Lease(work_id="work_stopping", session_id="sesn_stopping",
                          phase=Phase.RUNNING, worker="w2@host", claimed_at=now - 50,
                          ttl_seconds=30, heartbeat_ok_at=now - 2, **common), work_json="{}")
    registry.set_stop("work_stopping", StopKind.GRACEFUL, expected=StopKind.NONE, cause="server")
    book = WarmBook(registry.redis, prefix=registry.keys.prefix)
    book.alive("w1@host#a1b2c3d4", 2)
    book.alive("w9@host#dead", 5)
    book.gone("w9@host#dead")  # a worker that stopped: its pool counts no more
    metrics = Metrics(registry.redis, prefix=registry.keys.prefix)
    metrics.inc("warm_starts", 3, environment="env_1", result="hit")
    metrics.inc("warm_starts", environment="env_1", result="miss")


def test_status_reports_leases_and_workers_without_any_key(
        registry: LeaseRegistry, capsys: pytest.CaptureFixture[str]) -> None:
    _fill(registry)
    assert main(["status", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    leases = {row["work_id"]: row for row in report["leases"]}
    running = leases["work_run"]
    assert (running["session_id"], running["phase"], running["attempt"], running["worker"]) == (
        "sesn_run", "running", 2, "w1@host")
    assert 99 <= running["age_seconds"] < 110
    assert 9 <= running["heartbeat_age_seconds"] < 20
    assert 10 < running["expires_in_seconds"] <= 21
    assert running["stop"] is None
    assert leases["work_queued"]["expires_in_seconds"] is None
    assert (leases["work_stopping"]["stop"], leases["work_stopping"]["stop_cause"]) == (
        "graceful", "server")
    workers = {row["hostname"]: row for row in report["workers"]}
    assert (workers["w1@host"]["slots"], workers["w1@host"]["used"],
            workers["w1@host"]["free"]) == (4, 1, 3)
    assert workers["w2@host"]["draining"] is True and workers["w2@host"]["used"] == 1
    assert report["summary"] == {"leases_held": 3, "live_workers": 1, "slots_total": 4,
                                 "slots_free": 1, "warm_ready": 2, "warm_hits": 3,
                                 "warm_misses": 1}

    assert main(["status"]) == 0
    text = capsys.readouterr().out
    assert "3 leases held; 1 live workers, 1 of 4 slots free" in text
    assert "warm containers: 2 ready; 3 sessions started warm, 1 cold for want of one" in text
    assert re.search(r"w1@host\s+4\s+1\s+3\s+2\s+threads", text)
    assert re.search(r"work_stopping\s+sesn_stopping\s+running.*graceful \(server\)", text)
    assert re.search(r"w2@host\s+2\s+1\s+1\s+0\s+prefork\s+yes", text)


def test_status_of_an_empty_fleet(registry: LeaseRegistry,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["leases"] == [] and report["workers"] == []


def test_status_with_redis_down_exits_3(monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    _clean_env(monkeypatch)
    monkeypatch.setenv("DISPATCHER_REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")
    assert main(["status"]) == 3
    assert capsys.readouterr().err.startswith("dispatcher status: Redis: ")


# --- as a user runs it ----------------------------------------------------------------------
def _user_env(extra: dict[str, str]) -> dict[str, str]:
    own = ("ANTHROPIC_", "DISPATCHER_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(own)}
    return {**env, **extra}


def test_the_console_script(cli: Cli) -> None:
    help_text = subprocess.run([str(DISPATCHER), "--help"], capture_output=True, text=True,
                               timeout=30, check=True).stdout
    assert "exit codes" in help_text and "4  the work item does not exist" in help_text
    _, work_id = cli.session()
    env = _user_env(cli.env())
    shown = subprocess.run([str(DISPATCHER), "show", work_id, "--json"], capture_output=True,
                           text=True, timeout=30, env=env)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["id"] == work_id
    missing = subprocess.run([str(DISPATCHER), "show", "work_nope"], capture_output=True,
                             text=True, timeout=30, env=env)
    assert missing.returncode == 4
    no_key = subprocess.run([str(DISPATCHER), "show", work_id], capture_output=True, text=True,
                            timeout=30, env={k: v for k, v in env.items()
                                             if k != "ANTHROPIC_API_KEY"})
    assert no_key.returncode == 2
    assert no_key.stderr.strip().startswith("dispatcher show: ANTHROPIC_API_KEY is not set")
    for output in (shown, missing, no_key):
        assert cli.emulator.api_key not in output.stdout + output.stderr
        assert cli.emulator.environment_key not in output.stdout + output.stderr


def test_metrics_serves_the_exporter_until_sigterm(cli: Cli, registry: LeaseRegistry) -> None:
    _fill(registry)
    cli.session()
    env = _user_env({**cli.env(), "DISPATCHER_REDIS_URL": os.environ["DISPATCHER_REDIS_URL"],
                     "DISPATCHER_KEY_PREFIX": registry.keys.prefix})
    process = subprocess.Popen([str(DISPATCHER), "metrics", "--port", "0"], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        match = re.search(r"http://127\.0\.0\.1:(\d+)/metrics", line)
        assert match, line
        _advertise(registry)
        body = httpx.get(f"http://127.0.0.1:{match.group(1)}/metrics", timeout=10).text
        # Lease and server gauges are per environment (these leases' is not configured here).
        labelled = r'\{environment="[^"]*"\}'
        assert re.search(rf"^dispatcher_leases_held{labelled} 3\.0$", body, re.MULTILINE), body
        assert re.search(r'^dispatcher_session_slots\{state="free"\} 1\.0$', body, re.MULTILINE)
        assert re.search(rf"^dispatcher_server_queue_depth{labelled} 1\.0$", body, re.MULTILINE)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()
        if process.stderr is not None:
            process.stderr.close()
