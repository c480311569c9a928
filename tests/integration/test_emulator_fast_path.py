"""The emulator's own path for its busiest requests (`fastpath`) answers as the FastAPI routes.

Each case is sent both ways, on items in the same state: once as a client sends it (the fast
path), once with a query parameter the route does not name (`routed=1`), which the fast path
hands on to FastAPI and FastAPI ignores. Answers (status, body, header names) and request-log
entries are compared, ids, tokens and times aside.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from conftest import EmulatorProcess

pytestmark = pytest.mark.integration

# What differs between two items, or two requests, by nature: ids, tokens, times.
_OWN = {"id", "last_heartbeat", "lease_updated_at", "request_id", "time", "answered",
        "work_id", "expected_last_heartbeat", "message", "secret", "created_at", "updated_at",
        "acknowledged_at", "started_at", "latest_heartbeat_at", "session_id"}
_ROUTED = ("routed", "1")


def _alike(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _alike(v) for k, v in value.items() if k not in _OWN}
    if isinstance(value, list):
        return [_alike(v) for v in value]
    return value


def _shape(reply: Any) -> tuple[int, Any, set[str]]:
    headers = {name for name in reply.headers if name not in ("date", "server")}
    body = _alike(reply.json()) if reply.content else None
    return reply.status_code, body, headers


def _both(emu: EmulatorProcess, method: str, paths: tuple[str, str], *,
          params: list[tuple[str, str]] | None = None, **kwargs: Any) -> tuple[Any, Any]:
    """The request sent the fast way to `paths[0]`, then routed to `paths[1]`."""
    fast = emu.http.request(method, paths[0], params=params or [], **kwargs)
    routed = emu.http.request(method, paths[1], params=[*(params or []), _ROUTED], **kwargs)
    return fast, routed


def _same(cases: list[tuple[Any, Any]]) -> None:
    for fast, routed in cases:
        assert _shape(fast) == _shape(routed), (fast.text, routed.text)


def _entries(emu: EmulatorProcess) -> list[dict[str, Any]]:
    return [_alike(e) for e in emu.requests_log()]


def _polled(emu: EmulatorProcess, env: str) -> str:
    _, work_id = emu.create_session(env)
    assert emu.poll(env) is not None
    return work_id


def _acked(emu: EmulatorProcess, env: str) -> str:
    work_id = _polled(emu, env)
    emu.http.post(emu.work_url(env, f"/{work_id}/ack"), headers=emu.env_headers)
    return work_id


def test_creation_answers_as_the_route(emulator: EmulatorProcess) -> None:
    env = emulator.create_environment()
    org = emulator.org_headers
    both = ("/v1/sessions", "/v1/sessions")
    plain = {"environment_id": env, "agent": "agent_x", "metadata": {"k": "v"}}
    cases = [
        _both(emulator, "POST", both, json=plain, headers=org),
        _both(emulator, "POST", both, json={"environment_id": env}, headers=org),
        _both(emulator, "POST", both, json={**plain, "agent": {"id": "a", "x": [1]},
                                            "extra": True}, headers=org),
        _both(emulator, "POST", both, json={**plain, "environment_id": "env_unknown"},
              headers=org),
        _both(emulator, "POST", both, json={**plain, "metadata": {f"k{i}": "v" for i in
                                                                  range(17)}}, headers=org),
        _both(emulator, "POST", both, json={**plain, "metadata": {"": "v"}}, headers=org),
        _both(emulator, "POST", both, json=plain, headers=emulator.env_headers),
    ]
    assert [a.status_code for a, _ in cases] == [200, 200, 200, 404, 400, 400, 403]
    _same(cases)
    created = [a.json() for a, _ in cases[:3]] + [b.json() for _, b in cases[:3]]
    for session in created:  # each item queued, and its session bound to it
        assert emulator.get(env, session["work_id"])["data"]["id"] == session["id"]
        reply = emulator.http.get(f"/v1/sessions/{session['id']}", headers=org)
        assert reply.json()["work_id"] == session["work_id"]


@pytest.mark.parametrize("body", [
    b"", b"not json", b"[1]", b'{"environment_id": 5}', b'{"environment_id": "e", "metadata": 1}',
    b'{"environment_id": "e", "metadata": {"k": 1}}', b'{"environment_id": "e", "metadata": []}',
    b'{"environment_id": "e", "emulator_script": [{"name": "nope", "input": {}}]}',
])
def test_a_creation_body_only_the_route_judges_is_refused_by_it(
        emulator: EmulatorProcess, body: bytes) -> None:
    env = emulator.create_environment()
    body = body.replace(b'"e"', f'"{env}"'.encode())
    headers = {**emulator.org_headers, "content-type": "application/json"}
    fast, routed = _both(emulator, "POST", ("/v1/sessions", "/v1/sessions"), content=body,
                         headers=headers)
    assert fast.status_code == 400, fast.text
    assert _shape(fast) == _shape(routed)


def test_poll_answers_and_logs_as_the_route(emulator: EmulatorProcess) -> None:
    env = emulator.create_environment()
    for _ in range(4):
        emulator.create_session(env)
    emulator.clear_requests()
    url = emulator.work_url(env, "/poll")
    urls = (url, url)
    worker = {**emulator.env_headers, "anthropic-worker-id": "w-1"}
    cases = [
        _both(emulator, "GET", urls, headers=emulator.env_headers),
        _both(emulator, "GET", urls, params=[("reclaim_older_than_ms", "60000")], headers=worker),
        _both(emulator, "GET", urls, headers=emulator.env_headers),  # none left
        _both(emulator, "GET", urls, params=[("block_ms", "1")], headers=emulator.env_headers),
        _both(emulator, "GET", urls, params=[("block_ms", "0")], headers=emulator.env_headers),
        _both(emulator, "GET", urls, params=[("block_ms", "1000")],
              headers=emulator.env_headers),
        _both(emulator, "GET", urls, params=[("reclaim_older_than_ms", "0")],
              headers=emulator.env_headers),
        _both(emulator, "GET", urls, params=[("block_ms", "-1")], headers=emulator.env_headers),
        _both(emulator, "GET", urls, params=[("block_ms", "")], headers=emulator.env_headers),
        _both(emulator, "GET", urls, params=[("block_ms", " 5")], headers=emulator.env_headers),
        _both(emulator, "GET", (emulator.work_url("env_unknown", "/poll"),) * 2,
              headers=emulator.env_headers),
    ]
    statuses = [a.status_code for a, _ in cases]
    assert statuses == [200, 200, 200, 200, 400, 400, 400, 400, 400, 200, 404], statuses
    assert cases[2][0].json() is None
    _same(cases)
    entries = [e for e in _entries(emulator) if e["endpoint"] == "poll"]
    assert len(entries) == 2 * len(statuses)
    assert entries[0::2] == entries[1::2]


def test_ack_answers_and_logs_as_the_route(emulator: EmulatorProcess) -> None:
    env = emulator.create_environment()
    fast, routed = _polled(emulator, env), _polled(emulator, env)
    queued_fast, queued_routed = (emulator.create_session(env)[1] for _ in range(2))
    emulator.clear_requests()

    def ack(a: str, b: str, headers: dict[str, str] | None = None) -> tuple[Any, Any]:
        return _both(emulator, "POST", (emulator.work_url(env, f"/{a}/ack"),
                                        emulator.work_url(env, f"/{b}/ack")),
                     headers=headers or emulator.env_headers)

    cases = [ack(fast, routed), ack(fast, routed), ack(queued_fast, queued_routed),
             ack("work_unknown", "work_unknown"),
             ack(fast, routed, emulator.org_headers)]
    statuses = [a.status_code for a, _ in cases]
    assert statuses == [200, 409, 200, 404, 403], statuses
    _same(cases)
    entries = [e for e in _entries(emulator) if e["endpoint"] == "ack"]
    # The guard refuses the organisation key before the log (and either path) sees it.
    assert len(entries) == 2 * (len(cases) - 1)
    assert entries[0::2] == entries[1::2]


def _beat(emu: EmulatorProcess, env: str, work_id: str, expected: str, *, routed: bool,
          headers: dict[str, str] | None = None, ttl: str = "30") -> Any:
    params = [("expected_last_heartbeat", expected), ("desired_ttl_seconds", ttl)]
    if routed:
        params.append(("expected_last_heartbeat", expected))  # repeated: FastAPI's to judge
    return emu.http.post(emu.work_url(env, f"/{work_id}/heartbeat"), params=params,
                         headers=headers or emu.env_headers)


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
    _same(cases)
    entries = [e for e in _entries(emulator) if e["endpoint"] == "heartbeat"]
    assert len(entries) == 2 * (len(cases) - 1)
    assert entries[0::2] == entries[1::2]


@pytest.mark.parametrize("ttl", ["thirty", "-5", ""])
def test_a_heartbeat_query_only_the_route_judges_is_refused_by_it(
        emulator: EmulatorProcess, ttl: str) -> None:
    env = emulator.create_environment()
    work_id = _acked(emulator, env)
    reply = _beat(emulator, env, work_id, "NO_HEARTBEAT", routed=False, ttl=ttl)
    assert reply.status_code == 400
    assert "desired_ttl_seconds" in reply.json()["error"]["message"]


def test_faults_apply_on_the_fast_path(emulator: EmulatorProcess) -> None:
    """The faults are outside either path: an injected 503 answers a fast poll as a routed one."""
    env = emulator.create_environment()
    emulator.set_faults(error_rate=1.0, error_status=503, endpoints=["poll", "ack"])
    url = emulator.work_url(env, "/poll")
    cases = [_both(emulator, "GET", (url, url), headers=emulator.env_headers),
             _both(emulator, "POST", (emulator.work_url(env, "/work_x/ack"),) * 2,
                   headers=emulator.env_headers)]
    assert [a.status_code for a, _ in cases] == [503, 503]
    _same(cases)


def test_list_answers_and_logs_as_the_route(emulator: EmulatorProcess) -> None:
    """The same pages, byte for byte, over items in every state a listing meets: queued, leased,
    stop requested, stopped, with metadata; and the same refusals."""
    env = emulator.create_environment()
    queued = emulator.enqueue(env, "session", metadata={"k": "vé"})["id"]
    leased, stopping, stopped = (_acked(emulator, env) for _ in range(3))
    emulator.http.post(emulator.work_url(env, f"/{stopping}/stop"), json={},
                       headers=emulator.env_headers)
    emulator.http.post(emulator.work_url(env, f"/{stopped}/stop"), json={"force": True},
                       headers=emulator.env_headers)
    emulator.clear_requests()
    url = emulator.work_url(env)
    urls, headers = (url, url), emulator.env_headers
    first = _both(emulator, "GET", urls, params=[("limit", "2")], headers=headers)
    cursor = first[0].json()["next_page"]
    assert cursor is not None and cursor == first[1].json()["next_page"]
    cases = [
        first,
        _both(emulator, "GET", urls, params=[("limit", "2"), ("page", cursor)], headers=headers),
        _both(emulator, "GET", urls, headers=headers),
        _both(emulator, "GET", urls, params=[("page", "")], headers=headers),
        _both(emulator, "GET", urls, params=[("limit", "0")], headers=headers),
        _both(emulator, "GET", urls, params=[("limit", "101")], headers=headers),
        _both(emulator, "GET", urls, params=[("limit", "two")], headers=headers),
        _both(emulator, "GET", urls, params=[("page", "not a cursor")], headers=headers),
        _both(emulator, "GET", (emulator.work_url("env_unknown"),) * 2, headers=headers),
        _both(emulator, "GET", urls, headers=emulator.org_headers),
    ]
    statuses = [a.status_code for a, _ in cases]
    assert statuses == [200, 200, 200, 200, 400, 400, 400, 400, 404, 403], statuses
    _same(cases)
    for fast, routed in cases[:4]:  # the pages themselves, ids and times included
        assert fast.content == routed.content, (fast.text, routed.text)
    shown = {item["id"]: item for item in cases[2][0].json()["data"]}
    assert list(shown) == [stopped, stopping, leased, queued]  # newest first
    assert shown[queued]["metadata"] == {"k": "vé"}
    assert shown[stopping]["state"] == "stopping" and shown[stopping]["stop_requested_at"]
    assert shown[stopped]["state"] == "stopped"
    assert all(item["secret"] is None for item in shown.values())
    entries = [e for e in _entries(emulator) if e["endpoint"] == "list"]
    assert len(entries) == 2 * (len(cases) - 1)  # the organisation key: refused by the guard
    assert entries[0::2] == entries[1::2]
