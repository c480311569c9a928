"""The fake session program, run as a dispatcher runs it: work JSON on stdin, a record file."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from conftest import EmulatorProcess

pytestmark = pytest.mark.integration

COMMAND = [sys.executable, "-m", "dispatcher.emulator.fake_session"]


def _work(work_id: str = "work_fake1", **metadata: str) -> dict[str, Any]:
    return {"id": work_id, "type": "work", "environment_id": "env_fake", "state": "starting",
            "data": {"id": "session_fake1", "type": "session"}, "metadata": metadata,
            "secret": "c2VjcmV0"}


def _env(records: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC_", "DISPATCHER_"))}
    env.update({"DISPATCHER_FAKE_RECORD_DIR": str(records), "ANTHROPIC_WORK_ID": "work_fake1",
                "ANTHROPIC_SESSION_ID": "session_fake1", "ANTHROPIC_ENVIRONMENT_ID": "env_fake",
                "ANTHROPIC_ENVIRONMENT_KEY": "sk-ant-oat01-secret",
                "ANTHROPIC_BASE_URL": "http://127.0.0.1:9"}, **extra)
    return env


def _start(work: dict[str, Any], env: dict[str, str]) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(COMMAND, stdin=subprocess.PIPE, env=env, start_new_session=True)
    assert process.stdin is not None
    process.stdin.write(json.dumps(work).encode())
    process.stdin.close()
    return process


def _records(records: Path, work_id: str = "work_fake1") -> list[dict[str, Any]]:
    path = records / f"{work_id}.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def _wait_event(records: Path, event: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not any(r["event"] == event for r in _records(records)):
        assert time.monotonic() < deadline, f"no {event} event"
        time.sleep(0.02)


def test_it_records_what_it_was_given_and_exits_as_told(tmp_path: Path) -> None:
    process = _start(_work(**{"fake.duration": "0.2", "fake.exit_code": "3"}),
                     _env(tmp_path, DISPATCHER_ATTEMPT="2"))
    assert process.wait(timeout=10) == 3
    started, exited = _records(tmp_path)
    assert started["event"] == "started" and exited["event"] == "exited"
    assert started["env"]["ANTHROPIC_WORK_ID"] == "work_fake1"
    assert started["env"]["ANTHROPIC_BASE_URL"] == "http://127.0.0.1:9"
    assert started["env"]["ANTHROPIC_WORK_LAST_HEARTBEAT"] is None
    assert "ANTHROPIC_ENVIRONMENT_KEY" in started["env_names"]
    assert started["environment_key_sha256"] == hashlib.sha256(b"sk-ant-oat01-secret").hexdigest()
    assert started["stdin_work_id"] == "work_fake1"
    assert started["stdin_session_id"] == "session_fake1"
    assert started["stdin_secret_sha256"] == hashlib.sha256(b"c2VjcmV0").hexdigest()
    assert started["attempt"] == "2"
    assert started["pid"] == process.pid and started["pgid"] == process.pid
    assert (exited["exit_code"], exited["reason"]) == (3, "completed")
    assert exited["time"] - started["time"] >= 0.2
    raw = (tmp_path / "work_fake1.jsonl").read_text()
    assert "sk-ant-oat01-secret" not in raw and '"c2VjcmV0"' not in raw, "no raw secrets"


def test_no_record_dir_means_no_record(tmp_path: Path) -> None:
    env = _env(tmp_path)
    del env["DISPATCHER_FAKE_RECORD_DIR"]
    assert _start(_work(**{"fake.duration": "0"}), env).wait(timeout=10) == 0
    assert list(tmp_path.iterdir()) == []


def test_sigterm_ends_it_cleanly_with_its_children(tmp_path: Path) -> None:
    process = _start(_work(**{"fake.duration": "30", "fake.children": "2"}), _env(tmp_path))
    _wait_event(tmp_path, "started")
    deadline = time.monotonic() + 10
    while sum(r["event"] == "child_started" for r in _records(tmp_path)) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=5) == 0
    records = _records(tmp_path)
    children = [r for r in records if r["event"] == "child_started"]
    assert {c["pgid"] for c in children} == {process.pid}, "children share the process group"
    assert {c["ppid"] for c in children} == {process.pid}
    assert [r["event"] for r in records if r["event"] in ("sigterm", "exited")] == [
        "sigterm", "exited"]
    assert records[-1]["reason"] == "sigterm"
    for child in children:
        with pytest.raises(ProcessLookupError):
            os.kill(child["pid"], 0)


def test_ignore_sigterm_records_it_and_keeps_running(tmp_path: Path) -> None:
    process = _start(_work(**{"fake.duration": "30", "fake.ignore_sigterm": "1",
                              "fake.children": "1"}), _env(tmp_path))
    _wait_event(tmp_path, "child_started")
    process.send_signal(signal.SIGTERM)
    _wait_event(tmp_path, "sigterm")
    time.sleep(0.3)
    assert process.poll() is None, "still running"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=5)
    assert not any(r["event"] == "exited" for r in _records(tmp_path))


def test_runner_mode_heartbeats_its_own_lease_and_force_stops(
        emulator: EmulatorProcess, tmp_path: Path) -> None:
    env = emulator.create_environment()
    _, work_id = emulator.create_session(env, metadata={"fake.duration": "0.8",
                                                        "fake.heartbeat": "1"})
    polled = emulator.poll(env, block_ms=500)
    assert polled is not None
    emulator.http.post(emulator.work_url(env, f"/{work_id}/ack"), headers=emulator.env_headers)
    process = _start(polled, _env(
        tmp_path, ANTHROPIC_WORK_ID=work_id, ANTHROPIC_ENVIRONMENT_ID=env,
        ANTHROPIC_ENVIRONMENT_KEY=emulator.environment_key,
        ANTHROPIC_BASE_URL=emulator.base_url))
    assert process.wait(timeout=15) == 0
    records = _records(tmp_path, work_id)
    beats = [r for r in records if r["event"] == "heartbeat"]
    assert beats and beats[0]["status"] == 200 and beats[0]["state"] == "active"
    assert [r["status"] for r in records if r["event"] == "stop_sent"] == [204]
    assert emulator.get(env, work_id)["state"] == "stopped"
    claims = [e for e in emulator.requests_log()
              if e["work_id"] == work_id and e["endpoint"] == "heartbeat"]
    assert claims[0]["expected_last_heartbeat"] == "NO_HEARTBEAT"


def test_runner_mode_of_2_10_continues_a_lease_and_ends_on_a_graceful_stop(
        emulator: EmulatorProcess, tmp_path: Path) -> None:
    env = emulator.create_environment()
    _, work_id = emulator.create_session(env, metadata={"fake.duration": "30",
                                                        "fake.heartbeat": "1",
                                                        "fake.lease": "2.10"})
    polled = emulator.poll(env, block_ms=500)
    assert polled is not None
    emulator.http.post(emulator.work_url(env, f"/{work_id}/ack"), headers=emulator.env_headers)
    token = emulator.http.post(emulator.work_url(env, f"/{work_id}/heartbeat"),
                               params={"expected_last_heartbeat": "NO_HEARTBEAT"},
                               headers=emulator.env_headers).json()["last_heartbeat"]
    emulator.http.post(emulator.work_url(env, f"/{work_id}/stop"), headers=emulator.org_headers,
                       json={})  # graceful: the runner sees `stopping` on its first beat
    process = _start(polled, _env(
        tmp_path, ANTHROPIC_WORK_ID=work_id, ANTHROPIC_ENVIRONMENT_ID=env,
        ANTHROPIC_ENVIRONMENT_KEY=emulator.environment_key, ANTHROPIC_BASE_URL=emulator.base_url,
        ANTHROPIC_WORK_LAST_HEARTBEAT=token))
    assert process.wait(timeout=15) == 0
    records = _records(tmp_path, work_id)
    assert records[0]["env"]["ANTHROPIC_WORK_LAST_HEARTBEAT"] == token
    assert records[-1]["reason"] == "server_stop"
    assert emulator.get(env, work_id)["state"] == "stopped"


def _claimed(emulator: EmulatorProcess, metadata: dict[str, str]) -> tuple[str, str,
                                                                            dict[str, Any]]:
    env = emulator.create_environment()
    _, work_id = emulator.create_session(env, metadata={"fake.heartbeat": "1", **metadata})
    polled = emulator.poll(env, block_ms=500)
    assert polled is not None and polled["id"] == work_id
    emulator.http.post(emulator.work_url(env, f"/{work_id}/ack"), headers=emulator.env_headers)
    return env, work_id, polled


def _runner_env(emulator: EmulatorProcess, records: Path, env: str, work_id: str) -> dict[str, str]:
    return _env(records, ANTHROPIC_WORK_ID=work_id, ANTHROPIC_ENVIRONMENT_ID=env,
                ANTHROPIC_ENVIRONMENT_KEY=emulator.environment_key,
                ANTHROPIC_BASE_URL=emulator.base_url)


def test_runner_mode_of_2_17_holds_the_lease_with_the_sessions_token_and_ends_on_extended_false(
        emulator_factory: Any, tmp_path: Path) -> None:
    emulator = emulator_factory("--default-ttl", "2", "--min-ttl", "1")
    env, work_id, polled = _claimed(emulator, {"fake.duration": "60"})
    process = _start(polled, _runner_env(emulator, tmp_path, env, work_id))
    deadline = time.monotonic() + 15
    while sum(r["event"] == "heartbeat" for r in _records(tmp_path, work_id)) < 3:
        assert time.monotonic() < deadline, "no three heartbeats"
        time.sleep(0.05)
    emulator.http.post(emulator.work_url(env, f"/{work_id}/stop"), headers=emulator.org_headers,
                       json={"force": True})
    assert process.wait(timeout=10) == 0
    records = _records(tmp_path, work_id)
    (runner,) = [r for r in records if r["event"] == "runner"]
    assert (runner["lease"], runner["credential"]) == ("2.17", "sessions_token")
    beats = [r for r in records if r["event"] == "heartbeat"]
    assert all(b["lease_extended"] for b in beats[:-1]) and not beats[-1]["lease_extended"]
    gaps = [b["time"] - a["time"] for a, b in itertools.pairwise(beats[:3])]
    # Each gap is between two records written on the replies: one slow reply shortens the gap
    # after it (0.67 s seen on a busy CI machine). What matters is the granted TTL's half, not
    # the 300 s assumed before the first reply (150 s), and no tight loop.
    assert all(0.3 <= gap <= 3 for gap in gaps), f"every ttl/2 = 1 s: {gaps}"
    assert records[-1]["reason"] == "server_stop"
    assert [r["event"] for r in records].count("stop_sent") == 1, "the held item is stopped"


def test_runner_mode_of_2_17_never_stops_an_item_whose_lease_it_lost(
        emulator: EmulatorProcess, tmp_path: Path) -> None:
    env, work_id, polled = _claimed(emulator, {"fake.duration": "30"})
    emulator.set_faults(heartbeat_412_rate=1.0)
    process = _start(polled, _runner_env(emulator, tmp_path, env, work_id))
    assert process.wait(timeout=15) == 1
    records = _records(tmp_path, work_id)
    assert [r["status"] for r in records if r["event"] == "lease_lost"] == [412]
    assert records[-1]["reason"] == "lease_lost"
    assert not [r for r in records if r["event"] == "stop_sent"], "a lost lease is not stopped"
    stops = [e for e in emulator.requests_log()
             if e["work_id"] == work_id and e["endpoint"] == "stop"]
    assert not stops
