"""An environment's beats counted by the emulator as they are answered
(`/_emulator/environments/{env}/heartbeats`), with its heartbeats left out of the request log
when asked: the heartbeat capacity benchmark's way to learn every gap."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from conftest import EmulatorProcess

pytestmark = pytest.mark.integration


def _beats_url(env: str) -> str:
    return f"/_emulator/environments/{env}/heartbeats"


def _acked(emu: EmulatorProcess, env: str) -> str:
    _, work_id = emu.create_session(env)
    assert emu.poll(env, block_ms=500) is not None
    emu.http.post(emu.work_url(env, f"/{work_id}/ack"), headers=emu.env_headers)
    return work_id


def _beat(emu: EmulatorProcess, env: str, work_id: str, expected: str) -> Any:
    return emu.http.post(emu.work_url(env, f"/{work_id}/heartbeat"), headers=emu.env_headers,
                         params={"expected_last_heartbeat": expected,
                                 "desired_ttl_seconds": "30"})


def _counted(emu: EmulatorProcess, env: str) -> dict[str, Any]:
    reply = emu.http.get(_beats_url(env), headers=emu.org_headers)
    reply.raise_for_status()
    return dict(reply.json())


def test_beats_are_counted_and_left_out_of_the_log(emulator: EmulatorProcess) -> None:
    env, other = emulator.create_environment(), emulator.create_environment()
    work_id, beside = _acked(emulator, env), _acked(emulator, other)
    emulator.clear_requests()
    started = emulator.http.post(_beats_url(env), headers=emulator.org_headers,
                                 json={"log_heartbeats": False})
    assert started.status_code == 200 and started.json()["log_heartbeats"] is False
    first = _beat(emulator, env, work_id, "NO_HEARTBEAT")
    token = first.json()["last_heartbeat"]
    second = _beat(emulator, env, work_id, token)
    assert second.status_code == 200
    assert _beat(emulator, env, work_id, "stale-token").status_code == 412
    assert _beat(emulator, other, beside, "NO_HEARTBEAT").status_code == 200
    emulator.http.get(emulator.work_url(env), headers=emulator.env_headers).raise_for_status()

    counted = _counted(emulator, env)
    assert (counted["beats"], counted["refused"], counted["failed"]) == (2, 1, 0)
    assert counted["endpoints"] == {"heartbeat": 3, "list": 1}
    assert list(counted["last_beat"]) == [work_id]
    assert 0 < counted["max_gap_s"] < 5 and counted["max_gap_work_id"] == work_id
    assert counted["since"] <= counted["last_beat"][work_id] <= counted["until"]
    logged = [(e["endpoint"], e["environment_id"]) for e in emulator.requests_log()]
    # The counted environment's heartbeats are left out; its other requests, and every
    # request of another environment, are logged as always.
    assert ("heartbeat", env) not in logged
    assert ("list", env) in logged and ("heartbeat", other) in logged

    # A new window counts afresh, the last beats kept.
    emulator.http.post(_beats_url(env), headers=emulator.org_headers,
                       json={"log_heartbeats": False}).raise_for_status()
    renewed = _counted(emulator, env)
    assert (renewed["beats"], renewed["refused"], renewed["endpoints"]) == (0, 0, {})
    assert renewed["last_beat"] == counted["last_beat"]

    # No longer counted: the heartbeats are logged again.
    assert emulator.http.delete(_beats_url(env),
                                headers=emulator.org_headers).status_code == 204
    assert emulator.http.get(_beats_url(env), headers=emulator.org_headers).status_code == 404
    emulator.clear_requests()
    assert _beat(emulator, env, work_id, second.json()["last_heartbeat"]).status_code == 200
    assert [e["endpoint"] for e in emulator.requests_log()] == ["heartbeat"]


def test_counted_and_logged_by_default(emulator: EmulatorProcess) -> None:
    env = emulator.create_environment()
    work_id = _acked(emulator, env)
    emulator.http.post(_beats_url(env), headers=emulator.org_headers).raise_for_status()
    emulator.clear_requests()
    assert _beat(emulator, env, work_id, "NO_HEARTBEAT").status_code == 200
    assert _counted(emulator, env)["beats"] == 1
    assert [e["endpoint"] for e in emulator.requests_log()] == ["heartbeat"]
    emulator.http.delete(_beats_url(env), headers=emulator.org_headers).raise_for_status()


def test_the_counts_take_the_organisation_key_only(emulator: EmulatorProcess) -> None:
    env = emulator.create_environment()
    for method in ("POST", "GET", "DELETE"):
        assert emulator.http.request(method, _beats_url(env)).status_code == 401
        assert emulator.http.request(method, _beats_url(env),
                                     headers=emulator.env_headers).status_code == 403
