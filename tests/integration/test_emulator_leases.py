"""Lease expiry in each `--lease-expiry` mode, with 1 s TTLs so leases lapse quickly."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from conftest import EmulatorProcess

pytestmark = pytest.mark.integration

SHORT = ("--min-ttl", "1", "--default-ttl", "1")
LAPSE_S = 1.3  # a 1 s lease, and a margin


def _acked(emu: EmulatorProcess, env: str) -> str:
    _, work_id = emu.create_session(env)
    assert emu.poll(env, block_ms=500) is not None
    emu.http.post(emu.work_url(env, f"/{work_id}/ack"), headers=emu.env_headers)
    return work_id


def _beat(emu: EmulatorProcess, env: str, work_id: str, expected: str) -> Any:
    return emu.http.post(emu.work_url(env, f"/{work_id}/heartbeat"),
                         params={"expected_last_heartbeat": expected, "desired_ttl_seconds": 1},
                         headers=emu.env_headers)


def _state(emu: EmulatorProcess, env: str, work_id: str) -> str:
    return str(emu.get(env, work_id)["state"])


def test_realistic_requeues_lapsed_leases_and_strands_unheartbeated_items(
        emulator_factory: Callable[..., EmulatorProcess]) -> None:
    emu = emulator_factory(*SHORT)  # realistic is the default
    env = emu.create_environment()
    stranded = _acked(emu, env)
    lapsed = _acked(emu, env)
    token = _beat(emu, env, lapsed, "NO_HEARTBEAT").json()["last_heartbeat"]
    stopping = _acked(emu, env)
    _beat(emu, env, stopping, "NO_HEARTBEAT")
    emu.http.post(emu.work_url(env, f"/{stopping}/stop"), headers=emu.org_headers, json={})
    time.sleep(LAPSE_S)

    redelivered = emu.poll(env, block_ms=200)  # the sweep on poll re-queues it
    assert redelivered is not None and redelivered["id"] == lapsed
    work = emu.get(env, lapsed)
    assert work["state"] == "queued" and work["latest_heartbeat_at"] is None
    assert work["acknowledged_at"] is None
    old_holder = _beat(emu, env, lapsed, token)
    assert old_holder.status_code == 412
    assert old_holder.json()["error"]["details"]["current_state"]["state"] == "queued"

    assert _state(emu, env, stranded) == "starting", "SDK issue #1746: stranded for ever"
    assert emu.get(env, stranded)["latest_heartbeat_at"] is None
    assert _state(emu, env, stopping) == "stopped", "a lapsed stopping item ends"


def test_requeue_mode_requeues_even_unheartbeated_items(
        emulator_factory: Callable[..., EmulatorProcess]) -> None:
    emu = emulator_factory(*SHORT, "--lease-expiry", "requeue")
    env = emu.create_environment()
    work_id = _acked(emu, env)
    time.sleep(LAPSE_S)
    assert _state(emu, env, work_id) == "queued", "lazily expired on get"
    again = emu.poll(env, block_ms=200)
    assert again is not None and again["id"] == work_id and again["secret"]
    ack = emu.http.post(emu.work_url(env, f"/{work_id}/ack"), headers=emu.env_headers)
    assert ack.status_code == 200 and ack.json()["state"] == "starting"


def test_stop_mode_stops_lapsed_leases(emulator_factory: Callable[..., EmulatorProcess]) -> None:
    emu = emulator_factory(*SHORT, "--lease-expiry", "stop")
    env = emu.create_environment()
    beaten = _acked(emu, env)
    token = _beat(emu, env, beaten, "NO_HEARTBEAT").json()["last_heartbeat"]
    never = _acked(emu, env)
    time.sleep(LAPSE_S)
    late = _beat(emu, env, beaten, token)
    assert late.status_code == 200
    assert (late.json()["state"], late.json()["lease_extended"]) == ("stopped", False)
    stats = emu.http.get(emu.work_url(env, "/stats"), headers=emu.org_headers).json()
    assert stats["depth"] == 0
    assert _state(emu, env, never) == "stopped"
    assert emu.poll(env, block_ms=100) is None


def test_a_heartbeated_lease_does_not_lapse(emulator_factory: Callable[..., EmulatorProcess],
                                            ) -> None:
    emu = emulator_factory(*SHORT, "--lease-expiry", "stop")
    env = emu.create_environment()
    work_id = _acked(emu, env)
    token = "NO_HEARTBEAT"
    for _ in range(5):
        beat = _beat(emu, env, work_id, token)
        assert beat.status_code == 200 and beat.json()["state"] == "active"
        token = beat.json()["last_heartbeat"]
        time.sleep(0.4)
    assert _state(emu, env, work_id) == "active"
