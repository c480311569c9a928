"""The Work API clients against `httpx.MockTransport`: requests, parsing, errors, retries.

Every test runs twice, once through `WorkClient` and once through `AsyncWorkClient`, via the
`api` fixture: the two share a request builder and a parser, and these tests keep them equal.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import pickle
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

import dispatcher.workapi
from dispatcher.settings import Settings, SettingsError
from dispatcher.workapi import (
    NO_HEARTBEAT,
    AsyncWorkClient,
    AuthenticationError,
    ConflictError,
    Heartbeat,
    InvalidRequestError,
    InvalidWorkItem,
    LeasePreconditionFailed,
    ListedPage,
    ListedWork,
    MalformedResponseError,
    MissingCredentialError,
    NotFoundError,
    RateLimitedError,
    RequestTimeout,
    ServerError,
    TransientError,
    Work,
    WorkAPIError,
    WorkClient,
    WorkPage,
    WorkQueueStats,
    _endpoints,
)
from dispatcher.workapi.client import default_worker_id

BASE_URL = "http://workapi.test"
ENV_ID = "env_011"
ROOT = f"/v1/environments/{ENV_ID}/work"
ENV_KEY = "sk-ant-oat01-ENVIRONMENT-SECRET"
ORG_KEY = "sk-ant-api03-ORGANISATION-SECRET"
WORK_SECRET = "eyJzZXNzaW9uc190b2tlbiI6InNrLWFudC1yZXEtV09SSyJ9"
SECRETS = (ENV_KEY, ORG_KEY, WORK_SECRET, "ENVIRONMENT-SECRET", "ORGANISATION-SECRET")

Reply = Callable[[], httpx.Response]


def reply(
    status: int = 200,
    body: Any = ...,
    *,
    raw: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> Reply:
    """A scripted answer, built fresh each time it is sent (a response is read only once)."""

    def make() -> httpx.Response:
        if raw is not None:
            return httpx.Response(status, content=raw, headers=headers)
        if body is ...:
            return httpx.Response(status, headers=headers)
        return httpx.Response(status, json=body, headers=headers)

    return make


def fail(exc: type[httpx.RequestError]) -> Reply:
    def make() -> httpx.Response:
        raise exc("simulated")

    return make


def error_body(error_type: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"type": "error", "error": {"type": error_type, "message": message, **extra},
            "request_id": "req_1"}


def work_json(**overrides: Any) -> dict[str, Any]:
    return {
        "id": "work_1", "type": "work", "environment_id": ENV_ID, "state": "queued",
        "data": {"id": "session_1", "type": "session"}, "metadata": {},
        "created_at": "2026-01-01T00:00:00Z", "acknowledged_at": None, "started_at": None,
        "latest_heartbeat_at": None, "stop_requested_at": None, "stopped_at": None,
        "secret": None, **overrides,
    }


HEARTBEAT = {"type": "work_heartbeat", "last_heartbeat": "2026-01-01T00:00:01.5Z",
             "lease_extended": True, "state": "active", "ttl_seconds": 120}
STATS = {"type": "work_queue_stats", "depth": 3, "pending": 1,
         "oldest_queued_at": "2026-01-01T00:00:00Z", "workers_polling": 2}
LEASE_LOST = error_body(
    "invalid_request_error", "Heartbeat precondition failed: expected hb-1, actual was NULL",
    details={"error_code": "heartbeat_precondition_failed", "error_visibility": "user_facing",
             "current_state": {"state": "queued", "last_heartbeat": None,
                               "lease_updated_at": None, "lease_extended": False,
                               "ttl_seconds": 120}})


@dataclass
class Api:
    """One scripted server and a way to call either client against it."""

    mode: str
    replies: list[Reply]
    options: dict[str, Any]
    requests: list[httpx.Request] = field(default_factory=list)
    sleeps: list[float] = field(default_factory=list)

    def _handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        # The last reply repeats, so "always 503" is one reply.
        make = self.replies.pop(0) if len(self.replies) > 1 else self.replies[0]
        return make()

    def call(self, method: str, /, *args: Any, **kwargs: Any) -> Any:
        if self.mode == "sync":
            client = WorkClient(**self.options, transport=httpx.MockTransport(self._handle))
            client._sleep = self.sleeps.append
            with client:
                result = getattr(client, method)(*args, **kwargs)
                return list(result) if method == "iter_list" else result
        return asyncio.run(self._call_async(method, args, kwargs))

    async def _call_async(self, method: str, args: Any, kwargs: Any) -> Any:
        async def sleep(seconds: float) -> None:
            self.sleeps.append(seconds)

        client = AsyncWorkClient(**self.options, transport=httpx.MockTransport(self._handle))
        client._sleep = sleep
        async with client:
            if method == "iter_list":
                return [work async for work in client.aiter_list(*args, **kwargs)]
            return await getattr(client, method)(*args, **kwargs)

    @property
    def last(self) -> httpx.Request:
        return self.requests[-1]


MakeApi = Callable[..., Api]


@pytest.fixture(params=["sync", "async"])
def api(request: pytest.FixtureRequest) -> MakeApi:
    def make(*replies: Reply, **options: Any) -> Api:
        defaults = {"base_url": BASE_URL, "environment_id": ENV_ID, "environment_key": ENV_KEY,
                    "api_key": ORG_KEY, "worker_id": "host-1-dispatcher"}
        return Api(request.param, list(replies) or [reply(200, None)], {**defaults, **options})

    return make


def assert_no_secret(*texts: str) -> None:
    for text in texts:
        for secret in SECRETS:
            assert secret not in text


# --- the public surface ----------------------------------------------------------------------
def test_the_package_exports_exactly_its_public_names() -> None:
    assert sorted(dispatcher.workapi.__all__) == sorted([
        "ANTHROPIC_VERSION", "BETA", "NO_HEARTBEAT", "POLL_BLOCK_MS_MAX", "AsyncWorkClient",
        "AuthenticationError", "Backoff", "ConflictError", "Heartbeat", "InvalidRequestError",
        "InvalidWorkItem", "LeasePreconditionFailed", "LeaseState", "ListedPage", "ListedWork",
        "MalformedResponseError",
        "MissingCredentialError", "NotFoundError", "RateLimitedError", "RequestTimeout",
        "ServerError", "TransientError", "Work", "WorkAPIError", "WorkClient", "WorkData",
        "WorkDataType", "WorkPage", "WorkQueueStats", "WorkState", "classify", "delay_for",
        "epoch_seconds", "retry_after_seconds", "sessions_token",
    ])
    for name in dispatcher.workapi.__all__:
        assert hasattr(dispatcher.workapi, name)


# --- requests --------------------------------------------------------------------------------
ENDPOINTS = [
    pytest.param("poll", (), {}, reply(200, work_json(secret=WORK_SECRET)),
                 "GET", "/poll", {"block_ms": "999"}, "environment", None, Work, id="poll"),
    pytest.param("poll", (), {"block_ms": None, "reclaim_older_than_ms": 2000},
                 reply(200, None), "GET", "/poll", {"reclaim_older_than_ms": "2000"},
                 "environment", None, type(None), id="poll-non-blocking"),
    pytest.param("ack", ("work_1",), {}, reply(200, work_json(state="starting")),
                 "POST", "/work_1/ack", {}, "environment", None, Work, id="ack"),
    pytest.param("heartbeat", ("work_1",),
                 {"expected_last_heartbeat": NO_HEARTBEAT, "desired_ttl_seconds": 60},
                 reply(200, HEARTBEAT), "POST", "/work_1/heartbeat",
                 {"expected_last_heartbeat": "NO_HEARTBEAT", "desired_ttl_seconds": "60"},
                 "environment", None, Heartbeat, id="heartbeat"),
    pytest.param("heartbeat", ("work_1",), {"expected_last_heartbeat": None},
                 reply(200, HEARTBEAT), "POST", "/work_1/heartbeat", {},
                 "environment", None, Heartbeat, id="heartbeat-unconditional"),
    pytest.param("stop", ("work_1",), {"force": True}, reply(204),
                 "POST", "/work_1/stop", {}, "environment", {"force": True}, type(None),
                 id="stop"),
    pytest.param("stop", ("work_1",), {}, reply(200, work_json(state="stopping")),
                 "POST", "/work_1/stop", {}, "environment", {"force": False}, Work,
                 id="stop-graceful-json"),
    pytest.param("get", ("work_1",), {}, reply(200, work_json()),
                 "GET", "/work_1", {}, "organisation", None, Work, id="get"),
    pytest.param("update", ("work_1", {"queue": "gpu", "old": None}), {},
                 reply(200, work_json(metadata={"queue": "gpu"})), "POST", "/work_1", {},
                 "organisation", {"metadata": {"queue": "gpu", "old": None}}, Work, id="update"),
    pytest.param("list", (), {"limit": 10, "page": "cur_2"},
                 reply(200, {"data": [work_json()], "next_page": None}),
                 "GET", "", {"limit": "10", "page": "cur_2"}, "environment", None, WorkPage,
                 id="list"),
    pytest.param("list_states", (), {"limit": 1000, "page": "cur_2"},
                 reply(200, {"data": [work_json()], "next_page": "cur_3"}),
                 "GET", "", {"limit": "1000", "page": "cur_2"}, "environment", None, ListedPage,
                 id="list-states"),
    pytest.param("stats", (), {}, reply(200, STATS), "GET", "/stats", {}, "environment", None,
                 WorkQueueStats, id="stats"),
]


@pytest.mark.parametrize(
    ("method", "args", "kwargs", "answer", "http_method", "suffix", "query", "auth", "body",
     "parsed"),
    ENDPOINTS,
)
def test_each_endpoint_sends_its_request_and_parses_its_answer(
    api: MakeApi, method: str, args: tuple[Any, ...], kwargs: dict[str, Any], answer: Reply,
    http_method: str, suffix: str, query: dict[str, str], auth: str, body: Any, parsed: type,
) -> None:
    server = api(answer)
    result = server.call(method, *args, **kwargs)

    request = server.last
    assert (request.method, request.url.path) == (http_method, ROOT + suffix)
    # As SDK 2.10.0 sends them: no `?beta=true`, its version, both keys as Bearer.
    assert list(request.url.params.items()) == list(query.items())
    assert request.headers["anthropic-version"] == "2026-10-21"
    assert request.headers["anthropic-beta"] == "managed-agents-2026-04-01"
    assert request.headers["user-agent"] == f"dispatcher/{dispatcher.__version__}"
    key = ENV_KEY if auth == "environment" else ORG_KEY
    assert request.headers["authorization"] == f"Bearer {key}"
    assert "x-api-key" not in request.headers
    assert (request.headers.get("content-type") == "application/json") == (http_method == "POST")
    assert (json.loads(request.content) if request.content else None) == body
    assert ("anthropic-worker-id" in request.headers) == (method == "poll")
    assert isinstance(result, parsed)


def test_poll_names_the_worker_only_when_it_has_an_id(api: MakeApi) -> None:
    server = api()
    server.call("poll")
    assert server.last.headers["anthropic-worker-id"] == "host-1-dispatcher"
    server = api(worker_id=None)
    server.call("poll")
    assert "anthropic-worker-id" not in server.last.headers


def test_parsed_answers_carry_the_servers_values(api: MakeApi) -> None:
    beat = api(reply(200, HEARTBEAT)).call("heartbeat", "w", expected_last_heartbeat="t")
    assert (beat.last_heartbeat, beat.lease_extended, beat.ttl_seconds) == (
        "2026-01-01T00:00:01.5Z", True, 120)
    stats = api(reply(200, STATS)).call("stats")
    assert (stats.depth, stats.pending, stats.workers_polling) == (3, 1, 2)
    work = api(reply(200, work_json(secret=WORK_SECRET))).call("poll")
    assert (work.id, work.session_id, work.secret) == ("work_1", "session_1", WORK_SECRET)


@pytest.mark.parametrize("work_id", ["..", ".", "work_1/../../stop?force=true", "a%2Fb",
                                     "work 1", "work_1\r\nx-api-key: k", "w\x00", "", "é",
                                     "w" * 257])
def test_a_hostile_work_id_never_reaches_a_url(api: MakeApi, work_id: str) -> None:
    """`..` quotes to itself and `/v1/environments/{env}/work/..` is the environment itself."""
    server = api(reply(200, work_json()))
    for method, args in [("ack", (work_id,)), ("stop", (work_id,)), ("get", (work_id,)),
                         ("heartbeat", (work_id,)), ("update", (work_id, {"a": "b"}))]:
        kwargs = {"expected_last_heartbeat": "t"} if method == "heartbeat" else {}
        with pytest.raises(ValueError, match="work_id must be"):
            server.call(method, *args, **kwargs)
    assert server.requests == []


@pytest.mark.parametrize("environment_id", ["..", "env/../x", "env%2F", "env\n"])
def test_a_hostile_environment_id_is_refused_when_the_client_is_made(
    api: MakeApi, environment_id: str
) -> None:
    server = api(reply(200, STATS), environment_id=environment_id)
    with pytest.raises(ValueError, match="environment_id must be"):
        server.call("stats")
    assert server.requests == []


def test_a_plain_id_goes_into_the_path_as_it_is(api: MakeApi) -> None:
    server = api(reply(200, work_json()), environment_id="env_01.A-b")
    server.call("ack", "work_01.x-Y")
    assert server.last.url.raw_path.decode() == "/v1/environments/env_01.A-b/work/work_01.x-Y/ack"


def test_every_request_is_bounded_by_a_timeout_and_a_poll_adds_its_block(api: MakeApi) -> None:
    server = api(reply(200, None), timeout=5.0)
    server.call("poll", block_ms=500)
    assert server.last.extensions["timeout"]["read"] == pytest.approx(5.5)
    server = api(reply(200, HEARTBEAT), timeout=5.0)
    server.call("heartbeat", "work_1", expected_last_heartbeat=None, timeout=2.0)
    assert server.last.extensions["timeout"]["read"] == pytest.approx(2.0)
    server = api(reply(200, STATS), timeout=5.0)
    server.call("stats")
    assert server.last.extensions["timeout"] == httpx.Timeout(5.0).as_dict()


@pytest.mark.parametrize("block_ms", [0, 1000, -1])
def test_a_block_ms_the_server_rejects_is_refused_before_any_request(
    api: MakeApi, block_ms: int
) -> None:
    server = api()
    with pytest.raises(ValueError, match=r"block_ms must be 1\.\.999"):
        server.call("poll", block_ms=block_ms)
    assert server.requests == []


# --- credentials -----------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["stop", "stats"])
def test_stop_and_stats_fall_back_to_the_organisation_key(api: MakeApi, method: str) -> None:
    server = api(reply(200, STATS) if method == "stats" else reply(204), environment_key=None)
    server.call(method, *(["work_1"] if method == "stop" else []))
    assert server.last.headers["authorization"] == f"Bearer {ORG_KEY}"
    assert "x-api-key" not in server.last.headers


@pytest.mark.parametrize(
    ("method", "args", "keys", "variable"),
    [
        ("poll", (), {"environment_key": None}, "ANTHROPIC_ENVIRONMENT_KEY is not set"),
        ("ack", ("w",), {"environment_key": None}, "ANTHROPIC_ENVIRONMENT_KEY is not set"),
        ("list", (), {"environment_key": None}, "ANTHROPIC_ENVIRONMENT_KEY is not set"),
        ("get", ("w",), {"api_key": None}, "ANTHROPIC_API_KEY is not set"),
        ("update", ("w", {"a": "b"}), {"api_key": None}, "ANTHROPIC_API_KEY is not set"),
        ("stop", ("w",), {"environment_key": None, "api_key": None},
         "neither ANTHROPIC_ENVIRONMENT_KEY nor ANTHROPIC_API_KEY"),
        ("stats", (), {"environment_key": None, "api_key": None},
         "neither ANTHROPIC_ENVIRONMENT_KEY nor ANTHROPIC_API_KEY"),
    ],
)
def test_a_missing_credential_names_its_variable_before_any_request(
    api: MakeApi, method: str, args: tuple[Any, ...], keys: dict[str, None], variable: str
) -> None:
    server = api(**keys)
    with pytest.raises(MissingCredentialError, match=variable) as caught:
        server.call(method, *args)
    assert isinstance(caught.value, ValueError)
    assert server.requests == []


def test_the_heartbeat_never_sends_an_api_key_beside_the_bearer(api: MakeApi) -> None:
    server = api(reply(200, HEARTBEAT))
    server.call("heartbeat", "work_1", expected_last_heartbeat=NO_HEARTBEAT)
    assert "x-api-key" not in server.last.headers


# --- empty answers ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "answer", [reply(200, None), reply(204), reply(200, raw=b"")], ids=["null", "204", "empty"]
)
def test_an_empty_poll_is_none(api: MakeApi, answer: Reply) -> None:
    assert api(answer).call("poll") is None


def test_an_ack_without_a_body_is_malformed_not_none(api: MakeApi) -> None:
    with pytest.raises(MalformedResponseError, match="ack: the 204 response has no body"):
        api(reply(204), max_retries=0).call("ack", "work_1")


# --- errors ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("status", "headers", "error_class", "retryable"),
    [
        (400, {}, InvalidRequestError, False),
        (401, {}, AuthenticationError, False),
        (403, {}, AuthenticationError, False),
        (404, {}, NotFoundError, False),
        (408, {}, RequestTimeout, True),
        (409, {}, ConflictError, True),
        (409, {"x-should-retry": "false"}, ConflictError, False),
        (412, {}, LeasePreconditionFailed, False),
        (413, {}, InvalidRequestError, False),
        (422, {}, InvalidRequestError, False),
        (429, {}, RateLimitedError, True),
        (400, {"x-should-retry": "true"}, InvalidRequestError, True),
        (500, {}, ServerError, True),
        (503, {"x-should-retry": "false"}, ServerError, False),
        (529, {}, ServerError, True),
        (302, {}, WorkAPIError, False),
    ],
)
def test_each_status_maps_to_its_class_and_the_classifier_decides_retrying(
    api: MakeApi, status: int, headers: dict[str, str], error_class: type[WorkAPIError],
    retryable: bool,
) -> None:
    body = error_body("some_error", "it went wrong")
    with pytest.raises(WorkAPIError) as caught:
        api(reply(status, body, headers=headers), max_retries=0).call("stats")
    exc = caught.value
    assert type(exc) is error_class
    assert (exc.status, exc.retryable, exc.error_type, exc.request_id) == (
        status, retryable, "some_error", "req_1")
    assert str(exc) == f"stats: {status} some_error: it went wrong (request_id=req_1)"


def test_a_412_carries_the_servers_lease_state(api: MakeApi) -> None:
    with pytest.raises(LeasePreconditionFailed) as caught:
        api(reply(412, LEASE_LOST)).call("heartbeat", "work_1", expected_last_heartbeat="hb-1")
    exc = caught.value
    assert exc.current_state is not None
    assert (exc.current_state.state, exc.current_state.ttl_seconds) == ("queued", 120)
    assert exc.current_state.last_heartbeat is None
    assert not exc.retryable
    assert "heartbeat: 412 invalid_request_error: Heartbeat precondition failed" in str(exc)


@pytest.mark.parametrize(
    "details", [None, "text", {"current_state": "queued"}, {"current_state": {"ttl_seconds": "x"}}]
)
def test_a_412_without_a_readable_lease_state_still_is_a_412(api: MakeApi, details: Any) -> None:
    body = error_body("invalid_request_error", "precondition failed", details=details)
    with pytest.raises(LeasePreconditionFailed) as caught:
        api(reply(412, body)).call("heartbeat", "work_1", expected_last_heartbeat="hb-1")
    assert caught.value.current_state is None


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (reply(502, raw=b"<html><body>Bad Gateway</body></html>",
               headers={"content-type": "text/html"}),
         "stats: 502 Bad Gateway: the error body is not JSON (text/html, 37 bytes)"),
        (reply(404, {"detail": "nope"}),
         "stats: 404 Not Found: the error body has no error object"),
        (reply(404, ["error"]), "stats: 404 Not Found: the error body has no error object"),
        (reply(500), "stats: 500 Internal Server Error: no error body"),
        (reply(409, {"type": "error", "error": {"type": 7}}, headers={"request-id": "req_h"}),
         "stats: 409 Conflict: no message (request_id=req_h)"),
        (reply(502, raw=b"[" * 100_000),
         "stats: 502 Bad Gateway: the error body is not JSON (no content-type, 100000 bytes)"),
    ],
    ids=["html", "no-error-object", "list", "empty", "odd-fields", "nested-too-deeply"],
)
def test_an_odd_error_body_still_gives_the_right_class_and_a_clear_message(
    api: MakeApi, answer: Reply, message: str
) -> None:
    with pytest.raises(WorkAPIError) as caught:
        api(answer, max_retries=0).call("stats")
    assert str(caught.value) == message
    assert type(caught.value).__name__ in {"ServerError", "NotFoundError", "ConflictError"}


@pytest.mark.parametrize(
    ("failure", "error_class"),
    [(httpx.ConnectError, TransientError), (httpx.RemoteProtocolError, TransientError),
     (httpx.ReadTimeout, RequestTimeout), (httpx.ConnectTimeout, RequestTimeout)],
)
def test_transport_failures_are_transient(
    api: MakeApi, failure: type[httpx.RequestError], error_class: type[WorkAPIError]
) -> None:
    with pytest.raises(error_class) as caught:
        api(fail(failure), max_retries=0).call("poll")
    assert caught.value.retryable
    assert caught.value.status is None
    assert str(caught.value).startswith("poll: ")


# --- retries ---------------------------------------------------------------------------------
def test_retryable_errors_are_retried_then_given_up(
    api: MakeApi, caplog: pytest.LogCaptureFixture
) -> None:
    server = api(reply(503, error_body("overloaded_error", "busy")))
    with caplog.at_level(logging.WARNING, logger="dispatcher.workapi"), \
            pytest.raises(ServerError):
        server.call("poll")
    assert len(server.requests) == 3  # the first try and max_retries=2 more
    assert 0.375 <= server.sleeps[0] <= 0.5
    assert 0.75 <= server.sleeps[1] <= 1.0
    lines = [r.getMessage() for r in caplog.records if r.name == "dispatcher.workapi"]
    assert len(lines) == 2
    assert lines[0].startswith("retry endpoint=poll status=503 attempt=1 max_retries=2")
    assert_no_secret(*lines)


def test_a_retry_that_succeeds_returns_the_answer(api: MakeApi) -> None:
    server = api(fail(httpx.ConnectError), reply(500), reply(200, work_json()))
    assert isinstance(server.call("ack", "work_1"), Work)
    assert len(server.requests) == 3
    assert len(server.sleeps) == 2


@pytest.mark.parametrize(
    ("status", "headers"), [(400, {}), (404, {}), (409, {"x-should-retry": "false"})]
)
def test_fatal_errors_are_not_retried(
    api: MakeApi, status: int, headers: dict[str, str]
) -> None:
    server = api(reply(status, error_body("e", "m"), headers=headers))
    with pytest.raises(WorkAPIError):
        server.call("stop", "work_1")
    assert len(server.requests) == 1
    assert server.sleeps == []


def test_x_should_retry_true_retries_a_4xx(api: MakeApi) -> None:
    server = api(reply(400, error_body("e", "m"), headers={"x-should-retry": "true"}),
                 reply(200, STATS))
    assert isinstance(server.call("stats"), WorkQueueStats)
    assert len(server.requests) == 2


def test_max_retries_zero_tries_once(api: MakeApi) -> None:
    server = api(reply(503), max_retries=0)
    with pytest.raises(ServerError):
        server.call("heartbeat", "work_1", expected_last_heartbeat=NO_HEARTBEAT)
    assert len(server.requests) == 1


@pytest.mark.parametrize(
    ("headers", "expected"),
    [({"retry-after": "3"}, 3.0), ({"retry-after-ms": "1500"}, 1.5),
     ({"retry-after-ms": "250", "retry-after": "9"}, 0.25)],
)
def test_the_servers_retry_after_sets_the_wait(
    api: MakeApi, headers: dict[str, str], expected: float
) -> None:
    server = api(reply(429, error_body("rate_limit_error", "slow down"), headers=headers),
                 reply(200, STATS))
    server.call("stats")
    assert server.sleeps == [expected]


@pytest.mark.parametrize("headers", [{"retry-after": "0"}, {"retry-after-ms": "-5"},
                                     {"retry-after": "7200"}, {"retry-after": "soon"}])
def test_a_retry_after_out_of_range_falls_back_to_backoff(
    api: MakeApi, headers: dict[str, str]
) -> None:
    server = api(reply(429, headers=headers), reply(200, STATS))
    server.call("stats")
    assert 0.375 <= server.sleeps[0] <= 0.5


@pytest.mark.parametrize("headers", [{"retry-after": "120"}, {"retry-after-ms": "90000"}])
def test_a_retry_after_longer_than_a_call_waits_ends_the_call_with_it(
    api: MakeApi, headers: dict[str, str]
) -> None:
    """The caller waits it out with the fleet (control/pacing); no call sleeps for minutes."""
    server = api(reply(429, headers=headers), reply(200, STATS))
    with pytest.raises(RateLimitedError) as caught:
        server.call("stats")
    assert caught.value.retry_after in (120.0, 90.0)
    assert server.sleeps == [] and len(server.requests) == 1


def test_a_rate_limit_error_carries_retry_after(api: MakeApi) -> None:
    with pytest.raises(RateLimitedError) as caught:
        api(reply(429, headers={"retry-after": "7"}), max_retries=0).call("stats")
    assert caught.value.retry_after == 7.0


# --- malformed answers -----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("method", "args", "answer", "message"),
    [
        ("poll", (), reply(200, raw=b'{"id": "work_1", "secret": "' + WORK_SECRET.encode(),
                           headers={"content-type": "application/json"}),
         "poll: the 200 response is not JSON (application/json, 76 bytes): "
         "Unterminated string starting at (char 27); expected a work item or null"),
        ("ack", ("work_1",), reply(200, ["work_1"]),
         "ack: the 200 response is not a work item: "
         "body: Input should be a valid dictionary or instance of Work"),
        ("stats", (), reply(200, raw=b"<!doctype html><h1>Service Unavailable</h1>",
                            headers={"content-type": "text/html; charset=utf-8"}),
         "stats: the 200 response is not JSON (text/html; charset=utf-8, 43 bytes): "
         "Expecting value (char 0); expected queue stats"),
        ("heartbeat", ("work_1",), reply(200, {**HEARTBEAT, "ttl_seconds": "long"}),
         "heartbeat: the 200 response is not a heartbeat: "
         "ttl_seconds: Input should be a valid integer, unable to parse string as an integer"),
        ("list", (), reply(200, raw=b"\x80garbage"),
         "list: the 200 response is not JSON (no content-type, 8 bytes): not UTF-8; "
         "expected a page of work items"),
        ("heartbeat", ("work_1",), reply(200, raw=b"[" * 100_000),
         "heartbeat: the 200 response is not JSON (no content-type, 100000 bytes): "
         "nested too deeply; expected a heartbeat"),
        ("list", (), reply(200, raw=b"[" * 100_000),
         "list: the 200 response is not JSON (no content-type, 100000 bytes): nested too deeply; "
         "expected a page of work items"),
    ],
    ids=["truncated", "list-not-object", "html", "wrong-type", "not-utf8", "hb-nested-too-deeply",
         "nested-too-deeply"],
)
def test_a_malformed_answer_is_a_clear_retryable_error(
    api: MakeApi, method: str, args: tuple[Any, ...], answer: Reply, message: str
) -> None:
    kwargs = {"expected_last_heartbeat": "t"} if method == "heartbeat" else {}
    with pytest.raises(MalformedResponseError) as caught:
        api(answer, max_retries=0).call(method, *args, **kwargs)
    exc = caught.value
    assert str(exc) == message
    assert exc.retryable
    assert exc.__cause__ is None and exc.__suppress_context__
    assert_no_secret(str(exc), repr(exc))


@pytest.mark.parametrize(
    ("answer", "work_id", "problem"),
    [
        ({"id": "work_1", "secret": WORK_SECRET}, "work_1",
         "environment_id: Field required; state: Field required; data: Field required (+1 more)"),
        (work_json(id=".."), None, "id: Value error, id must be"),
        (work_json(id="work_7", metadata={"note": "\ud800"}), "work_7",
         "Value error, work.metadata.note is not valid Unicode (a lone surrogate)"),
        (work_json(id="work_8", data={"id": "s\x001", "type": "session"}), "work_8",
         "data.id: Value error, must be non-empty and hold no NUL"),
    ],
    ids=["missing-fields", "dot-dot-id", "lone-surrogate", "nul-in-session-id"],
)
def test_an_invalid_work_item_names_its_id_and_is_not_retried(
    api: MakeApi, answer: dict[str, Any], work_id: str | None, problem: str
) -> None:
    """Asking again brings the same item back: the caller stops it by the id read from the
    raw reply, when that id is itself valid."""
    raw = json.dumps(answer).encode()  # ensure_ascii: the surrogate travels as \ud800
    server = api(reply(200, raw=raw), max_retries=2)
    with pytest.raises(InvalidWorkItem) as caught:
        server.call("poll")
    assert isinstance(caught.value, MalformedResponseError)
    assert caught.value.work_id == work_id
    assert problem in str(caught.value)
    assert not caught.value.retryable and len(server.requests) == 1
    assert_no_secret(str(caught.value), repr(caught.value))


def test_an_invalid_item_in_a_list_page_is_left_out_and_named(
    api: MakeApi, caplog: pytest.LogCaptureFixture
) -> None:
    page = {"data": [work_json(id="w1"), work_json(id="w2", metadata={"k": "\ud800"}),
                     work_json(id=".."), work_json(id="w4")], "next_page": None}
    with caplog.at_level(logging.WARNING, logger="dispatcher.workapi"):
        result = api(reply(200, raw=json.dumps(page).encode())).call("list")
    assert [work.id for work in result.data] == ["w1", "w4"]
    skipped = [r.getMessage() for r in caplog.records if r.__dict__.get("action")
               == "invalid work item"]
    assert len(skipped) == 2
    assert "work_id=w2" in skipped[0] and "work_id=unreadable" in skipped[1]


def test_a_page_read_for_its_stops_keeps_only_what_the_stop_rule_reads(
    api: MakeApi, caplog: pytest.LogCaptureFixture
) -> None:
    """Fields the stop rule does not read are not checked (an odd session id costs no stop);
    an item whose id, state or stop request is unreadable is left out, one line naming it,
    and every other item of the page is kept."""
    page = {"data": [work_json(id="w1", stop_requested_at="2026-12-06T20:00:00Z"),
                     work_json(id="w2", metadata={"k": "\ud800"}, data={"id": "s\x001"}),
                     work_json(id=".."), {**work_json(id="w4"), "state": 7},
                     {**work_json(id="w5"), "stop_requested_at": ["t"]}, "w6",
                     {**work_json(id="w7"), "state": "stopping"}],
            "next_page": "cur_2"}
    with caplog.at_level(logging.WARNING, logger="dispatcher.workapi"):
        result = api(reply(200, raw=json.dumps(page).encode())).call("list_states")
    assert result == ListedPage([ListedWork("w1", "queued", "2026-12-06T20:00:00Z"),
                                 ListedWork("w2", "queued"), ListedWork("w7", "stopping")],
                                "cur_2")
    skipped = [r.getMessage() for r in caplog.records if r.__dict__.get("action")
               == "invalid work item"]
    assert [line.split()[3] for line in skipped] == [
        "work_id=unreadable", "work_id=w4", "work_id=w5", "work_id=unreadable"]
    assert "state: Input should be a valid string" in skipped[1]


def _page_bytes(*items: bytes, next_page: bytes = b"null") -> bytes:
    return b'{"data":[' + b",".join(items) + b'],"next_page":' + next_page + b"}"


_ITEM = json.dumps(work_json(id="w1")).encode()


# body, and whether `_listed_whole` reads it: any page it cannot vouch for (a bad item, anything
# odd even in a field nobody reads, a body `json.loads` refuses) goes to the item-by-item reading.
@pytest.mark.parametrize(("body", "whole"), [
    (_page_bytes(_ITEM, json.dumps(work_json(id="w2", stop_requested_at="t")).encode(),
                 next_page=b'"cur_2"'), True),
    (_page_bytes(next_page=b'""'), True),
    (_page_bytes(b'{"id":"w1","state":"queued","id":"w9"}'), True),  # the last key counts
    (_page_bytes(_ITEM.replace(b'"metadata": {}', b'"metadata": {"k": "\\ud800"}')), False),
    (_page_bytes(_ITEM.replace(b'"metadata": {}', b'"metadata": {"k": "\xff"}')), False),
    (_page_bytes(_ITEM.replace(b'"metadata": {}', b'"metadata": {"n": NaN}')), False),
    (_page_bytes(_ITEM.replace(b'"metadata": {}',
                               b'"metadata": ' + b"[" * 5000 + b"]" * 5000)), False),
    (_page_bytes(b'{"id":"w1","state":"\\ud800"}', _ITEM), False),
    (_page_bytes(b'{"id":"w1\\u0000","state":"queued"}', _ITEM), False),
    (_page_bytes(b'{"id":"..","state":"queued"}', b'{"id":"w3","state":null}', b"7"), False),
    (_page_bytes(b'{"id":"w1","state":"stopping","stop_requested_at":["t"]}'), False),
    (b"\xef\xbb\xbf" + _page_bytes(_ITEM), False),
    (_page_bytes(_ITEM) + b" trailing", False),
], ids=["plain", "empty-cursor", "duplicate-key", "lone-surrogate-unread",
        "not-utf8-unread", "nan-unread", "deep-unread", "lone-surrogate-state", "nul-in-id",
        "bad-items", "bad-stop", "bom", "trailing"])
def test_a_page_read_whole_reads_as_item_by_item(body: bytes, whole: bool) -> None:
    """A page decoded for its stop fields at once (`_listed_whole`) gives what reading it item
    by item gives; any page that reading would treat otherwise is handed to it (None)."""
    read = _endpoints._listed_whole(body)
    assert (read is not None) is whole
    if read is not None:
        assert read == _endpoints._listed_items("list", httpx.Response(200, content=body))


def test_a_page_whose_items_all_read_well_is_read_whole() -> None:
    assert _endpoints._listed_whole(_page_bytes(_ITEM, _ITEM)) == ListedPage(
        [ListedWork("w1", "queued"), ListedWork("w1", "queued")])


@pytest.mark.parametrize("body", [{"data": None}, [], {"data": [], "next_page": 3}],
                         ids=["no-list", "not-object", "odd-cursor"])
def test_a_page_read_for_its_stops_that_is_no_page_is_a_retryable_error(
    api: MakeApi, body: Any
) -> None:
    with pytest.raises(MalformedResponseError, match="is not a page of work items") as caught:
        api(reply(200, body), max_retries=0).call("list_states")
    assert caught.value.retryable


def test_a_stop_that_echoes_an_invalid_item_still_succeeded(api: MakeApi) -> None:
    """A 2xx stop was applied: an unreadable echo must not make the caller stop again."""
    server = api(reply(200, raw=json.dumps(work_json(id="work_7", metadata={"k": "\ud800"}))
                       .encode()))
    assert server.call("stop", "work_7", force=True) is None
    assert len(server.requests) == 1


def test_a_malformed_answer_is_retried_like_any_transient_failure(api: MakeApi) -> None:
    server = api(reply(200, raw=b"{"), reply(200, work_json()))
    assert isinstance(server.call("ack", "work_1"), Work)
    assert len(server.requests) == 2


# --- lists -----------------------------------------------------------------------------------
def test_iter_list_follows_next_page(api: MakeApi) -> None:
    server = api(
        reply(200, {"data": [work_json(id="w1"), work_json(id="w2")], "next_page": "cur_2"}),
        reply(200, {"data": [work_json(id="w3")], "next_page": "cur_3"}),
        reply(200, {"data": [], "next_page": None}),
    )
    works = server.call("iter_list", limit=2)
    assert [work.id for work in works] == ["w1", "w2", "w3"]
    assert [r.url.params.get("page") for r in server.requests] == [None, "cur_2", "cur_3"]
    assert {r.url.params["limit"] for r in server.requests} == {"2"}


# --- forward compatibility -------------------------------------------------------------------
@pytest.mark.parametrize("data_type", ["healthcheck", "something_new"])
def test_unknown_fields_and_work_types_are_kept(api: MakeApi, data_type: str) -> None:
    body = work_json(data={"id": "hc_1", "type": data_type, "mode": "private"},
                     actor={"type": "api_key", "api_key_id": "key_1"}, state="brand_new_state")
    work = api(reply(200, body)).call("poll")
    assert (work.data.type, work.state) == (data_type, "brand_new_state")
    assert work.data.model_extra == {"mode": "private"}
    assert work.model_extra == {"actor": {"type": "api_key", "api_key_id": "key_1"}}
    assert not work.is_session
    assert json.loads(work.to_json())["actor"]["api_key_id"] == "key_1"


# --- secrets ---------------------------------------------------------------------------------
def test_the_work_secret_stays_out_of_reprs(api: MakeApi) -> None:
    work = api(reply(200, work_json(secret=WORK_SECRET))).call("poll")
    assert work.secret == WORK_SECRET
    assert_no_secret(repr(work), str(work))


def test_keys_stay_out_of_client_reprs_errors_and_logs(
    api: MakeApi, caplog: pytest.LogCaptureFixture
) -> None:
    quoting = error_body("authentication_error", f"invalid x-api-key {ORG_KEY} / {ENV_KEY}")
    server = api(reply(503, quoting), reply(401, quoting))
    with caplog.at_level(logging.DEBUG), pytest.raises(AuthenticationError) as caught:
        server.call("stats")
    assert "sk-ant-***" in str(caught.value)
    assert_no_secret(str(caught.value), repr(caught.value), caplog.text)
    client = WorkClient(base_url=BASE_URL, environment_id=ENV_ID, environment_key=ENV_KEY,
                        api_key=ORG_KEY)
    assert_no_secret(repr(client), str(vars(client)))


# --- construction ----------------------------------------------------------------------------
def test_the_constructor_is_cheap_and_checks_the_base_url() -> None:
    client = WorkClient(base_url=BASE_URL, environment_id=ENV_ID)
    assert client._http is None  # no httpx client, no TLS context until the first request
    client.close()
    with pytest.raises(ValueError, match="base_url must start with http"):
        WorkClient(base_url="api.anthropic.com", environment_id=ENV_ID)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in list(os.environ):
        if name.startswith(("ANTHROPIC_", "DISPATCHER_")):
            monkeypatch.delenv(name)
    yield


@pytest.mark.usefixtures("clean_env")
@pytest.mark.parametrize("client_class", [WorkClient, AsyncWorkClient])
def test_from_settings_uses_the_secret_values_and_allows_overrides(
    client_class: type[WorkClient] | type[AsyncWorkClient],
) -> None:
    settings = Settings(ANTHROPIC_BASE_URL=BASE_URL, ANTHROPIC_ENVIRONMENT_ID=ENV_ID,
                        ANTHROPIC_ENVIRONMENT_KEY=ENV_KEY, ANTHROPIC_API_KEY=ORG_KEY,
                        DISPATCHER_HTTP_TIMEOUT_SECONDS=3.0)
    client = client_class.from_settings(settings, max_retries=0)
    assert client.worker_id == default_worker_id()
    host, _, suffix = client.worker_id.rpartition("-")
    assert host == socket.gethostname() and len(suffix) == 12
    call = client._api.heartbeat("w", expected_last_heartbeat=None, desired_ttl_seconds=None,
                                 timeout=None)
    assert call.request.headers["authorization"] == f"Bearer {ENV_KEY}"
    assert call.request.extensions["timeout"]["read"] == 3.0
    assert client._api.max_retries == 0
    assert client_class.from_settings(settings, worker_id="w-9").worker_id == "w-9"
    with pytest.raises(SettingsError, match="ANTHROPIC_ENVIRONMENT_ID is not set"):
        client_class.from_settings(Settings())


def test_errors_survive_pickling_as_celery_results_need(api: MakeApi) -> None:
    with pytest.raises(LeasePreconditionFailed) as caught:
        api(reply(412, LEASE_LOST)).call("heartbeat", "work_1", expected_last_heartbeat="hb-1")
    copy = pickle.loads(pickle.dumps(caught.value))
    assert (type(copy), str(copy), copy.status, copy.retryable, copy.request_id) == (
        LeasePreconditionFailed, str(caught.value), 412, False, "req_1")
    assert copy.current_state == caught.value.current_state
