"""Credentials per endpoint (protocol-facts section 10): either header carries either key; a
missing or unknown key is 401, a known key of the wrong kind is 403, in the Anthropic shape."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import httpx
import pytest

if TYPE_CHECKING:
    from conftest import EmulatorProcess

pytestmark = pytest.mark.integration

ENV, ORG = "environment", "organisation"
# endpoint -> (method, path suffix, body, the kinds of key it takes)
WORK_ENDPOINTS: dict[str, tuple[str, str, Any, set[str]]] = {
    "get": ("GET", "/{work}", None, {ORG}),
    "update": ("POST", "/{work}", {"metadata": {"a": "b"}}, {ORG}),
    "list": ("GET", "", None, {ENV}),
    "poll": ("GET", "/poll", None, {ENV}),
    "ack": ("POST", "/{work}/ack", None, {ENV}),
    "heartbeat": ("POST", "/{work}/heartbeat", None, {ENV}),
    "stop": ("POST", "/{work}/stop", {}, {ENV, ORG}),
    "stats": ("GET", "/stats", None, {ENV, ORG}),
}


def _headers(emu: EmulatorProcess, kind: str, style: str) -> dict[str, str]:
    key = {ENV: emu.environment_key, ORG: emu.api_key, "wrong": "sk-ant-api03-wrong"}[kind]
    return {"authorization": f"Bearer {key}"} if style == "bearer" else {"x-api-key": key}


def _call(emu: EmulatorProcess, endpoint: str, env: str, work_id: str,
          headers: dict[str, str]) -> httpx.Response:
    method, suffix, body, _ = WORK_ENDPOINTS[endpoint]
    url = emu.work_url(env, suffix.format(work=work_id))
    return emu.http.request(method, url, json=body, headers=headers)


def _assert_error(response: httpx.Response, status: int, error_type: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["type"] == "error" and body["error"]["type"] == error_type
    assert body["request_id"].startswith("req_")


@pytest.mark.parametrize("endpoint", sorted(WORK_ENDPOINTS))
def test_every_work_endpoint_refuses_missing_wrong_and_wrong_kind_keys(
        emulator: EmulatorProcess, endpoint: str) -> None:
    env = emulator.create_environment()
    _, work_id = emulator.create_session(env)
    _assert_error(_call(emulator, endpoint, env, work_id, {}), 401, "authentication_error")
    for style in ("bearer", "x-api-key"):
        wrong = _call(emulator, endpoint, env, work_id, _headers(emulator, "wrong", style))
        _assert_error(wrong, 401, "authentication_error")
    allowed = WORK_ENDPOINTS[endpoint][3]
    for kind in {ENV, ORG} - allowed:
        for style in ("bearer", "x-api-key"):
            refused = _call(emulator, endpoint, env, work_id, _headers(emulator, kind, style))
            _assert_error(refused, 403, "permission_error")


@pytest.mark.parametrize("endpoint", sorted(WORK_ENDPOINTS))
@pytest.mark.parametrize("style", ["bearer", "x-api-key"])
def test_every_work_endpoint_takes_its_keys_in_either_header(
        emulator: EmulatorProcess, endpoint: str, style: str) -> None:
    env = emulator.create_environment()
    for kind in WORK_ENDPOINTS[endpoint][3]:
        _, work_id = emulator.create_session(env)
        if endpoint == "heartbeat":
            emulator.poll(env)
            emulator.http.post(emulator.work_url(env, f"/{work_id}/ack"),
                               headers=emulator.env_headers)
        response = _call(emulator, endpoint, env, work_id, _headers(emulator, kind, style))
        assert response.status_code in (200, 204), (kind, response.text)


def test_any_anthropic_version_is_accepted(emulator: EmulatorProcess) -> None:
    env = emulator.create_environment()
    for version in ("2023-06-01", "2026-10-21", "1999-01-01"):
        response = emulator.http.get(emulator.work_url(env, "/stats"),
                                     headers={**emulator.org_headers,
                                              "anthropic-version": version})
        assert response.status_code == 200


def test_making_work_and_the_admin_routes_take_the_organisation_key_only(
        emulator: EmulatorProcess) -> None:
    env = emulator.create_environment()
    calls = [("POST", "/v1/environments", {"name": "x"}), ("GET", f"/v1/environments/{env}", None),
             ("POST", "/v1/sessions", {"environment_id": env}),
             ("POST", f"/_emulator/environments/{env}/healthcheck", None),
             ("POST", f"/_emulator/environments/{env}/work", {"data": {"type": "x"}}),
             ("GET", "/_emulator/faults", None), ("POST", "/_emulator/faults", {}),
             ("GET", "/_emulator/requests", None)]
    for method, url, body in calls:
        bare = emulator.http.request(method, url, json=body)
        _assert_error(bare, 401, "authentication_error")
        as_env = emulator.http.request(method, url, json=body, headers=emulator.env_headers)
        _assert_error(as_env, 403, "permission_error")
        as_org = emulator.http.request(method, url, json=body,
                                       headers=_headers(emulator, ORG, "bearer"))
        assert as_org.status_code == 200, (url, as_org.text)
