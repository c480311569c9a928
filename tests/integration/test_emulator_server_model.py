"""The server model of SDK 2.17 (its fake Work API), point by point, over real HTTP: each
default, the switch to the other behaviour, and SDK 2.17's own client where it shows."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anthropic
import pytest
from anthropic.lib.environments import EnvironmentWorker

from dispatcher.emulator.config import DEFAULT_TTL_SECONDS

if TYPE_CHECKING:
    from conftest import EmulatorProcess

pytestmark = pytest.mark.integration

Factory = Callable[..., "EmulatorProcess"]


@pytest.fixture(autouse=True)
def _no_ambient_credentials(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in ("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN", "ANTHROPIC_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    yield


def _url(emu: EmulatorProcess, env: str, work_id: str, action: str = "") -> str:
    return emu.work_url(env, f"/{work_id}{action}")


def _beat(emu: EmulatorProcess, env: str, work_id: str, expected: str = "NO_HEARTBEAT",
          **params: Any) -> Any:
    return emu.http.post(_url(emu, env, work_id, "/heartbeat"),
                         params={"expected_last_heartbeat": expected, **params},
                         headers=emu.env_headers)


def _acked(emu: EmulatorProcess, env: str) -> str:
    _, work_id = emu.create_session(env)
    assert emu.poll(env, block_ms=500) is not None
    emu.http.post(_url(emu, env, work_id, "/ack"), headers=emu.env_headers).raise_for_status()
    return work_id


def _payload(secret: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(base64.urlsafe_b64decode(secret + "=" * (-len(secret) % 4)))
    return loaded


def _stop(emu: EmulatorProcess, env: str, work_id: str, *, force: bool) -> Any:
    return emu.http.post(_url(emu, env, work_id, "/stop"), headers=emu.org_headers,
                         json={"force": force})


# 1. heartbeat on a stopping item -----------------------------------------------------------------
def test_a_stopping_items_heartbeat_is_not_extended(emulator: EmulatorProcess,
                                                     emulator_factory: Factory) -> None:
    env = emulator.create_environment()
    work_id = _acked(emulator, env)
    token = _beat(emulator, env, work_id).json()["last_heartbeat"]
    assert _stop(emulator, env, work_id, force=False).status_code == 204
    beat = _beat(emulator, env, work_id, token).json()
    assert (beat["state"], beat["lease_extended"], beat["last_heartbeat"]) == (
        "stopping", False, token), "no new token"

    old = emulator_factory("--stopping-heartbeat", "extend")
    env = old.create_environment()
    work_id = _acked(old, env)
    token = _beat(old, env, work_id).json()["last_heartbeat"]
    _stop(old, env, work_id, force=False)
    beat = _beat(old, env, work_id, token).json()
    assert (beat["state"], beat["lease_extended"]) == ("stopping", True)
    assert beat["last_heartbeat"] != token


def _long_bash_session(emu: EmulatorProcess, env: str, seconds: float) -> tuple[str, str, str]:
    response = emu.http.post("/v1/sessions", headers=emu.org_headers, json={
        "environment_id": env, "emulator_script": [
            {"name": "bash", "input": {"command": f"sleep {seconds}; echo done"}}]})
    session_id, work_id = response.json()["id"], response.json()["work_id"]
    work = emu.poll(env, block_ms=500)
    assert work is not None and work["id"] == work_id
    emu.http.post(_url(emu, env, work_id, "/ack"), headers=emu.env_headers).raise_for_status()
    return session_id, work_id, str(work["secret"])


async def _run_until_stopped(emu: EmulatorProcess, env: str, workdir: Path,
                             seconds: float) -> tuple[float, float]:
    """Runs a long bash call with `handle_item`, stops it gracefully once the call runs:
    (seconds from the stop to the runner's end, seconds the runner ran)."""
    session_id, work_id, secret = _long_bash_session(emu, env, seconds)
    client = anthropic.AsyncAnthropic(api_key="unused", base_url=emu.base_url, max_retries=0)
    worker = EnvironmentWorker(client, workdir=str(workdir), max_idle=0.2)
    began = time.monotonic()
    task = asyncio.create_task(worker.handle_item(
        work_id=work_id, environment_id=env, session_id=session_id, environment_key="",
        work_secret=secret))
    while emu.get(env, work_id)["state"] != "active":  # claimed
        await asyncio.sleep(0.05)
    await asyncio.sleep(1.5)  # the session read, the bash call started
    await asyncio.to_thread(_stop, emu, env, work_id, force=False)
    stopped_at = time.monotonic()
    await asyncio.wait_for(task, seconds + 30)
    await client.close()
    return time.monotonic() - stopped_at, time.monotonic() - began


def test_sdk_217s_runner_ends_on_a_graceful_stop_only_if_the_lease_is_not_extended(
        emulator_factory: Factory, tmp_path: Path) -> None:
    """SDK 2.17's lease stops only on `lease_extended: false`: with the default it ends within
    a heartbeat (ttl 2 s: beats every 1 s) of a graceful stop during a 20 s bash call; with
    `--stopping-heartbeat extend` it never sees the stop and runs the call to its end."""
    short = ("--min-ttl", "1", "--default-ttl", "2")
    emu = emulator_factory(*short)
    env = emu.create_environment()
    (tmp_path / "a").mkdir()
    after_stop, _ = asyncio.run(_run_until_stopped(emu, env, tmp_path / "a", 20))
    assert after_stop < 8, "the runner ended within a heartbeat and the tool's cancellation"
    log = [e for e in emu.requests_log() if e["endpoint"] == "stop"]
    assert log[-1]["force"] and log[-1]["credential"] == "sessions_token"

    old = emulator_factory(*short, "--stopping-heartbeat", "extend")
    env = old.create_environment()
    (tmp_path / "b").mkdir()
    _, ran = asyncio.run(_run_until_stopped(old, env, tmp_path / "b", 4))
    assert ran >= 4, "it ran the 4 s call to its end: the stop never reached it"


# 2. x-should-retry: false on refusals ------------------------------------------------------------
def _conflicting_acks(emu: EmulatorProcess) -> tuple[Any, int]:
    env = emu.create_environment()
    work_id = _acked(emu, env)
    emu.clear_requests()
    refused = emu.http.post(_url(emu, env, work_id, "/ack"), headers=emu.env_headers)
    client = anthropic.Anthropic(auth_token=emu.environment_key, base_url=emu.base_url,
                                 max_retries=2)
    with pytest.raises(anthropic.ConflictError):
        client.beta.environments.work.ack(work_id, environment_id=env)
    client.close()
    sent = [e for e in emu.requests_log() if e["endpoint"] == "ack"]
    return refused, len(sent) - 1


def test_refusals_that_will_not_change_say_so(emulator: EmulatorProcess,
                                              emulator_factory: Factory) -> None:
    refused, sdk_tries = _conflicting_acks(emulator)
    assert refused.status_code == 409 and refused.headers["x-should-retry"] == "false"
    assert sdk_tries == 1, "SDK 2.17 does not retry a refusal that says so"
    missing = emulator.http.get("/v1/environments/env_nope/work/stats",
                                headers=emulator.org_headers)
    assert missing.status_code == 404 and missing.headers["x-should-retry"] == "false"
    anonymous = emulator.http.get("/v1/environments/env_nope/work/stats")
    assert anonymous.status_code == 401 and anonymous.headers["x-should-retry"] == "false"
    env = emulator.create_environment()
    emulator.set_faults(rate_limit_rate=1.0, endpoints=["stats"])
    limited = emulator.http.get(emulator.work_url(env, "/stats"), headers=emulator.org_headers)
    assert limited.status_code == 429 and "x-should-retry" not in limited.headers

    old = emulator_factory("--no-should-retry-header")
    refused, sdk_tries = _conflicting_acks(old)
    assert refused.status_code == 409 and "x-should-retry" not in refused.headers
    assert sdk_tries == 3, "without it the SDK retries a 409 (max_retries=2)"


# 3. default TTL ----------------------------------------------------------------------------------
def test_the_default_ttl_is_300_s(emulator: EmulatorProcess) -> None:
    env = emulator.create_environment()
    work_id = _acked(emulator, env)
    assert DEFAULT_TTL_SECONDS == 300
    assert _beat(emulator, env, work_id).json()["ttl_seconds"] == 300


# 4. and 5. are in test_emulator_leases.py (--unclaimed-limit, --lease-expiry).

# 6. deliveries of an unacked item ----------------------------------------------------------------
def _deliveries(emu: EmulatorProcess, env: str, tries: int) -> list[dict[str, Any]]:
    delivered = []
    for _ in range(tries):
        work = emu.poll(env, reclaim_older_than_ms=1, block_ms=100)
        if work is not None:
            delivered.append(work)
        time.sleep(0.01)
    return delivered


def test_an_unacked_item_is_delivered_at_most_three_times(emulator: EmulatorProcess,
                                                          emulator_factory: Factory) -> None:
    env = emulator.create_environment()
    _, work_id = emulator.create_session(env)
    delivered = _deliveries(emulator, env, 6)
    assert [w["id"] for w in delivered] == [work_id] * 3
    assert emulator.get(env, work_id)["state"] == "queued", "left the queue, not stopped"
    stats = emulator.http.get(emulator.work_url(env, "/stats"),
                              headers=emulator.org_headers).json()
    assert (stats["depth"], stats["pending"]) == (0, 0)
    ack = emulator.http.post(_url(emulator, env, work_id, "/ack"), headers=emulator.env_headers)
    assert ack.status_code == 409

    old = emulator_factory("--max-deliveries", "0")
    env = old.create_environment()
    _, work_id = old.create_session(env)
    assert [w["id"] for w in _deliveries(old, env, 5)] == [work_id] * 5


# 7. a sessions token per delivery ----------------------------------------------------------------
def test_each_delivery_has_a_sessions_token_of_its_own_that_expires(
        emulator_factory: Factory) -> None:
    emu = emulator_factory("--sessions-token-life", "2")
    env = emu.create_environment()
    _, work_id = emu.create_session(env)
    first, second = _deliveries(emu, env, 2)
    secrets_ = [_payload(w["secret"]) for w in (first, second)]
    assert all(p["version"] == 1 for p in secrets_)
    assert secrets_[0]["sessions_token"] != secrets_[1]["sessions_token"]
    for payload in secrets_:
        beat = emu.http.post(_url(emu, env, work_id, "/heartbeat"), headers={
            **emu.env_headers, "authorization": f"Bearer {payload['sessions_token']}"},
            params={"desired_ttl_seconds": 30})
        assert beat.status_code == 200, "an earlier delivery's token still opens the item"
    time.sleep(2.3)
    late = emu.http.post(_url(emu, env, work_id, "/stop"), json={"force": True}, headers={
        **emu.env_headers, "authorization": f"Bearer {secrets_[1]['sessions_token']}"})
    assert late.status_code == 401, "expired"

    old = emulator_factory("--sessions-token", "per-item", "--sessions-token-life", "0")
    env = old.create_environment()
    old.create_session(env)
    first, second = _deliveries(old, env, 2)
    assert first["secret"] == second["secret"]


# 8. a claim heartbeat on a polled, unacked item --------------------------------------------------
def test_a_first_heartbeat_claims_a_polled_unacked_item(emulator: EmulatorProcess,
                                                        emulator_factory: Factory) -> None:
    env = emulator.create_environment()
    _, work_id = emulator.create_session(env)
    assert _beat(emulator, env, work_id).status_code == 409, "never polled: nothing to claim"
    assert emulator.poll(env, block_ms=500) is not None
    beat = _beat(emulator, env, work_id)
    assert beat.status_code == 200 and beat.json()["state"] == "active"
    work = emulator.get(env, work_id)
    assert work["acknowledged_at"] and work["started_at"]
    assert emulator.http.post(_url(emulator, env, work_id, "/ack"),
                              headers=emulator.env_headers).status_code == 409
    assert emulator.poll(env, reclaim_older_than_ms=1, block_ms=100) is None, "off the queue"

    old = emulator_factory("--no-claim-unacked")
    env = old.create_environment()
    _, work_id = old.create_session(env)
    assert old.poll(env, block_ms=500) is not None
    assert _beat(old, env, work_id).status_code == 409


# 9. a stop of a stopped item ---------------------------------------------------------------------
def test_a_stop_of_a_stopped_item_is_a_no_op(emulator: EmulatorProcess,
                                             emulator_factory: Factory) -> None:
    env = emulator.create_environment()
    work_id = _acked(emulator, env)
    assert _stop(emulator, env, work_id, force=True).status_code == 204
    stopped = emulator.get(env, work_id)
    assert _stop(emulator, env, work_id, force=True).status_code == 204
    assert _stop(emulator, env, work_id, force=False).status_code == 204
    assert emulator.get(env, work_id) == stopped

    old = emulator_factory("--stop-stopped", "conflict")
    env = old.create_environment()
    work_id = _acked(old, env)
    _stop(old, env, work_id, force=True)
    again = _stop(old, env, work_id, force=True)
    assert again.status_code == 409 and again.headers["x-should-retry"] == "false"
