"""Lease expiry in each `--lease-expiry` mode and with `--unclaimed-limit`, with 1 s TTLs so
leases lapse quickly."""

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
# Where a test needs a lease NOT to lapse, the emulator's clock must not pass a bound between
# two of the test's requests; on two cores at load 15-20 a process can wait a second or more
# for a CPU, so those bounds leave seconds, not tenths.
UNCLAIMED_LIMIT_S = 5  # checked "not yet" at LAPSE_S: 3.7 s to spare
HEARTBEATED_TTL_S = 2  # beaten every 0.3 s: 1.7 s to spare


def _acked(emu: EmulatorProcess, env: str) -> str:
    _, work_id = emu.create_session(env)
    assert emu.poll(env, block_ms=500) is not None
    emu.http.post(emu.work_url(env, f"/{work_id}/ack"), headers=emu.env_headers)
    return work_id


def _beat(emu: EmulatorProcess, env: str, work_id: str, expected: str, *, ttl: int = 1) -> Any:
    return emu.http.post(emu.work_url(env, f"/{work_id}/heartbeat"),
                         params={"expected_last_heartbeat": expected, "desired_ttl_seconds": ttl},
                         headers=emu.env_headers)


def _state(emu: EmulatorProcess, env: str, work_id: str) -> str:
    return str(emu.get(env, work_id)["state"])


def test_by_default_lapsed_leases_stop(emulator_factory: Callable[..., EmulatorProcess]) -> None:
    """SDK 2.17's model: a lapsed heartbeated lease, an acked item never heartbeated (after the
    unclaimed limit) and a stopping one all end `stopped`."""
    emu = emulator_factory(*SHORT, "--unclaimed-limit", "1")  # `stop` is the default
    env = emu.create_environment()
    beaten = _acked(emu, env)
    token = _beat(emu, env, beaten, "NO_HEARTBEAT").json()["last_heartbeat"]
    never = _acked(emu, env)
    stopping = _acked(emu, env)
    _beat(emu, env, stopping, "NO_HEARTBEAT")
    emu.http.post(emu.work_url(env, f"/{stopping}/stop"), headers=emu.org_headers, json={})
    time.sleep(LAPSE_S)
    late = _beat(emu, env, beaten, token)
    assert late.status_code == 200
    assert (late.json()["state"], late.json()["lease_extended"]) == ("stopped", False)
    stats = emu.http.get(emu.work_url(env, "/stats"), headers=emu.org_headers).json()
    assert stats["depth"] == 0
    assert _state(emu, env, never) == "stopped"
    assert _state(emu, env, stopping) == "stopped", "a lapsed stopping item ends"
    assert emu.poll(env, block_ms=100) is None


def test_the_unclaimed_limit_is_counted_from_the_ack(
        emulator_factory: Callable[..., EmulatorProcess]) -> None:
    """Not the lease TTL: an acked item waits the unclaimed limit for its first heartbeat."""
    emu = emulator_factory(*SHORT, "--unclaimed-limit", str(UNCLAIMED_LIMIT_S))
    env = emu.create_environment()
    never = _acked(emu, env)
    time.sleep(LAPSE_S)
    assert _state(emu, env, never) == "starting", "1 s TTL, 5 s limit: not yet"
    time.sleep(UNCLAIMED_LIMIT_S - LAPSE_S + 0.3)
    assert _state(emu, env, never) == "stopped"


def test_requeue_mode_requeues_lapsed_leases(
        emulator_factory: Callable[..., EmulatorProcess]) -> None:
    emu = emulator_factory(*SHORT, "--lease-expiry", "requeue", "--unclaimed-limit", "1")
    env = emu.create_environment()
    unclaimed = _acked(emu, env)
    lapsed = _acked(emu, env)
    token = _beat(emu, env, lapsed, "NO_HEARTBEAT").json()["last_heartbeat"]
    stopping = _acked(emu, env)
    _beat(emu, env, stopping, "NO_HEARTBEAT")
    emu.http.post(emu.work_url(env, f"/{stopping}/stop"), headers=emu.org_headers, json={})
    time.sleep(LAPSE_S)

    redelivered = {emu.poll(env, block_ms=200)["id"] for _ in range(2)}  # type: ignore[index]
    assert redelivered == {unclaimed, lapsed}, "the sweep on poll re-queues both"
    work = emu.get(env, lapsed)
    assert work["state"] == "queued" and work["latest_heartbeat_at"] is None
    assert work["acknowledged_at"] is None
    old_holder = _beat(emu, env, lapsed, token)
    assert old_holder.status_code == 412
    assert old_holder.json()["error"]["details"]["current_state"]["state"] == "queued"
    assert _state(emu, env, stopping) == "stopped", "a lapsed stopping item ends"
    ack = emu.http.post(emu.work_url(env, f"/{unclaimed}/ack"), headers=emu.env_headers)
    assert ack.status_code == 200 and ack.json()["state"] == "starting"


def test_no_unclaimed_limit_strands_unheartbeated_items(
        emulator_factory: Callable[..., EmulatorProcess]) -> None:
    """`--lease-expiry requeue --unclaimed-limit 0`: SDK issue #1746, as observed in July."""
    emu = emulator_factory(*SHORT, "--lease-expiry", "requeue", "--unclaimed-limit", "0")
    env = emu.create_environment()
    stranded = _acked(emu, env)
    time.sleep(LAPSE_S)
    assert emu.poll(env, block_ms=100) is None
    assert _state(emu, env, stranded) == "starting", "stranded for ever"
    assert emu.get(env, stranded)["latest_heartbeat_at"] is None


def test_a_heartbeated_lease_does_not_lapse(emulator_factory: Callable[..., EmulatorProcess],
                                            ) -> None:
    emu = emulator_factory(*SHORT, "--lease-expiry", "stop")
    env = emu.create_environment()
    work_id = _acked(emu, env)
    token = "NO_HEARTBEAT"
    for _ in range(8):  # 2.4 s: longer than the lease's TTL
        beat = _beat(emu, env, work_id, token, ttl=HEARTBEATED_TTL_S)
        assert beat.status_code == 200 and beat.json()["state"] == "active"
        token = beat.json()["last_heartbeat"]
        time.sleep(0.3)
    assert _state(emu, env, work_id) == "active"
