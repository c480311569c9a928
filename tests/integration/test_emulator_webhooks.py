"""The emulator's webhook deliveries, seen by a plain HTTP endpoint of the test: signed as the
SDK verifies, retried on no answer and on 5xx with the same id, never on 4xx, and logged."""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from anthropic import Anthropic

from dispatcher.emulator.cli import ENV_WEBHOOK_SIGNING_KEY
from tests.support.isolation import free_port
from tests.support.waiting import wait_for

pytestmark = pytest.mark.integration

KEY = "whsec_" + base64.b64encode(b"the emulator tests' signing key!").decode()



class Endpoint:
    """An HTTP endpoint that answers each delivery with the next status of `answers`."""

    def __init__(self, port: int, answers: list[int]) -> None:
        self.received: list[tuple[dict[str, str], str]] = []
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"])).decode()
                endpoint.received.append(({k.lower(): v for k, v in self.headers.items()}, body))
                status = answers[min(len(endpoint.received), len(answers)) - 1]
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def endpoints() -> Iterator[Callable[[int, list[int]], Endpoint]]:
    started: list[Endpoint] = []

    def start(port: int, answers: list[int]) -> Endpoint:
        started.append(Endpoint(port, answers))
        return started[-1]

    yield start
    for endpoint in started:
        endpoint.close()


def deliveries(emulator: Any) -> list[dict[str, Any]]:
    return [r for r in emulator.requests_log() if r["endpoint"] == "webhook"]


def test_a_delivery_is_retried_until_answered_with_the_same_id_and_fresh_signatures(
        emulator_factory: Callable[..., Any],
        endpoints: Callable[[int, list[int]], Endpoint]) -> None:
    port = free_port()
    emulator = emulator_factory("--webhook-url", f"http://127.0.0.1:{port}/webhooks",
                                env={ENV_WEBHOOK_SIGNING_KEY: KEY})
    environment_id = emulator.create_environment()
    session_id, work_id = emulator.create_session(environment_id)
    wait_for(lambda: deliveries(emulator), timeout=10, what="an unanswered attempt")
    endpoint = endpoints(port, [500, 503, 202])  # nothing listened; now 5xx twice, then 202
    wait_for(lambda: [d for d in deliveries(emulator) if d["status"] == 202], timeout=30,
             what="the accepted attempt")

    log = deliveries(emulator)
    statuses = [d["status"] for d in log]
    assert set(statuses[:-3]) == {0} and statuses[-3:] == [500, 503, 202], statuses
    assert [d["attempt"] for d in log] == list(range(1, len(log) + 1))
    assert {(d["session_id"], d["work_id"], d["environment_id"]) for d in log} == {
        (session_id, work_id, environment_id)}
    assert len({d["event_id"] for d in log}) == 1

    sdk = Anthropic(api_key="unused", webhook_key=KEY).beta.webhooks
    ids = set()
    for headers, body in endpoint.received:
        event = sdk.unwrap(body, headers=headers)  # raises unless signed as the SDK verifies
        assert event.data.type == "session.status_run_started" and event.data.id == session_id
        ids.add(headers["webhook-id"])
    assert ids == {log[0]["event_id"]} == {json.loads(endpoint.received[0][1])["id"]}


def test_a_4xx_ends_the_delivery(emulator_factory: Callable[..., Any],
                                 endpoints: Callable[[int, list[int]], Endpoint]) -> None:
    port = free_port()
    endpoint = endpoints(port, [401])
    emulator = emulator_factory("--webhook-url", f"http://127.0.0.1:{port}/webhooks",
                                env={ENV_WEBHOOK_SIGNING_KEY: KEY})
    emulator.create_session(emulator.create_environment())
    wait_for(lambda: deliveries(emulator), timeout=10, what="the attempt")
    emulator.create_session(emulator.create_environment())  # a later event, to wait on
    wait_for(lambda: len(endpoint.received) >= 2, timeout=10, what="the second session's")
    # The emulator logs a delivery once its answer is read, a moment after the endpoint got it.
    wait_for(lambda: len(deliveries(emulator)) >= 2, timeout=10, what="the second's log entry")
    assert [d["status"] for d in deliveries(emulator)] == [401, 401]
    assert len(endpoint.received) == 2, "the first delivery was not retried"


def test_no_deliveries_without_a_webhook_url(emulator: Any) -> None:
    emulator.clear_requests()
    emulator.create_session(emulator.create_environment())
    assert deliveries(emulator) == []
