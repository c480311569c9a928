"""The emulator's own heartbeat path (`FastHeartbeat`) answers as the FastAPI route does.

A heartbeat whose query repeats a parameter is one only FastAPI's validation judges, so it goes
to the route; the same value repeated means the same heartbeat. Each case is sent both ways,
on two items in the same state, and the answers and request-log entries compared.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from conftest import EmulatorProcess

pytestmark = pytest.mark.integration

# What differs between two items, or two requests, by nature: ids, tokens, times.
_OWN = {"id", "last_heartbeat", "lease_updated_at", "request_id", "time", "work_id",
        "expected_last_heartbeat", "message"}


def _alike(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _alike(v) for k, v in value.items() if k not in _OWN}
    return value


def _acked(emu: EmulatorProcess, env: str) -> str:
    _, work_id = emu.create_session(env)
    assert emu.poll(env, block_ms=500) is not None
    emu.http.post(emu.work_url(env, f"/{work_id}/ack"), headers=emu.env_headers)
    return work_id


def _beat(emu: EmulatorProcess, env: str, work_id: str, expected: str, *, routed: bool,
          headers: dict[str, str] | None = None, ttl: str = "30") -> Any:
    params = [("expected_last_heartbeat", expected), ("desired_ttl_seconds", ttl)]
    if routed:
        params.append(("expected_last_heartbeat", expected))
    return emu.http.post(emu.work_url(env, f"/{work_id}/heartbeat"), params=params,
                         headers=headers or emu.env_headers)


def _shape(reply: Any) -> tuple[int, dict[str, Any], set[str]]:
    headers = {name for name in reply.headers if name not in ("date", "server")}
    return reply.status_code, _alike(reply.json()), headers


def _entries(emu: EmulatorProcess) -> list[dict[str, Any]]:
    return [_alike(e) for e in emu.requests_log() if e["endpoint"] == "heartbeat"]


def test_the_heartbeat_path_answers_and_logs_as_the_route(emulator: EmulatorProcess) -> None:
    env = emulator.create_environment()
    fast, routed = _acked(emulator, env), _acked(emulator, env)
    emulator.clear_requests()
    cases: list[tuple[Any, Any]] = []
    first = (_beat(emulator, env, fast, "NO_HEARTBEAT", routed=False),
             _beat(emulator, env, routed, "NO_HEARTBEAT", routed=True))
    cases.append(first)
    assert first[0].status_code == 200, first[0].text
    # A stale token: 412, the item unchanged.
    cases.append((_beat(emulator, env, fast, "NO_HEARTBEAT", routed=False),
                  _beat(emulator, env, routed, "NO_HEARTBEAT", routed=True)))
    # The current token again: a renewal.
    cases.append((_beat(emulator, env, fast, first[0].json()["last_heartbeat"], routed=False),
                  _beat(emulator, env, routed, first[1].json()["last_heartbeat"], routed=True)))
    # An unknown item, and a key the endpoint does not take.
    cases.append((_beat(emulator, env, "work_unknown", "NO_HEARTBEAT", routed=False),
                  _beat(emulator, env, "work_unknown", "NO_HEARTBEAT", routed=True)))
    cases.append((
        _beat(emulator, env, fast, "x", routed=False, headers=emulator.org_headers),
        _beat(emulator, env, routed, "x", routed=True, headers=emulator.org_headers)))
    statuses = [a.status_code for a, _ in cases]
    assert statuses == [200, 412, 200, 404, 403], statuses
    for a, b in cases:
        assert _shape(a) == _shape(b)
    entries = _entries(emulator)
    # The guard refuses the organisation key before the log (and either path) sees it.
    assert len(entries) == 2 * (len(cases) - 1)
    assert entries[0::2] == entries[1::2]


def test_a_query_only_the_route_judges_is_refused_by_it(emulator: EmulatorProcess) -> None:
    env = emulator.create_environment()
    work_id = _acked(emulator, env)
    reply = _beat(emulator, env, work_id, "NO_HEARTBEAT", routed=False, ttl="thirty")
    assert reply.status_code == 400
    assert "desired_ttl_seconds" in reply.json()["error"]["message"]
