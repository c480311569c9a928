"""The emulator is as strict as the service: API headers, keys bound to their environment, the
sessions token bound to its item, bodies limited and refused unread, non-ASCII keys, and a
request log of authenticated requests only, its fields cut short."""

from __future__ import annotations

import base64
import json
import socket
import uuid
from typing import TYPE_CHECKING, Any

import httpx
import pytest

if TYPE_CHECKING:
    from conftest import EmulatorProcess

pytestmark = pytest.mark.integration

VERSION = {"anthropic-version": "2026-10-21"}
BETA = {"anthropic-beta": "managed-agents-2026-04-01"}
# endpoint -> (method, path suffix, body)
ENDPOINTS: dict[str, tuple[str, str, Any]] = {
    "get": ("GET", "/{work}", None),
    "update": ("POST", "/{work}", {"metadata": {"a": "b"}}),
    "list": ("GET", "", None),
    "poll": ("GET", "/poll", None),
    "ack": ("POST", "/{work}/ack", None),
    "heartbeat": ("POST", "/{work}/heartbeat", None),
    "stop": ("POST", "/{work}/stop", {}),
    "stats": ("GET", "/stats", None),
}
ORG_ENDPOINTS = {"get", "update"}


def _call(emu: EmulatorProcess, endpoint: str, env: str, work_id: str,
          headers: dict[str, Any]) -> httpx.Response:
    method, suffix, body = ENDPOINTS[endpoint]
    # A bare client: none of the fixture's default headers.
    with httpx.Client(base_url=emu.base_url, timeout=10) as client:
        return client.request(method, emu.work_url(env, suffix.format(work=work_id)), json=body,
                              headers=headers)


def _key_of(emu: EmulatorProcess, endpoint: str) -> dict[str, str]:
    key = emu.api_key if endpoint in ORG_ENDPOINTS else emu.environment_key
    return {"authorization": f"Bearer {key}"}


def _error(response: httpx.Response, status: int, error_type: str, text: str = "") -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["type"] == "error" and body["error"]["type"] == error_type
    assert text in body["error"]["message"]
    assert body["request_id"].startswith("req_") and response.headers["request-id"]


def _environment(emu: EmulatorProcess, key: str | None = None) -> str:
    body: dict[str, Any] = {"name": "strict", "config": {"type": "self_hosted"}}
    if key is not None:
        body["environment_key"] = key
    response = emu.http.post("/v1/environments", headers=emu.org_headers, json=body)
    response.raise_for_status()
    assert "environment_key" not in response.json(), "a key is never shown back"
    return str(response.json()["id"])


# --- API headers -----------------------------------------------------------------------------
@pytest.mark.parametrize("endpoint", sorted(ENDPOINTS))
def test_a_request_without_a_version_or_the_beta_is_a_400(
        emulator: EmulatorProcess, endpoint: str) -> None:
    env = emulator.create_environment()
    _, work_id = emulator.create_session(env)
    key = _key_of(emulator, endpoint)
    _error(_call(emulator, endpoint, env, work_id, {**key, **BETA}), 400,
           "invalid_request_error", "anthropic-version")
    _error(_call(emulator, endpoint, env, work_id, {**key, **VERSION}), 400,
           "invalid_request_error", "managed-agents-2026-04-01")
    other_beta = {"anthropic-beta": "files-api-2025-04-14"}
    _error(_call(emulator, endpoint, env, work_id, {**key, **VERSION, **other_beta}), 400,
           "invalid_request_error", "managed-agents-2026-04-01")
    several = {"anthropic-beta": "files-api-2025-04-14, managed-agents-2026-04-01"}
    accepted = _call(emulator, endpoint, env, work_id, {**key, **VERSION, **several})
    # Past the gate: a heartbeat of a queued item is the lifecycle's 409, nothing else.
    assert accepted.status_code in ((409,) if endpoint == "heartbeat" else (200, 204)), (
        accepted.text)


def test_making_work_needs_the_api_headers_and_admin_routes_do_not(
        emulator: EmulatorProcess) -> None:
    org = {"x-api-key": emulator.api_key}
    with httpx.Client(base_url=emulator.base_url, timeout=10) as bare:
        _error(bare.post("/v1/environments", headers=org, json={"name": "x"}), 400,
               "invalid_request_error", "anthropic-version")
        assert bare.get("/_emulator/faults", headers=org).status_code == 200
        assert bare.get("/_emulator/health").status_code == 200


# --- keys --------------------------------------------------------------------------------------
def test_an_environment_key_opens_only_its_own_environment(emulator: EmulatorProcess) -> None:
    key_a, key_b = (f"sk-ant-oat01-own-{uuid.uuid4().hex}" for _ in range(2))
    env_a, env_b = _environment(emulator, key_a), _environment(emulator, key_b)
    env_default = emulator.create_environment()
    allowed = {(key_a, env_a), (key_b, env_b), (emulator.environment_key, env_default)}
    for key in (key_a, key_b, emulator.environment_key):
        for env in (env_a, env_b, env_default):
            for style in ({"authorization": f"Bearer {key}"}, {"x-api-key": key}):
                response = _call(emulator, "stats", env, "-", {**style, **VERSION, **BETA})
                if (key, env) in allowed:
                    assert response.status_code == 200, response.text
                else:
                    _error(response, 403, "permission_error", f"does not open environment {env}")
    # An environment's own key is still an environment key: not for `get`.
    _, work_id = emulator.create_session(env_a)
    _error(_call(emulator, "get", env_a, work_id,
                 {"authorization": f"Bearer {key_a}", **VERSION, **BETA}), 403,
           "permission_error")
    taken = emulator.http.post("/v1/environments", headers=emulator.org_headers,
                               json={"name": "again", "environment_key": key_a})
    _error(taken, 400, "invalid_request_error", "already opens another environment")


def _sessions_token(secret: str) -> str:
    payload = json.loads(base64.urlsafe_b64decode(secret + "=" * (-len(secret) % 4)))
    return str(payload["sessions_token"])


def test_a_sessions_token_opens_heartbeat_and_stop_of_its_item_only(
        emulator: EmulatorProcess) -> None:
    env = emulator.create_environment()
    _, first = emulator.create_session(env)
    _, second = emulator.create_session(env)
    polled = emulator.poll(env)
    assert polled is not None and polled["id"] == first
    token = {"authorization": f"Bearer {_sessions_token(polled['secret'])}", **VERSION, **BETA}
    emulator.http.post(emulator.work_url(env, f"/{first}/ack"),
                       headers=emulator.env_headers).raise_for_status()
    for endpoint in sorted(set(ENDPOINTS) - {"heartbeat", "stop"}):
        _error(_call(emulator, endpoint, env, first, token), 401, "authentication_error")
    for endpoint in ("heartbeat", "stop"):
        _error(_call(emulator, endpoint, env, second, token), 401, "authentication_error")
    beat = emulator.http.post(emulator.work_url(env, f"/{first}/heartbeat"), headers=token,
                              params={"expected_last_heartbeat": "NO_HEARTBEAT"})
    assert beat.status_code == 200 and beat.json()["lease_extended"], beat.text
    stop = emulator.http.post(emulator.work_url(env, f"/{first}/stop"), headers=token,
                              json={"force": True})
    assert stop.status_code == 204, stop.text
    assert emulator.get(env, first)["state"] == "stopped"


@pytest.mark.parametrize("header", ["authorization", "x-api-key"])
def test_a_non_ascii_key_is_a_401_not_a_500(emulator: EmulatorProcess, header: str) -> None:
    env = emulator.create_environment()
    value = "Bearer sk-ant-ключ" if header == "authorization" else "sk-ant-ключ"
    response = _call(emulator, "stats", env, "-",
                     {header: value.encode("utf-8"), **VERSION, **BETA})
    _error(response, 401, "authentication_error")


# --- bodies --------------------------------------------------------------------------------------
def _raw_exchange(emu: EmulatorProcess, head: str, body: bytes = b"") -> tuple[int, bytes]:
    """Send a request head (and maybe part of a body) and read the answer: (status, body)."""
    with socket.create_connection(("127.0.0.1", emu.port), timeout=10) as sock:
        sock.sendall(head.encode() + body)
        data = b""
        while b"\r\n\r\n" not in data or len(data.partition(b"\r\n\r\n")[2]) < int(
                data.partition(b"content-length: ")[2].split(b"\r\n")[0] or 0):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    status = int(data.split(b" ", 2)[1])
    return status, data.partition(b"\r\n\r\n")[2]


def _head(emu: EmulatorProcess, env: str, work_id: str, length: int,
          key: str | None) -> str:
    auth = f"authorization: Bearer {key}\r\n" if key else ""
    return (f"POST {emu.work_url(env, f'/{work_id}/stop')} HTTP/1.1\r\n"
            f"host: 127.0.0.1\r\n{auth}anthropic-version: 2026-10-21\r\n"
            f"anthropic-beta: managed-agents-2026-04-01\r\ncontent-type: application/json\r\n"
            f"content-length: {length}\r\n\r\n")


def test_auth_is_checked_before_a_body_is_read(emulator: EmulatorProcess) -> None:
    """The body is announced but never sent: an answer at all shows nothing waited for it."""
    env = emulator.create_environment()
    _, work_id = emulator.create_session(env)
    status, body = _raw_exchange(emulator, _head(emulator, env, work_id, 1000, None))
    assert status == 401 and b"authentication_error" in body
    status, body = _raw_exchange(emulator, _head(emulator, env, work_id, 1000, "sk-ant-wrong"))
    assert status == 401


def test_a_body_over_the_limit_is_refused(emulator: EmulatorProcess) -> None:
    env = emulator.create_environment()
    _, work_id = emulator.create_session(env)
    key = emulator.environment_key
    # Announced too large: refused before a byte of it is read.
    status, body = _raw_exchange(emulator, _head(emulator, env, work_id, 10**9, key))
    assert status == 413 and b"request_too_large" in body
    # Sent too large, chunked: refused once the limit is passed.
    big = json.dumps({"force": True, "pad": "x" * 100_000}).encode()
    response = emulator.http.post(emulator.work_url(env, f"/{work_id}/stop"),
                                  headers=emulator.env_headers, content=iter([big]))
    _error(response, 413, "request_too_large")
    assert emulator.get(env, work_id)["state"] == "queued", "the refused stop did nothing"
    fine = emulator.http.post(emulator.work_url(env, f"/{work_id}/stop"),
                              headers=emulator.env_headers, json={"force": True})
    assert fine.status_code == 204


# --- the request log -----------------------------------------------------------------------------
def test_the_request_log_holds_authenticated_requests_only_with_fields_cut(
        emulator: EmulatorProcess) -> None:
    env = emulator.create_environment()
    emulator.clear_requests()
    with httpx.Client(base_url=emulator.base_url, timeout=10) as bare:
        for headers in ({}, {"authorization": "Bearer sk-ant-wrong", **VERSION, **BETA},
                        {"x-api-key": emulator.api_key, **BETA}):
            assert bare.get(emulator.work_url(env, "/stats"), headers=headers).status_code in (
                400, 401)
    assert [e for e in emulator.requests_log() if e["environment_id"] == env] == []
    long_id = "w" * 5000
    emulator.poll(env, worker_id=long_id)
    emulator.http.post(emulator.work_url(env, f"/{'x' * 5000}/heartbeat"),
                       headers=emulator.env_headers,
                       params={"expected_last_heartbeat": "t" * 5000})
    entries = [e for e in emulator.requests_log() if e["environment_id"] == env]
    assert [e["endpoint"] for e in entries] == ["poll", "heartbeat"]
    assert entries[0]["worker_id"] == "w" * 200
    assert entries[1]["work_id"] == "x" * 200
    assert entries[1]["expected_last_heartbeat"] == "t" * 200
