"""Each fault switch, set at run time (`POST /_emulator/faults`) and at start (CLI flags)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import httpx
import pytest

if TYPE_CHECKING:
    from conftest import EmulatorProcess

pytestmark = pytest.mark.integration


def _stats(emu: EmulatorProcess, env: str) -> httpx.Response:
    return emu.http.get(emu.work_url(env, "/stats"), headers=emu.org_headers)


def test_faults_are_readable_and_reset(emulator: EmulatorProcess) -> None:
    defaults = emulator.http.get("/_emulator/faults", headers=emulator.org_headers).json()
    assert defaults["error_rate"] == 0 and defaults["stop_response"] == "204"
    changed = emulator.set_faults(latency_ms=5, endpoints=["poll"])
    assert changed["latency_ms"] == 5 and changed["endpoints"] == ["poll"]
    assert changed["error_rate"] == 0, "fields not given keep their values"
    bad = emulator.http.post("/_emulator/faults", headers=emulator.org_headers,
                             json={"error_rate": 2})
    assert bad.status_code == 400
    assert emulator.reset_faults() == defaults


LATENCY_MS = 2000


def test_latency_only_for_the_chosen_endpoints(emulator: EmulatorProcess) -> None:
    env = emulator.create_environment()
    # Long enough that a poll taking it is slowed and nothing else: on two cores at load 15-20
    # a plain poll's round trip has no 250 ms bound.
    emulator.set_faults(latency_ms=LATENCY_MS, endpoints=["stats"])
    started = time.monotonic()
    assert _stats(emulator, env).status_code == 200
    assert time.monotonic() - started >= LATENCY_MS / 1000
    started = time.monotonic()
    emulator.poll(env)
    assert time.monotonic() - started < LATENCY_MS / 1000, "poll is not slowed"


def test_server_errors(emulator: EmulatorProcess) -> None:
    env = emulator.create_environment()
    emulator.set_faults(error_rate=1.0, error_status=503)
    response = _stats(emulator, env)
    assert response.status_code == 503
    assert response.json()["error"]["type"] == "api_error"
    emulator.create_environment()  # never faulted: making work
    assert emulator.requests_log()[-1]["fault"] == "error"


def test_rate_limits_carry_retry_after(emulator: EmulatorProcess) -> None:
    env = emulator.create_environment()
    emulator.set_faults(rate_limit_rate=1.0, retry_after_seconds=2)
    response = _stats(emulator, env)
    assert response.status_code == 429 and response.headers["retry-after"] == "2"
    assert response.json()["error"]["type"] == "rate_limit_error"


def test_dropped_connections_get_no_response_at_all(emulator: EmulatorProcess) -> None:
    env = emulator.create_environment()
    emulator.set_faults(drop_rate=1.0, endpoints=["poll"])
    with pytest.raises(httpx.RemoteProtocolError, match="without sending"):
        emulator.http.get(emulator.work_url(env, "/poll"), headers=emulator.env_headers)
    assert _stats(emulator, env).status_code == 200, "other endpoints answer"
    dropped = [e for e in emulator.requests_log() if e["endpoint"] == "poll"
               and e["environment_id"] == env]
    assert dropped[-1]["status"] == 0 and dropped[-1]["fault"] == "drop"


def test_lost_replies_are_applied_and_logged_with_the_status_they_had(
        emulator: EmulatorProcess) -> None:
    env = emulator.create_environment()
    _, work_id = emulator.create_session(env)
    emulator.poll(env)
    emulator.set_faults(lost_reply_rate=1.0, endpoints=["ack"])
    with pytest.raises(httpx.RemoteProtocolError, match="without sending"):
        emulator.http.post(emulator.work_url(env, f"/{work_id}/ack"),
                           headers=emulator.env_headers)
    emulator.reset_faults()
    assert emulator.get(env, work_id)["state"] == "starting", "the ack was applied"
    lost = [e for e in emulator.requests_log() if e["endpoint"] == "ack"
            and e["work_id"] == work_id]
    assert lost[-1]["status"] == 0 and lost[-1]["fault"] == "lost_reply"
    assert lost[-1]["applied_status"] == 200


def test_heartbeat_412_shows_the_real_current_state(emulator: EmulatorProcess) -> None:
    env = emulator.create_environment()
    _, work_id = emulator.create_session(env)
    emulator.poll(env)
    emulator.http.post(emulator.work_url(env, f"/{work_id}/ack"), headers=emulator.env_headers)
    emulator.set_faults(heartbeat_412_rate=1.0)
    url = emulator.work_url(env, f"/{work_id}/heartbeat")
    refused = emulator.http.post(url, params={"expected_last_heartbeat": "NO_HEARTBEAT"},
                                 headers=emulator.env_headers)
    assert refused.status_code == 412
    details = refused.json()["error"]["details"]
    assert details["error_code"] == "heartbeat_precondition_failed"
    assert details["current_state"]["state"] == "starting"
    emulator.reset_faults()
    accepted = emulator.http.post(url, params={"expected_last_heartbeat": "NO_HEARTBEAT"},
                                  headers=emulator.env_headers)
    assert accepted.status_code == 200, "the injected 412 changed nothing"


def test_stop_can_answer_the_work_object(emulator: EmulatorProcess) -> None:
    env = emulator.create_environment()
    _, work_id = emulator.create_session(env)
    emulator.set_faults(stop_response="json")
    response = emulator.http.post(emulator.work_url(env, f"/{work_id}/stop"),
                                  headers=emulator.org_headers, json={})
    assert response.status_code == 200
    assert response.json()["id"] == work_id and response.json()["state"] == "stopped"


def test_malformed_bodies(emulator: EmulatorProcess) -> None:
    env = emulator.create_environment()
    emulator.set_faults(malformed_rate=1.0)
    response = _stats(emulator, env)
    assert response.status_code == 200
    with pytest.raises(ValueError):
        response.json()
    _, work_id = emulator.create_session(env)  # never faulted: making work
    assert work_id.startswith("work_")


def test_fault_flags_at_start(emulator_factory: Callable[..., EmulatorProcess]) -> None:
    emu = emulator_factory("--error-rate", "1", "--fault-endpoints", "stats",
                           "--stop-response", "json")
    env = emu.create_environment()
    assert _stats(emu, env).status_code == 500
    _, work_id = emu.create_session(env)
    stop = emu.http.post(emu.work_url(env, f"/{work_id}/stop"), headers=emu.org_headers, json={})
    assert stop.status_code == 200 and stop.json()["state"] == "stopped"
    assert emu.http.get("/_emulator/faults", headers=emu.org_headers).json()["endpoints"] == [
        "stats"]


def _set_list_limit(emu: EmulatorProcess, most: int) -> httpx.Response:
    return emu.http.post("/_emulator/faults", headers=emu.org_headers,
                         json={"list_limit_max": most})


def test_the_list_limit_switch_narrows_a_wider_list_range(
        emulator_factory: Callable[..., EmulatorProcess]) -> None:
    """`list_limit_max` may be set up to `--max-list-limit`, whatever that is, never above."""
    emu = emulator_factory("--max-list-limit", "500")
    env = emu.create_environment()
    url, headers = emu.work_url(env, ""), emu.env_headers
    assert _set_list_limit(emu, 500).status_code == 200
    assert emu.http.get(url, params={"limit": 500}, headers=headers).status_code == 200
    assert _set_list_limit(emu, 300).status_code == 200
    refused = emu.http.get(url, params={"limit": 301}, headers=headers)
    assert refused.status_code == 400 and "limit must be 1-300" in refused.text
    assert emu.http.get(url, params={"limit": 300}, headers=headers).status_code == 200
    over = _set_list_limit(emu, 501)
    assert over.status_code == 400 and "max-list-limit, 500" in over.text


def test_the_list_limit_switch_stays_within_the_default_range(emulator: EmulatorProcess) -> None:
    assert _set_list_limit(emulator, 100).status_code == 200
    over = _set_list_limit(emulator, 101)
    assert over.status_code == 400 and "max-list-limit, 100" in over.text


def test_a_list_limit_below_the_usual_and_a_retry_after_past_a_minute(
        emulator: EmulatorProcess) -> None:
    env = emulator.create_environment()
    emulator.set_faults(list_limit_max=50)
    headers = emulator.env_headers
    refused = emulator.http.get(emulator.work_url(env, ""), params={"limit": 51}, headers=headers)
    assert refused.status_code == 400 and "limit must be 1-50" in refused.text
    assert emulator.http.get(emulator.work_url(env, ""), params={"limit": 50},
                             headers=headers).status_code == 200
    assert emulator.http.get(emulator.work_url(env, ""), headers=headers).status_code == 200
    emulator.set_faults(list_limit_max=None, rate_limit_rate=1.0, retry_after_seconds=120,
                        endpoints=["stats"])
    limited = _stats(emulator, env)
    assert limited.status_code == 429 and limited.headers["retry-after"] == "120"
