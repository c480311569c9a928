"""Bad input from the server, from work items and from the operator: each gives one clear error
and loses nothing. Real Redis (db 10, a unique prefix) and the emulator over HTTP; dispatcher
functions called in-process, with a stand-in for Celery's `send_task`."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from dispatcher.control.heartbeat import heartbeat_due_leases
from dispatcher.control.poller import claim, run_poller
from dispatcher.lease.model import Phase
from dispatcher.ops.stack import FAKE_SESSION
from dispatcher.runtime import Runtime
from dispatcher.session.attempt import Outcome, SessionAttempt, run_attempt
from dispatcher.workapi import MalformedResponseError, WorkClient
from tests.support.inprocess import IN_PROCESS_PREFIX, poll_until
from tests.support.isolation import free_port, integration_db, redis_url

pytestmark = pytest.mark.integration

CELERY = str(Path(sys.executable).with_name("celery"))


# --- malformed or truncated JSON from the server ---------------------------------------------
def test_a_truncated_poll_reply_is_one_clear_error_and_the_item_comes_back(
        emulator: Any, runtime: Runtime) -> None:
    _, work_id = emulator.create_session(runtime.environment_id, metadata={})
    emulator.set_faults(malformed_rate=1.0, endpoints=["poll"])
    with pytest.raises(MalformedResponseError) as caught:
        runtime.client(max_retries=0).poll(block_ms=None)
    message = str(caught.value)
    assert "\n" not in message and "poll" in message, message
    assert emulator.environment_key not in message
    emulator.reset_faults()
    # The poll was handled but its answer lost: the item is re-delivered (reclaim after 5 s).
    assert poll_until(runtime, work_id).id == work_id


def test_a_truncated_ack_reply_still_ends_with_the_lease_held(
        emulator: Any, runtime: Runtime) -> None:
    _, work_id = emulator.create_session(runtime.environment_id, metadata={})
    item = poll_until(runtime, work_id)
    emulator.set_faults(malformed_rate=1.0, endpoints=["ack"])
    assert claim(runtime, item), "the ack landed: the NO_HEARTBEAT probe finds it ours"
    emulator.reset_faults()
    lease = runtime.registry.get(work_id)
    assert lease is not None and lease.token, "held, with the probe's token"
    assert emulator.get(runtime.environment_id, work_id)["state"] == "active"
    assert [t["kwargs"]["work_id"] for t in runtime.app.sent] == [work_id]


def test_a_truncated_heartbeat_reply_is_transient(emulator: Any, runtime: Runtime) -> None:
    _, work_id = emulator.create_session(runtime.environment_id, metadata={})
    assert claim(runtime, poll_until(runtime, work_id))
    runtime.registry.schedule_heartbeat(work_id, 0)
    emulator.set_faults(malformed_rate=1.0, endpoints=["heartbeat"])
    tally = heartbeat_due_leases(runtime)
    emulator.reset_faults()
    assert tally.failed == 1 and tally.lost == 0
    lease = runtime.registry.get(work_id)
    assert lease is not None and not lease.lost and not lease.stop
    assert runtime.registry.next_due(work_id) is not None, "retried within a second"


# --- missing fields, unknown states --------------------------------------------------------
def _client_answering(body: bytes, status: int = 200) -> WorkClient:
    def reply(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, content=body, headers={"content-type": "application/json"})

    return WorkClient(base_url="http://server.invalid", environment_id="env_x",
                      environment_key="sk-ant-oat01-x", max_retries=0,
                      transport=httpx.MockTransport(reply))


@pytest.mark.parametrize("body", [
    b'{"type": "work", "id": "work_1"}',  # no data, state, environment_id, created_at
    b'{"type": "work", "id": "work_1", "environment_id": "env_x", "state": "queued", '
    b'"created_at": "2026-01-01T00:00:00Z", "data": {"type": "session"}}',  # data.id missing
    b'{"id": "work_1", "data": [1, 2]',  # truncated
    b'\xff\xfe not json at all \x00',  # not UTF-8
    b"[]",
])
def test_a_poll_reply_missing_fields_is_malformed(body: bytes) -> None:
    with _client_answering(body) as client, pytest.raises(MalformedResponseError) as caught:
        client.poll(block_ms=None)
    assert "\n" not in str(caught.value)


def test_unknown_states_are_kept_as_data() -> None:
    body = json.dumps({"type": "work", "id": "work_1", "environment_id": "env_x",
                       "state": "hibernating", "created_at": "2026-01-01T00:00:00Z",
                       "data": {"id": "session_1", "type": "session"}}).encode()
    with _client_answering(body) as client:
        item = client.poll(block_ms=None)
    assert item is not None and item.state == "hibernating"


def test_a_heartbeat_with_an_unknown_state_and_no_extension_loses_the_lease(
        emulator: Any, runtime: Runtime) -> None:
    from dispatcher.lease import events as ev

    _, work_id = emulator.create_session(runtime.environment_id, metadata={})
    assert claim(runtime, poll_until(runtime, work_id))
    lease = runtime.registry.get(work_id)
    assert lease is not None
    runtime.registry.update(work_id, phase=Phase.RUNNING)
    lease = runtime.registry.get(work_id)
    assert lease is not None
    runtime.executor.run(lease, ev.HeartbeatAnswered(
        ev.Reply(token="t", extended=False, state="hibernating", ttl_seconds=30), time.time()))
    after = runtime.registry.get(work_id)
    assert after is not None and after.lost and after.stop == "force"


# --- items that fail validation ------------------------------------------------------------
def test_an_item_that_fails_validation_is_named_and_stopped_never_acked(
        emulator: Any, runtime: Runtime, caplog: pytest.LogCaptureFixture) -> None:
    """A session id with a NUL could never reach the sandbox's environment: re-delivered for
    ever before, now logged by its id and force-stopped by the poller on first sight."""
    runtime.capacity.advertise(hostname="w1@test", slots=1, pool="threads",
                               queues=["dispatcher.sessions"])
    response = emulator.http.post(
        f"/_emulator/environments/{runtime.environment_id}/work", headers=emulator.org_headers,
        json={"data": {"type": "session", "id": "session_\u0000x"}})
    response.raise_for_status()
    invalid_id = response.json()["id"]
    with caplog.at_level(logging.INFO, logger="dispatcher"):
        claimed = run_poller(runtime, run_seconds=2.0)
    assert claimed == 0 and runtime.registry.get(invalid_id) is None
    assert runtime.app.sent == [], "nothing was dispatched"
    assert emulator.get(runtime.environment_id, invalid_id)["state"] == "stopped"
    refused = [r for r in caplog.records if getattr(r, "action", None) == "invalid work item"]
    assert len(refused) == 1, "stopped at first sight, never delivered again"
    line = refused[0].getMessage()
    assert f"work_id={invalid_id}" in line and "data.id" in line
    assert "action_taken='stopped, not run'" in line
    log = [e for e in emulator.requests_log() if e["work_id"] == invalid_id]
    assert "ack" not in {e["endpoint"] for e in log}


# --- unknown work types --------------------------------------------------------------------
def test_an_unknown_work_type_is_stopped_never_run(emulator: Any, runtime: Runtime) -> None:
    item = emulator.enqueue(runtime.environment_id, "mystery")
    polled = poll_until(runtime, item["id"])
    assert not claim(runtime, polled)
    assert runtime.registry.get(item["id"]) is None
    assert runtime.app.sent == [], "nothing was dispatched"
    assert emulator.get(runtime.environment_id, item["id"])["state"] == "stopped"


# --- hostile metadata and ids reach the sandbox only as data ------------------------------
HOSTILE = [
    "$(touch {marker})", "`touch {marker}`", "; touch {marker}", "| touch {marker} &",
    "line one\nline two\r\n$(touch {marker})", "quote ' \" \\ and glob * ? [a]",
    "\u00e9\u4e2d\U0001f600 \u202e right-to-left", "x" * 512,
]


def test_hostile_metadata_and_ids_reach_the_sandbox_only_as_data(
        emulator: Any, runtime: Runtime, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    marker = tmp_path / "pwned"
    records = tmp_path / "records"
    records.mkdir()
    monkeypatch.setenv("DISPATCHER_FAKE_RECORD_DIR", str(records))
    # 16 keys, values up to the 512-character limit: the largest metadata the API takes.
    metadata = {f"k{i:02d}": HOSTILE[i % len(HOSTILE)].format(marker=marker)[:512]
                for i in range(14)}
    metadata["fake.duration"] = "0.2"
    metadata[f"$(touch {marker})"[-64:]] = "a key with metacharacters too"
    session_id = f"session_$(touch {marker});\n`touch {marker}`"
    response = emulator.http.post(
        f"/_emulator/environments/{runtime.environment_id}/work", headers=emulator.org_headers,
        json={"data": {"type": "session", "id": session_id}, "metadata": metadata})
    response.raise_for_status()
    work_id = response.json()["id"]
    assert claim(runtime, poll_until(runtime, work_id))
    task = runtime.app.sent[0]
    assert task["kwargs"] == {"work_id": work_id, "session_id": session_id, "attempt": 1}
    outcome = run_attempt(runtime, SessionAttempt(
        work_id=work_id, session_id=session_id, attempt=1, task_id=task["task_id"],
        worker="bad-input@test"))
    assert outcome == Outcome.COMPLETED
    lines = [json.loads(x) for x in (records / f"{work_id}.jsonl").read_text().splitlines()]
    started = next(r for r in lines if r["event"] == "started")
    assert started["metadata"] == metadata, "metadata arrives byte for byte, as data"
    assert started["stdin_session_id"] == session_id
    assert started["env"]["ANTHROPIC_SESSION_ID"] == session_id, "an id is a value, not code"
    assert not marker.exists(), "no metadata or id was ever run as a command"
    assert emulator.get(runtime.environment_id, work_id)["state"] == "stopped"


def test_metadata_that_is_not_utf8_is_refused_by_the_api_with_a_clear_error(
        emulator: Any, runtime: Runtime) -> None:
    body = (b'{"environment_id": "' + runtime.environment_id.encode()
            + b'", "agent": "a", "metadata": {"k": "\xff\xfe"}}')
    response = emulator.http.post("/v1/sessions", headers={
        **emulator.org_headers, "content-type": "application/json"}, content=body)
    assert 400 <= response.status_code < 500, response.text
    assert response.json()["type"] == "error"


# --- the operator's mistakes: one clear line, a non-zero exit -----------------------------
def _worker(env_overrides: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC_", "DISPATCHER_"))}
    env.update({"ANTHROPIC_ENVIRONMENT_ID": "env_x", "ANTHROPIC_ENVIRONMENT_KEY": "sk-ant-oat01-x",
                "ANTHROPIC_BASE_URL": "http://127.0.0.1:9", "DISPATCHER_ON_WORK": FAKE_SESSION,
                "DISPATCHER_REDIS_URL": redis_url(integration_db()),
                "DISPATCHER_KEY_PREFIX": f"badinput{uuid.uuid4().hex[:8]}", **env_overrides})
    return subprocess.run(
        [CELERY, "-A", "dispatcher", "worker", "-Q", "dispatcher.sessions", "-P", "threads",
         "-c", "2", "--without-mingle", "--without-gossip", "-l", "INFO"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=90)


def _one_clear_line(result: subprocess.CompletedProcess[str], expected: str) -> None:
    assert result.returncode != 0
    output = result.stdout + result.stderr
    lines = [line for line in output.splitlines() if line.startswith("dispatcher: ")]
    assert len(lines) == 1 and expected in lines[0], output[-2000:]
    assert "Traceback" not in output, output[-2000:]


@pytest.mark.parametrize("kind", ["missing", "not executable", "directory"])
def test_a_bad_on_work_command_stops_the_worker_with_one_line(kind: str, tmp_path: Path) -> None:
    program = tmp_path / "spawn.sh"
    if kind == "not executable":
        program.write_text("#!/bin/sh\nexit 0\n")
        program.chmod(0o644)
    elif kind == "directory":
        program.mkdir()
    result = _worker({"DISPATCHER_ON_WORK": f"{program} --flag"}, tmp_path)
    _one_clear_line(result, "on-work command not found or not executable")


def test_a_redis_that_refuses_connections_stops_the_worker_with_one_line(tmp_path: Path) -> None:
    result = _worker({"DISPATCHER_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}, tmp_path)
    _one_clear_line(result, "Redis at DISPATCHER_REDIS_URL does not answer")


def test_the_integration_db_is_clean_of_our_prefix() -> None:
    """The fixture removes every key it wrote (a sanity check of the cleanup above)."""
    r = redis.Redis.from_url(redis_url(integration_db()))
    assert not list(r.scan_iter(f"{IN_PROCESS_PREFIX}*:lease:*", count=1000))
    r.close()
