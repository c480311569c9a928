"""The webhook receiver's effects on real Redis: replays refused across replicas, nothing
remembered from a delivery it could not act on, and its start-up refusals. Celery's publish is
a recorder here (the acceptance tests publish for real)."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
import redis
from kombu.exceptions import OperationalError
from standardwebhooks import Webhook

from dispatcher.control.capacity import Capacity
from dispatcher.emulator.webhooks import run_started_event
from dispatcher.ops.webhook_server import Receiver
from tests.support.isolation import integration_db, redis_url

pytestmark = pytest.mark.integration

KEY = "whsec_" + base64.b64encode(b"the receiver tests' signing key!").decode()


class Publisher:
    def __init__(self) -> None:
        self.published = 0
        self.failing = False

    def __call__(self) -> None:
        if self.failing:
            raise OperationalError("broker unreachable")
        self.published += 1


@pytest.fixture
def store() -> Iterator[tuple[redis.Redis, str]]:
    client = redis.Redis.from_url(redis_url(integration_db()), decode_responses=True)
    prefix = f"webhooks{uuid.uuid4().hex[:8]}"
    Capacity(client, prefix=prefix).advertise(hostname="w1@test", slots=2, pool="threads",
                                              queues=["dispatcher.sessions"])
    yield client, prefix
    for key in client.scan_iter(f"{prefix}:*"):
        client.delete(key)
    client.close()


def receiver(store: tuple[redis.Redis, str], publish: Publisher) -> Receiver:
    client, prefix = store
    return Receiver(webhook=Webhook(KEY), redis=client, prefix=prefix, publish=publish)


def delivery() -> tuple[bytes, dict[str, str]]:
    event = run_started_event("session_1")
    body, now = json.dumps(event), datetime.now(tz=UTC)
    return body.encode(), {"webhook-id": event["id"],
                           "webhook-timestamp": str(int(now.timestamp())),
                           "webhook-signature": Webhook(KEY).sign(event["id"], now, body)}


def test_a_replay_is_refused_by_every_replica(store: tuple[redis.Redis, str]) -> None:
    publish = Publisher()
    first, second = receiver(store, publish), receiver(store, publish)
    body, headers = delivery()
    assert first.answer(body, headers).status == 202
    assert second.answer(body, headers).status == 400
    assert publish.published == 1


def test_a_delivery_it_could_not_publish_is_not_remembered(
        store: tuple[redis.Redis, str]) -> None:
    publish = Publisher()
    receiving = receiver(store, publish)
    body, headers = delivery()
    publish.failing = True
    assert receiving.answer(body, headers).status == 503
    publish.failing = False
    assert receiving.answer(body, headers).status == 202, "the retry is a first delivery"


def test_no_live_slots_or_stopping_is_503_and_not_remembered(
        store: tuple[redis.Redis, str]) -> None:
    client, prefix = store
    publish = Publisher()
    receiving = receiver(store, publish)
    body, headers = delivery()
    Capacity(client, prefix=prefix).set_draining("w1@test")
    assert receiving.answer(body, headers).status == 503
    Capacity(client, prefix=prefix).register("w1@test")
    receiving.stopping = True
    assert receiving.answer(body, headers).status == 503
    receiving.stopping = False
    assert receiving.answer(body, headers).status == 202
    assert publish.published == 1


@pytest.mark.parametrize(("key", "message"), [
    (None, "ANTHROPIC_WEBHOOK_SIGNING_KEY is not set"),
    ("", "ANTHROPIC_WEBHOOK_SIGNING_KEY is not set"),
    ("whsec_", "ANTHROPIC_WEBHOOK_SIGNING_KEY is invalid"),
])
def test_it_refuses_to_start_without_a_usable_key(key: str | None, message: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "ANTHROPIC_WEBHOOK_SIGNING_KEY"}
    if key is not None:
        env["ANTHROPIC_WEBHOOK_SIGNING_KEY"] = key
    done = subprocess.run([sys.executable, "-m", "dispatcher.ops.cli", "webhooks", "--port", "0"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and message in done.stderr, done.stderr
