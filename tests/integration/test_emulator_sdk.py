"""The official `anthropic` SDK (2.17.0), unchanged, against the emulator."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Iterator
from typing import TYPE_CHECKING

import anthropic
import pytest
from anthropic.types.beta.environments import (
    BetaSelfHostedWork,
    BetaSelfHostedWorkHeartbeatResponse,
    BetaSelfHostedWorkQueueStats,
)

if TYPE_CHECKING:
    from conftest import EmulatorProcess

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def _no_ambient_credentials(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in ("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN", "ANTHROPIC_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    yield


def _clients(emu: EmulatorProcess) -> tuple[anthropic.Anthropic, anthropic.Anthropic]:
    """(organisation client, environment-key client), as a user would build them."""
    org = anthropic.Anthropic(api_key=emu.api_key, base_url=emu.base_url, max_retries=0)
    worker = anthropic.Anthropic(auth_token=emu.environment_key, base_url=emu.base_url,
                                 max_retries=0)
    return org, worker


def test_every_work_method_parses_its_response(emulator: EmulatorProcess) -> None:
    org, worker = _clients(emulator)
    env = emulator.create_environment()
    _, work_id = emulator.create_session(env, metadata={"a": "1"})
    work = worker.beta.environments.work

    polled = work.poll(env, block_ms=500, anthropic_worker_id="sdk-test")
    assert isinstance(polled, BetaSelfHostedWork) and polled.id == work_id and polled.secret
    assert work.poll(env) is None, "an empty poll parses as None"
    acked = work.ack(work_id, environment_id=env)
    assert acked.state == "starting" and acked.acknowledged_at
    beat = work.heartbeat(work_id, environment_id=env, expected_last_heartbeat="NO_HEARTBEAT")
    assert isinstance(beat, BetaSelfHostedWorkHeartbeatResponse) and beat.state == "active"
    with pytest.raises(anthropic.PreconditionFailedError) as lost:
        work.heartbeat(work_id, environment_id=env, expected_last_heartbeat="NO_HEARTBEAT")
    assert lost.value.error_code == "heartbeat_precondition_failed"

    got = org.beta.environments.work.retrieve(work_id, environment_id=env)
    assert got.state == "active" and got.secret is None
    updated = org.beta.environments.work.update(work_id, environment_id=env,
                                                metadata={"a": None, "b": "2"})
    assert updated.metadata == {"b": "2"}
    listed = [w.id for w in work.list(env, limit=1)]  # auto-pages through next_page
    assert listed == [work_id]
    stats = org.beta.environments.work.stats(env)
    assert isinstance(stats, BetaSelfHostedWorkQueueStats) and stats.workers_polling == 1

    assert work.stop(work_id, environment_id=env) == "", "204: no body to parse"
    emulator.set_faults(stop_response="json")
    stopped = org.beta.environments.work.stop(work_id, environment_id=env, force=True)
    assert isinstance(stopped, BetaSelfHostedWork) and stopped.state == "stopped"
    again = org.beta.environments.work.stop(work_id, environment_id=env, force=True)
    assert again.state == "stopped" and again.stopped_at == stopped.stopped_at, "a no-op"


def test_the_sdk_is_refused_with_the_wrong_credential(emulator: EmulatorProcess) -> None:
    org, worker = _clients(emulator)
    env = emulator.create_environment()
    _, work_id = emulator.create_session(env)
    with pytest.raises(anthropic.PermissionDeniedError):
        worker.beta.environments.work.retrieve(work_id, environment_id=env)
    with pytest.raises(anthropic.PermissionDeniedError):
        org.beta.environments.work.poll(env)
    bad = anthropic.Anthropic(api_key="sk-ant-api03-nope", base_url=emulator.base_url,
                              max_retries=0)
    with pytest.raises(anthropic.AuthenticationError):
        bad.beta.environments.work.stats(env)


def test_the_sdk_poller_drains_a_queue_of_sessions(emulator: EmulatorProcess) -> None:
    env = emulator.create_environment()
    work_ids = {emulator.create_session(env)[1] for _ in range(12)}

    async def drain() -> list[str]:
        client = anthropic.AsyncAnthropic(api_key=emulator.api_key, base_url=emulator.base_url,
                                          max_retries=0)
        claimed = []
        async for item in client.beta.environments.work.poller(
                environment_id=env, environment_key=emulator.environment_key,
                worker_id="sdk-poller", block_ms=100, drain=True):
            assert item.secret, "the polled copy, secret included"
            assert emulator.get(env, item.id)["state"] == "starting", "acked before yielded"
            claimed.append(item.id)
        await client.close()
        return claimed

    claimed = asyncio.run(drain())
    assert sorted(claimed) == sorted(work_ids), "each session claimed exactly once"
    for work_id in work_ids:
        assert emulator.get(env, work_id)["state"] == "stopped", "auto_stop: a forced stop"
    log = [e for e in emulator.requests_log() if e["environment_id"] == env]
    assert {e["endpoint"] for e in log} == {"poll", "ack", "stop", "get"}  # get: this test's
    assert {e["worker_id"] for e in log if e["endpoint"] == "poll"} == {"sdk-poller"}
    stops = [e for e in log if e["endpoint"] == "stop"]
    assert len(stops) == len(work_ids), "one stop each, none retried"
    assert all(e["force"] and e["credential"] == "sessions_token" for e in stops), (
        "SDK 2.16+: forced, as the delivery's own sessions token")


def test_the_sdk_worker_calls_run_on_the_items_sessions_token(emulator: EmulatorProcess) -> None:
    """As `handle_item` does: a Bearer-only client on the token from the item's secret beats
    and force-stops that item, and is refused elsewhere."""
    env = emulator.create_environment()
    _, work_id = emulator.create_session(env)
    _, other_id = emulator.create_session(env)
    _, worker = _clients(emulator)
    polled = worker.beta.environments.work.poll(env, block_ms=500)
    assert polled is not None and polled.id == work_id and polled.secret
    worker.beta.environments.work.ack(work_id, environment_id=env)
    secret = polled.secret
    token = json.loads(base64.urlsafe_b64decode(secret + "=" * (-len(secret) % 4)))[
        "sessions_token"]
    item = anthropic.Anthropic(auth_token=token, base_url=emulator.base_url, max_retries=0)
    work = item.beta.environments.work
    beat = work.heartbeat(work_id, environment_id=env, expected_last_heartbeat="NO_HEARTBEAT")
    assert beat.lease_extended
    with pytest.raises(anthropic.AuthenticationError):
        work.heartbeat(other_id, environment_id=env, expected_last_heartbeat="NO_HEARTBEAT")
    with pytest.raises(anthropic.AuthenticationError):
        work.poll(env)
    assert work.stop(work_id, environment_id=env, force=True) == ""
    assert emulator.get(env, work_id)["state"] == "stopped"
    item.close()
    worker.close()
