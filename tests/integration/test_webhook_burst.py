"""A burst of webhook deliveries over real HTTP to a real `dispatcher webhooks` puts at most one
wake-up on the control queue (real Redis as the broker, no worker taking it); the wake-up clears
the flag when it runs, and the next delivery publishes the next. Refusals are logged sampled."""

from __future__ import annotations

import base64
import json
import math
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
import redis
from standardwebhooks import Webhook

from dispatcher.celery.keys import CeleryKeys
from dispatcher.control.capacity import Capacity
from dispatcher.control.poll_keys import PollKeys
from dispatcher.control.webhooks import REFUSAL_LOG_SECONDS
from dispatcher.emulator.webhooks import run_started_event
from dispatcher.ops.webhook_server import CLAIM_EXPIRES_SECONDS
from tests.support import isolation
from tests.support.waiting import wait_for

pytestmark = pytest.mark.integration

KEY = "whsec_" + base64.b64encode(b"the burst test's signing key!!!!").decode()
BURST = 10_000
SENDERS = 16  # concurrent connections, as a sender's retry pool would open
START_TIMEOUT_S = 30.0
BURST_TIMEOUT_S = 240.0  # about 1,000 deliveries a second here, far slower under load
# The pending flag lapses with its wake-up's expiry (CLAIM_EXPIRES_SECONDS), and then the next
# delivery rightly publishes another: no worker takes wake-ups here, and on two cores at load
# 15-20 the burst outlasts that minute. The test gives the flag the burst's whole time, so what
# it counts is the coalescing alone; the lapse is shown on its own at the end.
FLAG_HELD_S = int(BURST_TIMEOUT_S) + 60
DISPATCHER = str(Path(sys.executable).with_name("dispatcher"))


class Receiver:
    def __init__(self, url: str, redis_url: str, prefix: str, log: Path) -> None:
        self.url, self.redis_url, self.prefix, self.log = url, redis_url, prefix, log


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[Receiver]:
    url = isolation.redis_url(isolation.integration_db())
    prefix = f"burst{uuid.uuid4().hex[:8]}"
    client = redis.Redis.from_url(url, decode_responses=True)
    live = threading.Event()

    def advertise() -> None:  # a live worker with free slots, for the whole test
        capacity = Capacity(client, prefix=prefix)
        while not live.wait(1.0):
            capacity.advertise(hostname="w1@test", slots=4, pool="threads",
                               queues=["dispatcher.sessions"])

    Capacity(client, prefix=prefix).advertise(hostname="w1@test", slots=4, pool="threads",
                                              queues=["dispatcher.sessions"])
    advertiser = threading.Thread(target=advertise, daemon=True)
    advertiser.start()
    port = isolation.free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DISPATCHER_", "ANTHROPIC_"))}
    env.update(DISPATCHER_REDIS_URL=url, DISPATCHER_KEY_PREFIX=prefix,
               ANTHROPIC_WEBHOOK_SIGNING_KEY=KEY)
    log = tmp_path / "webhooks.log"
    with log.open("wb") as out:
        process = subprocess.Popen([DISPATCHER, "webhooks", "--port", str(port)], env=env,
                                   stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        yield Receiver(f"http://127.0.0.1:{port}/webhooks", url, prefix, log)
    finally:
        process.terminate()
        process.wait(timeout=10)
        live.set()
        advertiser.join(timeout=5)
        for key in client.scan_iter(f"{prefix}:*"):
            client.delete(key)
        client.close()


def _signed(session_id: str) -> tuple[bytes, dict[str, str]]:
    event = run_started_event(session_id)
    body, now = json.dumps(event), datetime.now(tz=UTC)
    return body.encode(), {"content-type": "application/json", "webhook-id": event["id"],
                           "webhook-timestamp": str(int(now.timestamp())),
                           "webhook-signature": Webhook(KEY).sign(event["id"], now, body)}


def _pending_wakeups(client: redis.Redis, prefix: str) -> int:
    """Wake-up messages waiting in the control queue (every priority list kombu keeps)."""
    queues = client.keys(f"{CeleryKeys(prefix).broker}dispatcher.control*")
    return sum(int(client.llen(q)) for q in queues)


def _burst(url: str, deliveries: list[tuple[bytes, dict[str, str]]]) -> list[int]:
    chunks = [deliveries[i::SENDERS] for i in range(SENDERS)]

    def send(chunk: list[tuple[bytes, dict[str, str]]]) -> list[int]:
        with httpx.Client(timeout=30) as http:
            return [http.post(url, content=body, headers=headers).status_code
                    for body, headers in chunk]

    with ThreadPoolExecutor(SENDERS) as pool:
        return [status for statuses in pool.map(send, chunks) for status in statuses]


def test_a_burst_of_deliveries_leaves_at_most_one_wake_up_pending(receiver: Receiver) -> None:
    client = redis.Redis.from_url(receiver.redis_url, decode_responses=True)
    flag = PollKeys(receiver.prefix).wake_pending
    started = time.monotonic()
    assert _pending_wakeups(client, receiver.prefix) == 1, "the start-up claim"
    assert 0 < client.ttl(flag) <= CLAIM_EXPIRES_SECONDS, "the flag lapses with its wake-up"
    client.expire(flag, FLAG_HELD_S)
    deliveries = [_signed(f"session_{n}") for n in range(BURST)]
    statuses = _burst(receiver.url, deliveries)
    assert time.monotonic() - started < BURST_TIMEOUT_S
    assert statuses == [202] * BURST, {s: statuses.count(s) for s in set(statuses)}
    assert _pending_wakeups(client, receiver.prefix) == 1, "ten thousand deliveries, one wake-up"

    # The wake-up runs (its first step clears the flag): the next delivery publishes the next.
    client.delete(flag)
    for queue in client.keys(f"{CeleryKeys(receiver.prefix).broker}dispatcher.control*"):
        client.delete(queue)
    assert _burst(receiver.url, [_signed("session_after") for _ in range(20)]) == [202] * 20
    assert _pending_wakeups(client, receiver.prefix) == 1

    # A wake-up nobody took lapses with its flag: the next delivery publishes another.
    client.pexpire(flag, 1)
    wait_for(lambda: not client.exists(flag), timeout=5, what="the flag's lapse")
    assert _burst(receiver.url, [_signed("session_lapsed")]) == [202]
    assert _pending_wakeups(client, receiver.prefix) == 2
    client.close()


def test_a_flood_of_refusals_is_logged_sampled(receiver: Receiver) -> None:
    forged = [(body, {**headers, "webhook-signature": "v1,Zm9yZ2Vk"})
              for body, headers in (_signed(f"session_{n}") for n in range(500))]
    began = time.monotonic()
    assert set(_burst(receiver.url, forged)) == {401}
    windows = math.ceil((time.monotonic() - began) / REFUSAL_LOG_SECONDS)

    def refused() -> list[str]:
        return [line for line in receiver.log.read_text().splitlines()
                if "webhook refused" in line]

    # The receiver writes its line after the answer: wait for it, not for a while.
    wait_for(refused, timeout=10, what="the first refusal's log line")
    # The first, then one a window: at most one more per window the burst lasted (one, idle;
    # a burst that takes more than 10 s at load 15-20 may log its second).
    assert 1 <= len(refused()) <= 1 + windows, refused()
